"""DeadChannelPass: select the channels whose weights make them provably zero.

Lossless and data-free. A channel of an exact, prunable group is *dead* when removing it
cannot change the output. The prune oracle's claim is that a pruned model computes what
the *masked original* computes (every member slice of the removed channels set to zero);
so a channel is dead when the original already computes what its masked version does:

- every member slice of the channel is zero; or
- its producers are zero (conv/linear rows and their bias, and every other member that
  is neither a reader nor a batch norm's), every batch norm on the way maps a zero input
  to zero at that channel (``bias - mean * weight / sqrt(var + eps) == 0``, in eval mode),
  and every tensor of the group keeps a zero channel zero (``Layout.zero``): then the
  channel is zero wherever it is read, and the readers (conv/linear input columns) may
  hold anything; or
- nobody reads it: its readers (conv/linear input columns) are zero, and every use of
  every tensor of the group is another tensor of the group or such a reader (no graph
  output, no reduction or matmul over the channel, no opaque module). Then its producers
  may hold anything: what they compute is multiplied by zero.

Anything else (transposed convs, other norms, grouped structures) must be zero in every
member. The pass only writes a selection (``1`` keep, ``0`` drop); ``PlanChannelsPass`` and
``SurgeryPass`` cut. ``round_to`` keeps a multiple of that many channels per group (the
extra ones are dead, so zero: padding for fp16 tensor cores).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F

from fxprune import meta
from fxprune.artifacts import CHANNELS, DEAD_CHANNELS, GROUPS, SELECTION, SELECTION_NOTES
from fxprune.channels import Layout, PruneGroup
from fxprune.ops import CanonicalOp, ParamRef, callable_name
from fxprune.oracle import tensor_at
from fxprune.pass_infra import Pass, PassContext, PassResult
from fxprune.passes.select_channels import DROP, KEEP, SelectChannelsPass

logger = logging.getLogger(__name__)

_READER, _PRODUCER = "reader", "producer"
_TRANSPOSED_ARG = (
    6  # aten.convolution(input, weight, bias, stride, padding, dilation, transposed, ...)
)


@dataclass(frozen=True)
class _NormZero:
    """The channels (positions of dim 0) where a batch norm maps a zero input to zero."""

    zero: torch.Tensor  # bool, one per position
    input: fx.Node


def _roles(gm: fx.GraphModule, alias: dict[str, str]) -> dict[tuple[str, int], object]:
    """(parameter, dim) -> _READER, _PRODUCER or a _NormZero; unlisted dims must be zero."""
    roles: dict[tuple[str, int], object] = {}
    for node in gm.graph.nodes:
        op = meta.get(node, meta.OP)
        if not isinstance(op, CanonicalOp):
            continue
        params = {role: alias.get(fqn, fqn) for role, fqn in op.params.items()}
        dims = _weight_dims(op)
        if dims is not None:
            if "weight" in params:
                roles[(params["weight"], dims[0])] = _PRODUCER
                roles[(params["weight"], dims[1])] = _READER
            if "bias" in params:
                roles[(params["bias"], 0)] = _PRODUCER
        elif op.kind == "norm" and getattr(op.attrs, "norm", None) == "batch" and op.inputs:
            zero = _batch_norm_zero(gm, op)
            if zero is not None:
                for fqn in params.values():
                    roles[(fqn, 0)] = _NormZero(zero, op.inputs[0])
    return roles


def _weight_dims(op: CanonicalOp) -> tuple[int, int] | None:
    """(output dim, input dim) of the weight of a conv or linear, or None for other ops."""
    if op.kind in ("conv", "linear") and not _transposed(op):
        return 0, 1
    if op.kind == "linear_t":  # addmm(bias, x, weight[in, out]): transformers' Conv1D
        return 1, 0
    return None


def _transposed(op: CanonicalOp) -> bool:
    if callable_name(op.node.target) in ("convolution", "_convolution"):
        return bool(op.arg(_TRANSPOSED_ARG, "transposed", False))
    return False


def _batch_norm_zero(gm: fx.GraphModule, op: CanonicalOp) -> torch.Tensor | None:
    """Where the batch norm maps 0 to exactly 0 (computed by the kernel itself), or None."""
    a = op.attrs
    refs = {r: getattr(a, r) for r in ("weight", "bias", "running_mean", "running_var")}
    if any(isinstance(v, fx.Node) for v in refs.values()):
        return None  # a computed statistic or affine: nothing to prove it with
    t = {r: tensor_at(gm, v.fqn) if isinstance(v, ParamRef) else None for r, v in refs.items()}
    # The norm spec's view (passes/channel_rules/norm.py) reads the mode and eps.
    training = bool(a.training) or t["running_mean"] is None
    eps = a.eps if a.eps is not None else 1e-5
    if training:  # batch statistics of a zero channel are zero: the output is the bias
        bias = t["bias"]
        if bias is None:
            return None if t["weight"] is None else torch.ones(len(t["weight"]), dtype=torch.bool)
        return bias == 0
    mean, var = t["running_mean"], t["running_var"]
    with torch.no_grad():
        out = F.batch_norm(
            torch.zeros(1, len(mean), dtype=mean.dtype, device=mean.device),
            mean,
            var,
            t["weight"],
            t["bias"],
            False,
            0.0,
            eps,
        )
    return (out[0] == 0).cpu()


def _nonzero_channels(
    t: torch.Tensor, dim: int, index_map: torch.Tensor, size: int
) -> torch.Tensor:
    """Per group channel: does any of its positions of ``t`` along ``dim`` hold a nonzero?"""
    rows = t.detach().movedim(dim, 0).reshape(t.shape[dim], -1).ne(0).any(1).cpu()
    return _per_channel(rows, index_map, size)


def _per_channel(rows: torch.Tensor, index_map: torch.Tensor, size: int) -> torch.Tensor:
    """Any-reduce a per-position flag to the group's channels."""
    index_map = torch.as_tensor(index_map)
    valid = index_map >= 0
    out = torch.zeros(size, dtype=torch.int64)
    out.index_add_(0, index_map[valid], rows[valid].long())
    return out > 0


class DeadChannelPass(Pass):
    """Drop the provably dead channels of every exact prunable group (see the module doc)."""

    requires = (CHANNELS, GROUPS)
    provides = (SELECTION, SELECTION_NOTES, DEAD_CHANNELS)

    def __init__(self, round_to: int = 1) -> None:
        if not isinstance(round_to, int) or round_to < 1:
            raise ValueError(f"round_to must be a positive int, got {round_to!r}")
        self.round_to = round_to

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        env, groups = ctx[CHANNELS], ctx[GROUPS]
        roles = _roles(gm, env.param_alias)
        selection: dict[int, torch.Tensor] = {}
        notes: dict[int, str] = {}
        found: dict[int, int] = {}
        for g in groups:
            if not (g.prunable and g.exact and g.structure == "channels"):
                continue
            dead = self._dead(gm, g, roles, env.param_alias)
            if not dead.any():
                continue
            state = torch.where(dead, DROP, KEEP).to(torch.int8)
            self._align(state, notes, g)
            found[g.id] = int((state == DROP).sum())
            selection[g.id] = state
        scores = {gid: (s != DROP).double() for gid, s in selection.items()}
        SelectChannelsPass._never_empty(gm, ctx, groups, selection, scores, notes)
        selection = {gid: s for gid, s in selection.items() if (s == DROP).any()}
        ctx[SELECTION] = selection
        ctx[SELECTION_NOTES] = notes
        ctx[DEAD_CHANNELS] = {gid: int((s == DROP).sum()) for gid, s in selection.items()}
        if selection:
            logger.info(
                "dead channels: %d in %d groups",
                sum(ctx[DEAD_CHANNELS].values()),
                len(selection),
            )
        return PassResult(gm, False)

    def _dead(self, gm: fx.GraphModule, g: PruneGroup, roles: dict, alias: dict) -> torch.Tensor:
        all_zero = torch.ones(g.size, dtype=torch.bool)  # every member slice is zero
        sources_zero = torch.ones(g.size, dtype=torch.bool)  # all but readers and norms
        norms_ok = torch.ones(g.size, dtype=torch.bool)
        readers_zero = torch.ones(g.size, dtype=torch.bool)
        readers = set()  # (param, dim) of the group's reader slices
        for m in g.members:
            t = tensor_at(gm, m.param)
            if t is None:
                return torch.zeros(g.size, dtype=torch.bool)
            nonzero = _nonzero_channels(t, m.dim, m.index_map, g.size)
            all_zero &= ~nonzero
            role = roles.get((alias.get(m.param, m.param), m.dim))
            if role == _READER:
                readers_zero &= ~nonzero
                readers.add((alias.get(m.param, m.param), m.dim))
                continue
            if isinstance(role, _NormZero):
                if len(role.zero) == len(m.index_map):
                    norms_ok &= ~_per_channel(~role.zero, m.index_map, g.size)
                else:
                    norms_ok &= ~nonzero
                continue
            sources_zero &= ~nonzero
        zero_on_the_way = sources_zero & norms_ok
        if zero_on_the_way.any() and not self._keeps_zero(gm, g):
            zero_on_the_way[:] = False
        unread = readers_zero if readers else torch.zeros(g.size, dtype=torch.bool)
        if unread.any() and not self._read_only_by(gm, g, readers, alias):
            unread[:] = False
        return all_zero | zero_on_the_way | unread

    @staticmethod
    def _read_only_by(gm: fx.GraphModule, g: PruneGroup, readers: set, alias: dict) -> bool:
        """Every use of every tensor of the group is another tensor of the group or a
        conv/linear that reads the channel through one of ``readers`` (its input columns)."""
        names = set(g.nodes)
        for node in gm.graph.nodes:
            if node.name not in names:
                continue
            for user in node.users:
                if user.name in names:
                    continue
                op = meta.get(user, meta.OP)
                dims = _weight_dims(op) if isinstance(op, CanonicalOp) else None
                weight = op.params.get("weight") if dims is not None else None
                if weight is None or (alias.get(weight, weight), dims[1]) not in readers:
                    return False
                if not op.inputs or op.inputs[0] is not node:
                    return False  # the group's tensor is the weight or the bias, not the input
        return True

    @staticmethod
    def _keeps_zero(gm: fx.GraphModule, g: PruneGroup) -> bool:
        """Every tensor of the group keeps a zero channel zero (no ``sigmoid``, no ``+ 1``)."""
        names = set(g.nodes)
        for node in gm.graph.nodes:
            if node.name not in names:
                continue
            lays = meta.get(node, meta.LAYOUT)
            for lay in lays if isinstance(lays, list) else [lays]:
                if isinstance(lay, Layout) and not lay.zero:
                    return False
        return True

    def _align(self, state: torch.Tensor, notes: dict[int, str], g: PruneGroup) -> None:
        """Keep at least one channel, and a multiple of ``round_to`` (dead ones are zero)."""
        kept = int((state == KEEP).sum())
        step = self.round_to if g.size >= self.round_to else 1
        want = min(g.size, max(1, math.ceil(kept / step) * step))
        if want > kept:
            extra = (state == DROP).nonzero().flatten()[: want - kept]
            state[extra] = KEEP
            notes[g.id] = (
                f"kept {want - kept} dead channel(s) as zero padding (round_to={self.round_to})"
                if kept
                else "kept one dead channel so that no tensor becomes empty"
            )
