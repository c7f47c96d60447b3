"""SurgeryPass: remove the dropped channels from the graph module.

Slices every member parameter and buffer (zeroed slices for ``pad`` channels),
updates module size attributes (in/out channels, groups of depthwise convs,
num_features, normalized_shape, in/out features, embedding_dim, ...) and rewrites
graph constants — view/reshape/expand sizes, split sizes (a ``chunk`` becomes a
``split`` with explicit sizes), slice bounds, functional layer_norm shapes, a
depthwise conv's ``groups``, SDPA's default scale — so the graph is right even when
the Python source hard-codes shapes. Parameter names (state_dict keys) stay.

Writes ``ctx.results["kept"]``: {param: {dim: LongTensor of original indices, -1 for
a padding channel}} and re-propagates shapes, checking them against the plan.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from fxprune import meta
from fxprune.channels import Layout
from fxprune.errors import PostconditionError
from fxprune.ops import CanonicalOp, OpKind, callable_name, canonicalize, normalize_dim
from fxprune.pass_infra import Pass, PassContext, PassResult
from fxprune.passes.propagate_channels import param_aliases
from fxprune.passes.select_channels import DROP, KEEP, PAD
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

    def positions(self, atoms: np.ndarray) -> np.ndarray:
        """State of each position of a 1-D atom array (untracked positions are kept)."""
        classes = self.env.table.find(atoms)
        return np.where(classes >= 0, self.state[np.maximum(classes, 0)], KEEP)

    def line(self, lay: Layout, dim: int, size: int) -> np.ndarray:
        a = self.env.table.find(lay.atoms)
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
    return out.clone()


def _set_tensor(gm: nn.Module, fqn: str, value: torch.Tensor, cache: dict[int, Any]) -> None:
    mod_name, _, name = fqn.rpartition(".")
    mod = gm.get_submodule(mod_name) if mod_name else gm
    old = getattr(mod, name)
    if name in mod._parameters:
        new = cache.get(id(old))
        if new is None:
            new = cache[id(old)] = nn.Parameter(value, requires_grad=old.requires_grad)
        mod._parameters[name] = new
    elif name in mod._buffers:
        mod._buffers[name] = cache.setdefault(id(old), value)
    else:
        setattr(mod, name, value)


class SurgeryPass(Pass):
    requires = (meta.LAYOUT,)
    invalidates = (meta.LAYOUT, meta.GROUP, meta.OP)

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        env = ctx.results["channels"]
        plan = ChannelPlan(env, ctx.results["groups"], ctx.results.get("selection", {}))
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
            ctx.results["kept"] = {}
            return PassResult(gm, False)
        planned = self._planned_shapes(gm, plan)
        self._rewrite_graph(gm, plan, planned)
        state = dict(gm.named_parameters(remove_duplicate=False))
        state.update(dict(gm.named_buffers(remove_duplicate=False)))
        cache: dict[int, Any] = {}
        for fqn, dims in kept.items():
            _set_tensor(gm, fqn, slice_tensor(state[fqn], dims), cache)
        self._update_modules(gm, plan, planned)
        self._replace_attention(gm, plan)
        gm.recompile()
        gm.graph.lint()
        if ctx.example_inputs is not None:
            reshape_shapes(gm, ctx.example_inputs)
            self._check_shapes(gm, planned)
        ctx.results["kept"] = kept
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

    # -- graph constants ----------------------------------------------------------------------
    def _rewrite_graph(self, gm: fx.GraphModule, plan: ChannelPlan, planned: dict) -> None:
        for node in list(gm.graph.nodes):
            op = canonicalize(node, gm)
            old = meta.shape_of(node)
            new = planned.get(node)
            if (
                op.kind in (OpKind.RESHAPE, OpKind.EXPAND)
                and old is not None
                and new is not None
                and tuple(old) != tuple(new)
            ):
                self._rewrite_sizes(node, op, old, new)
            elif op.kind == OpKind.SPLIT:
                self._rewrite_split(gm, node, op, plan, planned)
            elif op.kind == OpKind.SLICE:
                self._rewrite_slice(node, op, plan)
            elif (
                op.kind == OpKind.NORM
                and op.attrs.get("norm") in ("layer", "rms")
                and node.op != "call_module"
            ):
                src_new = planned.get(op.inputs[0])
                k = int(op.attrs.get("normalized_ndim") or 1)
                if src_new is not None:
                    args = list(node.args)
                    args[1] = list(src_new[-k:])
                    node.args = tuple(args)
            elif op.kind == OpKind.CONV and node.op != "call_module":
                self._rewrite_conv_groups(gm, node, op, planned)
            elif op.kind == OpKind.SDPA:
                q_old, q_new = meta.shape_of(op.inputs[0]), planned.get(op.inputs[0])
                if q_old and q_new and q_old[-1] != q_new[-1] and op.attrs.get("scale") is None:
                    # the default scale is 1/sqrt(head_dim): pin the original so outputs stay exact
                    node.kwargs = {**node.kwargs, "scale": 1.0 / math.sqrt(q_old[-1])}

    @staticmethod
    def _size_args(node: fx.Node, op: CanonicalOp) -> tuple[int, list[Any]] | None:
        """(position of the sizes in node.args, the sizes) for view/reshape/expand/unflatten."""
        args = node.args
        if op.name in ("view", "reshape", "_unsafe_view", "expand"):
            if len(args) == 2 and isinstance(args[1], (list, tuple)):
                return 1, list(args[1])
            if node.op == "call_method" and len(args) >= 2:
                return -1, list(args[1:])
            if "size" in node.kwargs or "shape" in node.kwargs:
                return -2, list(node.kwargs.get("size", node.kwargs.get("shape")))
        if op.name == "unflatten" and len(args) >= 3:
            return 2, list(args[2])
        return None

    def _rewrite_sizes(self, node: fx.Node, op: CanonicalOp, old: tuple, new: tuple) -> None:
        found = self._size_args(node, op)
        if found is None:
            return
        pos, sizes = found
        if op.name == "unflatten":
            dim = normalize_dim(int(node.args[1]), len(meta.shape_of(op.inputs[0])))
            span = range(dim, dim + len(sizes))
            sizes = [
                s if (isinstance(s, int) and s == -1) or old[d] == new[d] else new[d]
                for s, d in zip(sizes, span)
            ]
        elif len(sizes) == len(old):
            sizes = [
                s if (isinstance(s, int) and s == -1) or o == n else n
                for s, o, n in zip(sizes, old, new)
            ]
        else:
            return
        args = list(node.args)
        if pos == -1:
            node.args = (args[0], *sizes)
        elif pos == -2:
            key = "size" if "size" in node.kwargs else "shape"
            node.kwargs = {**node.kwargs, key: sizes}
        else:
            args[pos] = sizes
            node.args = tuple(args)

    def _rewrite_split(
        self, gm, node: fx.Node, op: CanonicalOp, plan: ChannelPlan, planned
    ) -> None:
        if op.attrs.get("unbind"):
            return
        outs = planned.get(node)
        val = meta.tensor_value(node)
        src_shape = meta.shape_of(op.inputs[0])
        if not isinstance(outs, list) or meta.output_values(node) is None or src_shape is None:
            return
        dim = normalize_dim(int(op.attrs.get("dim", 0)), len(src_shape))
        old_sizes = [int(v.shape[dim]) for v in val]
        new_sizes = [o[dim] if o is not None else s for o, s in zip(outs, old_sizes)]
        if new_sizes == old_sizes:
            return
        x = op.inputs[0]
        if isinstance(node.target, torch._ops.OpOverload):
            node.target = torch.ops.aten.split_with_sizes.default
            node.args, node.kwargs = (x, new_sizes, dim), {}
        elif node.op == "call_method":
            node.target = "split"
            node.args, node.kwargs = (x, new_sizes, dim), {}
        else:
            node.target = torch.split
            node.args, node.kwargs = (x, new_sizes, dim), {}

    def _rewrite_slice(self, node: fx.Node, op: CanonicalOp, plan: ChannelPlan) -> None:
        src = op.inputs[0]
        lay, shape = meta.get(src, meta.LAYOUT), meta.shape_of(src)
        if not isinstance(lay, Layout) or shape is None:
            return

        def remap(d: int, bound: Any, default: int) -> Any:
            if bound is None or not isinstance(bound, int):
                return bound
            line = plan.line(lay, d, shape[d])
            b = bound + shape[d] if bound < 0 else min(bound, shape[d])
            return int((line[:b] != DROP).sum())

        if op.name == "getitem":
            index = op.attrs["index"]
            items = list(index) if isinstance(index, tuple) else [index]
            d, changed = 0, False
            if any(i is Ellipsis for i in items):
                return
            for k, item in enumerate(items):
                if item is None:
                    continue
                if isinstance(item, slice) and d < len(shape) and lay.atoms.shape[d] > 1:
                    new = slice(remap(d, item.start, 0), remap(d, item.stop, shape[d]), item.step)
                    if new != item:
                        items[k], changed = new, True
                d += 1
            if changed:
                node.args = (node.args[0], tuple(items) if isinstance(index, tuple) else items[0])
            return
        dim = normalize_dim(int(op.attrs["dim"]), len(shape))
        if lay.atoms.shape[dim] <= 1:
            return
        args = list(node.args)
        if op.name == "narrow":
            start, end = op.attrs["start"], op.attrs["end"]
            ns = remap(dim, start, 0)
            args[2], args[3] = ns, remap(dim, end, shape[dim]) - ns
        else:
            while len(args) < 4:
                args.append(None)
            args[2], args[3] = remap(dim, args[2], 0), remap(dim, args[3], shape[dim])
        node.args = tuple(args)

    @staticmethod
    def _rewrite_conv_groups(gm, node: fx.Node, op: CanonicalOp, planned) -> None:
        groups = int(op.attrs.get("groups") or 1)
        x = op.inputs[0]
        old, new = meta.shape_of(x), planned.get(x)
        w = (
            gm.get_parameter(op.params["weight"])
            if op.params.get("weight", "<").isidentifier() or "." in op.params.get("weight", "<")
            else None
        )
        if groups == 1 or old is None or new is None or w is None:
            return
        cdim = len(old) - (w.dim() - 1)
        if old[cdim] == groups and new[cdim] != old[cdim]:  # depthwise: one group per channel
            pos = 8 if callable_name(node.target) in ("convolution", "_convolution") else 6
            if len(node.args) > pos:
                args = list(node.args)
                args[pos] = new[cdim]
                node.args = tuple(args)
            else:
                node.kwargs = {**node.kwargs, "groups": new[cdim]}

    # -- module replacement -------------------------------------------------------------------
    @staticmethod
    def _replace_attention(gm: fx.GraphModule, plan: ChannelPlan) -> None:
        """Swap pruned ``nn.MultiheadAttention`` modules for ``PrunedMultiheadAttention``."""
        from fxprune.modules import PrunedMultiheadAttention

        env = plan.env
        for node in gm.graph.nodes:
            if node.op != "call_module":
                continue
            mod = gm.get_submodule(node.target)
            atoms = env.param_atoms.get((env.canonical_param(f"{node.target}.in_proj_weight"), 0))
            if (
                not isinstance(mod, (nn.MultiheadAttention, PrunedMultiheadAttention))
                or atoms is None
            ):
                continue
            h = mod.num_heads
            d = getattr(mod, "head_dim", mod.embed_dim // h)
            dv = getattr(mod, "v_head_dim", d)
            keep = torch.from_numpy(plan.positions(atoms) != DROP)
            q, v = keep[: h * d].view(h, d), keep[2 * h * d :].view(h, dv)
            heads = q.any(1) | v.any(1)
            new_d, new_dv = int(q[heads].sum(1).max()), int(v[heads].sum(1).max())
            scale = getattr(mod, "scale", d**-0.5)  # the original scale, whatever head_dim becomes
            parent_name, _, attr = node.target.rpartition(".")
            parent = gm.get_submodule(parent_name) if parent_name else gm
            setattr(
                parent,
                attr,
                PrunedMultiheadAttention.from_module(mod, int(heads.sum()), new_d, new_dv, scale),
            )

    # -- module attributes --------------------------------------------------------------------
    @staticmethod
    def _update_modules(gm: fx.GraphModule, plan: ChannelPlan, planned: dict) -> None:
        for node in gm.graph.nodes:
            if node.op != "call_module":
                continue
            mod = gm.get_submodule(node.target)
            x = node.args[0] if node.args else None
            in_new = planned.get(x) if isinstance(x, fx.Node) else None
            in_old = meta.shape_of(x) if isinstance(x, fx.Node) else None
            if isinstance(mod, nn.modules.conv._ConvNd):
                w = mod.weight
                if mod.transposed:
                    mod.in_channels = w.shape[0]
                    mod.out_channels = w.shape[1] * mod.groups
                else:
                    if mod.groups > 1 and mod.groups == mod.in_channels and in_new is not None:
                        mult = mod.out_channels // mod.groups
                        mod.groups = w.shape[0] // mult
                    mod.in_channels = w.shape[1] * mod.groups
                    mod.out_channels = w.shape[0]
            elif isinstance(mod, nn.Linear):
                mod.in_features, mod.out_features = mod.weight.shape[1], mod.weight.shape[0]
            elif isinstance(mod, nn.modules.batchnorm._NormBase):
                ref = mod.weight if mod.weight is not None else mod.running_mean
                if ref is not None:
                    mod.num_features = ref.shape[0]
                elif in_new is not None:
                    mod.num_features = in_new[1]
            elif isinstance(mod, nn.GroupNorm):
                if mod.weight is not None:
                    mod.num_channels = mod.weight.shape[0]
                elif in_new is not None:
                    mod.num_channels = in_new[1]
            elif isinstance(mod, nn.LayerNorm) or (
                hasattr(nn, "RMSNorm") and isinstance(mod, nn.RMSNorm)
            ):
                k = len(mod.normalized_shape)
                if mod.weight is not None:
                    mod.normalized_shape = tuple(mod.weight.shape)
                elif in_new is not None:
                    mod.normalized_shape = tuple(in_new[-k:])
            elif isinstance(mod, nn.Embedding):
                mod.embedding_dim = mod.weight.shape[1]
            elif isinstance(mod, nn.PReLU):
                mod.num_parameters = mod.weight.numel()
            elif isinstance(mod, nn.Unflatten) and in_old is not None:
                out_new = planned.get(node)
                if out_new is not None:
                    dim = normalize_dim(mod.dim, len(in_old))
                    mod.unflattened_size = tuple(out_new[dim : dim + len(mod.unflattened_size)])
