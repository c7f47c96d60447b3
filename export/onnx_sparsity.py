"""N:M check of an exported ONNX file: are the weights TensorRT sees 2:4 sparse?

:func:`check_onnx_nm` finds the weight initializers of every Conv / Gemm / MatMul,
through the Cast / Q / DQ / Identity / Transpose nodes between them, and checks each
along the reduction axis its consumer uses, with the same eligibility and the same
per-weight measure (``fxprune.nm_checks.measure``) as the checks of torch modules.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fxprune import validate
from fxprune.nm_checks import measure
from fxprune.nm_layers import NMLayer, NMReport
from fxprune.nm_patterns import (
    DEFAULT_MIN_SIZE,
    NMPattern,
    SparsityError,
    nm_eligibility,
    parse_pattern,
)

logger = logging.getLogger(__name__)

__all__ = ["check_onnx_nm"]

# ONNX ops whose output has the same layout as their first input, so a weight seen
# through them keeps its reduction axis.
_ONNX_PASSTHROUGH = {"Cast", "Identity", "QuantizeLinear", "DequantizeLinear", "CastLike"}
# How far back through such nodes (and transposes) a weight operand is followed.
_MAX_HOPS = 16


def check_onnx_nm(
    onnx_path: str | Path,
    pattern: str | tuple[int, int] | NMPattern = "2:4",
    min_size: int = DEFAULT_MIN_SIZE,
    align: bool = True,
) -> NMReport:
    """Verify the N:M pattern of the Conv/Gemm/MatMul weight initializers of an ONNX file.

    Each weight is found behind its consumer through Cast / Q / DQ / Identity /
    Transpose nodes (a Transpose moves the reduction axis), and checked along the
    reduction axis of that consumer; operands that are activations are ignored.
    Eligibility (with ``min_size``/``align``) is judged on the weight as its
    consumer sees it, ``(out, in, ...)``; rejected weights go to ``skipped``.
    """
    import onnx  # here, not at import time: fxprune.export loads without onnx until used

    pat = parse_pattern(pattern)
    validate.path_like("onnx_path", onnx_path, SparsityError)
    if not Path(onnx_path).is_file():
        raise SparsityError(f"onnx_path: no such file {str(onnx_path)!r}.")
    model = onnx.load(str(onnx_path))
    consts, producer = _constants_and_producers(model)
    report = NMReport(pat)
    seen: set[tuple[str, int]] = set()
    for tensor, axis, groups, consumer in _onnx_weight_uses(model):
        found = _resolve(tensor, axis, consts, producer)
        if found is None:
            continue
        name, axis = found
        values = consts[name]
        axis %= values.ndim
        if (name, axis) in seen:
            continue
        seen.add((name, axis))
        layer = NMLayer(f"{name} ({consumer})", tuple(int(d) for d in values.shape), axis=axis)
        if not np.issubdtype(values.dtype, np.floating) and values.dtype.kind != "V":
            layer.eligible, layer.reason = False, f"dtype {values.dtype} is not floating point"
        else:
            layer.eligible, layer.reason = nm_eligibility(
                _consumer_view(values.shape, axis), pat, groups, min_size, align
            )
        if layer.eligible:
            measure(layer, torch.from_numpy(values.astype(np.float32)), pat, axis)
        report.layers.append(layer)
    return report


def _onnx_weight_uses(model: Any) -> list[tuple[str, int, int, str]]:
    """(tensor name, reduction axis, conv groups, consumer) for every weight operand.

    Conv weights ``(out, in/groups, *k)`` reduce over axis 1. Gemm reduces B over
    axis 1 when ``transB=1`` (``(out, in)``, what the exporter emits for a 2-D
    Linear) and axis 0 otherwise; A over axis 0 if ``transA`` else 1. MatMul
    reduces B ``(..., in, out)`` over axis -2 (a Linear on 3-D inputs is exported
    as MatMul with a transposed initializer) and A over its last axis.
    """
    import onnx

    uses: list[tuple[str, int, int, str]] = []
    for node in model.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        label = node.name or node.op_type
        if node.op_type == "Conv" and len(node.input) > 1:
            uses.append((node.input[1], 1, int(attrs.get("group", 1)), label))
        elif node.op_type == "Gemm":
            uses.append((node.input[1], 1 if attrs.get("transB", 0) else 0, 1, label))
            uses.append((node.input[0], 0 if attrs.get("transA", 0) else 1, 1, label))
        elif node.op_type == "MatMul":
            uses.append((node.input[1], -2, 1, label))
            uses.append((node.input[0], -1, 1, label))
    return uses


def _constants_and_producers(model: Any) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The constant tensors (initializers and Constant nodes) and the node making each value."""
    from onnx import numpy_helper

    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    producer = {}
    for node in model.graph.node:
        for out in node.output:
            producer[out] = node
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    consts[node.output[0]] = numpy_helper.to_array(a.t)
    return consts, producer


def _resolve(
    name: str, axis: int, consts: dict[str, np.ndarray], producer: dict[str, Any]
) -> tuple[str, int] | None:
    """Follow ``name`` back to a constant, mapping the axis through transposes."""
    for _ in range(_MAX_HOPS):
        if name in consts:
            return name, axis
        node = producer.get(name)
        if node is None or not node.input:
            return None
        if node.op_type == "Transpose":
            perm = [a for a in node.attribute if a.name == "perm"]
            if not perm:
                return None  # a default (reversing) transpose without known rank: give up
            order = list(perm[0].ints)
            axis = order[axis % len(order)]
        elif node.op_type not in _ONNX_PASSTHROUGH:
            return None
        name = node.input[0]
    return None


def _consumer_view(shape: tuple[int, ...], axis: int) -> tuple[int, ...]:
    """``shape`` seen as ``(out, in, ...)`` with ``in`` the reduction axis, as a torch weight."""
    if len(shape) == 2 and axis == 0:
        return (shape[1], shape[0])
    return (shape[0], shape[axis], *(d for i, d in enumerate(shape) if i not in (0, axis)))
