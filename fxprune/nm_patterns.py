"""N:M patterns on one weight: the pattern, the mask, eligibility, retained magnitude.

The weight half of fxprune's 2:4 feature starts here (``nm_permutation`` searches
channel orders, ``nm_training`` keeps masks through fine-tuning, ``nm_layers`` lists a
model's N:M weights and ``nm_checks`` verifies them):

- :func:`nm_mask` keeps the N largest-magnitude weights of every M consecutive
  weights along the reduction (input-channel) dimension, in the layout that
  TensorRT / cuSPARSELt and NVIDIA apex ASP use: a Linear weight ``(out, in)``
  is grouped along ``in``; a Conv weight ``(out, in, kh, kw)`` is grouped along
  ``in`` separately for every ``(out, kh, kw)`` position.
- :func:`nm_eligibility` says whether a weight can usefully be N:M sparse, and why not.
- :func:`retained_magnitude` is the fraction of ``sum |w|`` a mask keeps: the number
  the permutation search maximises and every report shows.

Every weight is viewed as a matrix of *rows* and *columns* (:func:`as_rows`): the
columns are the input channels (the unit a permutation moves), the rows are
everything else (``out`` for Linear, ``out * kh * kw`` for Conv). An N:M group is M
consecutive columns within one row.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from fxprune import validate
from fxprune.errors import FxpruneError

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MIN_SIZE",
    "NMPattern",
    "SparsityError",
    "as_rows",
    "nm_eligibility",
    "nm_mask",
    "parse_pattern",
    "per_row_upper_bound",
    "retained_magnitude",
]

# Below this many weights a layer's GEMM is too small for a sparse kernel to beat
# the dense one by a measurable margin (ResNet-50's smallest 1x1 conv, 64x64, is
# exactly at the limit, so it stays in).
DEFAULT_MIN_SIZE = 4096


class SparsityError(FxpruneError, ValueError):
    """A weight or pattern the N:M machinery cannot handle (the message says why)."""


# --------------------------------------------------------------------------- patterns


@dataclass(frozen=True)
class NMPattern:
    """Keep ``n`` of every ``m`` consecutive weights along the reduction dim."""

    n: int
    m: int

    def __post_init__(self) -> None:
        if not (0 < self.n < self.m):
            raise SparsityError(f"N:M pattern needs 0 < N < M, got {self.n}:{self.m}")

    @property
    def density(self) -> float:
        return self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


def parse_pattern(pattern: str | tuple[int, int] | NMPattern) -> NMPattern:
    """``"2:4"``, ``(2, 4)`` or an :class:`NMPattern` -> :class:`NMPattern`."""
    if isinstance(pattern, NMPattern):
        return pattern
    if isinstance(pattern, str):
        parts = pattern.replace(" ", "").split(":")
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise SparsityError(
                f"pattern must be 'N:M' with 0 < N < M (keep N of every M weights), e.g. '2:4', "
                f"got {pattern!r}."
            )
        return NMPattern(int(parts[0]), int(parts[1]))
    if (
        not isinstance(pattern, (tuple, list))
        or len(pattern) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in pattern)
    ):
        raise SparsityError(
            f"pattern must be 'N:M', a pair of integers (N, M) or an NMPattern, e.g. '2:4', "
            f"got {validate.show(pattern)}."
        )
    n, m = pattern
    return NMPattern(int(n), int(m))


def require_tensor(name: str, value: object) -> None:
    """Raise a :class:`SparsityError` naming ``name`` unless ``value`` is a tensor."""
    if not isinstance(value, torch.Tensor):
        validate.fail(SparsityError, name, "a torch.Tensor (a conv or linear weight)", value)


# --------------------------------------------------------------------------- layout


def as_rows(weight: torch.Tensor, axis: int = 1) -> torch.Tensor:
    """``(out, in, *k)`` -> ``(out * prod(k), in)``: one row per (out, kernel position).

    ``axis`` is the reduction (input-channel) axis; it becomes the columns. The one
    row/column view of a weight that masks, magnitudes, checks and the permutation
    search share.
    """
    if weight.dim() == 2 and axis in (1, -1):
        return weight
    return weight.movedim(axis, -1).reshape(-1, weight.shape[axis])


def from_rows(rows: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The inverse of :func:`as_rows` (reduction axis 1) for a weight of ``shape``."""
    if len(shape) == 2:
        return rows.reshape(shape)
    return rows.reshape(shape[0], *shape[2:], shape[1]).movedim(-1, 1)


def require_nm_weight(weight: torch.Tensor, pat: NMPattern) -> None:
    """Raise a :class:`SparsityError` unless ``weight`` has input channels in whole M-groups."""
    if weight.dim() < 2:
        raise SparsityError(
            f"N:M masks apply to conv/linear weights (2-D or more), got shape {tuple(weight.shape)}"
        )
    if weight.shape[1] % pat.m:
        raise SparsityError(
            f"reduction dim (input channels) {weight.shape[1]} of weight {tuple(weight.shape)} "
            f"is not a multiple of M={pat.m}"
        )


# --------------------------------------------------------------------------- masks


def nm_mask(
    weight: torch.Tensor, pattern: str | tuple[int, int] | NMPattern = "2:4"
) -> torch.Tensor:
    """Boolean mask keeping the N largest-|w| of every M consecutive input channels.

    ``weight`` is a Linear ``(out, in)`` or Conv ``(out, in, *kernel)`` weight; the
    groups run along ``in`` for every other index, as TensorRT's sparse kernels and
    apex ASP's ``m4n2_1d`` expect. Every group keeps exactly N entries (ties are
    broken by position), so the result has N/M density.
    """
    pat = parse_pattern(pattern)
    require_tensor("weight", weight)
    require_nm_weight(weight, pat)
    rows = as_rows(weight.detach().abs().float())
    groups = rows.reshape(rows.shape[0], -1, pat.m)
    keep = groups.topk(pat.n, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return from_rows(mask.reshape(rows.shape), weight.shape)


def nm_eligibility(
    weight: torch.Tensor | torch.Size | tuple[int, ...],
    pattern: str | tuple[int, int] | NMPattern = "2:4",
    groups: int = 1,
    min_size: int = DEFAULT_MIN_SIZE,
    align: bool = True,
) -> tuple[bool, str]:
    """Whether a conv/linear weight can usefully be N:M sparse, and why not.

    ``weight`` may be the tensor or just its shape. ``align`` applies apex ASP's
    tensor-core check (``out % 8 == 0`` and ``in % 16 == 0``); sparse kernels are
    only selected for aligned GEMMs. Returns ``(True, "eligible")`` or
    ``(False, reason)``.
    """
    pat = parse_pattern(pattern)
    validate.integer_at_least("groups", groups, 1, "the convolution's groups", SparsityError)
    validate.integer_at_least(
        "min_size", min_size, 0, "fewest weights of a sparsified layer", SparsityError
    )
    validate.boolean("align", align, SparsityError)
    if isinstance(weight, torch.Tensor):
        if not (weight.is_floating_point()):
            return False, f"dtype {weight.dtype} is not floating point"
        shape = tuple(weight.shape)
    else:
        shape = tuple(int(d) for d in weight)
    if len(shape) < 2:
        return False, f"shape {shape} is not a conv/linear weight (needs 2 or more dims)"
    if groups != 1:
        kind = "depthwise" if shape[1] == 1 else "grouped"
        return False, (
            f"{kind} convolution (groups={groups}): sparse tensor-core kernels need a dense "
            f"reduction over {shape[1]} channels per group"
        )
    out_c, in_c = shape[0], shape[1]
    if in_c % pat.m:
        return False, f"reduction dim (input channels) {in_c} is not a multiple of M={pat.m}"
    numel = math.prod(shape)
    if numel < min_size:
        return False, f"{numel} weights < min_size={min_size}: too small for sparse kernels to gain"
    if align and (out_c % 8 or in_c % 16):
        return (
            False,
            f"out={out_c} not a multiple of 8 or in={in_c} not a multiple of 16 (tensor-core alignment)",
        )
    return True, "eligible"


def _permuted(weight: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    if perm is None:
        return weight
    perm = torch.as_tensor(perm, dtype=torch.long, device=weight.device)
    if perm.numel() != weight.shape[1]:
        raise SparsityError(
            f"permutation has {perm.numel()} entries, weight has {weight.shape[1]} input channels"
        )
    return weight.index_select(1, perm)


def retained_magnitude(
    weight: torch.Tensor,
    pattern: str | tuple[int, int] | NMPattern = "2:4",
    perm: torch.Tensor | None = None,
) -> float:
    """Fraction of ``sum |w|`` that the N:M mask of ``weight[:, perm]`` keeps (1.0 for all-zero weights)."""
    pat = parse_pattern(pattern)
    require_tensor("weight", weight)
    w = _permuted(weight.detach(), perm)
    require_nm_weight(w, pat)
    rows = as_rows(w.abs().double())
    total = rows.sum().item()
    if total == 0:
        return 1.0
    kept = rows.reshape(rows.shape[0], -1, pat.m).topk(pat.n, dim=-1).values.sum().item()
    return kept / total


def per_row_upper_bound(
    weight: torch.Tensor, pattern: str | tuple[int, int] | NMPattern = "2:4"
) -> float:
    """Fraction of ``sum |w|`` kept by the largest N/M of each row, ignoring the group structure.

    No permutation can beat it: every row of every N:M mask keeps exactly N/M of
    its entries. (A row is one output channel of a Linear, one (out, kh, kw)
    position of a Conv.)
    """
    pat = parse_pattern(pattern)
    require_tensor("weight", weight)
    require_nm_weight(weight, pat)
    rows = as_rows(weight.detach().abs().double())
    total = rows.sum().item()
    if total == 0:
        return 1.0
    k = rows.shape[1] * pat.n // pat.m
    return rows.topk(k, dim=1).values.sum().item() / total
