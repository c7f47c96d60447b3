"""Channel analysis data structures: atoms, layouts, groups.

Every element of every channel-carrying tensor dimension is owned by an *atom*.
Ops relate atoms (a residual add unions the atoms of its operands position by
position; a conv binds its weight's input columns to its input's atoms). After
propagation, each union class of atoms is one *channel*: a set of coordinates that
must be kept or removed together. A :class:`PruneGroup` gathers the channels that
one parameter dimension produces (a conv's output rows and everything tied to them
by residuals, norms and depthwise convs) and lists every parameter slice that
holds them.

A :class:`Layout` says which atom owns each position of a tensor: an integer array
broadcastable to the tensor's shape, ``-1`` where no atom does (batch, spatial or
untracked positions). fxprune keeps every layout *rectangular*: it varies along at
most one dimension, so removing channels always leaves a dense tensor.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

NO_ATOM = -1


def unique(a: np.ndarray) -> np.ndarray:
    """Sorted distinct values of a 1-D int array. np.unique's hashing is slow on the small
    arrays the analysis handles by the thousand; a sort is not."""
    if len(a) < 2:
        return a.copy()
    s = np.sort(a)
    return s[np.concatenate(([True], s[1:] != s[:-1]))]


def unique_in_order(a: np.ndarray) -> np.ndarray:
    """Distinct values of a 1-D int array, in order of first appearance."""
    if len(a) < 2:
        return a.copy()
    idx = np.argsort(a, kind="stable")
    s = a[idx]
    first = idx[np.concatenate(([True], s[1:] != s[:-1]))]
    return a[np.sort(first)]


class AtomTable:
    """Union-find over atoms, with a freeze reason and an inexactness reason per class."""

    def __init__(self) -> None:
        self._parent = np.zeros(1024, dtype=np.int64)
        self.size = 0
        self.frozen: dict[int, str] = {}
        self.inexact: dict[int, str] = {}

    def new(self, count: int) -> np.ndarray:
        start = self.size
        need = start + count
        if need > len(self._parent):
            grown = np.zeros(max(need, 2 * len(self._parent)), dtype=np.int64)
            grown[: self.size] = self._parent[: self.size]
            self._parent = grown
        self._parent[start:need] = np.arange(start, need)
        self.size = need
        return np.arange(start, need, dtype=np.int64)

    def roots(self) -> np.ndarray:
        """Class id of every atom, indexable by atom (``roots()[atoms]``): one find for all."""
        return self.find(np.arange(self.size, dtype=np.int64))

    def find(self, atoms: Any) -> np.ndarray:
        """Class id (root atom) of each atom; ``-1`` stays ``-1``."""
        a = np.asarray(atoms, dtype=np.int64)
        out = a.copy()
        mask = out >= 0
        if not mask.any():
            return out
        cur = out[mask]
        parent = self._parent
        while True:
            nxt = parent[cur]
            if np.array_equal(nxt, cur):
                break
            cur = nxt
        parent[a[mask]] = cur  # path compression
        out[mask] = cur
        return out

    def _find1(self, x: int) -> int:
        parent = self._parent
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:
            parent[x], x = root, parent[x]
        return int(root)

    def union(self, a: Any, b: Any) -> None:
        """Union atoms position by position (arrays broadcast); pairs with ``-1`` are skipped."""
        a, b = np.broadcast_arrays(np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64))
        ra, rb = self.find(a).ravel(), self.find(b).ravel()
        keep = (ra >= 0) & (rb >= 0) & (ra != rb)
        if not keep.any():
            return
        ra, rb = ra[keep], rb[keep]
        # Connected components of the pair graph by min-label propagation (vectorised: a
        # reshape or a frozen block can relate thousands of atoms at once).
        roots, inv = np.unique(np.concatenate([ra, rb]), return_inverse=True)
        ia, ib = inv[: len(ra)], inv[len(ra) :]
        label = roots.copy()
        while True:
            low = np.minimum(label[ia], label[ib])
            nxt = label.copy()
            np.minimum.at(nxt, ia, low)
            np.minimum.at(nxt, ib, low)
            nxt = nxt[np.searchsorted(roots, nxt)]  # follow labels to their own label
            if np.array_equal(nxt, label):
                break
            label = nxt
        changed = roots != label
        self._parent[roots[changed]] = label[changed]
        moved = dict(zip(roots[changed].tolist(), label[changed].tolist()))
        for reasons in (self.frozen, self.inexact):
            for r in [r for r in reasons if r in moved]:
                reasons.setdefault(moved[r], reasons.pop(r))

    def union_all(self, atoms: Any) -> None:
        """Put every (non ``-1``) atom of ``atoms`` into one class."""
        flat = np.asarray(atoms, dtype=np.int64).ravel()
        flat = flat[flat >= 0]
        if len(flat) > 1:
            self.union(flat[:1], flat[1:])

    def freeze(self, atoms: Any, reason: str) -> None:
        self._mark(self.frozen, atoms, reason)

    def mark_inexact(self, atoms: Any, reason: str) -> None:
        self._mark(self.inexact, atoms, reason)

    def _mark(self, reasons: dict[int, str], atoms: Any, reason: str) -> None:
        roots = np.unique(self.find(np.asarray(atoms).ravel()))
        for r in roots[roots >= 0].tolist():
            if r not in reasons:
                reasons[r] = reason

    def frozen_reason(self, cls: int) -> str | None:
        return self.frozen.get(self._find1(cls))

    def inexact_reason(self, cls: int) -> str | None:
        return self.inexact.get(self._find1(cls))


@dataclass
class Layout:
    """Which atom owns each position of a tensor (``-1``: none).

    ``atoms`` is broadcastable to the tensor's shape and has the same number of dims.
    ``zero`` says whether pruned channels of this tensor read as zero in the masked
    original (false after e.g. ``sigmoid`` or ``+ 1``); it decides exactness where
    channels are summed without a parameter that would zero them.
    """

    atoms: np.ndarray
    zero: bool = True

    @classmethod
    def untracked(cls, ndim: int) -> Layout:
        return cls(np.full((1,) * ndim, NO_ATOM, dtype=np.int64))

    @classmethod
    def along(cls, atoms: np.ndarray, dim: int, ndim: int, zero: bool = True) -> Layout:
        """A layout whose atoms vary along ``dim`` only."""
        shape = [1] * ndim
        shape[dim] = len(atoms)
        return cls(np.asarray(atoms, dtype=np.int64).reshape(shape), zero)

    @property
    def ndim(self) -> int:
        return self.atoms.ndim

    def fits(self, shape: tuple[int, ...]) -> bool:
        if self.atoms.ndim != len(shape):
            return False
        return all(a in (1, s) for a, s in zip(self.atoms.shape, shape))

    def varying_dims(self) -> list[int]:
        return [d for d, s in enumerate(self.atoms.shape) if s > 1]

    def channel_dim(self) -> int | None:
        dims = self.varying_dims()
        return dims[0] if len(dims) == 1 else None

    def is_tracked(self) -> bool:
        return bool((self.atoms >= 0).any())

    def all_atoms(self) -> np.ndarray:
        flat = self.atoms.ravel()
        return np.unique(flat[flat >= 0])


def compress(arr: np.ndarray) -> np.ndarray:
    """Shrink every dim along which ``arr`` is constant to size 1."""
    for d in range(arr.ndim):
        if arr.shape[d] > 1:
            first = np.take(arr, [0], axis=d)
            if np.array_equal(np.broadcast_to(first, arr.shape), arr):
                arr = first
    return arr


@dataclass
class Member:
    """One parameter slice of a group: positions of ``param`` along ``dim``.

    ``index_map[i]`` is the group channel held at position ``i`` of that dim, or ``-1``
    when position ``i`` belongs to another group (or to no prunable channel).
    """

    param: str
    dim: int
    index_map: torch.Tensor

    @property
    def size(self) -> int:
        return int((self.index_map >= 0).sum())

    def __repr__(self) -> str:
        return f"{self.param}[dim {self.dim}: {self.size}/{len(self.index_map)}]"


@dataclass
class PruneGroup:
    """Every parameter slice that must shrink together.

    ``size`` is the number of channels; a channel may span several positions of a
    member (a whole attention head, a pair of rotary dims, the H*W features a
    flatten makes of one conv channel). ``units`` says how many positions of the
    group's source dim one channel covers (1 for ordinary channels, head_dim for
    heads). ``heads`` is ``(num_heads, head_dim)`` when the group lives inside
    attention and whole heads are its channels, ``None`` otherwise.
    """

    id: int
    size: int
    members: list[Member]
    prunable: bool
    reason: str | None = None
    exact: bool = True
    inexact_reason: str | None = None
    classes: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64), repr=False)
    source: tuple[str, int] | None = None
    units: int = 1
    heads: tuple[int, int] | None = None
    structure: str = "channels"  # "channels", "heads", "head_dim", "grouped"
    nodes: list[str] = field(default_factory=list)

    def member(self, param: str, dim: int) -> Member | None:
        for m in self.members:
            if m.param == param and m.dim == dim:
                return m
        return None

    @property
    def params(self) -> list[str]:
        return sorted({m.param for m in self.members})

    def describe(self) -> str:
        state = "prunable" if self.prunable else f"frozen: {self.reason}"
        exact = "exact" if self.exact else f"inexact: {self.inexact_reason}"
        return f"group {self.id} ({self.size} ch, {self.structure}) {state}; {exact}"
