"""Turn a selection into the plan surgery cuts, and choose a selection by a MACs target.

``PlanChannelsPass`` reads the groups' keep/pad/drop states (``selection``) and writes the
``plan`` (what that means for every layout: kept positions, new shapes) and ``layouts``
(each node's channel layout before surgery, which the oracle needs after it).

``TargetMacsPass`` is the selection strategy of ``prune(target_macs=...)``: it bisects the
uniform ratio, selecting with ``SelectChannelsPass`` and counting the MACs of the planned
shapes (nothing is cut), until they reach the target fraction of the original.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import torch.fx as fx

from fxprune import meta
from fxprune.artifacts import CHANNELS, GROUPS, LAYOUTS, PLAN, SCORES, SELECTION, SELECTION_NOTES
from fxprune.channels import Layout
from fxprune.pass_infra import Pass, PassContext, PassResult
from fxprune.passes.select_channels import SelectChannelsPass, SelectionOptions
from fxprune.passes.surgery import ChannelPlan
from fxprune.report import graph_macs

logger = logging.getLogger(__name__)

_BISECTION_STEPS = 14  # ratio resolution max_ratio / 2**14: finer than one channel anywhere


class PlanChannelsPass(Pass):
    """The selection as a ``ChannelPlan``, plus the pre-surgery layouts for the oracle."""

    requires = (CHANNELS, GROUPS, SELECTION)
    provides = (PLAN, LAYOUTS)

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        ctx[PLAN] = ChannelPlan(ctx[CHANNELS], ctx[GROUPS], ctx[SELECTION])
        ctx[LAYOUTS] = {n.name: meta.get(n, meta.LAYOUT) for n in gm.graph.nodes}
        return PassResult(gm, False)


def planned_macs(gm: fx.GraphModule, plan: ChannelPlan) -> int:
    """MACs of ``gm`` once ``plan`` is cut, from the planned shapes (nothing is changed)."""
    cache: dict[fx.Node, Any] = {}

    def shape(node: fx.Node):
        if node not in cache:
            lay, s = meta.get(node, meta.LAYOUT), meta.shape_of(node)
            cache[node] = plan.new_shape(lay, s) if isinstance(lay, Layout) and s else s
        return cache[node]

    return graph_macs(gm, shape)


class TargetMacsPass(Pass):
    """Select channels at the smallest uniform ratio whose planned MACs reach ``target``."""

    requires = (CHANNELS, GROUPS, SCORES)
    provides = (SELECTION, SELECTION_NOTES)

    def __init__(self, options: SelectionOptions, target: float, macs_before: int) -> None:
        self.opts = options
        self.target = target
        self.macs_before = macs_before

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        limit = self.target * self.macs_before
        lo, hi = 0.0, self.opts.max_ratio
        if self._macs(gm, ctx, hi) > limit:
            logger.warning(
                "target_macs=%.3f cannot be reached within max_ratio=%.2f; pruning at max_ratio",
                self.target,
                self.opts.max_ratio,
            )
            return PassResult(gm, False)
        for _ in range(_BISECTION_STEPS):
            mid = (lo + hi) / 2
            if self._macs(gm, ctx, mid) <= limit:
                hi = mid
            else:
                lo = mid
        self._macs(gm, ctx, hi)  # leaves the selection of the ratio found
        return PassResult(gm, False)

    def _macs(self, gm: fx.GraphModule, ctx: PassContext, ratio: float) -> int:
        # SelectChannelsPass writes selection and notes, which this pass declares too.
        SelectChannelsPass(replace(self.opts, ratio=ratio)).call(gm, ctx)
        return planned_macs(gm, ChannelPlan(ctx[CHANNELS], ctx[GROUPS], ctx[SELECTION]))
