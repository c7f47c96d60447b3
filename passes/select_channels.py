"""SelectChannelsPass: which channels of each group to keep, with hardware alignment.

Per group: the kept count comes from a uniform ratio (or a per-module override),
or from one global ranking of normalised scores across groups (capped per group
by ``max_ratio``); it never drops below ``min_channels`` or to zero. Alignment:
the kept *positions* of the group's source dim (channels x positions per channel,
e.g. whole heads) become a multiple of ``round_to`` — ``align="round"`` rounds the
kept count down, ``align="pad"`` keeps the chosen channels and adds zeroed channels
(the next best ones, all their parameters set to zero) up to the multiple, so
alignment never changes what the model computes.

Writes ``ctx.results["selection"]``: {group id: int8 tensor, 1 keep / 2 pad / 0 drop}.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from fxprune import validate
from fxprune.channels import PruneGroup
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

    def validate(self) -> None:
        # the same checks and messages as fxprune.prune's own arguments
        validate.prune_arguments(
            dict(
                ratio=self.ratio,
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


def align_step(g: PruneGroup, round_to: int) -> int:
    """Smallest channel count step that keeps the group's positions a multiple of round_to."""
    return round_to // math.gcd(round_to, max(1, g.units))


class SelectChannelsPass(Pass):
    def __init__(self, options: SelectionOptions) -> None:
        options.validate()
        self.opts = options

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        groups: list[PruneGroup] = ctx.results["groups"]
        scores: dict[int, torch.Tensor] = ctx.results["scores"]
        prunable = [g for g in groups if g.prunable and g.id in scores]
        opts = self.opts
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
        targets = (
            self._global_counts(prunable, scores)
            if opts.global_ranking
            else {g.id: g.size - int(g.size * group_ratio(g, opts)) for g in prunable}
        )
        selection, notes = {}, {}
        for g in prunable:
            keep, pad, note = self._aligned(g, targets[g.id])
            if note:
                notes[g.id] = note
            order = torch.argsort(scores[g.id], descending=True, stable=True)
            state = torch.zeros(g.size, dtype=torch.int8)
            state[order[:keep]] = KEEP
            state[order[keep : keep + pad]] = PAD
            selection[g.id] = state
        self._never_empty(gm, ctx, groups, selection, scores, notes)
        ctx.results["selection"] = selection
        ctx.results["selection_notes"] = notes
        return PassResult(gm, False)

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
        from fxprune import meta
        from fxprune.channels import Layout

        env = ctx.results.get("channels")
        if env is None:
            return
        where: dict[int, tuple[int, int]] = {}
        for g in groups:
            if g.id in selection:
                for i, c in enumerate(g.classes.tolist()):
                    where[c] = (g.id, i)
        for node in gm.graph.nodes:
            lays = meta.get(node, meta.LAYOUT)
            for lay in lays if isinstance(lays, list) else [lays]:
                if not isinstance(lay, Layout) or lay.channel_dim() is None:
                    continue
                classes = [c for c in env.table.find(lay.atoms).ravel().tolist()]
                if any(c < 0 or c not in where for c in classes):
                    continue
                states = [int(selection[where[c][0]][where[c][1]]) for c in classes]
                if any(states):
                    continue
                best = max(set(classes), key=lambda c: float(scores[where[c][0]][where[c][1]]))
                gid, i = where[best]
                selection[gid][i] = KEEP
                notes[gid] = "kept a channel so that no tensor becomes empty"

    def _global_counts(
        self, groups: list[PruneGroup], scores: dict[int, torch.Tensor]
    ) -> dict[int, int]:
        opts = self.opts
        pool = torch.cat([scores[g.id] for g in groups]) if groups else torch.zeros(0)
        owner = (
            torch.cat([torch.full((g.size,), i) for i, g in enumerate(groups)]) if groups else pool
        )
        n_prune = int(len(pool) * opts.ratio)
        pruned = [0] * len(groups)
        caps = [int(g.size * opts.max_ratio) for g in groups]
        for idx in torch.argsort(pool, stable=True).tolist():
            if n_prune <= 0:
                break
            gi = int(owner[idx])
            if pruned[gi] < caps[gi]:
                pruned[gi] += 1
                n_prune -= 1
        return {g.id: g.size - pruned[i] for i, g in enumerate(groups)}

    def _aligned(self, g: PruneGroup, keep: int) -> tuple[int, int, str | None]:
        opts = self.opts
        keep = max(keep, min(opts.min_channels, g.size), 1)
        step = align_step(g, opts.round_to)
        if step <= 1:
            return keep, 0, None
        if g.size < step:
            return g.size, 0, f"kept whole: {g.size * g.units} positions < round_to={opts.round_to}"
        if keep % step == 0:
            return keep, 0, None
        if opts.align == "pad":
            target = min(g.size, math.ceil(keep / step) * step)
            if target % step:
                return g.size, 0, "kept whole: cannot pad to round_to within the group"
            return keep, target - keep, None
        return max(step, (keep // step) * step), 0, None
