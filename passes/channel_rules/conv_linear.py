"""Ops with weights: conv (plain, grouped, depthwise), transposed conv, linear, embedding,
and ``addmm`` with a parameter as its second matrix (transformers' ``Conv1D``, GPT-2's
layers: ``addmm(bias, x, weight)`` with the weight stored ``[in, out]``).

A weight's output rows are a *source* of channels (fresh atoms); its input columns
are bound to the channels of the op's input. Grouped convs tie the same in-group
position across groups, so each group keeps the same channels and ``groups`` stays
as it is; depthwise convs tie each output to its input channel (surgery then sets
``groups`` to the new channel count).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from fxprune import meta
from fxprune.channels import Layout
from fxprune.ops import (
    Attrs,
    CanonicalOp,
    ParamRef,
    callable_name,
    module_param,
    param_arg,
    param_shape,
)
from fxprune.passes.channel_rules.base import ChannelEnv, SurgeryEnv, default_rule, op_spec
from fxprune.tensors import get_tensor

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WeightAttrs(Attrs):
    """A weight (``ParamRef``; a computed tensor as its node), a bias, conv ``groups``."""

    weight: ParamRef | fx.Node | None
    bias: ParamRef | fx.Node | None = None
    groups: int = 1


_ATEN_CONV = ("convolution", "_convolution")  # (input, weight, bias, ..., transposed@6, groups@8)


def _groups_pos(node: fx.Node) -> int:
    return 8 if callable_name(node.target) in _ATEN_CONV else 6


def _weight(op: CanonicalOp, env: ChannelEnv):
    ref = op.attrs.weight
    if not isinstance(ref, ParamRef) or isinstance(op.attrs.bias, fx.Node):
        return None, None  # a computed weight or bias cannot be sliced
    return ref.fqn, env.param_tensor(ref.fqn)


def _bind_bias(op: CanonicalOp, env: ChannelEnv, out: np.ndarray) -> None:
    if isinstance(op.attrs.bias, ParamRef):
        env.param_dim(op.attrs.bias.fqn, 0, len(out), bind=out)


# -- views ------------------------------------------------------------------------------------


def _conv_view(op: CanonicalOp) -> CanonicalOp:
    if op.module is not None:
        mod = op.module
        attrs = WeightAttrs(module_param(op, "weight"), module_param(op, "bias"), mod.groups)
        return op.with_(name=op.spec.kind, attrs=attrs)
    attrs = WeightAttrs(
        param_arg(op, 1, "weight"),
        param_arg(op, 2, "bias"),
        op.arg(_groups_pos(op.node), "groups", 1),
    )
    op = op.with_(inputs=[op.node.args[0]], attrs=attrs)
    if op.name in _ATEN_CONV and op.arg(6, "transposed", False):
        return op.with_(spec=conv_transpose.spec, name="conv_transpose")
    return op.with_(name=op.spec.kind)


def _linear_view(op: CanonicalOp) -> CanonicalOp:
    if op.module is not None:
        return op.with_(
            name="linear", attrs=WeightAttrs(module_param(op, "weight"), module_param(op, "bias"))
        )
    attrs = WeightAttrs(param_arg(op, 1, "weight"), param_arg(op, 2, "bias"))
    return op.with_(name="linear", inputs=[op.node.args[0]], attrs=attrs)


def _addmm_view(op: CanonicalOp) -> CanonicalOp:
    """``addmm(bias, x, weight)``: ``x @ weight + bias``, the weight ``[in, out]``."""
    attrs = WeightAttrs(param_arg(op, 2, "mat2"), param_arg(op, 0, "input"))
    return op.with_(name="addmm", inputs=[op.node.args[1]], attrs=attrs)


def _embedding_view(op: CanonicalOp) -> CanonicalOp:
    if op.module is not None:
        return op.with_(name="embedding", attrs=WeightAttrs(module_param(op, "weight")))
    # F.embedding(input, weight) vs aten.embedding(weight, indices)
    w_idx = 0 if isinstance(op.node.target, torch._ops.OpOverload) else 1
    w, idx = op.node.args[w_idx], op.node.args[1 - w_idx]
    weight = ParamRef(w.target) if isinstance(w, fx.Node) and w.op == "get_attr" else w
    return op.with_(name="embedding", inputs=[idx], attrs=WeightAttrs(weight))


# -- rewrites after surgery -------------------------------------------------------------------


def _conv_rewrite(op: CanonicalOp, s: SurgeryEnv) -> None:
    if op.node.op == "call_module":
        _update_conv_module(op, s)
        return
    # A functional depthwise conv (one group per channel) gets the new channel count.
    groups = int(op.attrs.groups or 1)
    x = op.inputs[0]
    old, new = s.old_shape(x), s.new_shape(x)
    # The weight may be a buffer (timm's BlurPool2d filter) as well as a parameter.
    w = get_tensor(s.gm, op.attrs.weight.fqn) if isinstance(op.attrs.weight, ParamRef) else None
    if groups == 1 or old is None or new is None or w is None:
        return
    cdim = len(old) - (w.dim() - 1)
    if old[cdim] == groups and new[cdim] != old[cdim]:
        pos = _groups_pos(op.node)
        if len(op.node.args) > pos:
            args = list(op.node.args)
            args[pos] = new[cdim]
            op.node.args = tuple(args)
        else:
            op.node.kwargs = {**op.node.kwargs, "groups": new[cdim]}


def _update_conv_module(op: CanonicalOp, s: SurgeryEnv) -> None:
    if op.node.op != "call_module":
        return
    mod = s.gm.get_submodule(op.node.target)
    w = mod.weight
    if mod.transposed:
        mod.in_channels = w.shape[0]
        mod.out_channels = w.shape[1] * mod.groups
        return
    x = op.node.args[0] if op.node.args else None
    if mod.groups > 1 and mod.groups == mod.in_channels and s.new_shape(x) is not None:
        mult = mod.out_channels // mod.groups
        mod.groups = w.shape[0] // mult
    mod.in_channels = w.shape[1] * mod.groups
    mod.out_channels = w.shape[0]


def _linear_rewrite(op: CanonicalOp, s: SurgeryEnv) -> None:
    if op.node.op == "call_module":
        mod = s.gm.get_submodule(op.node.target)
        mod.in_features, mod.out_features = mod.weight.shape[1], mod.weight.shape[0]


def _embedding_rewrite(op: CanonicalOp, s: SurgeryEnv) -> None:
    if op.node.op == "call_module":
        mod = s.gm.get_submodule(op.node.target)
        mod.embedding_dim = mod.weight.shape[1]


# -- MACs -------------------------------------------------------------------------------------


def _conv_macs(op: CanonicalOp, gm: fx.GraphModule, shape) -> int:
    out = shape(op.node)
    w = param_shape(gm, op.attrs.weight)
    x = shape(op.inputs[0])
    if w is None or out is None or x is None:
        return 0
    k = math.prod(w[2:])
    cdim = len(x) - (len(w) - 1)
    groups = int(op.attrs.groups or 1)
    old_x = meta.shape_of(op.inputs[0])
    if groups > 1 and old_x is not None and old_x[cdim] == groups:
        groups = x[cdim]  # depthwise stays depthwise after pruning
    if op.kind == "conv":
        return math.prod(out) * (x[cdim] // groups) * k
    return math.prod(x) * (out[cdim] // groups) * k


def _linear_macs(op: CanonicalOp, gm: fx.GraphModule, shape) -> int:
    out, x = shape(op.node), shape(op.inputs[0])
    return math.prod(out) * x[-1] if out and x else 0


# -- the ops ----------------------------------------------------------------------------------


@op_spec(
    "conv",
    modules=(nn.Conv1d, nn.Conv2d, nn.Conv3d),
    ops=("conv1d", "conv2d", "conv3d", *_ATEN_CONV),
    view=_conv_view,
    rewrite=_conv_rewrite,
    macs=_conv_macs,
)
def conv(op: CanonicalOp, env: ChannelEnv):
    fqn, w = _weight(op, env)
    x = op.inputs[0]
    lay, shape = env.layout(x), env.shape(x)
    out_shape = env.shape(op.node)
    if w is None or lay is None or shape is None or out_shape is None:
        return default_rule(op, env)
    groups = int(op.attrs.groups or 1)
    cdim = len(shape) - (w.dim() - 1)  # batched (N, C, ...) or unbatched (C, ...)
    if _positions_carry_channels(lay, cdim):
        if _pointwise(op, w, shape, out_shape, cdim):
            return _channels_pass_through(op, env, fqn, w, lay)
        return default_rule(op, env, "a conv mixes positions along a dim that carries channels")
    c_out, c_in_g = w.shape[0], w.shape[1]
    xa = env.dim_atoms(lay, shape, cdim)
    if not lay.zero:
        env.inexact(xa, "conv reads channels that are non-zero when pruned")
    out = env.param_dim(fqn, 0, c_out)
    if groups == 1:
        env.param_dim(fqn, 1, c_in_g, bind=xa)
    elif c_in_g == 1:
        # Depthwise (with channel multiplier): each output row belongs to its input channel.
        mult = c_out // groups
        env.table.union(out.reshape(groups, mult), xa.reshape(groups, 1))
        env.table.freeze(
            np.where(xa < 0, out.reshape(groups, mult)[:, 0], -1),
            f"depthwise conv reads untracked channels ({env.where})",
        )
    else:
        # Grouped: every group must keep the same in-group positions (columns).
        grid_in = xa.reshape(groups, c_in_g)
        env.table.union(grid_in[:1], grid_in)
        env.param_dim(fqn, 1, c_in_g, bind=grid_in[0])
        env.in_group_dims.add((env.canonical_param(fqn), 1))
        grid_out = out.reshape(groups, c_out // groups)
        env.table.union(grid_out[:1], grid_out)
        env.note_grouped(out, groups)
    _bind_bias(op, env, out)
    return Layout.along(out, cdim, len(out_shape))


def _positions_carry_channels(lay: Layout, cdim: int) -> bool:
    """Channels along a spatial dim (after ``cdim``), none along the conv's own channel dim:
    CoaT's aggregate, a 1x1 conv1d over (batch, class tokens, channels)."""
    a = lay.atoms
    if a.ndim <= cdim or any(n > 1 for n in a.shape[: cdim + 1]):
        return False
    return any(n > 1 for n in a.shape[cdim + 1 :])


def _pointwise(op: CanonicalOp, w: torch.Tensor, shape, out_shape, cdim: int) -> bool:
    """A 1x1 (1, 1x1x1) kernel with stride 1 and no padding: each output position is its
    input position, mixed across the conv's channels only."""
    if any(k != 1 for k in w.shape[2:]) or tuple(out_shape[cdim + 1 :]) != tuple(shape[cdim + 1 :]):
        return False
    if op.module is not None:
        stride, padding = op.module.stride, op.module.padding
    else:
        stride, padding = op.arg(3, "stride", 1), op.arg(4, "padding", 0)
    ones = stride if isinstance(stride, (tuple, list)) else (stride,)
    pads = padding if isinstance(padding, (tuple, list)) else (padding,)
    return all(v == 1 for v in ones) and (padding in ("valid", "same") or all(v == 0 for v in pads))


_STD_CONVS = tuple(
    f"timm.layers.std_conv.{name}"
    for name in ("StdConv2d", "StdConv2dSame", "ScaledStdConv2d", "ScaledStdConv2dSame")
)


def _std_conv_view(op: CanonicalOp) -> CanonicalOp:
    mod = op.module
    attrs = WeightAttrs(module_param(op, "weight"), module_param(op, "bias"), mod.groups)
    return op.with_(name="conv", attrs=attrs)


@op_spec(
    "conv",
    leaf_modules=_STD_CONVS,
    view=_std_conv_view,
    rewrite=_update_conv_module,
    macs=_conv_macs,
)
def std_conv(op: CanonicalOp, env: ChannelEnv):
    """timm's weight-standardised convs (NFNets, BiT): each filter is standardised over its
    input positions before the conv, so an output channel is its own (exact), while an
    input channel enters every filter's mean and variance (inexact); ``gain`` scales each
    output channel."""
    out = conv(op, env)
    if not isinstance(out, Layout) or not out.is_tracked():
        return out
    x = op.inputs[0]
    lay, shape = env.layout(x), env.shape(x)
    if lay is not None and shape is not None and lay.is_tracked():
        cdim = len(shape) - 3
        env.inexact(
            env.dim_atoms(lay, shape, cdim),
            "weight standardisation normalises each filter over its input channels",
        )
    gain = module_param(op, "gain")
    if isinstance(gain, ParamRef):
        rows = env.dim_atoms(out, env.shape(op.node), len(env.shape(op.node)) - 3)
        env.param_dim(gain.fqn, 0, len(rows), bind=rows)
    return out


@op_spec(
    "conv_transpose",
    modules=(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d),
    ops=("conv_transpose1d", "conv_transpose2d", "conv_transpose3d"),
    view=_conv_view,
    rewrite=_update_conv_module,
    macs=_conv_macs,
)
def conv_transpose(op: CanonicalOp, env: ChannelEnv):
    fqn, w = _weight(op, env)
    x = op.inputs[0]
    lay, shape = env.layout(x), env.shape(x)
    out_shape = env.shape(op.node)
    if (
        w is None
        or lay is None
        or shape is None
        or out_shape is None
        or int(op.attrs.groups or 1) != 1
    ):
        return default_rule(op, env)
    cdim = len(shape) - (w.dim() - 1)
    xa = env.dim_atoms(lay, shape, cdim)
    env.param_dim(fqn, 0, w.shape[0], bind=xa)
    out = env.param_dim(fqn, 1, w.shape[1])
    _bind_bias(op, env, out)
    return Layout.along(out, cdim, len(out_shape))


@op_spec(
    "linear",
    modules=(nn.Linear,),
    ops=("linear",),
    view=_linear_view,
    rewrite=_linear_rewrite,
    macs=_linear_macs,
)
def linear(op: CanonicalOp, env: ChannelEnv):
    """``x @ W.T + b``. The bias may be computed (BEiT, EVA-02 and Swin-V2 build the qkv
    bias as ``cat(q_bias, zero k_bias, v_bias)`` and call ``F.linear``): it is then added
    element-wise, its channels tied to the output rows, as any added tensor's are."""
    ref, bias = op.attrs.weight, op.attrs.bias
    if not isinstance(ref, ParamRef):
        if isinstance(ref, fx.Node):
            why = "linear with a computed weight (not a parameter): its rows cannot be sliced"
            return default_rule(op, env, why)
        return default_rule(op, env)
    fqn, w = ref.fqn, env.param_tensor(ref.fqn)
    x = op.inputs[0]
    lay, shape = env.layout(x), env.shape(x)
    out_shape = env.shape(op.node)
    if lay is None or shape is None or out_shape is None:
        return default_rule(op, env)
    if isinstance(bias, fx.Node):
        blay, bshape = env.layout(bias), env.shape(bias)
        if blay is None or bshape is None or tuple(bshape) != (w.shape[0],):
            why = "linear with a computed bias that is not one value per output row"
            return default_rule(op, env, why)
    if _rows_carry_channels(lay):
        if isinstance(bias, fx.Node):
            return default_rule(op, env, "linear over tokens with a computed bias")
        return _channels_pass_through(op, env, fqn, w, lay)
    xa = env.dim_atoms(lay, shape, len(shape) - 1)
    if not lay.zero:
        env.inexact(xa, "linear reads channels that are non-zero when pruned")
    env.param_dim(fqn, 1, w.shape[1], bind=xa)
    out = env.param_dim(fqn, 0, w.shape[0])
    if isinstance(bias, fx.Node):
        out = env.unify([(Layout.along(out, 0, 1), (len(out),)), (blay, bshape)], bshape)
    else:
        _bind_bias(op, env, out)
    return Layout.along(out, len(out_shape) - 1, len(out_shape))


@op_spec("linear_t", ops=("addmm",), view=_addmm_view, macs=_linear_macs)
def addmm(op: CanonicalOp, env: ChannelEnv):
    """A linear whose weight is stored transposed: input columns are dim 0, outputs dim 1.

    Only the 2-D case with a parameter weight (and a parameter or no bias) is sliced; a
    computed matrix, a bias that is not a vector, or any other layout is frozen.
    """
    fqn, w = _weight(op, env)
    x = op.inputs[0]
    lay, shape = env.layout(x), env.shape(x)
    out_shape = env.shape(op.node)
    bias = op.attrs.bias
    bias_shape = env.shape(op.node.args[0]) if isinstance(op.node.args[0], fx.Node) else None
    if (
        w is None
        or w.dim() != 2
        or lay is None
        or shape is None
        or out_shape is None
        or len(shape) != 2
        or (isinstance(bias, ParamRef) and (bias_shape is None or len(bias_shape) != 1))
    ):
        return default_rule(op, env)
    xa = env.dim_atoms(lay, shape, 1)
    if not lay.zero:
        env.inexact(xa, "addmm reads channels that are non-zero when pruned")
    env.param_dim(fqn, 0, w.shape[0], bind=xa)
    out = env.param_dim(fqn, 1, w.shape[1])
    _bind_bias(op, env, out)
    return Layout.along(out, 1, 2)


def _rows_carry_channels(lay: Layout) -> bool:
    """Channels on a leading dim, the last dim (what the linear reads) not a channel dim:
    gMLP's spatial gate, a linear over tokens of a (batch, channels, tokens) tensor."""
    a = lay.atoms
    return a.ndim >= 2 and a.shape[-1] == 1 and any(n > 1 for n in a.shape[:-1])


def _channels_pass_through(
    op: CanonicalOp, env: ChannelEnv, fqn: str, w: torch.Tensor, lay: Layout
) -> Layout:
    """The channels sit on dims the layer maps one position at a time (a linear over the
    tokens of a (batch, channels, tokens) tensor, a pointwise conv over (batch, tokens,
    channels)): they pass through, and the weight's rows and columns, which index the
    layer's own (untracked) dims, stay whole. A bias makes a pruned (zero) position non-zero."""
    env.param_dim(fqn, 0, w.shape[0], bind=np.full(w.shape[0], -1, dtype=np.int64))
    env.param_dim(fqn, 1, w.shape[1], bind=np.full(w.shape[1], -1, dtype=np.int64))
    if isinstance(op.attrs.bias, ParamRef):
        env.param_dim(op.attrs.bias.fqn, 0, w.shape[0], bind=np.full(w.shape[0], -1))
    return Layout(lay.atoms, lay.zero and op.attrs.bias is None)


@op_spec(
    "embedding",
    modules=(nn.Embedding,),
    ops=("embedding",),
    view=_embedding_view,
    rewrite=_embedding_rewrite,
)
def embedding(op: CanonicalOp, env: ChannelEnv):
    ref = op.attrs.weight
    out_shape = env.shape(op.node)
    if not isinstance(ref, ParamRef) or out_shape is None:
        return default_rule(op, env)
    w = env.param_tensor(ref.fqn)
    out = env.param_dim(ref.fqn, 1, w.shape[1])
    return Layout.along(out, len(out_shape) - 1, len(out_shape))
