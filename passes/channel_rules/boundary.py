"""Graph boundaries and values that carry no channels of their own.

Model inputs are untracked (their channels are the user's data); anything reaching
the model output is frozen; a parameter used as a tensor (layer scale, position
embedding, class token) carries channels along its last dim; python numbers, sizes
and guards carry none. These are the foundation's own kinds (``OpKind``): the specs
here give them their rules, and list the calls that only ever compute numbers.
"""

from __future__ import annotations

import logging

from torch import nn

from fxprune import meta
from fxprune.channels import Layout
from fxprune.ops import CanonicalOp, OpKind, canonicalize
from fxprune.passes.channel_rules.base import ChannelEnv, nested_nodes, op_spec

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
    dim = long[0] if len(long) == 1 else len(shape) - 1
    if shape[dim] == 1:
        return env.untracked(op.node)
    if env.head_mode == "heads" and env.is_buffer(op.node.target):
        # A per-dim buffer shared by all heads (rotary frequencies): whole heads never remove
        # its dims, and tracking it would tie every head together.
        return env.untracked(op.node)
    atoms = env.param_dim(op.node.target, dim, shape[dim])
    return Layout.along(atoms, dim, len(shape))


@op_spec(OpKind.OUTPUT.value)
def output(op: CanonicalOp, env: ChannelEnv):
    for n in nested_nodes(op.node.args):
        lay = env.layouts.get(n)
        for one in lay if isinstance(lay, list) else [lay]:
            if isinstance(one, Layout):
                env.freeze_layout(one, "reaches the model output")
    return None
