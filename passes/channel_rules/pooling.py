"""Pooling, resizing and padding: ops over the trailing spatial dims.

They pass channels through unchanged, as long as the channels do not live in the
dims they pool, resize or pad (then the channels are frozen). Padding with a
non-zero constant makes a pruned (zero) channel non-zero.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from torch import nn

from fxprune.channels import NO_ATOM, Layout
from fxprune.ops import Attrs, CanonicalOp
from fxprune.passes.channel_rules.base import ChannelEnv, default_rule, op_spec

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PadAttrs(Attrs):
    """Pad amounts, last dim first (``F.pad`` order: left, right, top, bottom, ...)."""

    pad: tuple[int, ...]


def _pool_view(op: CanonicalOp) -> CanonicalOp:
    if op.module is not None:
        return op.with_(name="pool")
    return op.with_(inputs=op.inputs[:1])


def _pad_view(op: CanonicalOp) -> CanonicalOp:
    if op.module is not None:
        return op.with_(name="pad", attrs=PadAttrs(tuple(op.module.padding)))
    return op.with_(name="pad", inputs=op.inputs[:1], attrs=PadAttrs(tuple(op.arg(1, "pad"))))


@op_spec(
    "pool",
    module_types=(
        nn.MaxPool1d,
        nn.MaxPool2d,
        nn.MaxPool3d,
        nn.AvgPool1d,
        nn.AvgPool2d,
        nn.AvgPool3d,
        nn.AdaptiveAvgPool1d,
        nn.AdaptiveAvgPool2d,
        nn.AdaptiveAvgPool3d,
        nn.AdaptiveMaxPool1d,
        nn.AdaptiveMaxPool2d,
        nn.AdaptiveMaxPool3d,
        nn.Upsample,
        nn.UpsamplingNearest2d,
        nn.UpsamplingBilinear2d,
        nn.LPPool2d,
    ),
    ops=(
        "max_pool1d",
        "max_pool2d",
        "max_pool3d",
        "avg_pool1d",
        "avg_pool2d",
        "avg_pool3d",
        "adaptive_avg_pool1d",
        "adaptive_avg_pool2d",
        "adaptive_avg_pool3d",
        "adaptive_max_pool1d",
        "adaptive_max_pool2d",
        "adaptive_max_pool3d",
        "interpolate",
        "upsample",
        "upsample_nearest2d",
        "upsample_bilinear2d",
        "upsample_bicubic2d",
        "_upsample_bilinear2d_aa",
        "max_pool2d_with_indices",
        "lp_pool2d",
    ),
    view=_pool_view,
)
def pool(op: CanonicalOp, env: ChannelEnv):
    lay = env.layout(op.inputs[0]) if op.inputs else None
    in_shape, out_shape = env.shape(op.inputs[0]) if op.inputs else None, env.shape(op.node)
    if lay is None or out_shape is None or in_shape is None or len(in_shape) != len(out_shape):
        return default_rule(op, env)
    # Pooling and resizing act on the trailing spatial dims; channels must not live there.
    spatial = range(max(1, len(in_shape) - max(len(in_shape) - 2, 1)), len(in_shape))
    if any(lay.atoms.shape[d] > 1 for d in spatial):
        env.freeze_layout(lay, f"'{op.name}' pools over a dim that carries channels")
        return env.untracked(op.node)
    return lay


@op_spec(
    "pad",
    module_types=(
        nn.ZeroPad2d,
        nn.ConstantPad1d,
        nn.ConstantPad2d,
        nn.ConstantPad3d,
        nn.ReflectionPad1d,
        nn.ReflectionPad2d,
        nn.ReplicationPad1d,
        nn.ReplicationPad2d,
    ),
    ops=("pad", "constant_pad_nd", "reflection_pad2d", "replication_pad2d"),
    view=_pad_view,
)
def pad(op: CanonicalOp, env: ChannelEnv):
    lay = env.layout(op.inputs[0])
    shape = env.shape(op.inputs[0])
    amounts = list(op.attrs.pad or ())
    value = op.node.kwargs.get("value", op.node.args[3] if len(op.node.args) > 3 else 0) or 0
    if op.node.op == "call_module" and op.module is not None:
        value = getattr(op.module, "value", 0) or 0
    mode = op.node.kwargs.get("mode", op.node.args[2] if len(op.node.args) > 2 else "constant")
    if op.module is not None and not isinstance(op.module, nn.modules.padding._ConstantPadNd):
        mode = "reflect or replicate"
    atoms, spatial = lay.atoms, False  # spatial: a dim of no channel is padded
    for i in range(0, len(amounts) - 1, 2):
        d = len(shape) - 1 - i // 2
        before, after = amounts[i], amounts[i + 1]
        if not (before or after) or not 0 <= d < len(shape):
            continue
        if atoms.shape[d] == 1:
            spatial = True
            continue
        if mode != "constant" or not (isinstance(before, int) and isinstance(after, int)):
            env.freeze_layout(lay, f"'{mode}' padding along a channel dim")
            return env.untracked(op.node)
        if before < 0 or after < 0:
            env.freeze_layout(lay, "negative padding (a crop) along a channel dim")
            return env.untracked(op.node)
        # A constant block before and after the channels (LiteMLA's column of ones beside
        # v): positions of no channel; the channels shift, and the amounts stay valid.
        block = list(atoms.shape)
        atoms = np.concatenate(
            [
                np.full([*block[:d], before, *block[d + 1 :]], NO_ATOM, dtype=np.int64),
                atoms,
                np.full([*block[:d], after, *block[d + 1 :]], NO_ATOM, dtype=np.int64),
            ],
            axis=d,
        )
    # Padding a spatial dim with a non-zero value makes pruned channels non-zero there.
    return Layout(atoms, lay.zero and (value == 0 or mode != "constant" or not spatial))
