"""PadChannelsPass: grow channel counts up to a multiple of ``round_to`` with zero channels.

Lossless and data-free, for targets where aligned counts are faster (fp16 tensor cores work
in tiles of 8 channels): a group of 60 channels becomes 64, the 4 new ones zero all the way,
so the output is unchanged. A new channel is appended to every member of the group: zero
rows (and bias) in the producing conv/linear, zero columns in the reading conv/linear, and in
each batch norm weight 0, bias 0, running mean 0, running variance 1, which maps the zero
input to zero.

Only groups where that provably holds are grown; the rest stay as they are:

* the group is exact, prunable (not a graph input or output), of plain channels;
* every member is a conv/linear weight or bias (not grouped, not transposed) or a batch
  norm's vector, and every tensor of the group keeps a zero channel zero (``Layout.zero``:
  no ``sigmoid``, no ``+ 1``);
* every op the group's channels go through is a conv, linear, batch norm, elementwise op,
  pooling, identity or ``flatten``: nothing whose arguments hold a channel count (a
  ``view(1, 60)`` or a split into sizes would need rewriting, so such groups stay).

Module size attributes (``out_channels``, ``num_features``, ...) are updated and shapes
propagated again. Writes the ``padded_channels`` artifact: {group id: channels added}.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.fx as fx
from torch import nn

from fxprune import meta
from fxprune.artifacts import CHANNELS, GROUPS, PADDED_CHANNELS
from fxprune.channels import Layout, PruneGroup
from fxprune.ops import CanonicalOp, callable_name
from fxprune.pass_infra import Pass, PassContext, PassResult
from fxprune.tensors import get_tensor, set_tensor
from fxprune.trace import flat_inputs, propagate_shapes

logger = logging.getLogger(__name__)

_CHANNEL_KINDS = frozenset({"conv", "linear", "norm", "elementwise", "identity", "pool"})
_BN_FILL = {"weight": 0.0, "bias": 0.0, "running_mean": 0.0, "running_var": 1.0}


class PadChannelsPass(Pass):
    """Grow every group that can be grown losslessly to a multiple of ``round_to``."""

    requires = (CHANNELS, GROUPS)
    provides = (PADDED_CHANNELS,)

    def __init__(self, round_to: int = 8) -> None:
        if not isinstance(round_to, int) or round_to < 1:
            raise ValueError(f"round_to must be a positive int, got {round_to!r}")
        self.round_to = round_to

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        padded: dict[int, int] = {}
        if self.round_to > 1:
            roles = _roles(gm, ctx[CHANNELS].param_alias)
            for g in ctx[GROUPS]:
                extra = math.ceil(g.size / self.round_to) * self.round_to - g.size
                if extra and _can_grow(gm, g, roles):
                    _grow(gm, g, roles, extra)
                    padded[g.id] = extra
        ctx[PADDED_CHANNELS] = padded
        if not padded:
            return PassResult(gm, False)
        for node in gm.graph.nodes:
            if node.op == "call_module":
                _update_sizes(gm.get_submodule(node.target))
        propagate_shapes(gm, flat_inputs(gm, ctx.example_inputs))
        logger.info("padded %d groups with %d zero channels", len(padded), sum(padded.values()))
        return PassResult(gm, True)


def _roles(gm: fx.GraphModule, alias: dict[str, str]) -> dict[tuple[str, int], str]:
    """(parameter, dim) -> "rows", "bias", "columns" or "bn.<name>"; only the growable ones."""
    roles: dict[tuple[str, int], str] = {}
    for node in gm.graph.nodes:
        op = meta.get(node, meta.OP)
        if not isinstance(op, CanonicalOp):
            continue
        params = {role: alias.get(fqn, fqn) for role, fqn in op.params.items()}
        if op.kind in ("conv", "linear"):
            if int(getattr(op.attrs, "groups", 1) or 1) != 1 or _transposed(op):
                continue
            if "weight" in params:
                roles[(params["weight"], 0)] = "rows"
                roles[(params["weight"], 1)] = "columns"
            if "bias" in params:
                roles[(params["bias"], 0)] = "bias"
        elif op.kind == "norm" and getattr(op.attrs, "norm", None) == "batch":
            for role, fqn in params.items():
                if role in _BN_FILL:
                    roles[(fqn, 0)] = f"bn.{role}"
    return roles


def _transposed(op: CanonicalOp) -> bool:
    if callable_name(op.node.target) in ("convolution", "_convolution"):
        return bool(op.arg(6, "transposed", False))
    return isinstance(op.module, nn.modules.conv._ConvTransposeNd)


def _can_grow(gm: fx.GraphModule, g: PruneGroup, roles: dict) -> bool:
    if not (g.prunable and g.exact and g.structure == "channels" and g.units == 1):
        return False
    for m in g.members:
        if (m.param, m.dim) not in roles or not bool((m.index_map >= 0).all()):
            return False  # a member only part of which is this group: positions interleave
    names = set(g.nodes)
    for node in gm.graph.nodes:
        if node.name not in names:
            continue
        lay = meta.get(node, meta.LAYOUT)
        if not isinstance(lay, Layout) or not lay.zero:
            return False
        op = meta.get(node, meta.OP)
        kind = op.kind if isinstance(op, CanonicalOp) else None
        if kind == "norm" and getattr(op.attrs, "norm", None) != "batch":
            return False
        if kind not in _CHANNEL_KINDS and not _is_flatten(gm, node):
            return False
    return True


def _is_flatten(gm: fx.GraphModule, node: fx.Node) -> bool:
    """``flatten`` (function, method or ``nn.Flatten``): no channel count among its args."""
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), nn.Flatten)
    if node.op == "call_method":
        return node.target == "flatten"
    return node.op == "call_function" and callable_name(node.target) == "flatten"


def _grow(gm: fx.GraphModule, g: PruneGroup, roles: dict, extra: int) -> None:
    cache: dict[int, torch.Tensor] = {}
    for m in g.members:
        t = get_tensor(gm, m.param)
        role = roles[(m.param, m.dim)]
        fill = _BN_FILL[role[3:]] if role.startswith("bn.") else 0.0
        shape = list(t.shape)
        shape[m.dim] = extra
        pad = torch.full(shape, fill, dtype=t.dtype, device=t.device)
        set_tensor(gm, m.param, torch.cat([t.detach(), pad], m.dim), cache)


def _update_sizes(module: nn.Module) -> None:
    """Size attributes of a conv, linear or batch norm from its (grown) weights."""
    w = getattr(module, "weight", None)
    if isinstance(module, nn.modules.conv._ConvNd) and w is not None and module.groups == 1:
        module.out_channels, module.in_channels = w.shape[0], w.shape[1]
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, nn.modules.batchnorm._BatchNorm):
        ref = w if w is not None else module.running_mean
        if ref is not None:
            module.num_features = ref.shape[0]
