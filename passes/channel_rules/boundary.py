"""Graph boundaries and values that carry no channels of their own.

Model inputs are untracked (their channels are the user's data); anything reaching
the model output is frozen; a parameter used as a tensor (layer scale, position
embedding, class token) carries channels along its last dim; python numbers, sizes
and guards carry none. These are the foundation's own kinds (``OpKind``): the specs
here give them their rules, and list the calls that only ever compute numbers.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fxprune import meta
from fxprune.channels import Layout
from fxprune.ops import Attrs, CanonicalOp, OpKind, canonicalize
from fxprune.passes.channel_rules.base import (
    ChannelEnv,
    SurgeryEnv,
    default_rule,
    nested_nodes,
    op_spec,
)
from fxprune.passes.select_channels import DROP

logger = logging.getLogger(__name__)


@op_spec(OpKind.PLACEHOLDER.value)
def placeholder(op: CanonicalOp, env: ChannelEnv):
    # Model inputs are untracked: their channels are the user's data and never pruned.
    return env.untracked(op.node)


@op_spec(
    OpKind.SCALAR.value,
    ops=(
        "size",
        "dim",
        "numel",
        "getattr",
        "len",
        "sym_size",
        "_guards_fn",
        "_assert_scalar",
        "sym_constrain_range_for_size",
        "scalar_tensor",
    ),
)
def scalar(op: CanonicalOp, env: ChannelEnv):
    return None


@op_spec(OpKind.PARAM.value)
def param(op: CanonicalOp, env: ChannelEnv):
    """A parameter used as a tensor (layer scale, position embedding, class token).

    Its only dim longer than 1 carries channels (a ``(C, 1, 1)`` layer scale), or, when it
    has several, its last dim (``(1, tokens, C)`` position embeddings); dims a
    weight-reading op binds itself are left to it.
    """
    shape = env.shape(op.node)
    dtype = meta.dtype_of(op.node)
    if shape is None or not shape or dtype is None or not dtype.is_floating_point:
        return env.untracked(op.node)  # integer buffers (position ids, masks) carry no channels
    if not op.node.users:
        # Read by nothing here (torch.export keeps a get_attr for every parameter): the
        # model may read it in another mode or branch, so it is no channel of this graph.
        # (timm's EfficientViT reads a cached copy of its attention biases in eval.)
        return env.untracked(op.node)
    users = [canonicalize(u, env.gm) for u in op.node.users]
    if users and all(op.node.target in u.params.values() for u in users):
        return env.untracked(op.node)  # read as a weight (conv, linear, norm, embedding)
    long = [d for d, n in enumerate(shape) if n > 1]
    owned = env.is_buffer(op.node.target) or isinstance(
        env.param_tensor(op.node.target), nn.Parameter
    )
    if len(long) > 1 and not owned:
        # A tensor the trace captured by value, neither parameter nor buffer (a cache the
        # model filled in an earlier forward: timm's EfficientViT keeps its attention biases
        # gathered per head and token pair), with several long dims: which one carries
        # channels would be a guess, so none does.
        return env.untracked(op.node)
    dim = long[0] if len(long) == 1 else _channel_dim_of_param(op.node, shape, long, env)
    if shape[dim] == 1:
        return env.untracked(op.node)
    if env.head_mode == "heads" and env.is_buffer(op.node.target):
        # A per-dim buffer shared by all heads (rotary frequencies): whole heads never remove
        # its dims, and tracking it would tie every head together.
        return env.untracked(op.node)
    atoms = env.param_dim(op.node.target, dim, shape[dim])
    return Layout.along(atoms, dim, len(shape))


def _channel_dim_of_param(node: fx.Node, shape, long: list[int], env: ChannelEnv) -> int:
    """Which of a parameter's long dims carries channels: the one lined up (broadcast from
    the right) with the channel dim of what it is added to or multiplied with, when that is
    known (a ``(1, C, H, W)`` position embedding on an image: dim 1); else the last
    (``(1, tokens, C)``)."""
    for user in node.users:
        for other in user.all_input_nodes:
            lay, other_shape = env.layouts.get(other), env.shape(other)
            if other is node or not isinstance(lay, Layout) or other_shape is None:
                continue
            d = Layout(env.canonical(lay.atoms)).channel_dim()
            if d is None:
                continue
            mine = d - (len(other_shape) - len(shape))
            if mine in long and shape[mine] == other_shape[d]:
                return mine
    return len(shape) - 1


@op_spec(OpKind.OUTPUT.value)
def output(op: CanonicalOp, env: ChannelEnv):
    """What reaches the model output keeps its channels, or with ``pad_outputs`` its shape.

    With ``pad_outputs``, an output whose channels run along one dim and read as zero when
    pruned (``Layout.zero``) is pruned like any other tensor; surgery then puts its kept
    channels back at their positions among zeros (:func:`unprune_channels`), which is
    what the masked original outputs, so callers see the original shape.
    """
    for n in nested_nodes(op.node.args):
        lay = env.layouts.get(n)
        for one in lay if isinstance(lay, list) else [lay]:
            if not isinstance(one, Layout) or not one.is_tracked():
                continue
            dim, why = (
                (None, "one of several results of one node")
                if isinstance(lay, list)
                else _padding_dim(one, env)
            )
            if env.pad_outputs and dim is not None:
                env.padded_outputs.setdefault(n, dim)
                continue
            reason = f" ({why})" if env.pad_outputs else ""
            env.freeze_layout(one, "reaches the model output" + reason)
    return None


def _padding_dim(lay: Layout, env: ChannelEnv) -> tuple[int | None, str]:
    """(the dim along which ``lay``'s pruned channels can be padded back with zeros, '') or
    (None, why they cannot)."""
    dim = Layout(env.canonical(lay.atoms)).channel_dim()
    if dim is None:
        return None, "its channels run along several dims, so zero padding cannot restore its shape"
    if not lay.zero:
        why = "its pruned channels are not zero in the masked original, so padding with zeros would change it"
        return None, why
    return dim, ""


def unprune_channels(x: torch.Tensor, index: Sequence[int], dim: int) -> torch.Tensor:
    """``x`` widened back along ``dim``: position ``i`` is ``x``'s channel ``index[i]``, or
    zero where ``index[i] == x.shape[dim]`` (a pruned channel).

    What surgery puts before a model output pruned with ``pad_outputs=True``: one zero
    channel appended, then a gather (ONNX ``Pad`` and ``Gather``). The index is a graph
    constant, as sizes are, so a later surgery rewrites it and no tensor of the model changes.
    """
    pad = [0, 0] * (x.dim() - 1 - dim) + [0, 1]
    return torch.index_select(F.pad(x, pad), dim, torch.as_tensor(index, device=x.device))


@dataclass(frozen=True)
class UnpruneAttrs(Attrs):
    index: tuple[int, ...]
    dim: int


def _unprune_view(op: CanonicalOp) -> CanonicalOp:
    index = op.arg(1, "index")
    ok = isinstance(index, (list, tuple)) and all(isinstance(i, int) for i in index)
    return op.with_(
        inputs=op.inputs[:1], attrs=UnpruneAttrs(tuple(index) if ok else (), op.arg(2, "dim"))
    )


def _unprune_rewrite(op: CanonicalOp, s: SurgeryEnv) -> None:
    """A later step (Pruner) pruned the channels it reads: point the index at their new places."""
    src = op.inputs[0]
    lay, shape = meta.get(src, meta.LAYOUT), meta.shape_of(src)
    if not isinstance(lay, Layout) or shape is None or not op.attrs.index:
        return
    alive = s.plan.line(lay, op.attrs.dim, shape[op.attrs.dim]) != DROP
    if alive.all():
        return
    op.node.update_arg(1, unprune_index(alive, op.attrs.index))


def unprune_index(alive: np.ndarray, index: Sequence[int] | None = None) -> list[int]:
    """Where each output position reads from once the channels not ``alive`` are gone.

    ``index``: the current one, over the ``len(alive)`` channels it reads (None: a first
    cut, position ``i`` reading channel ``i``). A removed channel reads the zero slot, at
    the new width.
    """
    size = len(alive)
    old = np.arange(size) if index is None else np.asarray(index, dtype=np.int64)
    live = old < size
    live[live] = alive[old[live]]
    new_pos = np.cumsum(alive) - 1
    return np.where(live, new_pos[np.minimum(old, size - 1)], int(alive.sum())).tolist()


@op_spec(
    "unprune_channels", functions=(unprune_channels,), view=_unprune_view, rewrite=_unprune_rewrite
)
def unprune(op: CanonicalOp, env: ChannelEnv):
    """Reads its input's channels like a layer reads its inputs: they may go, as long as they
    are zero when pruned; what it outputs is the original width, so it makes no channels."""
    lay = env.layout(op.inputs[0])
    if lay is None or not op.attrs.index:
        return default_rule(op, env)
    if lay.is_tracked():
        dim, why = _padding_dim(lay, env)
        if dim != op.attrs.dim:
            env.freeze_layout(
                lay, f"read by unprune_channels: {why or 'channels along another dim'}"
            )
    return env.untracked(op.node)
