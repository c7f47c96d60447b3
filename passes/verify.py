"""VerifyPass: run the correctness oracle (``fxprune.oracle``) after surgery; and the pair
RecordOutputsPass / SameOutputsPass, which prove a lossless rewrite kept the outputs.

Every pruned parameter must equal the original indexed by the kept indices; when
every pruned group is exact, the pruned outputs must equal the masked original's on
the example inputs. On a mismatch it raises ``VerificationError`` with the first
diverging node. The oracle is the same code ``fxprune.verify`` runs, and it does not
reuse surgery's indexing.
"""

from __future__ import annotations

import logging

import torch.fx as fx
from torch import nn

from fxprune.artifacts import (
    GROUPS,
    KEPT,
    LAYOUTS,
    ORIGINAL,
    OUTPUT_ERROR,
    PLAN,
    REFERENCE_OUTPUTS,
    SELECTION,
    VERIFICATION,
)
from fxprune.errors import VerificationError
from fxprune.oracle import (
    check,
    check_snapshot,
    eval_flags,
    first_divergence,
    float_outputs,
    max_error,
    outputs_tolerance,
    snapshot,
)
from fxprune.pass_infra import Pass, PassContext, PassResult
from fxprune.passes.select_channels import KEEP

logger = logging.getLogger(__name__)


class VerifyPass(Pass):
    """Check the pruned graph against the masked original (the ``verification`` artifact)."""

    requires = (ORIGINAL, GROUPS, SELECTION, PLAN, LAYOUTS, KEPT)
    provides = (VERIFICATION,)

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        original = ctx[ORIGINAL]
        check_snapshot(original)
        selection = ctx[SELECTION]
        inexact = [
            g
            for g in ctx[GROUPS]
            if g.id in selection and not g.exact and bool((selection[g.id] != KEEP).any())
        ]
        reason = (
            f"{len(inexact)} pruned group(s) are inexact ({inexact[0].inexact_reason})"
            if inexact
            else None
        )

        def locate(masked: nn.Module, run: nn.Module) -> str | None:
            return first_divergence(masked, run, ctx.example_inputs, ctx[PLAN], ctx[LAYOUTS])

        report = check(
            original,
            gm,
            ctx[KEPT],
            ctx.example_inputs,
            inexact=reason,
            locate=locate,
            original_is_private=True,  # the pipeline's snapshot, used for nothing else
        )
        ctx[VERIFICATION] = report
        return PassResult(gm, False)


class SnapshotPass(Pass):
    """The oracle's reference (``original``), taken before anything is cut: the graph and
    modules copied, the weights shared (surgery replaces tensors, and the oracle checks
    that no pass wrote into one of these)."""

    provides = (ORIGINAL,)

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        ctx[ORIGINAL] = snapshot(gm)
        return PassResult(gm, False)


class RecordOutputsPass(Pass):
    """The graph's float outputs on the example inputs (eval mode), before a rewrite that
    must keep them (``reference_outputs``)."""

    provides = (REFERENCE_OUTPUTS,)

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        with eval_flags(gm):
            ctx[REFERENCE_OUTPUTS] = float_outputs(gm, ctx.example_inputs)
        return PassResult(gm, False)


class SameOutputsPass(Pass):
    """Raise ``VerificationError`` unless the outputs still equal ``reference_outputs``
    within the oracle's tolerance; the error found is the ``output_error`` artifact."""

    requires = (REFERENCE_OUTPUTS,)
    provides = (OUTPUT_ERROR,)

    def __init__(self, what: str = "the rewritten model") -> None:
        self.what = what

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        reference = ctx[REFERENCE_OUTPUTS]
        with eval_flags(gm):
            err, scale = max_error(reference, float_outputs(gm, ctx.example_inputs))
        if not err <= outputs_tolerance(reference) * max(scale, 1.0):
            raise VerificationError(f"{self.what} differs from the original by {err:.3e}")
        ctx[OUTPUT_ERROR] = err
        return PassResult(gm, False)
