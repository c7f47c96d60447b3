"""GraphBoundaryPass: name why the channels of a Dynamo graph's outputs stay.

A graph ``torch.compile`` hands to a backend ends either at the model's output or at a
graph break, where its activations go back to Python and on into the next graph. Their
channels cannot change (the next graph, compiled separately, reads all of them); the
channel rules already freeze every output, and this pass records the reason a compile
pipeline reader needs. Graph inputs are untracked by the channel rules (never pruned).
"""

from __future__ import annotations

import logging

import numpy as np
import torch.fx as fx

from fxprune import meta
from fxprune.artifacts import CHANNELS
from fxprune.channels import Layout
from fxprune.pass_infra import Pass, PassContext, PassResult

logger = logging.getLogger(__name__)

GRAPH_BREAK_REASON = (
    "a Dynamo graph output (the model's output, or an activation crossing a graph break)"
)


class GraphBoundaryPass(Pass):
    """Freeze the channels of every graph output with the graph-break reason (analysis only)."""

    requires = (meta.LAYOUT, CHANNELS)

    def __init__(self, reason: str = GRAPH_BREAK_REASON) -> None:
        self.reason = reason

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        table = ctx[CHANNELS].table
        out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
        for node in out.all_input_nodes:
            lays = meta.get(node, meta.LAYOUT)
            for lay in lays if isinstance(lays, list) else [lays]:
                if not isinstance(lay, Layout) or not lay.is_tracked():
                    continue
                roots = np.unique(table.find(lay.atoms.ravel()))
                for root in roots[roots >= 0].tolist():
                    table.frozen[root] = self.reason  # replaces "reaches the model output"
        return PassResult(gm, False)
