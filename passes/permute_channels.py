"""ChannelPermutationPass: reorder channels so N:M masks keep more magnitude.

Permuting the input channels of a consumer is free when every other member of the
channel group (the producer's output rows, BN statistics, residual partners,
concat slices, heads) is permuted the same way: the dense model computes exactly
the same function (Pool & Yu, NeurIPS 2021). The groups from the channel analysis
say which permutations are legal; for each group the permutation is searched on
the stacked input-channel columns of its consumers (``fxprune.sparsity
.search_permutation``) and applied to every member.

A group is permuted only when each member holds its channels as contiguous runs
in channel order — whole copies (``0..C-1``, as in concat consumers and head grids)
or whole blocks (each channel repeated in place, as in flatten or pixel shuffle) —
so that reordering runs cannot move a channel across a split or slice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from fxprune.channels import PruneGroup
from fxprune.pass_infra import Pass, PassContext, PassResult

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
    cols = []
    for s in runs.starts:
        part = w[:, s : s + runs.size]  # (out, C, *kernel) -> (out * prod(kernel), C)
        cols.append(
            part.reshape(part.shape[0], runs.size, -1).permute(0, 2, 1).reshape(-1, runs.size)
        )
    return torch.cat(cols, 0)


class ChannelPermutationPass(Pass):
    """Writes ``ctx.results["permutations"]``: {group id: LongTensor}; reasons in ``..._skipped``."""

    def __init__(
        self, pattern: str = "2:4", time_budget: float = 1.0, seed: int = 0, progress: bool = False
    ) -> None:
        self.pattern = pattern
        self.time_budget = time_budget
        self.seed = seed
        self.progress = progress

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        from fxprune.sparsity import parse_pattern, search_permutation

        m = parse_pattern(self.pattern).m
        tensors = dict(gm.named_parameters(remove_duplicate=False))
        tensors.update(dict(gm.named_buffers(remove_duplicate=False)))
        consumers = ctx.results.get("nm_consumers") or set()
        perms, skipped = {}, {}
        groups: list[PruneGroup] = ctx.results["groups"]
        todo = [g for g in groups if g.prunable and g.size > m]
        bar = _progress(todo, self.progress)
        for g in bar:
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
                t = tensors[p]
                pos = r.position_permutation(t.shape[d], perm)
                _replace(gm, p, t.detach().index_select(d, pos.to(t.device)))
                tensors = dict(gm.named_parameters(remove_duplicate=False))
                tensors.update(dict(gm.named_buffers(remove_duplicate=False)))
            perms[g.id] = perm
        ctx.results["permutations"] = perms
        ctx.results["permutations_skipped"] = skipped
        return PassResult(gm, bool(perms))


def _replace(gm: nn.Module, fqn: str, value: torch.Tensor) -> None:
    mod_name, _, name = fqn.rpartition(".")
    mod = gm.get_submodule(mod_name) if mod_name else gm
    if name in mod._parameters:
        with torch.no_grad():
            mod._parameters[name].data = value.clone()
    elif name in mod._buffers:
        mod._buffers[name] = value.clone()
    else:
        setattr(mod, name, value.clone())


def _progress(items, enabled: bool):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc="permutation search", unit="group")
