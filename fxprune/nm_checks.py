"""Checks of N:M sparsity: does every eligible weight follow the pattern?

:func:`check_nm` verifies a module or a state dict; it judges the same weights that
``fxprune.sparsify`` masks (:func:`fxprune.nm_layers.nm_layers`), so a model
sparsified with the default eligibility checks clean. :func:`measure` checks one
weight along its reduction axis; ``fxprune.export.check_onnx_nm`` uses it on the
initializers of an exported ONNX file.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from fxprune import validate
from fxprune.nm_layers import NMLayer, NMReport, NMWeight, layer_records, nm_weights
from fxprune.nm_patterns import (
    DEFAULT_MIN_SIZE,
    NMPattern,
    SparsityError,
    as_rows,
    parse_pattern,
    retained_magnitude,
)

logger = logging.getLogger(__name__)

__all__ = ["check_nm", "measure"]


def measure(
    layer: NMLayer,
    weight: torch.Tensor,
    pattern: str | tuple[int, int] | NMPattern = "2:4",
    axis: int = 1,
) -> NMLayer:
    """Fill ``layer``'s check of ``weight`` (N:M groups along ``axis``) and return it."""
    pat = parse_pattern(pattern)
    w = weight.detach().float().cpu().movedim(axis, 1)
    rows = as_rows(w)
    nonzero = (rows.reshape(rows.shape[0], -1, pat.m) != 0).sum(-1)
    layer.violations = int((nonzero > pat.n).sum())
    layer.passed = layer.violations == 0
    layer.groups = nonzero.numel()
    layer.sparsity = float(1.0 - nonzero.sum().item() / max(1, rows.numel()))
    layer.retained = retained_magnitude(w, pat)
    layer.axis = axis % weight.dim()
    return layer


def check_nm(
    module_or_state_dict: nn.Module | Mapping[str, torch.Tensor],
    pattern: str | tuple[int, int] | NMPattern = "2:4",
    names: Iterable[str] | None = None,
    min_size: int = DEFAULT_MIN_SIZE,
    align: bool = True,
) -> NMReport:
    """Verify the N:M pattern on every eligible conv/linear weight.

    For a module, the weights are its :func:`~fxprune.nm_layers.nm_weights` (conv,
    linear and attention projections, the ones ``fxprune.sparsify`` masks); for a
    state dict, every floating tensor with 2 or more dims (pass ``names`` to leave out
    e.g. embeddings). Weights that :func:`~fxprune.nm_patterns.nm_eligibility`
    rejects with the same ``min_size``/``align`` are in ``report.skipped`` with the
    reason, so a model sparsified with the default eligibility checks clean.
    """
    pat = parse_pattern(pattern)
    if not isinstance(module_or_state_dict, (nn.Module, Mapping)):
        validate.fail(
            SparsityError, "module_or_state_dict", "a module or a state dict", module_or_state_dict
        )
    if isinstance(names, str):
        validate.fail(SparsityError, "names", "a list of parameter names", names)
    if isinstance(module_or_state_dict, nn.Module):
        candidates = nm_weights(module_or_state_dict)
    else:
        candidates = [
            NMWeight(k, v)
            for k, v in module_or_state_dict.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() >= 2
        ]
    wanted = set(names) if names is not None else None
    if wanted is not None:
        candidates = [w for w in candidates if w.name in wanted]
    tensors = {w.name: w.tensor for w in candidates}
    report = NMReport(pat, layer_records(candidates, pat, min_size=min_size, align=align))
    for layer in report.eligible:
        measure(layer, tensors[layer.name], pat)
    if wanted is not None:
        missing = sorted(wanted - set(tensors))
        report.layers += [
            NMLayer(name, (), False, "not a conv/linear weight of this model") for name in missing
        ]
    return report
