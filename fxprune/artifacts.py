"""The typed artifacts passes hand each other through the ``PassContext``, in one table.

``node.meta`` holds what belongs to one node (``fxprune.meta``); an artifact is a value
about the whole graph (the channel analysis, the groups, the scores, the selection...).
A pass names the artifacts it reads in ``requires`` and the ones it writes in
``provides``; the pass manager checks both, and the context checks each value's type.
Artifacts whose type belongs to a higher layer (``passes/``) name it as
``"module:Class"``, so that this foundation module never imports that layer.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import Any

import torch.fx as fx

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class Artifact:
    """One named, typed value of a pipeline run; ``provided_by`` is for error messages."""

    name: str
    type: type | str
    provided_by: str
    doc: str = ""

    def check(self, value: Any) -> None:
        cls = self._resolve()
        if not isinstance(value, cls):
            raise TypeError(
                f"artifact {self.name!r} must be a {getattr(cls, '__name__', cls)}, "
                f"got {type(value).__name__}"
            )

    def _resolve(self) -> type:
        if isinstance(self.type, type):
            return self.type
        module, _, qualname = self.type.partition(":")
        # Not imported yet means no value can be of that class: nothing to resolve.
        owner = sys.modules.get(module)
        return getattr(owner, qualname) if owner is not None else _Unloaded

    def __repr__(self) -> str:
        return f"Artifact({self.name!r})"


class _Unloaded:
    """Stands for a class whose module is not loaded (so no value is an instance)."""


# name, type, the pass that provides it, what it holds
CHANNELS = Artifact(
    "channels",
    "fxprune.passes.channel_rules.base:ChannelEnv",
    "PropagateChannelsPass",
    "channel atoms and layouts of every node, frozen/inexact atoms and their reasons",
)
GROUPS = Artifact(
    "groups", list, "BuildGroupsPass", "list[PruneGroup]: the channels that prune together"
)
SCORES = Artifact(
    "scores", dict, "ImportancePass", "{group id: float64 tensor}: importance per channel"
)
SELECTION = Artifact(
    "selection", dict, "SelectChannelsPass", "{group id: int8 tensor}: 1 keep, 2 pad, 0 drop"
)
SELECTION_NOTES = Artifact(
    "selection_notes", dict, "SelectChannelsPass", "{group id: str}: why a group kept more"
)
PLAN = Artifact(
    "plan",
    "fxprune.passes.surgery:ChannelPlan",
    "PlanChannelsPass",
    "the selection in positions of every layout (what surgery cuts)",
)
LAYOUTS = Artifact(
    "layouts", dict, "PlanChannelsPass", "{node name: Layout} before surgery, for the oracle"
)
KEPT = Artifact(
    "kept", dict, "SurgeryPass", "{param: {dim: LongTensor of original indices, -1 padding}}"
)
ORIGINAL = Artifact(
    "original",
    fx.GraphModule,
    "SnapshotPass",
    "an untouched copy of the traced graph, which the oracle masks and runs",
)
VERIFICATION = Artifact(
    "verification",
    "fxprune.oracle:VerificationReport",
    "VerifyPass",
    "the oracle's report: parameters checked, outputs compared, max error",
)

REFERENCE_OUTPUTS = Artifact(
    "reference_outputs",
    list,
    "RecordOutputsPass",
    "list[Tensor]: the float outputs on the example inputs before a lossless rewrite",
)
OUTPUT_ERROR = Artifact(
    "output_error",
    float,
    "SameOutputsPass",
    "max abs difference of the outputs from the reference (within tolerance, or it raised)",
)
NM_LAYERS = Artifact(
    "nm_layers",
    list,
    "NMLayersPass",
    "list[NMLayer]: every N:M weight with its eligibility and what its mask kept",
)
NM_ORIGINAL_WEIGHTS = Artifact(
    "nm_original_weights",
    dict,
    "NMLayersPass",
    "{param: tensor}: the eligible weights in their original channel order",
)
NM_MASKS = Artifact("nm_masks", dict, "NMSparsityPass", "{param: bool tensor}: the masks applied")
PERMUTATIONS = Artifact(
    "permutations",
    dict,
    "ChannelPermutationPass",
    "{group id: LongTensor}: the channel order applied to every member of the group",
)
PERMUTATIONS_SKIPPED = Artifact(
    "permutations_skipped",
    dict,
    "ChannelPermutationPass",
    "{group id: str}: why a group kept its channel order",
)

ALL = (CHANNELS, GROUPS, SCORES, SELECTION, SELECTION_NOTES, PLAN, LAYOUTS, KEPT, ORIGINAL)
ALL += (VERIFICATION, REFERENCE_OUTPUTS, OUTPUT_ERROR)
ALL += (NM_LAYERS, NM_ORIGINAL_WEIGHTS, NM_MASKS, PERMUTATIONS, PERMUTATIONS_SKIPPED)

DEAD_CHANNELS = Artifact(
    "dead_channels", dict, "DeadChannelPass", "{group id: int}: provably dead channels dropped"
)
PADDED_CHANNELS = Artifact(
    "padded_channels",
    dict,
    "PadChannelsPass",
    "{group id: int}: zero channels added to reach a multiple of round_to",
)
SEMI_STRUCTURED = Artifact(
    "semi_structured",
    dict,
    "SemiStructuredPass",
    "{param: str}: 2:4 weights converted to semi-structured sparse tensors, or why not",
)
ALL += (DEAD_CHANNELS, PADDED_CHANNELS, SEMI_STRUCTURED)
