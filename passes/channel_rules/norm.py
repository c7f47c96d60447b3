"""Channel rules for normalisation layers.

BatchNorm and InstanceNorm normalise each channel on its own: their affine
parameters and running statistics join the channel, exactly. LayerNorm, RMSNorm
and GroupNorm normalise across channels: they join too, but removing a channel
changes the statistics, so the group is marked inexact. GroupNorm also ties the
same in-group position across groups, so every group keeps the same size.
"""

from __future__ import annotations

import logging

import numpy as np

from fxprune.channels import Layout
from fxprune.ops import CanonicalOp, OpKind
from fxprune.passes.channel_rules.base import ChannelEnv, default_rule, register

logger = logging.getLogger(__name__)

_STATS = ("weight", "bias", "running_mean", "running_var")


@register(OpKind.NORM)
def norm(op: CanonicalOp, env: ChannelEnv):
    x = op.inputs[0]
    lay, shape = env.layout(x), env.shape(x)
    if lay is None or shape is None:
        return default_rule(op, env)
    kind = op.attrs.get("norm")
    affine = any(
        op.params.get(r) and not op.params[r].startswith("<tensor") for r in ("weight", "bias")
    )
    if kind in ("batch", "instance", "group"):
        cdim = 1 if len(shape) > 1 else 0
        xa = env.dim_atoms(lay, shape, cdim)
        if kind == "group":
            g = int(op.attrs.get("num_groups") or 1)
            per = shape[cdim] // g
            if per > 1:
                grid = xa.reshape(g, per)
                env.table.union(grid[:1], grid)
                env.inexact(xa, f"GroupNorm({g}) normalises across channels")
        for role in _STATS:
            fqn = op.params.get(role)
            if fqn and not fqn.startswith("<tensor"):
                env.param_dim(fqn, 0, shape[cdim], bind=xa)
        return Layout(lay.atoms, lay.zero and (affine or kind == "batch"))
    # layer / rms norm over the trailing normalized_ndim dims
    k = int(op.attrs.get("normalized_ndim") or 1)
    nd = len(shape)
    if any(lay.atoms.shape[d] > 1 for d in range(nd - k, nd)):
        env.inexact(lay.atoms, f"{op.name} normalises across channels")
    for role in ("weight", "bias"):
        fqn = op.params.get(role)
        if not fqn or fqn.startswith("<tensor"):
            continue
        for j in range(k):
            d = nd - k + j
            if lay.atoms.shape[d] > 1:
                bind = env.dim_atoms(lay, shape, d)
            else:
                bind = np.full(shape[d], -1, dtype=np.int64)
            env.param_dim(fqn, j, shape[d], bind=bind)
    return Layout(lay.atoms, lay.zero and affine)
