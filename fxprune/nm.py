"""``fxprune.sparsify``: 2:4 (N:M) structured sparsity with graph-wide channel permutation.

trace -> channel groups -> permutation search per group (legal because every member
of a group is permuted the same way; checked: the permuted dense model gives the
original outputs) -> N:M masks on every eligible conv/linear weight -> report.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fxprune import validate
from fxprune.analysis import IgnoreSpec, ignore_alias, ignored_prefixes, run_analysis
from fxprune.errors import VerificationError
from fxprune.oracle import TOLERANCE, _outputs, max_error
from fxprune.pass_infra import PassContext, PassManager
from fxprune.prune import become
from fxprune.sparsity import SparsityError, parse_pattern
from fxprune.trace import FRONTENDS, trace

logger = logging.getLogger(__name__)


@dataclass
class SparsifyReport:
    pattern: str
    layers: list = field(default_factory=list)
    permuted_groups: int = 0
    skipped_groups: dict[int, str] = field(default_factory=dict)
    permutation_error: float | None = None

    @property
    def eligible(self) -> list:
        return [x for x in self.layers if x.eligible]

    def overall(self, permuted: bool = True) -> float:
        """Fraction of the eligible layers' total |w| the masks keep."""
        return _weighted(self.eligible, "retained" if permuted else "retained_unpermuted")

    def __str__(self) -> str:
        lines = [f"{'layer':<44}{'shape':<22}{'sparsity':>9}{'kept |w|':>10}{'no perm':>9}  note"]
        for x in self.layers:
            shape = "x".join(map(str, x.shape))
            if x.eligible:
                lines.append(
                    f"{x.param:<44}{shape:<22}{x.sparsity:>9.1%}{x.retained:>10.1%}"
                    f"{x.retained_unpermuted:>9.1%}"
                )
            else:
                lines.append(
                    f"{x.param:<44}{shape:<22}{'-':>9}{'-':>10}{'-':>9}  skipped: {x.reason}"
                )
        n = len(self.eligible)
        lines.append(
            f"{n}/{len(self.layers)} layers {self.pattern}; magnitude kept "
            f"{self.overall(True):.2%} with permutation, {self.overall(False):.2%} without; "
            f"{self.permuted_groups} channel groups permuted"
            + (
                f" (permuted model matches the original to {self.permutation_error:.1e})"
                if self.permutation_error is not None
                else ""
            )
        )
        return "\n".join(lines)


def _weighted(layers: list, attr: str) -> float:
    # weight each layer by its number of weights: a fair "fraction of total magnitude" proxy
    total = sum(float(torch.tensor(x.shape).prod()) for x in layers)
    if not total:
        return 1.0
    return sum(getattr(x, attr) * float(torch.tensor(x.shape).prod()) for x in layers) / total


@dataclass
class SparsifyResult:
    module: nn.Module
    masks: dict[str, torch.Tensor]
    report: SparsifyReport
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
    from fxprune.passes.nm_sparsity import NMSparsityPass, nm_layers
    from fxprune.passes.permute_channels import ChannelPermutationPass

    validate.module("model", model, SparsityError)
    validate.example_inputs(example_inputs)
    validate.inputs_match_forward(model, example_inputs)
    parse_pattern(pattern)
    for name, flag in [
        ("permute", permute),
        ("inplace", inplace),
        ("verify", verify),
        ("mask", mask),
    ]:
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
    ignored = IgnoreSpec(frozen=prefixes)
    _, _, ctx = run_analysis(gm, ignored, "auto", PassContext(example_inputs=example_inputs))
    layers = nm_layers(gm, pattern, prefixes, min_size)
    ctx.results["nm_layers"] = layers
    ctx.results["nm_consumers"] = {x.param for x in layers if x.eligible}
    ctx.results["nm_original_weights"] = {
        x.param: gm.get_parameter(x.param).detach().clone() for x in layers if x.eligible
    }
    report = SparsifyReport(pattern)
    if permute:
        # Compared in eval mode: dropout and batch statistics would make a train-mode model
        # differ from itself. Only the flags of the graph's own modules flip, and only here.
        with _eval_mode(gm):
            reference = _outputs(gm, example_inputs) if verify else None
        if progress is None:
            import sys

            progress = sys.stderr.isatty()
        PassManager([ChannelPermutationPass(pattern, time_budget, progress=progress)]).run(gm, ctx)
        report.permuted_groups = len(ctx.results["permutations"])
        report.skipped_groups = ctx.results["permutations_skipped"]
        if verify:
            with _eval_mode(gm):
                err, scale = max_error(reference, _outputs(gm, example_inputs))
            if err > TOLERANCE * max(scale, 1.0):
                raise VerificationError(
                    f"the channel-permuted model differs from the original by {err:.3e}"
                )
            report.permutation_error = err
    if mask:
        PassManager([NMSparsityPass(pattern, prefixes, min_size)]).run(gm, ctx)
    report.layers = ctx.results["nm_layers"]
    module = become(model, gm) if inplace else gm
    return SparsifyResult(
        module, ctx.results.get("nm_masks", {}), report, ctx.results.get("permutations", {})
    )


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Eval mode for a comparison; every submodule's own training flag is restored after."""
    flags = {m: m.training for m in module.modules()}
    for m in flags:  # per module: torch.export graph modules refuse .eval() on themselves
        m.training = False
    try:
        yield
    finally:
        for m, training in flags.items():
            m.training = training
