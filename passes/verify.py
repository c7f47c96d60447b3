"""VerifyPass: run the correctness oracle after surgery.

Every pruned parameter must equal the original indexed by the kept indices; when
every pruned group is exact, the pruned outputs must equal the masked original's on
the example inputs. On a mismatch it raises with the first diverging node.
"""

from __future__ import annotations

import contextlib
import logging

import torch.fx as fx

from fxprune.errors import VerificationError
from fxprune.pass_infra import Pass, PassContext, PassResult
from fxprune.verify import check_params, compare_outputs, first_divergence, masked_original

logger = logging.getLogger(__name__)


class VerifyPass(Pass):
    """Writes ``ctx.results["verified"]`` (what was checked) and ``ctx.results["max_error"]``."""

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        original = ctx.results["original"]
        kept = ctx.results.get("kept", {})
        check_params(original, gm, kept)
        pruned_ids = set(ctx.results.get("selection", {}))
        inexact = [
            g
            for g in ctx.results["groups"]
            if g.id in pruned_ids
            and not g.exact
            and bool((ctx.results["selection"][g.id] != 1).any())
        ]
        if inexact:
            ctx.results["verified"] = (
                f"parameters only: {len(inexact)} pruned group(s) are inexact "
                f"({inexact[0].inexact_reason})"
            )
            ctx.results["max_error"] = None
            return PassResult(gm, False)
        masked = masked_original(original, kept)
        _eval(masked)
        was = gm.training
        _eval(gm)
        try:
            err = compare_outputs(masked, gm, ctx.example_inputs)
        except VerificationError as exc:
            where = first_divergence(
                masked, gm, ctx.example_inputs, ctx.results["plan"], ctx.results["layouts"]
            )
            raise VerificationError(f"{exc} First diverging node: {where or 'unknown'}.") from exc
        finally:
            _eval(gm, was)
        ctx.results["verified"] = "outputs equal the masked original"
        ctx.results["max_error"] = err
        return PassResult(gm, False)


def _eval(module, training: bool = False) -> None:
    """Switch train/eval mode; torch.export graph modules fix their mode at export time."""
    with contextlib.suppress(NotImplementedError):
        module.train(training)
