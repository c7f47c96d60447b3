"""ImportancePass: a score per channel of every prunable group.

Scores are computed per member (the parameter slice along the member's dim) and
combined per channel through the member's index map, then reduced over members
(``mean`` / ``sum`` / ``max``) and normalised. Built-in criteria: ``l1``, ``l2``
(magnitude), ``bn_scale`` (|gamma| of BatchNorm members), ``taylor`` (first order
|w * dL/dw|, needs calibration batches and a loss), ``fpgm`` (distance to the
geometric median of the source filters), ``random``; any callable
``fn(group, params) -> Tensor[group.size]`` works too.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx

from fxprune import validate
from fxprune.artifacts import GROUPS, SCORES
from fxprune.channels import PruneGroup
from fxprune.errors import PruneError
from fxprune.pass_infra import Pass, PassContext, PassResult
from fxprune.validate import IMPORTANCE_CRITERIA, NORMALIZATIONS, REDUCTIONS

logger = logging.getLogger(__name__)

CRITERIA = IMPORTANCE_CRITERIA


def _slice_norms(t: torch.Tensor, dim: int, p: float) -> torch.Tensor:
    """sum(|x|^p) of every slice along ``dim``.

    Along dim 0, one reduction over each contiguous row. Along a later dim, seen as
    [outer, dim, inner], it sums the outer rows, then the inner columns: two reductions
    over contiguous memory. A reduction over the non-contiguous dims at once (vector_norm
    over (0, 2, 3) of a conv weight) is many times slower.
    """
    x = t.detach().float()
    if x.dim() == 1:
        return x.abs().pow(p)
    size = x.shape[dim]
    if dim == 0:  # rows are contiguous: one reduction, no temporary
        return torch.linalg.vector_norm(x.reshape(size, -1), ord=p, dim=1).pow(p)
    powered = x.square() if p == 2.0 else x.abs().pow(p)
    outer = math.prod(x.shape[:dim])
    return powered.reshape(outer, -1).sum(0).reshape(size, -1).sum(1)


def _per_channel(values: torch.Tensor, index_map: torch.Tensor, size: int) -> torch.Tensor:
    """Per-position values averaged into the group's channels (NaN: a channel this member
    does not hold); scores live on the CPU, with the rest of the channel bookkeeping,
    whatever device the weights are on.

    The mean, not the sum: after a channel shuffle or a flatten one channel covers several
    positions of a member, and summed it would outscore the others for covering more,
    so the channels whose removal saves the most would always be kept (ShuffleNet's
    stage outputs stayed whole). Where each channel holds one position, the two agree.
    """
    out = torch.zeros(size, dtype=torch.float64)
    count = torch.zeros(size, dtype=torch.float64)
    sel = index_map >= 0
    out.index_add_(0, index_map[sel], values.detach().to("cpu", torch.float64)[sel])
    count.index_add_(0, index_map[sel], torch.ones(int(sel.sum()), dtype=torch.float64))
    return out / count  # 0 / 0: NaN, left out of the reduction over members


class ImportancePass(Pass):
    """Score every channel of every prunable group (the ``scores`` artifact)."""

    requires = (GROUPS,)
    provides = (SCORES,)

    def __init__(
        self,
        importance: str | Callable = "l2",
        reduction: str = "mean",
        normalize: str | None = "mean",
        grads: dict[str, torch.Tensor] | None = None,
        seed: int = 0,
    ) -> None:
        validate.importance(importance)
        validate.one_of("reduction", reduction, REDUCTIONS)
        if normalize is not None:
            validate.one_of("normalize", normalize, NORMALIZATIONS)
        self.importance = importance
        self.reduction = reduction
        self.normalize = normalize
        self.grads = grads or {}
        self.seed = seed
        self._parameters: set[str] = set()  # names of the graph's parameters (not buffers)

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        params = dict(gm.named_parameters(remove_duplicate=False))
        self._parameters = set(params)
        params.update(dict(gm.named_buffers(remove_duplicate=False)))
        if self.importance == "taylor" and not self.grads:
            raise PruneError(
                "importance='taylor' needs gradients: pass calibration batches and a "
                "loss function (prune(..., calibration=batches, loss_fn=fn))."
            )
        gen = torch.Generator().manual_seed(self.seed)
        scores = {}
        for g in ctx[GROUPS]:
            if not g.prunable:
                continue
            s = self.group_scores(g, params, gen)
            scores[g.id] = self._normalize(s)
        ctx[SCORES] = scores
        return PassResult(gm, False)

    def group_scores(self, g: PruneGroup, params: dict[str, torch.Tensor], gen) -> torch.Tensor:
        if callable(self.importance):
            s = torch.as_tensor(self.importance(g, params), dtype=torch.float64).cpu()
            if s.shape != (g.size,):
                raise PruneError(
                    f"custom importance returned shape {tuple(s.shape)} for group {g.id}, "
                    f"expected ({g.size},)."
                )
            return s
        if self.importance == "random":
            return torch.rand(g.size, generator=gen, dtype=torch.float64)
        if self.importance == "fpgm":
            return self._fpgm(g, params)
        per_member = []
        for m in self._scored_members(g, params):
            t = params[m.param]
            if self.importance == "bn_scale":
                if not m.param.endswith("weight") or t.dim() != 1 or "running" in m.param:
                    continue
                if (m.param.rsplit(".", 1)[0] + ".running_var") not in params:
                    continue
                vals = t.detach().abs().float()
            elif self.importance == "taylor":
                grad = self.grads.get(m.param)
                if grad is None:
                    continue
                vals = _slice_norms(t.detach() * grad, m.dim, 1.0)
            else:
                vals = _slice_norms(t, m.dim, 1.0 if self.importance == "l1" else 2.0)
            per_member.append(_per_channel(vals, m.index_map, g.size))
        if not per_member:
            if self.importance == "bn_scale":  # no BatchNorm in this group: fall back to magnitude
                fallback = ImportancePass("l2", self.reduction, None)
                fallback._parameters = self._parameters
                return fallback.group_scores(g, params, gen)
            return torch.zeros(g.size, dtype=torch.float64)
        # Over the members that hold each channel (a concat's reader holds all of them,
        # each producer only its own): a member without it is no evidence either way.
        stacked = torch.stack(per_member)
        if self.reduction == "sum":
            return stacked.nansum(0)
        if self.reduction == "max":
            return stacked.nan_to_num(float("-inf")).max(0).values.clamp(min=0)
        return stacked.nanmean(0).nan_to_num(0.0)

    def _scored_members(self, g: PruneGroup, params: dict[str, torch.Tensor]) -> list:
        """The members whose values score the group's channels.

        Magnitude and Taylor criteria score weights: BatchNorm running statistics (buffers)
        and biases say how large activations were, not how much a channel contributes, and
        averaged in they pick measurably worse channels (a trained digits ResNet-18 cut 20%
        keeps 0.32 accuracy with them, 0.42 without, the same channels as Torch-Pruning's
        MagnitudeImportance). Groups holding nothing else are scored by everything they hold.
        """
        members = [
            m for m in g.members if (t := params.get(m.param)) is not None and t.is_floating_point()
        ]
        if self.importance not in ("l1", "l2", "taylor"):
            return members
        weights = [
            m for m in members if m.param in self._parameters and not m.param.endswith("bias")
        ]
        return weights or members

    def _fpgm(self, g: PruneGroup, params: dict[str, torch.Tensor]) -> torch.Tensor:
        m = g.member(*g.source) if g.source else None
        t = params.get(m.param) if m is not None else None
        if t is None:
            return torch.zeros(g.size, dtype=torch.float64)
        rows = t.detach().to("cpu", torch.float64).transpose(0, m.dim).reshape(t.shape[m.dim], -1)
        feats = torch.zeros(g.size, rows.shape[1], dtype=torch.float64)
        sel = m.index_map >= 0
        feats.index_add_(0, m.index_map[sel], rows[sel])
        return torch.cdist(feats, feats).sum(1)

    def _normalize(self, s: torch.Tensor) -> torch.Tensor:
        if self.normalize in (None, "none"):
            return s
        if self.normalize == "mean":
            return s / (s.mean() + 1e-12)
        if self.normalize == "max":
            return s / (s.max() + 1e-12)
        if self.normalize == "sum":
            return s / (s.sum() + 1e-12)
        if self.normalize == "standardization":
            return (s - s.mean()) / (s.std() + 1e-12)
        raise PruneError(f"unknown importance normalisation {self.normalize!r}.")


def taylor_grads(
    module: torch.nn.Module, batches: Any, loss_fn: Callable
) -> dict[str, torch.Tensor]:
    """Accumulated gradients of ``loss_fn(module(batch), batch)`` over calibration batches."""
    grads: dict[str, torch.Tensor] = {}
    named = dict(module.named_parameters())
    was_training = module.training
    module.eval()
    try:
        for batch in batches:
            module.zero_grad(set_to_none=True)
            inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
            out = module(*inputs) if isinstance(inputs, tuple) else module(inputs)
            loss = loss_fn(out, batch)
            loss.backward()
            for n, p in named.items():
                if p.grad is not None:
                    grads[n] = grads.get(n, 0) + p.grad.detach().clone()
    finally:
        module.zero_grad(set_to_none=True)
        module.train(was_training)
    return grads
