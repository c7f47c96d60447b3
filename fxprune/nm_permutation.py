"""Channel permutations for N:M sparsity: the order of input channels that keeps most.

:func:`search_permutation` finds an order of a weight's input channels under which
the N:M mask keeps more magnitude (the idea of Pool & Yu, "Channel Permutations for
N:M Sparsity", NeurIPS 2021). Permuting a layer's input channels together with its
producer's output channels leaves the network function unchanged, so the magnitude
kept by the permutation is free (``passes/permute_channels.py`` decides which
channels may move together and applies the order to every member).

Problem: order the C columns (input channels) of a (rows, C) magnitude matrix so
that the sum over rows and over groups of M consecutive columns of "the N largest
of the group's M entries in that row" is as large as possible. Only the partition
of columns into groups matters, not the order inside a group or of the groups.

Search: tabu search over swaps of two columns between two groups. The score of a
group depends only on its own M columns, so a swap's gain only involves the two
groups it touches; all C*C swap gains are kept in a table and only the rows and
columns of the two touched groups are recomputed after a swap. The table entry
for "column q replaces column p" has a closed form: with t = the N-th largest and
s = the sum of the N-1 largest of p's M-1 group mates (per row),
    topN(mates + {x}) = s + max(x, t)
so one row of the table is a single vectorised max-and-sum over the block.
Tabu search (best non-tabu swap each step, even when it loses, with a short
random tenure and aspiration) walks out of local optima that plain greedy swaps
(apex's "channel swap") stop in; after a long stall it restarts from the best
order with a few random swaps (apex's "bounded regressions" idea).
Large layers are cut into blocks of groups that are searched one after another
and re-drawn every round, which keeps the per-step work bounded.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from fxprune import validate
from fxprune.nm_patterns import (
    NMPattern,
    SparsityError,
    as_rows,
    parse_pattern,
    require_nm_weight,
    require_tensor,
)

logger = logging.getLogger(__name__)

__all__ = ["search_permutation"]

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
    rows = as_rows(weight.detach().abs().float().cpu())
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
    require_tensor("weight", weight)
    require_nm_weight(weight, pat)
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
    block = _block_groups(c, rows, m, time_budget)
    bar = None
    if progress:
        bar = tqdm(desc=f"permutation {tuple(weight.shape)}", unit="round", leave=False)
    try:
        current, rounds = _search(colmat, perm, current, plain, pat, block, budget, rng, bar)
    finally:
        if bar is not None:
            bar.close()
    logger.debug(
        "permutation search %s %s: %d rounds, %d steps, %.2fs, kept %.4g -> %.4g (blocks of %d groups)",
        tuple(weight.shape),
        pat,
        rounds,
        budget.steps,
        time.perf_counter() - start_time,
        plain,
        current,
        block,
    )
    result = torch.from_numpy(perm.astype(np.int64))
    # The identity is always a candidate: never hand back a worse order.
    return result if _order_score(colmat, perm, n, m) >= plain else identity


def _search(
    colmat: np.ndarray,
    perm: np.ndarray,
    current: float,
    plain: float,
    pat: NMPattern,
    block: int,
    budget: _Budget,
    rng: np.random.Generator,
    bar: tqdm | None,
) -> tuple[float, int]:
    """Rounds of tabu search over blocks of groups, improving ``perm`` in place.

    Returns (the score of ``perm``, the number of rounds). With one block holding every
    group the search is long tabu runs with restarts, and stops after two rounds
    without progress; with several blocks, they are re-drawn every round (so that any
    two groups eventually meet) and each round without progress searches deeper.
    """
    c = colmat.shape[0]
    groups = c // pat.m
    single = block >= groups
    rounds = idle_rounds = level = 0
    while not budget.out():
        rounds += 1
        if single:
            order, steps, stall = np.arange(groups), max(2000, 16 * c), max(300, 4 * c)
        else:
            order, stall = rng.permutation(groups), _STALL_LEVELS[level]
            steps = 16 * stall
        gain = _round(colmat, perm, pat, order, block, steps, stall, budget, rng, single)
        current += gain
        if bar is not None:
            bar.update(1)
            bar.set_postfix(kept=f"{current / max(plain, 1e-30):.4f}x", steps=budget.steps)
        if gain > 0:
            idle_rounds = 0
            continue
        idle_rounds += 1
        if single and idle_rounds >= 2:
            break
        if not single:
            level += 1
            if level == len(_STALL_LEVELS):
                break
    return current, rounds


def _round(
    colmat: np.ndarray,
    perm: np.ndarray,
    pat: NMPattern,
    order: np.ndarray,
    block: int,
    steps: int,
    stall: int,
    budget: _Budget,
    rng: np.random.Generator,
    restart: bool,
) -> float:
    """One tabu search per block of the groups in ``order``; returns the score gained."""
    n, m = pat.n, pat.m
    gained = 0.0
    for b0 in range(0, len(order), block):
        if budget.out():
            break
        gsel = order[b0 : b0 + block]
        if len(gsel) < 2:
            continue
        slots = (np.sort(gsel)[:, None] * m + np.arange(m)).ravel()
        sub = perm[slots]
        best_ids, before, after = _tabu_block(colmat[sub], n, m, rng, steps, stall, budget, restart)
        if after > before + 1e-9 * max(1.0, abs(before)):
            perm[slots] = sub[best_ids]
            gained += after - before
    return gained
