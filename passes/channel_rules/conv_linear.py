"""Channel rules for ops with weights: conv (plain, grouped, depthwise), transposed
conv, linear, embedding.

A weight's output rows are a *source* of channels (fresh atoms); its input columns
are bound to the channels of the op's input. Grouped convs tie the same in-group
position across groups, so each group keeps the same channels and ``groups`` stays
as it is; depthwise convs tie each output to its input channel.
"""

from __future__ import annotations

import logging

import numpy as np

from fxprune.channels import Layout
from fxprune.ops import CanonicalOp, OpKind
from fxprune.passes.channel_rules.base import ChannelEnv, default_rule, register

logger = logging.getLogger(__name__)


def _weight(op: CanonicalOp, env: ChannelEnv):
    fqn = op.params.get("weight")
    if fqn is None or fqn.startswith("<tensor"):
        return None, None
    return fqn, env.param_tensor(fqn)


@register(OpKind.CONV)
def conv(op: CanonicalOp, env: ChannelEnv):
    fqn, w = _weight(op, env)
    x = op.inputs[0]
    lay, shape = env.layout(x), env.shape(x)
    out_shape = env.shape(op.node)
    if w is None or lay is None or shape is None or out_shape is None:
        return default_rule(op, env)
    groups = int(op.attrs.get("groups") or 1)
    cdim = len(shape) - (w.dim() - 1)  # batched (N, C, ...) or unbatched (C, ...)
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
        grid_out = out.reshape(groups, c_out // groups)
        env.table.union(grid_out[:1], grid_out)
        env.note_grouped(out, groups)
    if op.params.get("bias"):
        env.param_dim(op.params["bias"], 0, c_out, bind=out)
    return Layout.along(out, cdim, len(out_shape))


@register(OpKind.CONV_TRANSPOSE)
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
        or int(op.attrs.get("groups") or 1) != 1
    ):
        return default_rule(op, env)
    cdim = len(shape) - (w.dim() - 1)
    xa = env.dim_atoms(lay, shape, cdim)
    env.param_dim(fqn, 0, w.shape[0], bind=xa)
    out = env.param_dim(fqn, 1, w.shape[1])
    if op.params.get("bias"):
        env.param_dim(op.params["bias"], 0, w.shape[1], bind=out)
    return Layout.along(out, cdim, len(out_shape))


@register(OpKind.LINEAR)
def linear(op: CanonicalOp, env: ChannelEnv):
    fqn, w = _weight(op, env)
    x = op.inputs[0]
    lay, shape = env.layout(x), env.shape(x)
    out_shape = env.shape(op.node)
    if w is None or lay is None or shape is None or out_shape is None:
        return default_rule(op, env)
    xa = env.dim_atoms(lay, shape, len(shape) - 1)
    if not lay.zero:
        env.inexact(xa, "linear reads channels that are non-zero when pruned")
    env.param_dim(fqn, 1, w.shape[1], bind=xa)
    out = env.param_dim(fqn, 0, w.shape[0])
    if op.params.get("bias"):
        env.param_dim(op.params["bias"], 0, w.shape[0], bind=out)
    return Layout.along(out, len(out_shape) - 1, len(out_shape))


@register(OpKind.EMBEDDING)
def embedding(op: CanonicalOp, env: ChannelEnv):
    fqn = op.params.get("weight")
    out_shape = env.shape(op.node)
    if fqn is None or out_shape is None:
        return default_rule(op, env)
    w = env.param_tensor(fqn)
    out = env.param_dim(fqn, 1, w.shape[1])
    return Layout.along(out, len(out_shape) - 1, len(out_shape))
