"""The op-spec decorator and the environments op hooks run in.

Each family file declares its ops with :func:`op_spec` on the op's channel rule: the
targets it matches, its view (typed attributes), the rule itself, its post-surgery
rewrite and its MACs, registered in :data:`fxprune.ops.REGISTRY`.

A rule is ``rule(op, env) -> Layout | list[Layout] | None``: it reads the layouts of
the op's inputs from :class:`ChannelEnv`, relates atoms (union, bind parameter dims,
freeze, mark inexact) and returns the layout of the op's output. Ops without a spec
fall to :func:`default_rule`, which freezes every channel the op touches: fxprune
never guesses at an op it does not understand. A rewrite is ``rewrite(op, surgery)``
with a :class:`SurgeryEnv`, run after parameters are sliced.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch.fx as fx

from fxprune import meta
from fxprune.channels import NO_ATOM, AtomTable, Layout, compress
from fxprune.ops import REGISTRY, CanonicalOp, OpSpec, normalize_dim
from fxprune.passes.select_channels import DROP

logger = logging.getLogger(__name__)

Rule = Callable[[CanonicalOp, "ChannelEnv"], Any]

# Materialising an atom array over many dims is only needed inside reshapes; past this many
# positions the reshape's channels are frozen instead (they would be spatial in practice).
MAX_MATERIALIZE = 1 << 24


def op_spec(kind: str, **declared: Any) -> Callable[[Rule], Rule]:
    """Declare an op family on its channel rule: ``@op_spec("conv", modules=..., ops=...)``.

    ``declared`` takes the other fields of :class:`~fxprune.ops.OpSpec` (targets, view,
    rewrite, macs). Stack several on one rule for families that share it; the rule's
    ``.spec`` is its bottom-most declaration (a view hands a node over to it).
    """

    def deco(rule: Rule) -> Rule:
        spec = REGISTRY.register(OpSpec(kind, rule=rule, **declared))
        if not hasattr(rule, "spec"):
            rule.spec = spec  # type: ignore[attr-defined]
        return rule

    return deco


def rule_of(op: CanonicalOp) -> Rule:
    """The channel rule of ``op``: its spec's, or the default (freeze) one."""
    return op.spec.rule or default_rule


@dataclass
class SurgeryEnv:
    """What an op's rewrite hook sees: the graph, the plan and the planned shapes."""

    gm: fx.GraphModule
    plan: Any  # passes.surgery.ChannelPlan
    planned: dict[fx.Node, Any]

    def old_shape(self, node: Any) -> tuple[int, ...] | None:
        return meta.shape_of(node)

    def new_shape(self, node: Any) -> Any:
        return self.planned.get(node) if isinstance(node, fx.Node) else None

    def kept_before(self, lay: Layout, dim: int, size: int, bound: Any) -> Any:
        """Where position ``bound`` of ``dim`` lands once dropped channels are gone."""
        if bound is None or not isinstance(bound, int):
            return bound
        line = self.plan.line(lay, dim, size)
        b = bound + size if bound < 0 else min(bound, size)
        return int((line[:b] != DROP).sum())


class ChannelEnv:
    """What a rule can see and do while channels propagate through one graph."""

    def __init__(
        self,
        gm: fx.GraphModule,
        head_mode: str = "auto",
        param_alias: dict[str, str] | None = None,
        pad_outputs: bool = False,
    ) -> None:
        self.gm = gm
        self.table = AtomTable()
        self.head_mode = head_mode
        # Outputs pruned and padded back to their shape (pad_outputs): node -> channel dim.
        self.pad_outputs = pad_outputs
        self.padded_outputs: dict[fx.Node, int] = {}
        self.layouts: dict[fx.Node, Any] = {}
        # (param fqn, dim) -> atoms along that dim; "source" dims created fresh atoms.
        self.param_atoms: dict[tuple[str, int], np.ndarray] = {}
        self.param_source: dict[tuple[str, int], bool] = {}
        self.param_nodes: dict[tuple[str, int], str] = {}
        # (param, dim) of grouped conv weights' in-group columns (not the tensor's channels)
        self.in_group_dims: set[tuple[str, int]] = set()
        # source dim -> path of the module whose op created it (when the graph says)
        self.source_modules: dict[tuple[str, int], str] = {}
        # A source dim that packs several channel spaces (q | k | v rows) lists their ranges.
        self.source_segments: dict[tuple[str, int], list[tuple[int, int]]] = {}
        self.param_alias = param_alias or {}
        self.node: fx.Node | None = None
        self.rectified: dict[int, tuple[str, tuple[int, ...]]] = {}  # class -> (mode, grid)
        self.warned: set[str] = set()

    # -- where we are -----------------------------------------------------------------------
    @property
    def where(self) -> str:
        return meta.describe(self.node) if self.node is not None else "?"

    def shape(self, node: Any) -> tuple[int, ...] | None:
        return meta.shape_of(node)

    # -- layouts ------------------------------------------------------------------------------
    def layout(self, node: Any) -> Layout | None:
        """Layout of a tensor input; untracked for constants and values we know nothing of."""
        if not isinstance(node, fx.Node):
            return None
        lay = self.layouts.get(node)
        if isinstance(lay, Layout):
            return lay
        shape = self.shape(node)
        if shape is None:
            return None
        return Layout.untracked(len(shape))

    def canonical(self, atoms: np.ndarray) -> np.ndarray:
        return compress(self.table.find(atoms))

    def untracked(self, node: fx.Node | None = None) -> Layout | None:
        shape = self.shape(node if node is not None else self.node)
        return None if shape is None else Layout.untracked(len(shape))

    # -- parameters ---------------------------------------------------------------------------
    def canonical_param(self, fqn: str) -> str:
        return self.param_alias.get(fqn, fqn)

    def param_dim(
        self, fqn: str, dim: int, size: int, bind: np.ndarray | None = None
    ) -> np.ndarray:
        """Atoms along ``dim`` of parameter ``fqn``.

        The first time a parameter dim is seen it either gets fresh atoms (a *source*
        dim: conv/linear output rows) or, with ``bind``, takes the given atoms (a conv's
        input columns take its input's channel atoms). Later uses union with it.
        """
        fqn = self.canonical_param(fqn)
        key = (fqn, dim)
        have = self.param_atoms.get(key)
        if bind is not None:
            bind = np.asarray(bind, dtype=np.int64).reshape(-1)
            if len(bind) != size:
                raise ValueError(f"binding {len(bind)} atoms to {fqn} dim {dim} of size {size}")
        if have is None:
            if bind is None:
                have = self.table.new(size)
                self.param_source[key] = True
                owner = meta.module_path(self.node)
                if owner is not None:
                    self.source_modules[key] = owner
            else:
                # Positions with no atom get fresh frozen ones: the parameter dim exists but
                # what it reads cannot be removed.
                have = bind.copy()
                missing = have < 0
                if missing.any():
                    fresh = self.table.new(int(missing.sum()))
                    self.table.union_all(fresh)  # one frozen channel set, not one group each
                    self.table.freeze(fresh, f"reads untracked channels at {self.where}")
                    have[missing] = fresh
                self.param_source[key] = False
            self.param_atoms[key] = have
            if self.node is not None:
                self.param_nodes[key] = self.node.name
        elif bind is not None:
            self.table.union(have, np.where(bind >= 0, bind, have))
            if (bind < 0).any():
                self.table.freeze(have[bind < 0], f"reads untracked channels at {self.where}")
        return have

    def param_tensor(self, fqn: str):
        """The parameter or buffer tensor ``fqn`` of the graph module (None if absent)."""
        obj: Any = self.gm
        try:
            for part in fqn.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            return None
        return obj if hasattr(obj, "shape") else None

    def is_buffer(self, fqn: str) -> bool:
        if not hasattr(self, "_buffers"):
            self._buffers = {n for n, _ in self.gm.named_buffers(remove_duplicate=False)}
        return self.canonical_param(fqn) in self._buffers or fqn in self._buffers

    def note_grouped(self, atoms: np.ndarray, groups: int) -> None:
        for cls in np.unique(self.table.find(atoms)):
            if cls >= 0:
                self.rectified.setdefault(int(cls), ("grouped", (groups,)))

    # -- relations ----------------------------------------------------------------------------
    def freeze(self, atoms: Any, reason: str) -> None:
        self.table.freeze(atoms, f"{reason} ({self.where})")

    def freeze_layout(self, lay: Layout | None, reason: str) -> None:
        if lay is not None and lay.is_tracked():
            self.freeze(lay.atoms, reason)

    def inexact(self, atoms: Any, reason: str) -> None:
        self.table.mark_inexact(atoms, f"{reason} ({self.where})")

    def warn_once(self, key: str, message: str) -> None:
        if key not in self.warned:
            self.warned.add(key)
            logger.warning(message)

    def dim_atoms(self, lay: Layout, shape: Sequence[int], dim: int) -> np.ndarray:
        """1-D atoms along ``dim``; if the layout varies along another dim, freeze and return -1."""
        dim = normalize_dim(dim, len(shape))
        a = self.canonical(lay.atoms)
        others = [d for d in range(a.ndim) if d != dim and a.shape[d] > 1]
        if others:
            self.freeze(a, f"channels spread over dims {others} and {dim}")
            return np.full(shape[dim], NO_ATOM, dtype=np.int64)
        line = a.reshape(-1) if a.size > 1 else np.full(1, a.reshape(-1)[0])
        return np.broadcast_to(line, (shape[dim],)).copy()

    def unify(
        self,
        items: Sequence[tuple[Layout, Sequence[int]]],
        out_shape: Sequence[int],
        real: Sequence[Sequence[bool]] | None = None,
    ) -> np.ndarray:
        """Element-wise relation of broadcast operands: union the atoms at each position.

        An atom that meets an untracked value with real extent (not broadcast) is frozen:
        removing it would leave that value alone in the output. Returns the output atoms.
        """
        nd = len(out_shape)
        arrays, reals = [], []
        for i, (lay, shape) in enumerate(items):
            a = self.table.find(lay.atoms)
            a = a.reshape((1,) * (nd - a.ndim) + a.shape)
            s = (1,) * (nd - len(shape)) + tuple(shape)
            arrays.append(a)
            if real is not None:
                reals.append(tuple(real[i]))
            else:
                reals.append(tuple(s[d] == out_shape[d] for d in range(nd)))
        full = np.broadcast_shapes(*(a.shape for a in arrays))
        out = np.full(full, NO_ATOM, dtype=np.int64)
        for a in arrays:
            ab = np.broadcast_to(a, full)
            both = (out >= 0) & (ab >= 0)
            if both.any():
                self.table.union(out[both], ab[both])
            out = np.where(out >= 0, out, ab)
        # Freeze atoms that meet an untracked operand with real extent along a varying dim.
        for a, r in zip(arrays, reals):
            ab = np.broadcast_to(a, full)
            vary = [d for d in range(nd) if full[d] > 1]
            if all(r[d] for d in vary):
                hole = (ab < 0) & (out >= 0)
                if hole.any():
                    self.freeze(out[hole], "added to or combined with an untracked tensor")
        return self.canonical(out)

    def rectify(
        self,
        atoms: np.ndarray,
        shape: Sequence[int],
        how: str = "union",
        keep: int | None = None,
    ) -> np.ndarray:
        """Make a layout vary along one dim at most, so pruned tensors stay dense.

        ``how="union"``: tie the atoms along every other dim (a head split makes the
        grid (heads, head_dim); keep whole heads or the same head dims in every head,
        per ``head_mode``, or along ``keep`` when the op fixes it). ``how="freeze"``:
        freeze instead (independent channels met).
        """
        a = self.canonical(atoms)
        vary = [d for d in range(a.ndim) if a.shape[d] > 1]
        if len(vary) <= 1:
            return a
        if how == "freeze":
            self.freeze(a, "channels in two dims of one tensor")
            return np.full((1,) * a.ndim, NO_ATOM, dtype=np.int64)
        if keep is not None:
            keep = normalize_dim(keep, a.ndim)
        elif self.head_mode == "heads":
            keep = vary[0]
        elif self.head_mode == "head_dim":
            keep = vary[-1]
        else:  # auto: keep the finer-grained (larger) dim; ties go to the inner dim
            keep = max(vary, key=lambda d: (a.shape[d], d))
        moved = np.moveaxis(a, keep, 0).reshape(a.shape[keep], -1)
        self.table.union(moved[:, :1], moved)
        mode = "heads" if keep == vary[0] else "head_dim"
        grid = tuple(a.shape[d] for d in vary)
        for cls in np.unique(self.table.find(moved[:, 0])):
            if cls >= 0:
                self.rectified.setdefault(int(cls), (mode, grid))
        out_shape = [1] * a.ndim
        out_shape[keep] = a.shape[keep]
        return self.canonical(moved[:, 0].reshape(out_shape))


def materialize(atoms: np.ndarray, shape: Sequence[int], dims: Sequence[int]) -> np.ndarray:
    """Broadcast ``atoms`` to full extent along ``dims`` (other dims stay as they are)."""
    target = [s if d in dims else atoms.shape[d] for d, s in enumerate(shape)]
    return np.broadcast_to(atoms, target).copy()


def reshape_atoms(
    env: ChannelEnv, atoms: np.ndarray, in_shape: Sequence[int], out_shape: Sequence[int]
) -> np.ndarray | None:
    """Atoms of ``reshape(in_shape -> out_shape)``; None if the reshape cannot be followed.

    Input and output dims are paired into chunks of equal product. A chunk along which
    the atoms are constant stays size 1; a chunk where they vary is materialised and
    reshaped, which follows merges (C*H*W features), splits (heads x head_dim) and the
    view-transpose-view of a channel shuffle exactly.
    """
    a = env.canonical(atoms)
    if a.size == 1:
        return np.full([1] * len(out_shape), a.reshape(-1)[0], dtype=np.int64)
    chunks = _reshape_chunks(list(in_shape), list(out_shape))
    if chunks is None:
        return None
    in_full, out_full = list(a.shape), []
    for (i0, i1), (o0, o1) in chunks:
        if any(a.shape[d] > 1 for d in range(i0, i1)):
            in_full[i0:i1] = in_shape[i0:i1]
            out_full += list(out_shape[o0:o1])
        else:
            out_full += [1] * (o1 - o0)
    if int(np.prod(in_full)) > MAX_MATERIALIZE:
        return None
    return np.broadcast_to(a, in_full).reshape(out_full).copy()


def _reshape_chunks(
    ins: list[int], outs: list[int]
) -> list[tuple[tuple[int, int], tuple[int, int]]] | None:
    """Pair runs of input dims with runs of output dims of equal product."""
    chunks = []
    i = o = 0
    ni, no = len(ins), len(outs)
    while i < ni or o < no:
        i0, o0 = i, o
        pi = po = 1
        if i < ni:
            pi *= ins[i]
            i += 1
        if o < no:
            po *= outs[o]
            o += 1
        while pi != po:
            if pi < po and i < ni:
                pi *= ins[i]
                i += 1
            elif po < pi and o < no:
                po *= outs[o]
                o += 1
            else:
                return None
        while i < ni and ins[i] == 1:
            i += 1
        while o < no and outs[o] == 1:
            o += 1
        chunks.append(((i0, i), (o0, o)))
    return chunks


def default_rule(op: CanonicalOp, env: ChannelEnv, reason: str | None = None) -> Any:
    """Unknown op: freeze every channel it touches, say why once, output untracked.

    ``reason``: why a known op cannot be related here (a computed weight, say), said
    instead of "no rule"."""
    where = meta.describe(op.node)
    touched = False
    for inp in _nested_nodes(op.node.args) + _nested_nodes(op.node.kwargs):
        lay = env.layouts.get(inp)
        for one in lay if isinstance(lay, list) else [lay]:
            if isinstance(one, Layout) and one.is_tracked():
                touched = True
                env.freeze_layout(
                    one, reason or f"used by '{op.name}', which fxprune has no rule for"
                )
    if touched:  # an op on masks or positions touches no channels: nothing to say
        env.warn_once(
            f"{op.name}: {reason}" if reason else op.name,
            f"{reason} ({where}); the channels it touches are frozen."
            if reason
            else f"fxprune has no channel rule for '{op.name}' ({where}); "
            f"the channels it touches are frozen.",
        )
    return untracked_like(op.node)


def untracked_like(node: fx.Node) -> Any:
    val = meta.tensor_value(node)
    if meta.output_values(node) is not None:
        return [Layout.untracked(len(v.shape)) if hasattr(v, "shape") else None for v in val]
    shape = meta.shape_of(node)
    return None if shape is None else Layout.untracked(len(shape))


def _nested_nodes(obj: Any) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg(obj, lambda n: out.append(n) or n)
    return out


nested_nodes = _nested_nodes
