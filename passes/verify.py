"""VerifyPass: run the correctness oracle (``fxprune.oracle``) after surgery.

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

from fxprune.oracle import check, first_divergence
from fxprune.pass_infra import Pass, PassContext, PassResult
from fxprune.passes.select_channels import KEEP

logger = logging.getLogger(__name__)


class VerifyPass(Pass):
    """Writes ``ctx.results["verification"]`` (a ``VerificationReport``), ``["verified"]``
    (its summary) and ``["max_error"]`` (None when outputs prove nothing)."""

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        original = ctx.results["original"]
        selection = ctx.results.get("selection", {})
        inexact = [
            g
            for g in ctx.results["groups"]
            if g.id in selection and not g.exact and bool((selection[g.id] != KEEP).any())
        ]
        reason = (
            f"{len(inexact)} pruned group(s) are inexact ({inexact[0].inexact_reason})"
            if inexact
            else None
        )

        def locate(masked: nn.Module, run: nn.Module) -> str | None:
            return first_divergence(
                masked, run, ctx.example_inputs, ctx.results["plan"], ctx.results["layouts"]
            )

        report = check(
            original,
            gm,
            ctx.results.get("kept", {}),
            ctx.example_inputs,
            inexact=reason,
            locate=locate,
            original_is_private=True,  # _prune_graph's deep copy, used for nothing else
        )
        ctx.results["verification"] = report
        ctx.results["verified"] = report.summary
        ctx.results["max_error"] = report.max_error if report.exact else None
        return PassResult(gm, False)
