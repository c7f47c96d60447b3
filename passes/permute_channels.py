"""ChannelPermutationPass: reorder channels so N:M masks keep more magnitude.

Permuting the input channels of a consumer is free when every other member of the
channel group (the producer's output rows, BN statistics, residual partners,
concat slices, heads) is permuted the same way: the dense model computes exactly
the same function (Pool & Yu, NeurIPS 2021). The groups from the channel analysis
say which permutations are legal; for each group the permutation is searched on
the stacked input-channel columns of its consumers (``fxprune.nm_permutation
.search_permutation``) and applied to every member. Its consumers are the eligible
weights of the ``nm_layers`` artifact (``fxprune.nm_layers``).

A group is permuted only when each member holds its channels as contiguous runs
in channel order — whole copies (``0..C-1``, as in concat consumers and head grids)
or whole blocks (each channel repeated in place, as in flatten or pixel shuffle) —
so that reordering runs cannot move a channel across a split or slice.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from tqdm import tqdm

from fxprune.artifacts import GROUPS, NM_LAYERS, PERMUTATIONS, PERMUTATIONS_SKIPPED
from fxprune.channels import PruneGroup
from fxprune.nm_patterns import as_rows, parse_pattern
from fxprune.nm_permutation import search_permutation
from fxprune.pass_infra import Pass, PassContext, PassResult
from fxprune.tensors import set_tensor

logger = logging.getLogger(__name__)


@dataclass
class Runs:
    """Where a member holds a group's channels: ``starts`` of runs of ``size * block`` positions."""

    starts: list[int]
    size: int
    block: int

    def position_permutation(self, length: int, perm: torch.Tensor) -> torch.Tensor:
        """Positions of the member dim after moving channel ``perm[k]`` to place ``k`` in each run."""
        out = torch.arange(length)
        offs = torch.arange(self.block)
        for s in self.starts:
            src = s + (perm[:, None] * self.block + offs[None, :]).reshape(-1)
            out[s : s + self.size * self.block] = src
        return out


def member_runs(index_map: torch.Tensor, size: int) -> Runs | None:
    """Runs of a member's positions, or None when its channels are not whole ordered runs."""
    pos = (index_map >= 0).nonzero().flatten()
    if len(pos) == 0 or len(pos) % size:
        return None
    vals = index_map[pos]
    copies = len(pos) // size
    for block in sorted({1, copies}):
        # copies of the whole group (block 1) or every channel repeated in place (block k)
        per_run = size * block
        starts = []
        ok = True
        for r in range(len(pos) // per_run):
            chunk = pos[r * per_run : (r + 1) * per_run]
            want = torch.arange(size).repeat_interleave(block)
            if not (
                torch.equal(chunk, torch.arange(chunk[0], chunk[0] + per_run))
                and torch.equal(vals[r * per_run : (r + 1) * per_run], want)
            ):
                ok = False
                break
            starts.append(int(chunk[0]))
        if ok:
            return Runs(starts, size, block)
    return None


def consumer_columns(param: torch.Tensor, runs: Runs) -> torch.Tensor | None:
    """(rows, C) magnitude matrix of a consumer weight's input columns for a group."""
    if param.dim() < 2:
        return None
    w = param.detach().abs().float()
    return torch.cat([as_rows(w[:, s : s + runs.size]) for s in runs.starts], 0)


class ChannelPermutationPass(Pass):
    """Permute every group whose channels eligible N:M weights read (``modified``: any)."""

    requires = (GROUPS, NM_LAYERS)
    provides = (PERMUTATIONS, PERMUTATIONS_SKIPPED)

    def __init__(
        self, pattern: str = "2:4", time_budget: float = 1.0, seed: int = 0, progress: bool = False
    ) -> None:
        self.pattern = pattern
        self.time_budget = time_budget
        self.seed = seed
        self.progress = progress

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        m = parse_pattern(self.pattern).m
        tensors = _tensors(gm)
        consumers = {layer.name for layer in ctx[NM_LAYERS] if layer.eligible}
        perms, skipped = {}, {}
        groups: list[PruneGroup] = ctx[GROUPS]
        todo = [g for g in groups if g.prunable and g.size > m]
        for g in tqdm(todo, desc="permutation search", unit="group", disable=not self.progress):
            runs = {}
            for mem in g.members:
                r = member_runs(mem.index_map, g.size)
                if r is None:
                    skipped[g.id] = f"{mem.param} holds the channels out of order (split or slice)"
                    break
                runs[(mem.param, mem.dim)] = r
            if g.id in skipped:
                continue
            # Consumers that hold each channel once per run: their N:M groups of M consecutive
            # input channels are what the permutation changes (blocks of a flatten move whole).
            mats = [
                consumer_columns(tensors[p], r)
                for (p, d), r in runs.items()
                if d == 1 and p in consumers and r.block == 1
            ]
            mats = [x for x in mats if x is not None]
            if not mats:
                skipped[g.id] = "no N:M-eligible layer reads these channels"
                continue
            perm = search_permutation(
                torch.cat(mats, 0), self.pattern, time_budget=self.time_budget, seed=self.seed
            )
            if torch.equal(perm, torch.arange(g.size)):
                skipped[g.id] = "the identity was best"
                continue
            for (p, d), r in runs.items():
                tensors = _permute_member(gm, tensors, p, d, r.position_permutation, perm)
            perms[g.id] = perm
        ctx[PERMUTATIONS] = perms
        ctx[PERMUTATIONS_SKIPPED] = skipped
        return PassResult(gm, bool(perms))


def _permute_member(
    gm: fx.GraphModule,
    tensors: dict[str, torch.Tensor],
    fqn: str,
    dim: int,
    positions: Callable[[int, torch.Tensor], torch.Tensor],
    perm: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Reorder ``dim`` of the tensor at ``fqn`` (and of every name it is tied to).

    Returns the tensors by name after the change; a member permuted in two dims (a
    square weight whose input and output channels are the same group) reads the
    first permutation when applying the second.
    """
    t = tensors[fqn]
    new = t.detach().index_select(dim, positions(t.shape[dim], perm).to(t.device))
    cache: dict[int, Any] = {}  # every name of a tied tensor gets the same new tensor
    for name, other in tensors.items():
        if other is t:
            set_tensor(gm, name, new, cache)
    return _tensors(gm)


def _tensors(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by each of its names."""
    tensors = dict(gm.named_parameters(remove_duplicate=False))
    tensors.update(dict(gm.named_buffers(remove_duplicate=False)))
    return tensors
