"""``fxprune.sparsify``: 2:4 (N:M) structured sparsity with graph-wide channel permutation.

trace -> channel groups -> the N:M layers (``fxprune.nm_layers``, the list the checks
use too) -> permutation search per group (legal because every member of a group is
permuted the same way; checked: the permuted dense model gives the original outputs)
-> N:M masks on every eligible conv/linear weight -> report (``NMReport``).

``import fxprune.sparsify`` loads this module, but the package attribute
``fxprune.sparsify`` is the function (as ``fxprune.prune`` and ``fxprune.trace`` are):
import names from here with ``from fxprune.sparsify import SparsifyResult``.
"""

from __future__ import annotations

import copy
import logging
import math
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fxprune import validate
from fxprune.analysis import IgnoreSpec, analysis_passes, ignore_alias, ignored_prefixes
from fxprune.artifacts import (
    NM_LAYERS,
    NM_MASKS,
    OUTPUT_ERROR,
    PERMUTATIONS,
    PERMUTATIONS_SKIPPED,
)
from fxprune.nm_layers import NMReport
from fxprune.nm_patterns import SparsityError, parse_pattern
from fxprune.pass_infra import Pass, PassContext, PassManager
from fxprune.passes.nm_sparsity import NMLayersPass, NMSparsityPass
from fxprune.passes.permute_channels import ChannelPermutationPass
from fxprune.passes.verify import RecordOutputsPass, SameOutputsPass
from fxprune.prune import become
from fxprune.trace import FRONTENDS, trace

logger = logging.getLogger(__name__)

__all__ = ["SparsifyResult", "sparsify"]


@dataclass
class SparsifyResult:
    module: nn.Module
    masks: dict[str, torch.Tensor]
    report: NMReport
    permutations: dict[int, torch.Tensor] = field(default_factory=dict)

    def __str__(self) -> str:
        return str(self.report)


def sparsify(
    model: nn.Module,
    example_inputs: Any,
    pattern: str = "2:4",
    permute: bool = True,
    time_budget: float = 1.0,
    ignore: Iterable[Any] | None = None,
    inplace: bool = False,
    frontend: str = "auto",
    min_size: int | None = None,
    progress: bool | None = None,
    verify: bool = True,
    mask: bool = True,
    *,
    ignored_layers: Iterable[Any] | None = None,
) -> SparsifyResult:
    """N:M-sparsify every eligible conv/linear weight, permuting channels first.

    The model passed in is untouched unless ``inplace=True``: then, once sparsifying has
    succeeded, ``model`` itself becomes the sparse module (``res.module is model``), as with
    :func:`fxprune.prune`. ``time_budget`` is the
    permutation search time per channel group, in seconds. ``mask=False`` stops after
    the permutation: the result computes exactly what the original does. ``ignore``
    (alias ``ignored_layers``): modules or parameters left as they are, neither sparsified
    nor permuted (every channel they touch, read or produced, stays in place).
    """
    flags = {"permute": permute, "inplace": inplace, "verify": verify, "mask": mask}
    _check_arguments(model, example_inputs, pattern, flags, progress, time_budget, frontend)
    if min_size is not None:
        validate.integer_at_least(
            "min_size", min_size, 0, "fewest weights of a sparsified layer", SparsityError
        )
    validate.eval_mode_for_export(model, frontend, verify and permute, SparsityError)
    prefixes = ignored_prefixes(model, *ignore_alias(ignore, ignored_layers))
    work = copy.deepcopy(model)  # inplace=True too: the model changes only once this succeeded
    gm = trace(work, example_inputs, frontend=frontend)
    validate.eval_mode_for_export(
        model, gm.meta.get("fxprune.frontend", frontend), verify and permute, SparsityError
    )
    # An ignored layer is left as it is: not sparsified, and no channel it touches permuted.
    passes: list[Pass] = [NMLayersPass(pattern, prefixes, min_size)]
    if permute:
        progress = sys.stderr.isatty() if progress is None else progress
        passes += [
            *analysis_passes(IgnoreSpec(frozen=prefixes), "auto"),
            *([RecordOutputsPass()] if verify else []),
            ChannelPermutationPass(pattern, time_budget, progress=progress),
            *([SameOutputsPass("the channel-permuted model")] if verify else []),
        ]
    if mask:
        passes.append(NMSparsityPass(pattern))
    ctx = PassContext(example_inputs)
    PassManager(passes, name="sparsify").run(gm, ctx)
    report = NMReport(parse_pattern(pattern), ctx[NM_LAYERS])
    if permute:
        report.permuted_groups = len(ctx[PERMUTATIONS])
        report.skipped_groups = ctx[PERMUTATIONS_SKIPPED]
        report.permutation_error = ctx.get(OUTPUT_ERROR)
    module = become(model, gm) if inplace else gm
    return SparsifyResult(module, ctx.get(NM_MASKS, {}), report, ctx.get(PERMUTATIONS, {}))


def _check_arguments(
    model: Any,
    example_inputs: Any,
    pattern: Any,
    flags: dict[str, Any],
    progress: Any,
    time_budget: Any,
    frontend: Any,
) -> None:
    """Check :func:`sparsify`'s arguments before anything is traced."""
    validate.module("model", model, SparsityError)
    validate.example_inputs(example_inputs)
    validate.inputs_match_forward(model, example_inputs)
    parse_pattern(pattern)
    for name, flag in flags.items():
        validate.boolean(name, flag, SparsityError)
    if progress is not None:
        validate.boolean("progress", progress, SparsityError)
    validate.number_in(
        "time_budget",
        time_budget,
        0.0,
        math.inf,
        "seconds of permutation search per group",
        low_open=True,
        error=SparsityError,
    )
    validate.one_of("frontend", frontend, FRONTENDS, error=SparsityError)
