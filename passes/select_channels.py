"""SelectChannelsPass: which channels of each group to keep, with hardware alignment.

Per group: the kept count comes from a uniform ratio (or a per-module override),
or from one global ranking of normalised scores across groups (capped per group
by ``max_ratio``); it never drops below ``min_channels`` or to zero. Alignment:
the kept *positions* of the group's source dim (channels x positions per channel,
e.g. whole heads) become a multiple of ``round_to`` — ``align="round"`` rounds the
kept count down, ``align="pad"`` keeps the chosen channels and adds zeroed channels
(the next best ones, all their parameters set to zero) up to the multiple, so
alignment never changes what the model computes.

Iterative pruning (``fxprune.Pruner``) passes ``original_sizes``: each group's size
before the first step. The ratio is then cumulative and counts are taken on the
original size with the same rounding as one-shot pruning, so step k leaves exactly
what ``prune(ratio=r_k)`` would (rounding never compounds), clamped to the channels
still there. ``padding`` marks the zero channels an earlier ``align="pad"`` step
added: they rank below every real channel, so a later step drops them first and
fills its own padding, as one-shot does, with the next best real channels (zeroed).

Writes the ``selection`` artifact: {group id: int8 tensor, 1 keep / 2 pad / 0 drop}.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from fxprune import meta, validate
from fxprune.artifacts import CHANNELS, GROUPS, SCORES, SELECTION, SELECTION_NOTES
from fxprune.channels import Layout, PruneGroup
from fxprune.errors import PruneError
from fxprune.pass_infra import Pass, PassContext, PassResult

logger = logging.getLogger(__name__)

DROP, KEEP, PAD = 0, 1, 2


@dataclass
class SelectionOptions:
    ratio: float = 0.5
    round_to: int = 1
    align: str = "round"
    global_ranking: bool = False
    max_ratio: float = 0.9
    min_channels: int = 1
    ratios: dict[str, float] = field(default_factory=dict)
    # Iterative pruning: {group id: channels before the first step}; ratio is cumulative.
    original_sizes: dict[int, int] = field(default_factory=dict)
    # {group id: bool per channel}: zero channels an earlier align="pad" step added.
    padding: dict[int, torch.Tensor] = field(default_factory=dict)
    # Iterative pruning: history(groups) -> {"original_sizes": ..., "padding": ...} for the
    # groups of this step's graph (which only the analysis of this step knows).
    history: Callable[[list[PruneGroup]], dict[str, Any]] | None = None

    def validate(self) -> None:
        # ratio=1 is allowed here: an iterative schedule ends there, and _aligned keeps
        # min_channels (at least one alignment step) of every group.
        validate.number_in("ratio", self.ratio, 0.0, 1.0, "the fraction of channels to remove")
        # the same checks and messages as fxprune.prune's own arguments
        validate.prune_arguments(
            dict(
                align=self.align,
                global_ranking=self.global_ranking,
                max_ratio=self.max_ratio,
                min_channels=self.min_channels,
                ratios=self.ratios,
            )
        )
        validate.integer_at_least("round_to", self.round_to, 1, "kept positions per multiple")


def group_ratio(g: PruneGroup, opts: SelectionOptions) -> float:
    """The ratio that applies to ``g``: the longest matching per-module/per-name override."""
    best, best_len = opts.ratio, -1
    src = g.source[0] if g.source else ""
    for name, r in opts.ratios.items():
        if (src == name or src.startswith(name + ".")) and len(name) > best_len:
            best, best_len = r, len(name)
    return best


def removed_count(size: int, ratio: float) -> int:
    """Channels a uniform ``ratio`` removes from ``size`` before alignment.

    The kept count is rounded down, ``floor(size * (1 - ratio))``, as Torch-Pruning does, so
    a ratio never keeps more than asked (the epsilon absorbs float error: 70 * 0.7 is
    48.99999999999999).
    """
    return size - math.floor(size * (1.0 - ratio) + 1e-9)


def align_step(g: PruneGroup, round_to: int) -> int:
    """Smallest channel count step that keeps the group's positions a multiple of round_to.

    A group of head dims (the same dims in every head) is the inner dim of attention's own
    matrix products (q @ k^T, attn @ v) as well: its count itself is a multiple of round_to,
    not only heads x count. Measured on an H200 (docs/BENCHMARKS_gpu.md): ViT-B at ratio 0.4
    with 38 dims per head (12 x 38 = 456 positions, a multiple of 8) ran 1.10x faster than
    the original under torch.compile at batch 32 where 3.8x fewer MACs at 32 per head ran
    2.09x; fused attention kernels want a head dim that is a multiple of 8."""
    if g.structure == "head_dim":
        return round_to
    return round_to // math.gcd(round_to, max(1, g.units))


def split_pieces(
    gm: fx.GraphModule, ctx: PassContext, groups: list[PruneGroup]
) -> dict[int, list[np.ndarray]]:
    """{group id: the pieces (group indices of each)} for groups that one split or chunk
    cuts, whole, into two or more disjoint parts (C2f's ``chunk(2)``)."""
    env = ctx.get(CHANNELS)
    if env is None:
        return {}
    owner: dict[int, tuple[int, int]] = {}  # class -> (group id, index in the group)
    for g in groups:
        if g.structure == "channels" and g.units == 1:
            for i, c in enumerate(np.asarray(g.classes, dtype=np.int64).tolist()):
                owner[c] = (g.id, i)
    sizes = {g.id: g.size for g in groups}
    found: dict[int, list[np.ndarray]] = {}
    for node in gm.graph.nodes:
        lays = meta.get(node, meta.LAYOUT)
        if not isinstance(lays, list) or len(lays) < 2:
            continue
        gids, pieces = set(), []
        for lay in lays:
            if not isinstance(lay, Layout) or lay.channel_dim() is None:
                break
            classes = np.unique(np.asarray(env.table.find(lay.atoms)).ravel()).tolist()
            hits = [owner[c] for c in classes if c in owner]
            gids.update(gid for gid, _ in hits)
            pieces.append(np.array(sorted(i for _, i in hits), dtype=np.int64))
        else:
            if len(gids) != 1 or min(len(p) for p in pieces) == 0:
                continue
            gid = gids.pop()
            joined = np.concatenate(pieces)
            if len(np.unique(joined)) == len(joined) == sizes[gid]:
                found.setdefault(gid, pieces)
    return found


class SelectChannelsPass(Pass):
    """Keep/pad/drop state of every channel of every prunable group, by score and ratio."""

    requires = (GROUPS, SCORES)
    provides = (SELECTION, SELECTION_NOTES)

    def __init__(self, options: SelectionOptions) -> None:
        options.validate()
        self.opts = options

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        groups: list[PruneGroup] = ctx[GROUPS]
        scores: dict[int, torch.Tensor] = ctx[SCORES]
        prunable = [g for g in groups if g.prunable and g.id in scores]
        opts = self.opts
        if opts.history is not None:  # resolved once: one instance serves one pipeline run
            self.opts = opts = replace(opts, history=None, **opts.history(groups))
        if (
            opts.round_to > 1
            and prunable
            and all(g.size * g.units < opts.round_to for g in prunable)
        ):
            biggest = max(g.size * g.units for g in prunable)
            raise PruneError(
                f"round_to={opts.round_to} is larger than every prunable group (the "
                f"largest has {biggest} channels); use a smaller round_to."
            )
        original = {g.id: opts.original_sizes.get(g.id, g.size) for g in prunable}
        targets = (
            self._global_counts(prunable, scores)
            if opts.global_ranking
            else {
                g.id: original[g.id] - removed_count(original[g.id], group_ratio(g, opts))
                for g in prunable
            }
        )
        selection, notes = {}, {}
        split = split_pieces(gm, ctx, prunable)
        for g in prunable:
            keep, pad, note = self._aligned(g, targets[g.id], original[g.id])
            real = g.size - self._padding(g).sum().item()
            if keep > real or keep + pad > g.size:
                # A schedule that goes back, or channels kept so that no tensor is empty:
                # fewer channels are left than the original count asks for.
                keep, pad, note = self._aligned(g, min(keep, real))
            if note:
                notes[g.id] = note
            ranked = scores[g.id].masked_fill(self._padding(g), -math.inf)
            pieces = None if g.id in opts.padding else split.get(g.id)
            if pieces is not None and keep + pad < g.size:
                selection[g.id] = self._by_piece(g, pieces, ranked, keep + pad)
                continue
            order = torch.argsort(ranked, descending=True, stable=True)
            state = torch.zeros(g.size, dtype=torch.int8)
            state[order[:keep]] = KEEP
            state[order[keep : keep + pad]] = PAD
            selection[g.id] = state
        self._never_empty(gm, ctx, groups, selection, scores, notes)
        ctx[SELECTION] = selection
        ctx[SELECTION_NOTES] = notes
        return PassResult(gm, False)

    def _by_piece(
        self, g: PruneGroup, pieces: list[np.ndarray], ranked: torch.Tensor, total: int
    ) -> torch.Tensor:
        """The group's kept share in every piece a split makes of it (C2f's ``chunk(2)``),
        each piece aligned on its own, the best channels of each piece kept: a global
        ranking could empty one piece and leave the other whole."""
        state = torch.zeros(g.size, dtype=torch.int8)
        for piece in pieces:
            want = max(1, round(total * len(piece) / g.size))
            keep, pad, _ = self._aligned(g, want, len(piece))
            idx = torch.as_tensor(piece, dtype=torch.long)
            order = idx[torch.argsort(ranked[idx], descending=True, stable=True)]
            state[order[:keep]] = KEEP
            state[order[keep : keep + pad]] = PAD
        return state

    @staticmethod
    def _never_empty(
        gm: fx.GraphModule,
        ctx: PassContext,
        groups: list[PruneGroup],
        selection: dict[int, torch.Tensor],
        scores,
        notes,
    ) -> None:
        """No tensor may lose all its channels (a chunk or slice can hold only dropped ones)."""
        env = ctx.get(CHANNELS)
        if env is None:
            return
        # State of every channel class (-1: not in a selected group), dense for fast checks.
        state = np.full(env.table.size, -1, dtype=np.int8)
        owner = np.zeros(env.table.size, dtype=np.int64)
        index = np.zeros(env.table.size, dtype=np.int64)
        for g in groups:
            if g.id in selection:
                cls = np.asarray(g.classes, dtype=np.int64)
                state[cls] = selection[g.id].numpy()
                owner[cls], index[cls] = g.id, np.arange(len(cls))
        for node in gm.graph.nodes:
            lays = meta.get(node, meta.LAYOUT)
            for lay in lays if isinstance(lays, list) else [lays]:
                if not isinstance(lay, Layout) or lay.channel_dim() is None:
                    continue
                classes = np.asarray(env.table.find(lay.atoms)).ravel()
                if (classes < 0).any() or (state[classes] < 0).any() or state[classes].any():
                    continue
                best = max(np.unique(classes), key=lambda c: float(scores[owner[c]][index[c]]))
                gid, i = int(owner[best]), int(index[best])
                selection[gid][i] = KEEP
                state[best] = KEEP
                notes[gid] = f"kept a channel so that {meta.describe(node)} does not become empty"

    def _padding(self, g: PruneGroup) -> torch.Tensor:
        pad = self.opts.padding.get(g.id)
        return pad if pad is not None else torch.zeros(g.size, dtype=torch.bool)

    def _global_counts(
        self, groups: list[PruneGroup], scores: dict[int, torch.Tensor]
    ) -> dict[int, int]:
        """Real channels to keep per group; budget and caps count on the original sizes."""
        opts = self.opts
        if not groups:
            return {}
        real = [~self._padding(g) for g in groups]
        original = [opts.original_sizes.get(g.id, g.size) for g in groups]
        gone = [n - int(r.sum()) for n, r in zip(original, real)]  # removed by earlier steps
        pool = torch.cat([scores[g.id][r] for g, r in zip(groups, real)])
        owner = torch.cat([torch.full((int(r.sum()),), i) for i, r in enumerate(real)])
        n_prune = int(sum(original) * opts.ratio) - sum(gone)
        pruned = [0] * len(groups)
        caps = [int(n * opts.max_ratio) - d for n, d in zip(original, gone)]
        for idx in torch.argsort(pool, stable=True).tolist():
            if n_prune <= 0:
                break
            gi = int(owner[idx])
            if pruned[gi] < caps[gi]:
                pruned[gi] += 1
                n_prune -= 1
        return {g.id: int(r.sum()) - pruned[i] for i, (g, r) in enumerate(zip(groups, real))}

    def _aligned(
        self, g: PruneGroup, keep: int, size: int | None = None
    ) -> tuple[int, int, str | None]:
        """(kept, padding, note) for ``keep`` wanted channels of a group of ``size``."""
        opts = self.opts
        size = g.size if size is None else size
        keep = max(keep, min(opts.min_channels, size), 1)
        step = align_step(g, opts.round_to)
        if step <= 1:
            return keep, 0, None
        if size < step:
            return size, 0, f"kept whole: {size * g.units} positions < round_to={opts.round_to}"
        if keep % step == 0:
            return keep, 0, None
        if opts.align == "pad":
            target = min(size, math.ceil(keep / step) * step)
            if target % step:
                return size, 0, "kept whole: cannot pad to round_to within the group"
            return keep, target - keep, None
        return max(step, (keep // step) * step), 0, None
