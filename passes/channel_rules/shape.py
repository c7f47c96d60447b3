"""Ops that move, cut, join or reinterpret channel positions.

concat (a composite with offsets; nested and repeated inputs), split / chunk /
unbind / slicing / narrow / select, view / reshape / flatten / unflatten (merging
C x H x W into features, splitting C into heads x head_dim, hard-coded literal
shapes), permute / transpose / movedim, expand / repeat / repeat_interleave (GQA),
and pixel (un)shuffle. Layouts are followed position by position, so a channel
shuffle (view-transpose-view) is tracked exactly. After surgery the sizes written in
the graph (view sizes, split sizes — a ``chunk`` becomes a ``split`` —, slice
bounds, an ``nn.Unflatten``'s sizes) follow the kept channels.
"""

from __future__ import annotations

import logging
import math
import operator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from fxprune import meta
from fxprune.channels import NO_ATOM, Layout, compress
from fxprune.ops import Attrs, CanonicalOp, callable_name, normalize_dim
from fxprune.passes.channel_rules.base import (
    ChannelEnv,
    SurgeryEnv,
    default_rule,
    nested_nodes,
    op_spec,
    reshape_atoms,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CatAttrs(Attrs):
    dim: int


@dataclass(frozen=True)
class SplitAttrs(Attrs):
    dim: int
    sizes: Any = None  # split size or sections
    chunks: int | None = None
    unbind: bool = False


@dataclass(frozen=True)
class SliceAttrs(Attrs):
    """narrow / slice: dim, start, end, step; select: dim, index; getitem: index."""

    dim: Any = None
    start: Any = None
    end: Any = None
    step: Any = 1
    index: Any = None


@dataclass(frozen=True)
class ItemAttrs(Attrs):
    index: Any


@dataclass(frozen=True)
class PixelShuffleAttrs(Attrs):
    factor: Any
    up: bool


def _first_input(op: CanonicalOp) -> CanonicalOp:
    return op.with_(inputs=op.inputs[:1])


def _full_along(atoms: np.ndarray, shape, dims) -> np.ndarray:
    target = [shape[d] if d in dims else atoms.shape[d] for d in range(len(shape))]
    return np.broadcast_to(atoms, target).copy()


def _cat_view(op: CanonicalOp) -> CanonicalOp:
    tensors = op.arg(0, "tensors")
    return op.with_(name="cat", inputs=list(tensors), attrs=CatAttrs(op.arg(1, "dim", 0)))


@op_spec("cat", ops=("cat", "concat", "concatenate"), view=_cat_view)
def cat(op: CanonicalOp, env: ChannelEnv):
    out_shape = env.shape(op.node)
    if out_shape is None or not op.inputs:
        return default_rule(op, env)
    dim = normalize_dim(int(op.attrs.dim), len(out_shape))
    parts = [(env.layout(n), env.shape(n)) for n in op.inputs]
    if any(lay is None or s is None or len(s) != len(out_shape) for lay, s in parts):
        return default_rule(op, env)
    chans = {
        d
        for lay, _ in parts
        for d in range(len(out_shape))
        if env.canonical(lay.atoms).shape[d] > 1
    }
    if len(chans) == 1 and dim not in chans:
        # Tokens joined along another dim (a class token before the patches): each part holds
        # the same channels, position by position, and an untracked part freezes them.
        flat = [1 if d == dim else n for d, n in enumerate(out_shape)]
        items = [(lay, flat) for lay, _ in parts]
        return Layout(env.unify(items, flat), all(lay.zero for lay, _ in parts))
    vary = sorted(chans | {dim})
    arrays = [_full_along(env.canonical(lay.atoms), s, vary) for lay, s in parts]
    atoms = np.concatenate(arrays, axis=dim)
    atoms = env.rectify(atoms, out_shape)
    return Layout(atoms, all(lay.zero for lay, _ in parts))


def _stack_view(op: CanonicalOp) -> CanonicalOp:
    tensors = op.arg(0, "tensors")
    return op.with_(name="stack", inputs=list(tensors), attrs=CatAttrs(op.arg(1, "dim", 0)))


@op_spec("stack", ops=("stack",), view=_stack_view)
def stack(op: CanonicalOp, env: ChannelEnv):
    """Tensors stacked along a new dim (selective-kernel branches, per-scale features).

    Each part holds the same channels, position by position, as tokens joined along a
    dim the channels do not run along: their channels unify, and an untracked part
    freezes them.
    """
    out_shape = env.shape(op.node)
    if out_shape is None or not op.inputs:
        return default_rule(op, env)
    dim = normalize_dim(int(op.attrs.dim), len(out_shape))
    parts = [(env.layout(n), env.shape(n)) for n in op.inputs]
    if any(lay is None or s is None or len(s) + 1 != len(out_shape) for lay, s in parts):
        return default_rule(op, env)
    flat = [1 if d == dim else n for d, n in enumerate(out_shape)]
    items = []
    for lay, s in parts:
        atoms = lay.atoms.reshape((1,) * (len(s) - lay.atoms.ndim) + lay.atoms.shape)
        items.append((Layout(np.expand_dims(atoms, dim), lay.zero), flat))
    return Layout(env.unify(items, flat), all(lay.zero for lay, _ in parts))


def _split_view(op: CanonicalOp) -> CanonicalOp:
    a = op.arg
    if op.name == "unbind":
        attrs = SplitAttrs(a(1, "dim", 0), unbind=True)
    elif op.name == "chunk":
        attrs = SplitAttrs(a(2, "dim", 0), chunks=a(1, "chunks"))
    else:
        size = a(1, "split_size_or_sections", a(1, "split_size", a(1, "split_sizes")))
        attrs = SplitAttrs(a(2, "dim", 0), size)
    return op.with_(inputs=op.inputs[:1], attrs=attrs)


def _split_rewrite(op: CanonicalOp, s: SurgeryEnv) -> None:
    """Write the new sizes; a ``chunk`` becomes a ``split`` with explicit sizes."""
    node = op.node
    if op.attrs.unbind:
        return
    outs = s.new_shape(node)
    val = meta.tensor_value(node)
    src_shape = meta.shape_of(op.inputs[0])
    if not isinstance(outs, list) or meta.output_values(node) is None or src_shape is None:
        return
    dim = normalize_dim(int(op.attrs.dim), len(src_shape))
    old_sizes = [int(v.shape[dim]) for v in val]
    new_sizes = [o[dim] if o is not None else n for o, n in zip(outs, old_sizes)]
    if new_sizes == old_sizes:
        return
    x = op.inputs[0]
    if isinstance(node.target, torch._ops.OpOverload):
        node.target = torch.ops.aten.split_with_sizes.default
    elif node.op == "call_method":
        node.target = "split"
    else:
        node.target = torch.split
    node.args, node.kwargs = (x, new_sizes, dim), {}


@op_spec(
    "split",
    ops=("split", "chunk", "unbind", "split_with_sizes", "unsafe_split"),
    view=_split_view,
    rewrite=_split_rewrite,
)
def split(op: CanonicalOp, env: ChannelEnv):
    src = op.inputs[0]
    lay, shape = env.layout(src), env.shape(src)
    outs = meta.output_values(op.node)
    if lay is None or shape is None or outs is None:
        return default_rule(op, env)
    dim = normalize_dim(int(op.attrs.dim), len(shape))
    atoms = env.canonical(lay.atoms)
    varies = atoms.shape[dim] > 1
    if op.attrs.unbind:
        if varies:
            env.freeze(atoms, "unbind along a channel dim")
        piece = (
            np.take(atoms, [0], axis=dim).squeeze(dim)
            if not varies
            else np.full((1,) * (len(shape) - 1), NO_ATOM, dtype=np.int64)
        )
        return [Layout(piece, lay.zero) for _ in outs]
    result, start = [], 0
    for t in outs:
        n = int(t.shape[dim])
        if varies:
            piece = compress(np.take(atoms, range(start, start + n), axis=dim))
        else:
            piece = atoms
        result.append(Layout(piece, lay.zero))
        start += n
    return result


def _value(v: Any) -> Any:
    """An int computed in the graph (recorded by shape propagation), or ``v`` itself."""
    if isinstance(v, fx.Node) and "fxprune.value" in v.meta:
        return v.meta["fxprune.value"]
    return v


def _normalize_index(index: Any, ndim: int) -> list[Any] | None:
    idx = list(index) if isinstance(index, tuple) else [index]
    if any(
        isinstance(i, list) or (isinstance(i, fx.Node) and "fxprune.value" not in i.meta)
        for i in idx
    ):
        return None
    consumed = sum(1 for i in idx if i is not None and i is not Ellipsis)
    out: list[Any] = []
    for i in idx:
        if i is Ellipsis:
            out += [slice(None)] * (ndim - consumed)
        else:
            out.append(i)
    out += [slice(None)] * (ndim - sum(1 for i in out if i is not None))
    return out


def _getitem_view(op: CanonicalOp) -> CanonicalOp:
    src, index = op.node.args[0], op.node.args[1]
    if isinstance(src, fx.Node) and meta.is_tensor_node(src):
        return op.with_(spec=slicing.spec, inputs=[src], attrs=SliceAttrs(index=index))
    return op.with_(inputs=[src] if isinstance(src, fx.Node) else [], attrs=ItemAttrs(index))


@op_spec("getitem", ops=("getitem",), view=_getitem_view)
def tuple_item(op: CanonicalOp, env: ChannelEnv):
    """One result of an op with several (split, max with dim); a tensor's item is a slice."""
    src = op.inputs[0] if op.inputs else None
    lay = env.layouts.get(src) if src is not None else None
    idx = op.attrs.index
    if isinstance(lay, list) and isinstance(idx, int) and -len(lay) <= idx < len(lay):
        return lay[idx]
    return env.untracked(op.node)


def _slice_view(op: CanonicalOp) -> CanonicalOp:
    a = op.arg
    if op.name == "narrow":
        start = a(2, "start")
        attrs = SliceAttrs(a(1, "dim"), start, start + a(3, "length"), 1)
    else:
        attrs = SliceAttrs(a(1, "dim", 0), a(2, "start"), a(3, "end"), a(4, "step", 1))
    return op.with_(inputs=op.inputs[:1], attrs=attrs)


def _select_view(op: CanonicalOp) -> CanonicalOp:
    attrs = SliceAttrs(op.arg(1, "dim"), index=op.arg(2, "index"))
    return op.with_(inputs=op.inputs[:1], attrs=attrs)


def _slice_rewrite(op: CanonicalOp, s: SurgeryEnv) -> None:
    """Move slice bounds along a pruned dim to where the kept channels now are."""
    src = op.inputs[0]
    lay, shape = meta.get(src, meta.LAYOUT), meta.shape_of(src)
    if not isinstance(lay, Layout) or shape is None:
        return
    if op.name == "getitem":
        _rewrite_index(op, s, lay, shape)
        return
    dim = normalize_dim(int(op.attrs.dim), len(shape))
    if lay.atoms.shape[dim] <= 1:
        return
    args = list(op.node.args)
    if op.name == "narrow":
        ns = s.kept_before(lay, dim, shape[dim], op.attrs.start)
        args[2], args[3] = ns, s.kept_before(lay, dim, shape[dim], op.attrs.end) - ns
    else:
        while len(args) < 4:
            args.append(None)
        args[2] = s.kept_before(lay, dim, shape[dim], args[2])
        args[3] = s.kept_before(lay, dim, shape[dim], args[3])
    op.node.args = tuple(args)


def _rewrite_index(op: CanonicalOp, s: SurgeryEnv, lay: Layout, shape) -> None:
    index = op.attrs.index
    items = list(index) if isinstance(index, tuple) else [index]
    d, changed = 0, False
    if any(i is Ellipsis for i in items):
        return
    for k, item in enumerate(items):
        if item is None:
            continue
        if isinstance(item, slice) and d < len(shape) and lay.atoms.shape[d] > 1:
            new = slice(
                s.kept_before(lay, d, shape[d], item.start),
                s.kept_before(lay, d, shape[d], item.stop),
                item.step,
            )
            if new != item:
                items[k], changed = new, True
        d += 1
    if changed:
        op.node.args = (op.node.args[0], tuple(items) if isinstance(index, tuple) else items[0])


@op_spec("select", ops=("select",), view=_select_view)
@op_spec("slice", ops=("narrow", "slice"), view=_slice_view, rewrite=_slice_rewrite)
def slicing(op: CanonicalOp, env: ChannelEnv):
    src = op.inputs[0] if op.inputs else None
    lay, shape = env.layout(src), env.shape(src)
    out_shape = env.shape(op.node)
    if lay is None or shape is None or out_shape is None:
        return default_rule(op, env)
    a = op.attrs
    if op.name == "getitem":
        index = _normalize_index(a.index, len(shape))
    else:
        dim = normalize_dim(int(a.dim), len(shape))
        index = [slice(None)] * len(shape)
        index[dim] = a.index if op.kind == "select" else slice(a.start, a.end, a.step or 1)
    if index is not None:
        index = [
            slice(*(_value(v) for v in (i.start, i.stop, i.step)))
            if isinstance(i, slice)
            else _value(i)
            for i in index
        ]
    if index is None or any(
        isinstance(i, fx.Node)
        or (isinstance(i, slice) and any(isinstance(v, fx.Node) for v in (i.start, i.stop, i.step)))
        for i in index
    ):
        return default_rule(op, env)
    atoms = env.canonical(lay.atoms)
    np_index: list[Any] = []
    d = 0
    for i in index:
        if i is None:
            np_index.append(None)
            continue
        if atoms.shape[d] > 1:
            if isinstance(i, int):
                env.freeze(atoms, "a fixed index along a channel dim")
            np_index.append(i)
        else:
            np_index.append(0 if isinstance(i, int) else slice(None))
        d += 1
    try:
        out = atoms[tuple(np_index)]
    except (IndexError, TypeError):
        return default_rule(op, env)
    out = np.asarray(out).reshape(np.shape(out))
    if out.ndim != len(out_shape):
        return default_rule(op, env)
    return Layout(compress(out), lay.zero)


def _reshape_view(op: CanonicalOp) -> CanonicalOp:
    if op.module is not None:
        return op.with_(name="unflatten" if isinstance(op.module, nn.Unflatten) else "flatten")
    return op.with_(inputs=op.inputs[:1])


def _size_args(node: fx.Node, name: str) -> tuple[int, list[Any]] | None:
    """(position of the sizes in node.args, the sizes) for view/reshape/expand/unflatten."""
    args = node.args
    if name in ("view", "reshape", "_unsafe_view", "expand"):
        if len(args) == 2 and isinstance(args[1], (list, tuple)):
            return 1, list(args[1])
        if node.op == "call_method" and len(args) >= 2:
            return -1, list(args[1:])
        if "size" in node.kwargs or "shape" in node.kwargs:
            return -2, list(node.kwargs.get("size", node.kwargs.get("shape")))
    if name == "unflatten" and len(args) >= 3:
        return 2, list(args[2])
    return None


def _sizes_rewrite(op: CanonicalOp, s: SurgeryEnv) -> None:
    """Write the new sizes into a view / reshape / expand / unflatten (and nn.Unflatten)."""
    node = op.node
    old, new = s.old_shape(node), s.new_shape(node)
    if old is None or new is None:
        return
    _rewrite_sizes(op, old, new, s)
    if node.op == "call_module" and op.name == "unflatten":
        x = node.args[0] if node.args else None
        in_old = s.old_shape(x) if isinstance(x, fx.Node) else None
        if in_old is not None:
            mod = s.gm.get_submodule(node.target)
            dim = normalize_dim(mod.dim, len(in_old))
            mod.unflattened_size = tuple(new[dim : dim + len(mod.unflattened_size)])


def _shape_of(node: Any) -> fx.Node | None:
    """``x`` when ``node`` is ``x.shape`` or ``x.size()``."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_function" and node.target is getattr and node.args[1:] == ("shape",):
        return node.args[0]
    if node.op == "call_method" and node.target == "size" and len(node.args) == 1:
        return None if node.kwargs else node.args[0]
    return None


def _size_reads(node: Any, seen: set[fx.Node]) -> set[tuple[fx.Node, int | None]]:
    """The (tensor, dim) shape entries a size computed in the graph reads.

    ``C // heads`` with ``B, N, C = x.shape`` reads ``(x, 2)``; ``None`` for the dim means
    the whole shape. A value read from a tensor's data (``x.item()``) is not a size.
    """
    if not isinstance(node, fx.Node) or node in seen or meta.is_tensor_node(node):
        return set()
    seen.add(node)
    src = _shape_of(node)
    if src is not None:
        return {(src, None)}
    args = node.args
    if node.target is operator.getitem and len(args) == 2 and isinstance(args[1], int):
        src = _shape_of(args[0])
        if src is not None:
            return {(src, args[1])}
    if node.target == "size" or callable_name(node.target) == "sym_size":
        dim = args[1] if len(args) > 1 else node.kwargs.get("dim")
        if isinstance(args[0], fx.Node) and isinstance(dim, int):
            return {(args[0], dim)}
    reads: set[tuple[fx.Node, int | None]] = set()
    for inp in nested_nodes(args) + nested_nodes(node.kwargs):
        reads |= _size_reads(inp, seen)
    return reads


def _read_sizes(size: Any, s: SurgeryEnv) -> list[tuple[int, int]]:
    """(size before surgery, size after) of every tensor dim a size computed in the graph reads."""
    out = []
    for src, dim in _size_reads(size, set()):
        old, new = s.old_shape(src), s.new_shape(src)
        if old is None or not isinstance(new, tuple) or len(new) != len(old):
            continue
        dims = range(len(old)) if dim is None else [dim]
        out.extend((old[d], new[d]) for d in dims)
    return out


def _size_moves(size: Any, s: SurgeryEnv) -> bool:
    """Whether a size computed in the graph reads a dim that surgery shrinks."""
    return any(o != n for o, n in _read_sizes(size, s))


# the integer operators a size computed in the graph may apply (``B * C // 2``, ``ceil``)
_SIZE_OPS = frozenset(
    {
        operator.add,
        operator.sub,
        operator.mul,
        operator.floordiv,
        operator.truediv,
        operator.mod,
        operator.neg,
        math.ceil,
        math.floor,
        int,
    }
)


def _size_value(size: Any, shape_of: Any) -> Any:
    """What the size expression ``size`` computes when each tensor ``t`` it reads has the
    shape ``shape_of(t)``: an int (a tuple for a whole shape), or None where it reads
    anything else."""
    if isinstance(size, (int, float)) and not isinstance(size, bool):
        return size
    if not isinstance(size, fx.Node) or meta.is_tensor_node(size):
        return None
    src = _shape_of(size)
    if src is not None:
        return shape_of(src)
    args = size.args
    if size.target is operator.getitem and len(args) == 2 and isinstance(args[1], int):
        whole = _size_value(args[0], shape_of)
        ok = isinstance(whole, tuple) and -len(whole) <= args[1] < len(whole)
        return whole[args[1]] if ok else None
    if size.target == "size" or callable_name(size.target) == "sym_size":
        dim = args[1] if len(args) > 1 else size.kwargs.get("dim")
        shape = shape_of(args[0]) if isinstance(args[0], fx.Node) else None
        if shape is None or not isinstance(dim, int) or not -len(shape) <= dim < len(shape):
            return None
        return shape[dim]
    if size.op == "call_function" and size.target in _SIZE_OPS and not size.kwargs:
        values = [_size_value(a, shape_of) for a in args]
        if any(v is None or isinstance(v, tuple) for v in values):
            return None
        try:
            return size.target(*values)
        except (ArithmeticError, TypeError, ValueError):
            return None
    return None


def _reads_a_kept_dim(size: fx.Node, surgery: SurgeryEnv) -> bool:
    """Whether ``size`` reads a dim surgery leaves alone (the batch, tokens, an image
    side): a dim that may take other values at run time than in the example."""
    return any(o == n for o, n in _read_sizes(size, surgery))


def _scaled(node: fx.Node, size: fx.Node, want: int, now: int) -> fx.Node:
    """``size * want / now`` computed in the graph before ``node``: exact at the example
    (where ``size`` is ``now``), and at any batch for a size proportional to it."""
    graph = node.graph
    with graph.inserting_before(node):
        if want % now == 0:
            out = graph.call_function(operator.mul, (size, want // now))
        elif now % want == 0:
            out = graph.call_function(operator.floordiv, (size, now // want))
        else:
            out = graph.call_function(
                operator.floordiv, (graph.call_function(operator.mul, (size, want)), now)
            )
    for new in (out, *out.all_input_nodes):
        if new is not size:
            new.meta.setdefault("stack_trace", node.meta.get("stack_trace"))
    return out


def _rewrite_sizes(op: CanonicalOp, old: tuple, new: tuple, surgery: SurgeryEnv) -> None:
    """Write each size whose planned value differs from the value the graph will compute.

    A size computed in the graph is evaluated on the pruned shapes. When it already gives
    the planned value (``B * C`` with ``C`` read from the pruned tensor) it stays as it is,
    so the graph keeps its dynamic dims. When it gives another value and reads a dim that
    surgery leaves alone (``B * 96`` with the channel count a constant of the trace, the
    batch from the input), it is scaled in the graph to the planned value: still exact at
    the example, and right at every batch. Otherwise it becomes the planned literal
    (``qkv(x).reshape(B, N, 3, h, C // h)`` with ``C`` from ``x`` pruned otherwise than the
    heads).
    """
    node = op.node
    found = _size_args(node, op.name)
    if found is None:
        return
    pos, sizes = found

    def pruned_shape(t: fx.Node) -> Any:
        shape = surgery.new_shape(t)
        return tuple(shape) if isinstance(shape, tuple) else None

    def to_write(size: Any, o: int, n: int) -> Any:
        if isinstance(size, int) and size == -1:
            return size
        if not isinstance(size, fx.Node):
            return size if o == n else n
        now = _size_value(size, pruned_shape)
        if not isinstance(now, int) or isinstance(now, bool):  # an expression not followed
            return size if o == n and not _size_moves(size, surgery) else n
        if now == n:
            return size
        if now > 0 and n > 0 and _reads_a_kept_dim(size, surgery):
            return _scaled(node, size, n, now)
        return n

    if op.name == "unflatten":
        dim = normalize_dim(int(node.args[1]), len(meta.shape_of(op.inputs[0])))
        span = range(dim, dim + len(sizes))
        written = [to_write(s, old[d], new[d]) for s, d in zip(sizes, span)]
    elif len(sizes) == len(old):
        written = [to_write(s, o, n) for s, o, n in zip(sizes, old, new)]
    else:
        return
    if written == sizes:
        return
    sizes = written
    args = list(node.args)
    if pos == -1:
        node.args = (args[0], *sizes)
    elif pos == -2:
        key = "size" if "size" in node.kwargs else "shape"
        node.kwargs = {**node.kwargs, key: sizes}
    else:
        args[pos] = sizes
        node.args = tuple(args)


@op_spec(
    "reshape",
    modules=(nn.Flatten, nn.Unflatten),
    ops=(
        "view",
        "reshape",
        "flatten",
        "unflatten",
        "squeeze",
        "unsqueeze",
        "squeeze_",
        "unsqueeze_",
        "view_as",
        "reshape_as",
        "_unsafe_view",
    ),
    view=_reshape_view,
    rewrite=_sizes_rewrite,
)
def reshape(op: CanonicalOp, env: ChannelEnv):
    src = op.inputs[0] if op.inputs else None
    lay, in_shape = env.layout(src), env.shape(src)
    out_shape = env.shape(op.node)
    if lay is None or in_shape is None or out_shape is None:
        return default_rule(op, env)
    atoms = reshape_atoms(env, lay.atoms, in_shape, out_shape)
    if atoms is None:
        env.freeze_layout(lay, f"'{op.name}' that fxprune cannot follow")
        return env.untracked(op.node)
    return Layout(env.rectify(atoms, out_shape), lay.zero)


def _permutation(op: CanonicalOp, ndim: int) -> list[int] | None:
    args = op.node.args
    name = op.name
    if name == "permute":
        dims = args[1:] if len(args) > 2 or not isinstance(args[1], (list, tuple)) else args[1]
        dims = dims or op.node.kwargs.get("dims")
        return [normalize_dim(int(d), ndim) for d in dims]
    if name in ("transpose", "transpose_", "swapaxes", "swapdims"):
        d0 = normalize_dim(int(args[1] if len(args) > 1 else op.node.kwargs["dim0"]), ndim)
        d1 = normalize_dim(int(args[2] if len(args) > 2 else op.node.kwargs["dim1"]), ndim)
        perm = list(range(ndim))
        perm[d0], perm[d1] = perm[d1], perm[d0]
        return perm
    if name in ("movedim", "moveaxis"):
        src, dst = args[1], args[2]
        return list(np.moveaxis(np.arange(ndim), src, dst))
    if name == "t":
        return list(range(ndim))[::-1]
    return None


@op_spec(
    "permute",
    ops=("permute", "transpose", "transpose_", "movedim", "moveaxis", "t", "swapaxes", "swapdims"),
    view=_first_input,
)
def permute(op: CanonicalOp, env: ChannelEnv):
    src = op.inputs[0]
    lay, shape = env.layout(src), env.shape(src)
    if lay is None or shape is None:
        return default_rule(op, env)
    perm = _permutation(op, len(shape))
    if perm is None or any(isinstance(p, fx.Node) for p in perm):
        return default_rule(op, env)
    return Layout(np.transpose(lay.atoms, perm), lay.zero)


@op_spec(
    "expand",
    ops=("expand", "expand_as", "repeat", "repeat_interleave", "tile"),
    view=_first_input,
    rewrite=_sizes_rewrite,
)
def expand(op: CanonicalOp, env: ChannelEnv):
    src = op.inputs[0]
    lay, in_shape = env.layout(src), env.shape(src)
    out_shape = env.shape(op.node)
    if lay is None or in_shape is None or out_shape is None:
        return default_rule(op, env)
    nd = len(out_shape)
    atoms = env.canonical(lay.atoms)
    if op.name == "repeat_interleave":
        reps = op.node.args[1] if len(op.node.args) > 1 else op.node.kwargs.get("repeats")
        dim = op.node.args[2] if len(op.node.args) > 2 else op.node.kwargs.get("dim")
        if dim is None or not isinstance(dim, int):
            return default_rule(op, env)
        dim = normalize_dim(int(dim), len(in_shape))
        if atoms.shape[dim] == 1:  # repeats along a dim of no channel (GCViT's batch)
            return Layout(atoms, lay.zero)  # whatever the count, computed or not
        if not isinstance(reps, int):
            return default_rule(op, env)
        return Layout(np.repeat(atoms, reps, axis=dim), lay.zero)
    atoms = atoms.reshape((1,) * (nd - atoms.ndim) + atoms.shape)
    in_full = (1,) * (nd - len(in_shape)) + tuple(in_shape)
    if op.name in ("expand", "expand_as"):
        return Layout(atoms, lay.zero)
    reps = [o // i if i else 1 for o, i in zip(out_shape, in_full)]
    tiles = [r if atoms.shape[d] > 1 else 1 for d, r in enumerate(reps)]
    return Layout(np.tile(atoms, tiles), lay.zero)


def _pixel_shuffle_view(op: CanonicalOp) -> CanonicalOp:
    if op.module is not None:
        up = isinstance(op.module, nn.PixelShuffle)
        factor = op.module.upscale_factor if up else op.module.downscale_factor
        name = "pixel_shuffle" if up else "pixel_unshuffle"
        return op.with_(name=name, attrs=PixelShuffleAttrs(factor, up))
    up = op.name == "pixel_shuffle"
    factor = op.arg(1, "upscale_factor" if up else "downscale_factor")
    return op.with_(inputs=op.inputs[:1], attrs=PixelShuffleAttrs(factor, up))


@op_spec(
    "pixel_shuffle",
    modules=(nn.PixelShuffle, nn.PixelUnshuffle),
    ops=("pixel_shuffle", "pixel_unshuffle"),
    view=_pixel_shuffle_view,
)
def pixel_shuffle(op: CanonicalOp, env: ChannelEnv):
    src = op.inputs[0]
    lay, shape = env.layout(src), env.shape(src)
    out_shape = env.shape(op.node)
    r = op.attrs.factor
    if lay is None or shape is None or out_shape is None or not isinstance(r, int):
        return default_rule(op, env)
    cdim = len(shape) - 3
    xa = env.dim_atoms(lay, shape, cdim)
    if op.attrs.up:
        grid = xa.reshape(-1, r * r)  # output channel c reads input channels c*r^2 .. c*r^2+r^2-1
        env.table.union(grid[:, :1], grid)
        out = grid[:, 0]
    else:
        out = np.repeat(xa, r * r)
    return Layout.along(env.table.find(out), cdim, len(out_shape), lay.zero)


@dataclass(frozen=True)
class RollAttrs(Attrs):
    dims: tuple[int, ...]  # the dims rolled; () rolls the flattened tensor


def _roll_view(op: CanonicalOp) -> CanonicalOp:
    dims = op.arg(2, "dims", ())
    dims = tuple(dims) if isinstance(dims, (list, tuple)) else (dims,)
    return op.with_(inputs=op.inputs[:1], attrs=RollAttrs(dims))


@op_spec("roll", ops=("roll",), view=_roll_view)
def roll(op: CanonicalOp, env: ChannelEnv):
    """``torch.roll``: rolling H and W (Swin's shifted windows) moves pixels, never channels."""
    lay, shape = env.layout(op.inputs[0]), env.shape(op.inputs[0])
    if lay is None or shape is None or not op.attrs.dims:
        return default_rule(op, env)  # a roll of the flattened tensor mixes everything
    if any(lay.atoms.shape[normalize_dim(d, len(shape))] > 1 for d in op.attrs.dims):
        env.freeze_layout(lay, "roll along a channel dim")
        return env.untracked(op.node)
    return lay
