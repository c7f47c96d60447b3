"""NMSparsityPass: N:M (2:4, 4:8) masks on every eligible conv/linear weight.

Keeps the N largest of every M consecutive weights along the input-channel
(reduction) dim, the layout TensorRT and cuSPARSELt use. Layers are skipped with a
reason (grouped/depthwise convs, reduction dim not a multiple of M, too small to
gain, user-ignored). Writes ``ctx.results["nm_masks"]`` and ``ctx.results["nm_layers"]``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.fx as fx

from fxprune.ops import OpKind, canonicalize
from fxprune.pass_infra import Pass, PassContext, PassResult

logger = logging.getLogger(__name__)


@dataclass
class NMLayer:
    """One conv/linear weight: whether it took a mask, and what the mask kept."""

    param: str
    shape: tuple[int, ...]
    eligible: bool
    reason: str
    sparsity: float = 0.0
    retained: float = 1.0  # fraction of sum |w| kept (after any permutation)
    retained_unpermuted: float = 1.0  # the same mask on the original column order


def nm_layers(
    gm: fx.GraphModule, pattern: str, ignore: tuple[str, ...] = (), min_size: int | None = None
) -> list[NMLayer]:
    """Every conv/linear weight of the graph with its eligibility for the pattern."""
    from fxprune.sparsity import nm_eligibility

    seen, out = set(), []
    for node in gm.graph.nodes:
        op = canonicalize(node, gm)
        if op.kind not in (OpKind.CONV, OpKind.LINEAR):
            continue
        fqn = op.params.get("weight")
        if not fqn or fqn.startswith("<") or fqn in seen:
            continue
        seen.add(fqn)
        w = gm.get_parameter(fqn) if fqn in dict(gm.named_parameters()) else None
        if w is None:
            continue
        if any(fqn == p or fqn.startswith(p + ".") for p in ignore):
            out.append(NMLayer(fqn, tuple(w.shape), False, "ignored by the user"))
            continue
        kwargs = {} if min_size is None else {"min_size": min_size}
        ok, why = nm_eligibility(w, pattern, groups=int(op.attrs.get("groups") or 1), **kwargs)
        out.append(NMLayer(fqn, tuple(w.shape), ok, why))
    return out


class NMSparsityPass(Pass):
    def __init__(
        self, pattern: str = "2:4", ignore: tuple[str, ...] = (), min_size: int | None = None
    ) -> None:
        self.pattern = pattern
        self.ignore = ignore
        self.min_size = min_size

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        from fxprune.sparsity import nm_mask, retained_magnitude

        layers = ctx.results.get("nm_layers") or nm_layers(
            gm, self.pattern, self.ignore, self.min_size
        )
        original = ctx.results.get("nm_original_weights", {})
        masks = {}
        for layer in layers:
            if not layer.eligible:
                continue
            w = gm.get_parameter(layer.param)
            mask = nm_mask(w, self.pattern)
            layer.retained = retained_magnitude(w, self.pattern)
            before = original.get(layer.param)
            layer.retained_unpermuted = (
                retained_magnitude(before, self.pattern) if before is not None else layer.retained
            )
            with torch.no_grad():
                w.mul_(mask.to(w.dtype))
            layer.sparsity = float(1.0 - mask.float().mean())
            masks[layer.param] = mask
        ctx.results["nm_masks"] = masks
        ctx.results["nm_layers"] = layers
        return PassResult(gm, bool(masks))
