"""Channel rules for ops that move, cut, join or reinterpret channel positions.

concat (a composite with offsets; nested and repeated inputs), split / chunk /
unbind / slicing / narrow / select, view / reshape / flatten / unflatten (merging
C x H x W into features, splitting C into heads x head_dim, hard-coded literal
shapes), permute / transpose / movedim, expand / repeat / repeat_interleave (GQA),
and pixel (un)shuffle. Layouts are followed position by position, so a channel
shuffle (view-transpose-view) is tracked exactly.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch.fx as fx

from fxprune import meta
from fxprune.channels import NO_ATOM, Layout, compress
from fxprune.ops import CanonicalOp, OpKind, normalize_dim
from fxprune.passes.channel_rules.base import ChannelEnv, default_rule, register, reshape_atoms

logger = logging.getLogger(__name__)


def _full_along(atoms: np.ndarray, shape, dims) -> np.ndarray:
    target = [shape[d] if d in dims else atoms.shape[d] for d in range(len(shape))]
    return np.broadcast_to(atoms, target).copy()


@register(OpKind.CAT)
def cat(op: CanonicalOp, env: ChannelEnv):
    out_shape = env.shape(op.node)
    if out_shape is None or not op.inputs:
        return default_rule(op, env)
    dim = normalize_dim(int(op.attrs.get("dim", 0)), len(out_shape))
    parts = [(env.layout(n), env.shape(n)) for n in op.inputs]
    if any(lay is None or s is None or len(s) != len(out_shape) for lay, s in parts):
        return default_rule(op, env)
    vary = sorted(
        {
            d
            for lay, _ in parts
            for d in range(len(out_shape))
            if env.canonical(lay.atoms).shape[d] > 1
        }
        | {dim}
    )
    arrays = [_full_along(env.canonical(lay.atoms), s, vary) for lay, s in parts]
    atoms = np.concatenate(arrays, axis=dim)
    atoms = env.rectify(atoms, out_shape)
    return Layout(atoms, all(lay.zero for lay, _ in parts))


@register(OpKind.SPLIT)
def split(op: CanonicalOp, env: ChannelEnv):
    src = op.inputs[0]
    lay, shape = env.layout(src), env.shape(src)
    outs = meta.output_values(op.node)
    if lay is None or shape is None or outs is None:
        return default_rule(op, env)
    dim = normalize_dim(int(op.attrs.get("dim", 0)), len(shape))
    atoms = env.canonical(lay.atoms)
    varies = atoms.shape[dim] > 1
    if op.attrs.get("unbind"):
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


@register(OpKind.SLICE, OpKind.SELECT)
def slicing(op: CanonicalOp, env: ChannelEnv):
    src = op.inputs[0] if op.inputs else None
    lay, shape = env.layout(src), env.shape(src)
    out_shape = env.shape(op.node)
    if lay is None or shape is None or out_shape is None:
        return default_rule(op, env)
    if op.name == "getitem":
        index = _normalize_index(op.attrs["index"], len(shape))
    else:
        dim = normalize_dim(int(op.attrs["dim"]), len(shape))
        index = [slice(None)] * len(shape)
        if op.kind == OpKind.SELECT:
            index[dim] = op.attrs["index"]
        else:
            index[dim] = slice(
                op.attrs.get("start"), op.attrs.get("end"), op.attrs.get("step") or 1
            )
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


@register(OpKind.RESHAPE)
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


@register(OpKind.PERMUTE)
def permute(op: CanonicalOp, env: ChannelEnv):
    src = op.inputs[0]
    lay, shape = env.layout(src), env.shape(src)
    if lay is None or shape is None:
        return default_rule(op, env)
    perm = _permutation(op, len(shape))
    if perm is None or any(isinstance(p, fx.Node) for p in perm):
        return default_rule(op, env)
    return Layout(np.transpose(lay.atoms, perm), lay.zero)


@register(OpKind.EXPAND)
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
        if not isinstance(reps, int) or dim is None:
            return default_rule(op, env)
        dim = normalize_dim(int(dim), len(in_shape))
        if atoms.shape[dim] > 1:
            atoms = np.repeat(atoms, reps, axis=dim)
        return Layout(atoms, lay.zero)
    atoms = atoms.reshape((1,) * (nd - atoms.ndim) + atoms.shape)
    in_full = (1,) * (nd - len(in_shape)) + tuple(in_shape)
    if op.name in ("expand", "expand_as"):
        return Layout(atoms, lay.zero)
    reps = [o // i if i else 1 for o, i in zip(out_shape, in_full)]
    tiles = [r if atoms.shape[d] > 1 else 1 for d, r in enumerate(reps)]
    return Layout(np.tile(atoms, tiles), lay.zero)


@register(OpKind.PIXEL_SHUFFLE)
def pixel_shuffle(op: CanonicalOp, env: ChannelEnv):
    src = op.inputs[0]
    lay, shape = env.layout(src), env.shape(src)
    out_shape = env.shape(op.node)
    r = op.attrs.get("factor")
    if lay is None or shape is None or out_shape is None or not isinstance(r, int):
        return default_rule(op, env)
    cdim = len(shape) - 3
    xa = env.dim_atoms(lay, shape, cdim)
    if op.attrs.get("up"):
        grid = xa.reshape(-1, r * r)  # output channel c reads input channels c*r^2 .. c*r^2+r^2-1
        env.table.union(grid[:, :1], grid)
        out = grid[:, 0]
    else:
        out = np.repeat(xa, r * r)
    return Layout.along(env.table.find(out), cdim, len(out_shape), lay.zero)
