"""N:M structured sparsity at the weight level: masks, channel permutations, checks.

This is the weight half of fxprune's 2:4 feature (the graph half decides which
layers may be permuted and applies the permutation to their producers):

- :func:`nm_mask` keeps the N largest-magnitude weights of every M consecutive
  weights along the reduction (input-channel) dimension, in the layout that
  TensorRT / cuSPARSELt and NVIDIA apex ASP use: a Linear weight ``(out, in)``
  is grouped along ``in``; a Conv weight ``(out, in, kh, kw)`` is grouped along
  ``in`` separately for every ``(out, kh, kw)`` position.
- :func:`search_permutation` finds an order of the input channels under which
  that mask keeps more magnitude (the idea of Pool & Yu, "Channel Permutations
  for N:M Sparsity", NeurIPS 2021). Permuting a layer's input channels together
  with its producer's output channels leaves the network function unchanged, so
  the magnitude kept by the permutation is free.
- :func:`apply_nm_masks` / :func:`bake_masks` keep the zeros in place while
  fine-tuning (``torch.nn.utils.parametrize``) and then leave plain tensors with
  the original parameter names.
- :func:`check_nm` / :func:`check_onnx_nm` verify the pattern on a module, a
  state dict or an exported ONNX file.

Every weight is viewed as a matrix of *rows* and *columns*: the columns are the
input channels (the unit a permutation moves), the rows are everything else
(``out`` for Linear, ``out * kh * kw`` for Conv). An N:M group is M consecutive
columns within one row.
"""

from __future__ import annotations

import difflib
import logging
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from fxprune import validate
from fxprune.errors import FxpruneError

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MIN_SIZE",
    "NMLayerCheck",
    "NMMask",
    "NMPattern",
    "NMReport",
    "SparsityError",
    "apply_nm_masks",
    "bake_masks",
    "check_nm",
    "check_onnx_nm",
    "nm_eligibility",
    "nm_mask",
    "parse_pattern",
    "per_row_upper_bound",
    "retained_magnitude",
    "search_permutation",
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


def _check_tensor(name: str, value: object) -> None:
    if not isinstance(value, torch.Tensor):
        validate.fail(SparsityError, name, "a torch.Tensor (a conv or linear weight)", value)


# --------------------------------------------------------------------------- layout


def _as_rows(weight: torch.Tensor) -> torch.Tensor:
    """``(out, in, *k)`` -> ``(out * prod(k), in)``: one row per (out, kernel position)."""
    if weight.dim() == 2:
        return weight
    return weight.movedim(1, -1).reshape(-1, weight.shape[1])


def _from_rows(rows: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    if len(shape) == 2:
        return rows.reshape(shape)
    return rows.reshape(shape[0], *shape[2:], shape[1]).movedim(-1, 1)


def _check_weight(weight: torch.Tensor, pat: NMPattern) -> None:
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
    _check_tensor("weight", weight)
    _check_weight(weight, pat)
    rows = _as_rows(weight.detach().abs().float())
    groups = rows.reshape(rows.shape[0], -1, pat.m)
    keep = groups.topk(pat.n, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return _from_rows(mask.reshape(rows.shape), weight.shape)


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
    _check_tensor("weight", weight)
    w = _permuted(weight.detach(), perm)
    _check_weight(w, pat)
    rows = _as_rows(w.abs().double())
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
    _check_tensor("weight", weight)
    _check_weight(weight, pat)
    rows = _as_rows(weight.detach().abs().double())
    total = rows.sum().item()
    if total == 0:
        return 1.0
    k = rows.shape[1] * pat.n // pat.m
    return rows.topk(k, dim=1).values.sum().item() / total


# --------------------------------------------------------------------------- permutation search
#
# Problem: order the C columns (input channels) of a (rows, C) magnitude matrix so
# that the sum over rows and over groups of M consecutive columns of "the N largest
# of the group's M entries in that row" is as large as possible. Only the partition
# of columns into groups matters, not the order inside a group or of the groups.
#
# Search: tabu search over swaps of two columns between two groups. The score of a
# group depends only on its own M columns, so a swap's gain only involves the two
# groups it touches; all C*C swap gains are kept in a table and only the rows and
# columns of the two touched groups are recomputed after a swap. The table entry
# for "column q replaces column p" has a closed form: with t = the N-th largest and
# s = the sum of the N-1 largest of p's M-1 group mates (per row),
#     topN(mates + {x}) = s + max(x, t)
# so one row of the table is a single vectorised max-and-sum over the block.
# Tabu search (best non-tabu swap each step, even when it loses, with a short
# random tenure and aspiration) walks out of local optima that plain greedy swaps
# (apex's "channel swap") stop in; after a long stall it restarts from the best
# order with a few random swaps (apex's "bounded regressions" idea).
# Large layers are cut into blocks of groups that are searched one after another
# and re-drawn every round, which keeps the per-step work bounded.

# Nominal single-core throughput (element-ops per second) of the vectorised
# max-and-sum. Only used to size blocks from the shape and the budget, so that the
# block layout (and with it the result) does not depend on how loaded the machine is.
_NOMINAL_OPS_PER_S = 1.5e9
_TENURE = 4  # tabu tenure is drawn from [_TENURE, 2 * _TENURE)
_KICK_SWAPS = 8  # random swaps applied when restarting from the best order
# Steps without a new best before a block is left, in multi-block rounds: start
# with near-greedy descent (cheap, most of the gain on large layers) and search
# deeper each time a whole round finds nothing.
_STALL_LEVELS = (2, 8, 32, 128, 512)


def _column_matrix(weight: torch.Tensor) -> np.ndarray:
    """|w| as a contiguous float32 ``(C, rows)`` array: one row per input channel."""
    rows = _as_rows(weight.detach().abs().float().cpu())
    return np.ascontiguousarray(rows.numpy().T)


class _SwapTable:
    """Every column swap between two groups of a block, with its exact gain kept current.

    ``cols[slot]`` is the magnitude vector (over rows) of the column in that slot;
    slots ``g*m .. g*m+m-1`` form group ``g``. ``ids[slot]`` names the column (its
    index in the block as given).
    """

    def __init__(self, cols: np.ndarray, n: int, m: int) -> None:
        self.n, self.m = n, m
        self.cols = np.array(cols, dtype=np.float32, copy=True)
        c = self.cols.shape[0]
        self.ids = np.arange(c)
        self.slot_of = np.arange(c)
        self.group = np.arange(c) // m
        self.score = np.zeros(c // m, dtype=np.float64)
        # replace[p, q]: score of p's group with the column in slot q in place of p's.
        self.replace = np.empty((c, c), dtype=np.float32)
        chunk = max(1, (1 << 22) // max(1, c * self.cols.shape[1] * m))
        for g0 in range(0, c // m, chunk):
            self._refresh(np.arange(g0, min(c // m, g0 + chunk)))
        s = self.score[self.group].astype(np.float32)
        self.gain = self.replace + self.replace.T - s[:, None] - s[None, :]
        self.gain[self.group[:, None] == self.group[None, :]] = -np.inf

    @property
    def total(self) -> float:
        return float(self.score.sum())

    def _refresh(self, groups: np.ndarray) -> np.ndarray:
        n, m = self.n, self.m
        slots = (groups[:, None] * m + np.arange(m)).ravel()
        members = self.cols[slots].reshape(len(groups), m, -1)  # (g, m, rows)
        top, nth, after = _order_stats(members, n)
        self.score[groups] = top.sum(axis=1, dtype=np.float64)
        # Per member x of a group, with v_N / v_N+1 the N-th / (N+1)-th largest of the
        # group: its mates' top N-1 sum to top - max(x, v_N), and their N-th largest
        # is v_N+1 if x is kept, else v_N.
        x = members
        rest = (top[:, None, :] - np.maximum(x, nth[:, None, :])).sum(axis=2, dtype=np.float64)
        mate_nth = np.where(x >= nth[:, None, :], after[:, None, :], nth[:, None, :])
        mate_nth = mate_nth.reshape(len(slots), -1)
        self.replace[slots] = rest.reshape(-1, 1) + np.maximum(
            self.cols[None, :, :], mate_nth[:, None, :]
        ).sum(axis=-1, dtype=np.float32)
        return slots

    def swap(self, p: int, q: int) -> None:
        for arr in (self.ids, self.cols):
            arr[[p, q]] = arr[[q, p]]
        self.slot_of[self.ids[[p, q]]] = [p, q]
        self.replace[:, [p, q]] = self.replace[:, [q, p]]
        touched = self._refresh(np.array(sorted({p // self.m, q // self.m})))
        s = self.score[self.group].astype(np.float32)
        rows = self.replace[touched] + self.replace[:, touched].T - s[touched][:, None] - s[None, :]
        rows[self.group[touched][:, None] == self.group[None, :]] = -np.inf
        self.gain[touched] = rows
        self.gain[:, touched] = rows.T


@dataclass
class _Budget:
    """Wall-clock deadline plus an optional cap on search steps (for exact reproducibility)."""

    deadline: float
    max_steps: int | None
    steps: int = 0

    def out(self) -> bool:
        return (
            self.max_steps is not None and self.steps >= self.max_steps
        ) or time.perf_counter() >= self.deadline


def _tabu_block(
    cols: np.ndarray,
    n: int,
    m: int,
    rng: np.random.Generator,
    steps: int,
    stall: int,
    budget: _Budget,
    restart: bool,
) -> tuple[np.ndarray, float, float]:
    """Tabu search on one block; returns (best order of the block's columns, start score, best score).

    After ``stall`` steps without a new best it either restarts from the best order
    shaken by a few random swaps (``restart``) or gives up on the block.
    """
    table = _SwapTable(cols, n, m)
    start = best = table.total
    best_ids = table.ids.copy()
    c = len(best_ids)
    # (column id, group) -> step until which the column may not move back into the group.
    tabu: dict[tuple[int, int], int] = {}
    since_best = 0
    for step in range(steps):
        if budget.out():
            break
        budget.steps += 1
        if tabu:
            tabu = {k: v for k, v in tabu.items() if v > step}
        if tabu:
            # Forbid moving a column back into a group it recently left, unless it beats the best.
            keys = np.array(list(tabu))
            rows = table.slot_of[keys[:, 0]]
            targets = keys[:, 1:2] * m + np.arange(m)
            held = table.gain[rows[:, None], targets].copy()
            table.gain[rows[:, None], targets] = -np.inf
            table.gain[targets, rows[:, None]] = -np.inf
        flat = int(table.gain.argmax())
        p, q = divmod(flat, c)
        gain = float(table.gain[p, q])
        if tabu:
            table.gain[rows[:, None], targets] = held
            table.gain[targets, rows[:, None]] = held
            k = int(held.argmax())
            if held.flat[k] > gain and table.total + held.flat[k] > best + 1e-6:
                p, q = int(rows[k // m]), int(targets.flat[k])
                gain = float(held.flat[k])
        if not np.isfinite(gain):
            break  # a single group: nothing to swap
        x, y = int(table.ids[p]), int(table.ids[q])
        gp, gq = int(table.group[p]), int(table.group[q])
        table.swap(p, q)
        tenure = _TENURE + int(rng.integers(0, _TENURE))
        tabu[(x, gp)] = step + tenure
        tabu[(y, gq)] = step + tenure
        if table.total > best + 1e-9 * max(1.0, abs(best)):
            best, best_ids, since_best = table.total, table.ids.copy(), 0
            continue
        since_best += 1
        if since_best >= stall:
            if not restart:
                break
            # Stalled: restart from the best order shaken by a few random swaps.
            kicked = best_ids.copy()
            for _ in range(min(_KICK_SWAPS, c // m)):
                a, b = rng.choice(c, 2, replace=False)
                kicked[[a, b]] = kicked[[b, a]]
            table = _SwapTable(cols[kicked], n, m)
            table.ids = kicked.copy()
            table.slot_of[kicked] = np.arange(c)
            tabu, since_best = {}, 0
    return best_ids, start, best


def _initial_order(colmat: np.ndarray, n: int, m: int, plain: float) -> tuple[np.ndarray, float]:
    """The better of the identity and a strength-balanced order.

    The balanced order gives every group N columns from the strong half and M-N
    from the weak half (by column L1 norm), which is what trained weights with
    per-channel scale differences want; on i.i.d. weights the identity is as good.
    """
    c = colmat.shape[0]
    strength = colmat.sum(axis=1, dtype=np.float64)
    order = np.argsort(-strength, kind="stable")
    n_strong = c * n // m
    strong = order[:n_strong].reshape(-1, n)
    weak = order[n_strong:].reshape(-1, m - n)
    balanced = np.concatenate([strong, weak], axis=1).ravel()
    score = _order_score(colmat, balanced, n, m)
    return (balanced, score) if score > plain else (np.arange(c), plain)


def _order_stats(members: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For groups ``(g, m, rows)``: (sum of the N largest, N-th largest, (N+1)-th largest) per row.

    An odd-even transposition network on the m slices: numpy's sort along a short
    axis costs about ten times more.
    """
    m = members.shape[1]
    v = [members[:, i] for i in range(m)]
    for rnd in range(m):
        for i in range(rnd % 2, m - 1, 2):
            v[i], v[i + 1] = np.maximum(v[i], v[i + 1]), np.minimum(v[i], v[i + 1])
    top = v[0].copy()
    for i in range(1, n):
        top += v[i]
    return top, v[n - 1], v[n]


def _order_score(colmat: np.ndarray, order: np.ndarray, n: int, m: int) -> float:
    """Magnitude the N:M mask keeps with the columns in ``order`` (chunked to bound memory)."""
    total = 0.0
    step = max(m, (1 << 22) // max(1, colmat.shape[1]) // m * m)
    for c0 in range(0, len(order), step):
        groups = colmat[order[c0 : c0 + step]].reshape(-1, m, colmat.shape[1])
        total += float(_order_stats(groups, n)[0].sum(dtype=np.float64))
    return total


def _block_groups(c: int, rows: int, m: int, time_budget: float) -> int:
    """Groups per block: up to 128 columns, fewer when a round would not fit the budget.

    A round over blocks of b columns costs about C * rows * b * (M + 1) element-ops
    (each block's swap table plus ~b/2 swaps); the block is the largest whose round
    fits a third of the budget. Sized from the shape and the budget only, never from
    measured speed, so that the block layout (and the result) is reproducible.
    """
    for cols in (128, 64):
        if c * rows * min(cols, c) * (m + 1) / _NOMINAL_OPS_PER_S <= time_budget / 3:
            return max(2, min(c // m, cols // m))
    return max(2, min(c // m, 32 // m))


def _search_arguments(weight, pattern, time_budget, seed, progress, max_steps) -> NMPattern:
    """Check :func:`search_permutation`'s arguments; returns the parsed pattern."""
    pat = parse_pattern(pattern)
    _check_tensor("weight", weight)
    _check_weight(weight, pat)
    validate.number_in(
        "time_budget",
        time_budget,
        0.0,
        math.inf,
        "seconds of search",
        low_open=True,
        error=SparsityError,
    )
    validate.integer_at_least("seed", seed, 0, error=SparsityError)
    validate.boolean("progress", progress, SparsityError)
    if max_steps is not None:
        validate.integer_at_least("max_steps", max_steps, 1, "swap steps", SparsityError)
    return pat


def search_permutation(
    weight: torch.Tensor,
    pattern: str | tuple[int, int] | NMPattern = "2:4",
    time_budget: float = 2.0,
    seed: int = 0,
    progress: bool = False,
    max_steps: int | None = None,
) -> torch.Tensor:
    """Permutation of the input channels under which the N:M mask keeps the most magnitude.

    Returns ``perm`` (LongTensor of length ``in``) such that ``nm_mask(weight[:, perm])``
    keeps at least as much ``sum |w|`` as ``nm_mask(weight)`` and usually much more.
    Works for Linear ``(out, in)`` and Conv ``(out, in, *kernel)`` weights; for a conv,
    a channel's columns at every kernel position move together, so all
    ``out * kh * kw`` rows take part in the objective.

    The search stops at ``time_budget`` seconds of wall clock, after ``max_steps``
    swap steps, or when a whole round improves nothing, whichever is first. Its
    random choices come from ``seed`` and the block layout from the shape and
    budget, so two calls give the same permutation whenever the clock is not what
    stopped them; set ``max_steps`` (with a generous budget) for bit-exact runs on
    a loaded machine. When the clock stops it, the answer is the best order found
    so far, never worse than the identity.
    """
    pat = _search_arguments(weight, pattern, time_budget, seed, progress, max_steps)
    start_time = time.perf_counter()
    n, m = pat.n, pat.m
    colmat = _column_matrix(weight)
    c, rows = colmat.shape
    identity = torch.arange(c, dtype=torch.long)
    if c <= m or not np.any(colmat):
        return identity
    budget = _Budget(start_time + time_budget, max_steps)
    rng = np.random.default_rng(seed)

    # The tensors here are small and the work is a long chain of small numpy ops;
    # numpy runs them on one core, which on a shared 2-core machine is both faster
    # and far steadier than torch's intra-op threads.
    plain = _order_score(colmat, identity.numpy(), n, m)
    perm, current = _initial_order(colmat, n, m, plain)
    groups = c // m
    block = _block_groups(c, rows, m, time_budget)
    single = block >= groups
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(desc=f"permutation {tuple(weight.shape)}", unit="round", leave=False)
    rounds = idle_rounds = level = 0
    while not budget.out():
        rounds += 1
        if single:
            # One block holds every group: long tabu runs with restarts from the best.
            order, steps, stall = np.arange(groups), max(2000, 16 * c), max(300, 4 * c)
        else:
            # Blocks re-drawn every round, so that any two groups eventually meet.
            order, stall = rng.permutation(groups), _STALL_LEVELS[level]
            steps = 16 * stall
        improved = False
        for b0 in range(0, groups, block):
            if budget.out():
                break
            gsel = order[b0 : b0 + block]
            if len(gsel) < 2:
                continue
            slots = (np.sort(gsel)[:, None] * m + np.arange(m)).ravel()
            sub = perm[slots]
            best_ids, before, after = _tabu_block(
                colmat[sub], n, m, rng, steps, stall, budget, single
            )
            if after > before + 1e-9 * max(1.0, abs(before)):
                perm[slots] = sub[best_ids]
                current += after - before
                improved = True
        if bar is not None:
            bar.update(1)
            bar.set_postfix(kept=f"{current / max(plain, 1e-30):.4f}x", steps=budget.steps)
        if improved:
            idle_rounds = 0
            continue
        idle_rounds += 1
        if single and idle_rounds >= 2:
            break
        if not single:
            level += 1
            if level == len(_STALL_LEVELS):
                break
    if bar is not None:
        bar.close()
    elapsed = time.perf_counter() - start_time
    logger.debug(
        "permutation search %s %s: %d rounds, %d steps, %.2fs, kept %.4g -> %.4g (blocks of %d groups)",
        tuple(weight.shape),
        pat,
        rounds,
        budget.steps,
        elapsed,
        plain,
        current,
        block,
    )
    result = torch.from_numpy(perm.astype(np.int64))
    # The identity is always a candidate: never hand back a worse order.
    return result if _order_score(colmat, perm, n, m) >= plain else identity


# --------------------------------------------------------------------------- masked training


class NMMask(nn.Module):
    """Parametrization ``w -> w * mask``; the mask is a buffer saved with the module."""

    def __init__(self, mask: torch.Tensor, owner_order: list[str] | None = None) -> None:
        super().__init__()
        self.register_buffer("mask", mask.detach().to(torch.bool).clone())
        # The owner's parameter order before parametrization, restored by bake_masks so
        # that state_dict() and parameters() come out in the original order.
        self.owner_order = list(owner_order or [])

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask


def _owner(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return (module.get_submodule(path) if path else module), attr


def apply_nm_masks(module: nn.Module, masks: Mapping[str, torch.Tensor]) -> nn.Module:
    """Make each named parameter read as ``param * mask`` so zeros stay zero in training.

    ``masks`` maps parameter names (``"layer1.0.conv1.weight"``) to boolean masks of
    the same shape. Gradients of masked entries are zero because the mask is in
    the forward computation, so any optimizer keeps the pattern. Applied twice, the
    masks combine (logical and). Returns ``module`` (changed in place).
    """
    validate.module("module", module, SparsityError)
    if not isinstance(masks, Mapping):
        validate.fail(SparsityError, "masks", "a dict {parameter name: boolean mask}", masks)
    params = dict(module.named_parameters())
    for name, mask in masks.items():
        if name not in params and not _is_masked(module, name):
            close = difflib.get_close_matches(str(name), list(params), n=1)
            raise SparsityError(
                f"masks: {name!r} is not a parameter of the module."
                + (f" Did you mean {close[0]!r}?" if close else "")
            )
        _check_tensor(f"masks[{name!r}]", mask)
        owner, attr = _owner(module, name)
        if parametrize.is_parametrized(owner, attr):
            for p in owner.parametrizations[attr]:
                if isinstance(p, NMMask):
                    p.mask &= mask.to(p.mask.device, torch.bool)
                    break
            else:
                raise SparsityError(f"{name} already has parametrizations that are not N:M masks")
            continue
        param = getattr(owner, attr)
        if tuple(mask.shape) != tuple(param.shape):
            raise SparsityError(
                f"mask for {name} has shape {tuple(mask.shape)}, parameter has {tuple(param.shape)}"
            )
        order = list(owner._parameters.keys())
        parametrize.register_parametrization(owner, attr, NMMask(mask.to(param.device), order))
    return module


def _is_masked(module: nn.Module, name: str) -> bool:
    """``name`` is a parametrized parameter (``apply_nm_masks`` applied a second time)."""
    path, _, attr = name.rpartition(".")
    try:
        owner = module.get_submodule(path) if path else module
    except AttributeError:
        return False
    return parametrize.is_parametrized(owner, attr)


def bake_masks(module: nn.Module) -> nn.Module:
    """Remove the :class:`NMMask` parametrizations, leaving plain masked parameters.

    After baking, ``state_dict()`` keys are the original parameter names again.
    Returns ``module`` (changed in place).
    """
    for sub in list(module.modules()):
        if not parametrize.is_parametrized(sub):
            continue
        for attr in list(sub.parametrizations.keys()):
            masks = [p for p in sub.parametrizations[attr] if isinstance(p, NMMask)]
            if not masks:
                continue
            parametrize.remove_parametrizations(sub, attr, leave_parametrized=True)
            rank = {name: i for i, name in enumerate(masks[0].owner_order)}
            params = sorted(sub._parameters.items(), key=lambda kv: rank.get(kv[0], len(rank)))
            sub._parameters.clear()
            sub._parameters.update(params)
    return module


# --------------------------------------------------------------------------- checks


@dataclass
class NMLayerCheck:
    """The N:M check of one weight.

    ``passed``: every M-group along the reduction axis has at most N nonzeros.
    ``sparsity``: fraction of exact zeros. ``retained``: fraction of ``sum |w|``
    that the N:M mask of this weight keeps (1.0 when it already follows the
    pattern; for a dense weight, what masking it would keep). ``violations``:
    number of groups with more than N nonzeros.
    """

    name: str
    shape: tuple[int, ...]
    axis: int
    passed: bool
    sparsity: float
    retained: float
    violations: int
    groups: int


@dataclass
class NMReport:
    """Per-layer N:M verdicts, plus the weights skipped and why."""

    pattern: NMPattern
    layers: list[NMLayerCheck] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """True when at least one weight was checked and every checked weight follows the pattern."""
        return bool(self.layers) and all(layer.passed for layer in self.layers)

    @property
    def failed(self) -> list[NMLayerCheck]:
        return [layer for layer in self.layers if not layer.passed]

    def __str__(self) -> str:
        width = max([len(layer.name) for layer in self.layers] + [5])
        lines = [
            f"N:M check {self.pattern}: {len(self.layers) - len(self.failed)}/{len(self.layers)} weights pass"
            f", {len(self.skipped)} skipped",
            f"{'layer':<{width}}  {'shape':<20} {'ok':<4} {'sparsity':>8} {'retained':>8} {'bad groups':>10}",
        ]
        for la in self.layers:
            lines.append(
                f"{la.name:<{width}}  {la.shape!s:<20} {'yes' if la.passed else 'NO':<4} "
                f"{la.sparsity:>8.3f} {la.retained:>8.3f} {la.violations:>6}/{la.groups}"
            )
        lines += [f"skipped {name}: {reason}" for name, reason in self.skipped]
        return "\n".join(lines)


def _check_array(name: str, values: np.ndarray, axis: int, pat: NMPattern) -> NMLayerCheck:
    """Check the N:M pattern of ``values`` along ``axis`` (groups of M consecutive entries)."""
    arr = np.moveaxis(np.asarray(values, dtype=np.float64), axis, -1)
    groups = np.abs(arr).reshape(-1, arr.shape[-1] // pat.m, pat.m)
    nonzero = (groups != 0).sum(axis=-1)
    violations = int((nonzero > pat.n).sum())
    total = float(groups.sum())
    kept = float(-np.sort(-groups, axis=-1)[..., : pat.n].sum()) if total else 0.0
    return NMLayerCheck(
        name=name,
        shape=tuple(int(d) for d in values.shape),
        axis=axis,
        passed=violations == 0,
        sparsity=float(1.0 - nonzero.sum() / max(1, groups.size)),
        retained=kept / total if total else 1.0,
        violations=violations,
        groups=int(nonzero.size),
    )


def _nm_weights(module: nn.Module) -> Iterable[tuple[str, torch.Tensor, int]]:
    """(name, weight, groups) of every Linear, (non-transposed) Conv and MHA input projection."""
    for mod_name, mod in module.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        if isinstance(mod, nn.Linear):
            yield prefix + "weight", mod.weight, 1
        elif isinstance(mod, nn.MultiheadAttention) and mod.in_proj_weight is not None:
            yield prefix + "in_proj_weight", mod.in_proj_weight, 1
        elif isinstance(mod, nn.modules.conv._ConvNd) and not mod.transposed:
            yield prefix + "weight", mod.weight, mod.groups


def check_nm(
    module_or_state_dict: nn.Module | Mapping[str, torch.Tensor],
    pattern: str | tuple[int, int] | NMPattern = "2:4",
    names: Iterable[str] | None = None,
    min_size: int = DEFAULT_MIN_SIZE,
    align: bool = True,
) -> NMReport:
    """Verify the N:M pattern on every eligible conv/linear weight.

    For a module, the weights are those of ``nn.Linear`` and ``nn.Conv*d`` (their
    ``groups`` decides eligibility); for a state dict, every floating tensor with
    2 or more dims (pass ``names`` to leave out e.g. embeddings). Weights that
    :func:`nm_eligibility` rejects with the same ``min_size``/``align`` are
    listed in ``report.skipped`` with the reason, so a model sparsified with the
    default eligibility checks clean.
    """
    pat = parse_pattern(pattern)
    if not isinstance(module_or_state_dict, (nn.Module, Mapping)):
        validate.fail(
            SparsityError, "module_or_state_dict", "a module or a state dict", module_or_state_dict
        )
    if isinstance(names, str):
        validate.fail(SparsityError, "names", "a list of parameter names", names)
    if isinstance(module_or_state_dict, nn.Module):
        candidates = list(_nm_weights(module_or_state_dict))
    else:
        candidates = [
            (k, v, 1)
            for k, v in module_or_state_dict.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() >= 2
        ]
    wanted = set(names) if names is not None else None
    report = NMReport(pat)
    for name, weight, groups in candidates:
        if wanted is not None and name not in wanted:
            continue
        ok, reason = nm_eligibility(weight, pat, groups=groups, min_size=min_size, align=align)
        if not ok:
            report.skipped.append((name, reason))
            continue
        report.layers.append(_check_array(name, weight.detach().float().cpu().numpy(), 1, pat))
    if wanted is not None:
        missing = wanted - {name for name, _, _ in candidates}
        report.skipped += [
            (name, "not a conv/linear weight of this model") for name in sorted(missing)
        ]
    return report


# ONNX ops whose output has the same layout as their first input (so a weight seen
# through them keeps its reduction axis), and the reduction axis of each consumer.
_ONNX_PASSTHROUGH = {"Cast", "Identity", "QuantizeLinear", "DequantizeLinear", "CastLike"}


def _onnx_weight_uses(model) -> list[tuple[str, int, int, str]]:
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
    import onnx
    from onnx import numpy_helper

    pat = parse_pattern(pattern)
    validate.path_like("onnx_path", onnx_path, SparsityError)
    if not Path(onnx_path).is_file():
        raise SparsityError(f"onnx_path: no such file {str(onnx_path)!r}.")
    model = onnx.load(str(onnx_path))
    consts: dict[str, np.ndarray] = {
        t.name: numpy_helper.to_array(t) for t in model.graph.initializer
    }
    producer = {}
    for node in model.graph.node:
        for out in node.output:
            producer[out] = node
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    consts[node.output[0]] = numpy_helper.to_array(a.t)

    def resolve(name: str, axis: int) -> tuple[str, int] | None:
        """Follow ``name`` back to a constant, mapping the axis through transposes."""
        for _ in range(16):
            if name in consts:
                return name, axis
            node = producer.get(name)
            if node is None or not node.input:
                return None
            if node.op_type == "Transpose":
                perm = [a for a in node.attribute if a.name == "perm"]
                rank = None
                if perm:
                    order = list(perm[0].ints)
                    rank = len(order)
                    axis = order[axis % rank]
                else:
                    return None  # a default (reversing) transpose without known rank: give up
            elif node.op_type not in _ONNX_PASSTHROUGH:
                return None
            name = node.input[0]
        return None

    report = NMReport(pat)
    seen: set[tuple[str, int]] = set()
    for tensor, axis, groups, consumer in _onnx_weight_uses(model):
        found = resolve(tensor, axis)
        if found is None:
            continue
        name, axis = found
        values = consts[name]
        axis %= values.ndim
        if (name, axis) in seen:
            continue
        seen.add((name, axis))
        label = f"{name} ({consumer})"
        if not np.issubdtype(values.dtype, np.floating) and values.dtype.kind != "V":
            report.skipped.append((label, f"dtype {values.dtype} is not floating point"))
            continue
        values = values.astype(np.float32)
        # Seen as (out, in, ...) so that nm_eligibility judges it like a torch weight.
        if values.ndim == 2 and axis == 0:
            view_shape = (values.shape[1], values.shape[0])
        else:
            view_shape = (
                values.shape[0],
                values.shape[axis],
                *(d for i, d in enumerate(values.shape) if i not in (0, axis)),
            )
        ok, reason = nm_eligibility(
            tuple(view_shape), pat, groups=groups, min_size=min_size, align=align
        )
        if not ok:
            report.skipped.append((label, reason))
            continue
        report.layers.append(_check_array(label, values, axis, pat))
    return report
