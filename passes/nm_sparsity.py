"""NMSparsityPass: N:M (2:4, 4:8) masks on every eligible conv/linear weight.

Keeps the N largest of every M consecutive weights along the input-channel
(reduction) dim, the layout TensorRT and cuSPARSELt use. The weights are
``fxprune.nm_layers.nm_layers`` of the graph — the same list the checks use — and
the ineligible ones keep their reason (grouped/depthwise convs, reduction dim not a
multiple of M, too small to gain, tied, user-ignored). Writes the ``nm_masks``
artifact and fills the ``nm_layers`` records with what each mask kept.
"""

from __future__ import annotations

import logging

import torch
import torch.fx as fx

from fxprune.artifacts import NM_LAYERS, NM_MASKS, NM_ORIGINAL_WEIGHTS
from fxprune.nm_checks import measure
from fxprune.nm_layers import NMLayer, nm_layers
from fxprune.nm_patterns import nm_mask, parse_pattern, retained_magnitude
from fxprune.pass_infra import Pass, PassContext, PassResult
from fxprune.tensors import get_tensor

logger = logging.getLogger(__name__)

__all__ = ["NMLayersPass", "NMSparsityPass", "nm_layers"]


class NMLayersPass(Pass):
    """Find the N:M weights of the graph (``nm_layers``) and keep the eligible ones' values
    in their original channel order (``nm_original_weights``, for the report)."""

    provides = (NM_LAYERS, NM_ORIGINAL_WEIGHTS)

    def __init__(
        self, pattern: str = "2:4", ignore: tuple[str, ...] = (), min_size: int | None = None
    ) -> None:
        self.pattern = parse_pattern(pattern)
        self.ignore = ignore
        self.min_size = min_size

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        layers = nm_layers(gm, self.pattern, self.ignore, self.min_size)
        ctx[NM_LAYERS] = layers
        ctx[NM_ORIGINAL_WEIGHTS] = {
            x.name: get_tensor(gm, x.name).detach().clone() for x in layers if x.eligible
        }
        return PassResult(gm, False)


class NMSparsityPass(Pass):
    """Mask every eligible weight of the graph in place (``modified``: any mask applied).

    Reads the ``nm_layers`` records (and fills them in with what each mask kept) and
    ``nm_original_weights``, to report what the masks keep without the permutation.
    """

    requires = (NM_LAYERS, NM_ORIGINAL_WEIGHTS)
    provides = (NM_MASKS,)

    def __init__(self, pattern: str = "2:4") -> None:
        self.pattern = parse_pattern(pattern)

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        layers: list[NMLayer] = ctx[NM_LAYERS]  # filled in with what each mask kept
        original = ctx[NM_ORIGINAL_WEIGHTS]
        masks = {}
        for layer in layers:
            if not layer.eligible:
                continue
            w = get_tensor(gm, layer.name)
            mask = nm_mask(w, self.pattern)
            retained = retained_magnitude(w, self.pattern)
            before = original.get(layer.name)
            with torch.no_grad():
                w.mul_(mask.to(w.dtype))
            measure(layer, w, self.pattern)
            layer.retained = retained
            layer.retained_unpermuted = (
                retained_magnitude(before, self.pattern) if before is not None else retained
            )
            masks[layer.name] = mask
        ctx[NM_MASKS] = masks
        return PassResult(gm, bool(masks))
