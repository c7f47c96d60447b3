"""BuildGroupsPass: turn related atoms into :class:`~fxprune.channels.PruneGroup` s.

Each union class of atoms is one channel. The channels that a *source* parameter
dim produces (conv/linear output rows, embedding dims, parameters used as tensors)
form a group, merged with every other source dim that shares a channel with it
(residual partners). Every parameter dim holding any of a group's channels becomes
a member with an index map; concat consumers hold channels of several groups.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.fx as fx

from fxprune import meta
from fxprune.artifacts import CHANNELS, GROUPS
from fxprune.channels import AtomTable, Layout, Member, PruneGroup, unique, unique_in_order
from fxprune.pass_infra import Pass, PassContext, PassResult
from fxprune.passes.channel_rules import ChannelEnv

logger = logging.getLogger(__name__)


class BuildGroupsPass(Pass):
    requires = (meta.LAYOUT, CHANNELS)
    provides = (meta.GROUP, GROUPS)

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        env: ChannelEnv = ctx[CHANNELS]
        table = env.table
        roots = table.roots()
        dims = {key: _classes(roots, atoms) for key, atoms in env.param_atoms.items()}
        # Second-level union-find over channel classes: a source dim's channels form a group.
        merged = AtomTable()
        merged.new(table.size)
        for key, classes in dims.items():
            if env.param_source.get(key):
                for start, end in env.source_segments.get(key, [(0, len(classes))]):
                    merged.union_all(classes[start:end])
        # Order channels by first appearance in a source dim (then any other dim).
        keys = [k for k in dims if env.param_source.get(k)] + [
            k for k in dims if not env.param_source.get(k)
        ]
        class_gid = np.full(table.size, -1, dtype=np.int64)
        class_idx = np.full(table.size, -1, dtype=np.int64)
        root_gid: dict[int, int] = {}
        groups: list[PruneGroup] = []
        group_classes: list[list[np.ndarray]] = []
        for key in keys:
            classes = dims[key]
            valid = classes[classes >= 0]
            cand = valid[class_gid[valid] < 0]
            if not len(cand):
                continue
            order = unique_in_order(cand)  # first-appearance order within this dim
            merged_roots = merged.find(order)
            for root in unique(merged_roots):
                sel = order[merged_roots == root]
                gid = root_gid.get(int(root))
                if gid is None:
                    gid = root_gid[int(root)] = len(groups)
                    groups.append(PruneGroup(id=gid, size=0, members=[], prunable=True, source=key))
                    group_classes.append([])
                start = sum(len(c) for c in group_classes[gid])
                class_gid[sel] = gid
                class_idx[sel] = np.arange(start, start + len(sel))
                group_classes[gid].append(sel)
        for g, parts in zip(groups, group_classes):
            self._finish(g, np.concatenate(parts), env)
        for key, classes in dims.items():
            valid = classes >= 0
            gids = np.where(valid, class_gid[np.where(valid, classes, 0)], -1)
            for gid in unique(gids[gids >= 0]):
                index_map = np.where(gids == gid, class_idx[np.where(valid, classes, 0)], -1)
                groups[int(gid)].members.append(Member(key[0], key[1], torch.from_numpy(index_map)))
        param_names = {n for n, _ in gm.named_parameters(remove_duplicate=False)}
        shapes = {n: t.shape for n, t in gm.named_parameters(remove_duplicate=False)}
        for g in groups:
            if g.prunable and not any(m.param in param_names for m in g.members):
                g.prunable, g.reason = False, "holds buffers only, no parameters to remove"
            # Positions per channel in the weight matrices (the GEMM dims alignment is for).
            # A grouped conv's in-group columns are not the tensor's channels: alignment counts
            # the tensor (in-group position x conv groups), as its producer's rows do.
            per = [
                m.size // g.size
                for m in g.members
                if len(shapes.get(m.param, ())) >= 2
                and g.size
                and m.size >= g.size
                and (m.param, m.dim) not in env.in_group_dims
            ]
            src = g.member(*g.source) if g.source else None
            if per:
                g.units = max(1, min(per))
            elif src is not None and g.size:
                g.units = max(1, src.size // g.size)
        self._annotate_nodes(gm, roots, class_gid, groups)
        ctx[GROUPS] = groups
        return PassResult(gm, False)

    @staticmethod
    def _finish(g: PruneGroup, classes: np.ndarray, env: ChannelEnv) -> None:
        table = env.table
        g.classes = classes
        g.size = len(classes)
        as_list = classes.tolist()
        g.reason = next((table.frozen[c] for c in as_list if c in table.frozen), None)
        g.prunable = g.reason is None
        g.inexact_reason = next((table.inexact[c] for c in as_list if c in table.inexact), None)
        g.exact = g.inexact_reason is None
        for c in (c for c in as_list if c in env.rectified):
            info = env.rectified.get(c)
            if info is None:
                continue
            mode, grid = info
            g.structure = mode
            if mode == "heads" and len(grid) >= 2:
                g.heads = (grid[0], int(np.prod(grid[1:])))
            elif mode == "head_dim" and len(grid) >= 2:
                g.heads = (int(np.prod(grid[:-1])), grid[-1])
            break

    @staticmethod
    def _annotate_nodes(
        gm: fx.GraphModule, roots: np.ndarray, class_gid: np.ndarray, groups
    ) -> None:
        for node in gm.graph.nodes:
            lay = meta.get(node, meta.LAYOUT)
            if not isinstance(lay, Layout):
                meta.put(node, meta.GROUP, None)
                continue
            atoms = np.asarray(lay.atoms).ravel()
            found = unique(class_gid[roots[atoms[atoms >= 0]]])
            gids = found[found >= 0].tolist()
            meta.put(node, meta.GROUP, gids or None)
            for gid in gids:
                groups[gid].nodes.append(node.name)


def _classes(roots: np.ndarray, atoms: np.ndarray) -> np.ndarray:
    """The class of each atom (``-1`` stays ``-1``), from the table's precomputed roots."""
    atoms = np.asarray(atoms, dtype=np.int64)
    return np.where(atoms >= 0, roots[np.maximum(atoms, 0)], -1)
