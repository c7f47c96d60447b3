"""SurgeryPass: remove the dropped channels from the graph module.

Slices every member parameter and buffer (zeroed slices for ``pad`` channels), then
runs each op's ``rewrite`` hook (declared with the op under ``passes/channel_rules/``),
which updates module size attributes and rewrites graph constants (sizes, split sizes,
slice bounds, ``groups``, a default attention scale), so the graph is right even when
the Python source hard-codes shapes. Parameter names (state_dict keys) stay.

Writes the ``kept`` artifact: {param: {dim: LongTensor of original indices, -1 for
a padding channel}} and re-propagates shapes, checking them against the plan.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from fxprune import meta
from fxprune.artifacts import KEPT, PLAN
from fxprune.channels import Layout
from fxprune.errors import PostconditionError
from fxprune.ops import canonicalize
from fxprune.pass_infra import Pass, PassContext, PassResult
from fxprune.passes.channel_rules import SurgeryEnv
from fxprune.passes.channel_rules.boundary import unprune_channels, unprune_index
from fxprune.passes.propagate_channels import param_aliases
from fxprune.passes.select_channels import DROP, KEEP, PAD
from fxprune.tensors import set_tensor
from fxprune.trace import reshape_shapes

logger = logging.getLogger(__name__)


class ChannelPlan:
    """Keep / pad / drop state of every channel class, and what it means for shapes."""

    def __init__(self, env: Any, groups: list, selection: dict[int, torch.Tensor]) -> None:
        self.env = env
        self.state = np.full(env.table.size, KEEP, dtype=np.int8)
        for g in groups:
            if g.id in selection:
                self.state[g.classes] = selection[g.id].numpy()
        # State of every atom, through its class: the analysis is final, so one find serves
        # every lookup of the plan.
        self._atom_state = self.state[env.table.roots()]

    def positions(self, atoms: np.ndarray) -> np.ndarray:
        """State of each position of an atom array (untracked positions are kept)."""
        atoms = np.asarray(atoms, dtype=np.int64)
        return np.where(atoms >= 0, self._atom_state[np.maximum(atoms, 0)], KEEP)

    def line(self, lay: Layout, dim: int, size: int) -> np.ndarray:
        a = lay.atoms
        if a.shape[dim] == 1:
            return np.full(size, KEEP, dtype=np.int8)
        other = tuple(0 if d != dim else slice(None) for d in range(a.ndim))
        return self.positions(a[other])

    def kept_positions(self, lay: Layout, dim: int, size: int) -> np.ndarray:
        """Positions of ``dim`` that survive surgery (kept or padded), in order.

        A position survives when any element of its slice does, so a factored layout
        (heads x head_dim) whose first head_dim is dropped still keeps its heads.
        """
        if lay.atoms.shape[dim] == 1:
            return np.arange(size)
        alive = self.positions(lay.atoms.ravel()).reshape(lay.atoms.shape) != DROP
        others = tuple(d for d in range(alive.ndim) if d != dim)
        return np.nonzero(alive.any(axis=others) if others else alive)[0]

    def new_shape(self, lay: Layout, shape: tuple[int, ...]) -> tuple[int, ...]:
        a = lay.atoms
        out = list(shape)
        for d in range(min(a.ndim, len(shape))):
            if a.shape[d] > 1:
                out[d] = int((self.line(lay, d, shape[d]) != DROP).sum())
        return tuple(out)

    def kept_index(self, atoms: np.ndarray) -> torch.Tensor | None:
        st = self.positions(atoms)
        if (st == KEEP).all():
            return None
        idx = np.nonzero(st != DROP)[0]
        return torch.from_numpy(np.where(st[idx] == PAD, -1, idx).astype(np.int64))


def slice_tensor(t: torch.Tensor, dims: dict[int, torch.Tensor]) -> torch.Tensor:
    """``t`` indexed by kept indices along each dim; zeros where the index is -1."""
    out = t.detach()
    for d, idx in sorted(dims.items()):
        out = out.index_select(d, idx.clamp(min=0).to(out.device))
        pad = idx < 0
        if pad.any():
            shape = [1] * out.dim()
            shape[d] = len(idx)
            out = out * (~pad).view(shape).to(out.dtype)
    return out if dims else out.clone()  # index_select already made a new tensor


class SurgeryPass(Pass):
    requires = (meta.LAYOUT, PLAN)
    provides = (KEPT,)
    invalidates = (meta.LAYOUT, meta.GROUP, meta.OP)

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        plan: ChannelPlan = ctx[PLAN]
        env = plan.env
        kept: dict[str, dict[int, torch.Tensor]] = {}
        for (fqn, dim), atoms in env.param_atoms.items():
            idx = plan.kept_index(atoms)
            if idx is not None:
                kept.setdefault(fqn, {})[dim] = idx
        aliases = param_aliases(gm)
        for alias, name in aliases.items():
            if name in kept:
                kept[alias] = kept[name]
        if not kept:
            ctx[KEPT] = {}
            return PassResult(gm, False)
        planned = self._planned_shapes(gm, plan)
        state = dict(gm.named_parameters(remove_duplicate=False))
        state.update(dict(gm.named_buffers(remove_duplicate=False)))
        cache: dict[int, Any] = {}
        for fqn, dims in kept.items():
            set_tensor(gm, fqn, slice_tensor(state[fqn], dims), cache)
        self._rewrite_ops(gm, plan, planned)
        self._pad_outputs(gm, plan)
        gm.recompile()
        gm.graph.lint()
        if ctx.example_inputs is not None:
            reshape_shapes(gm, ctx.example_inputs)
            self._check_shapes(gm, planned)
        ctx[KEPT] = kept
        return PassResult(gm, True)

    # -- planning -----------------------------------------------------------------------------
    @staticmethod
    def _planned_shapes(gm: fx.GraphModule, plan: ChannelPlan) -> dict[fx.Node, Any]:
        planned: dict[fx.Node, Any] = {}
        for node in gm.graph.nodes:
            lay = meta.get(node, meta.LAYOUT)
            val = meta.tensor_value(node)
            if isinstance(lay, Layout) and meta.shape_of(node) is not None:
                old = meta.shape_of(node)
                planned[node] = new = plan.new_shape(lay, old)
                d = lay.channel_dim()
                if d is not None and d < len(old):
                    meta.put(node, meta.KEPT, (new[d], old[d]))
            elif isinstance(lay, list) and meta.output_values(node) is not None:
                planned[node] = [
                    plan.new_shape(sub, tuple(v.shape))
                    if isinstance(sub, Layout) and hasattr(v, "shape")
                    else None
                    for sub, v in zip(lay, val)
                ]
        return planned

    def _check_shapes(self, gm: fx.GraphModule, planned: dict[fx.Node, Any]) -> None:
        for node in gm.graph.nodes:
            want = planned.get(node)
            if want is None or isinstance(want, list) or node.op == "get_attr":
                continue  # parameters are checked against res.kept by the oracle
            got = meta.shape_of(node)
            if got is not None and tuple(got) != tuple(want):
                raise PostconditionError(
                    f"after surgery {meta.describe(node)} has shape {list(got)}, planned "
                    f"{list(want)}: an op changed shape in a way the channel rules did not predict."
                )

    @staticmethod
    def _pad_outputs(gm: fx.GraphModule, plan: ChannelPlan) -> None:
        """Outputs pruned with ``pad_outputs``: their kept channels go back to their places
        among zeros (:func:`unprune_channels`), so the output has its original shape."""
        out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
        for node, dim in plan.env.padded_outputs.items():
            lay, shape = meta.get(node, meta.LAYOUT), meta.shape_of(node)
            alive = plan.line(lay, dim, shape[dim]) != DROP
            if alive.all():
                continue
            with gm.graph.inserting_before(out):
                padded = gm.graph.call_function(unprune_channels, (node, unprune_index(alive), dim))
            out.replace_input_with(node, padded)

    # -- per-op rewrites ----------------------------------------------------------------------
    @staticmethod
    def _rewrite_ops(gm: fx.GraphModule, plan: ChannelPlan, planned: dict) -> None:
        """Run each op's rewrite hook (graph constants, module attributes), params sliced."""
        surgery = SurgeryEnv(gm, plan, planned)
        for node in list(gm.graph.nodes):
            op = canonicalize(node, gm)
            if op.spec.rewrite is not None:
                op.spec.rewrite(op, surgery)
