"""Channel rules for graph boundaries and ops that keep channels where they are.

Pass-through (activations, dropout, identity, pooling, interpolation, padding over
spatial dims), union of broadcast operands (residual add/sub/mul/div, SE scaling,
layer-scale parameters), and reductions/softmax (which keep the channel space when
they reduce other dims and make it inexact when they reduce the channel dim).
"""

from __future__ import annotations

import logging

import numpy as np

from fxprune import meta
from fxprune.channels import NO_ATOM, Layout
from fxprune.ops import CanonicalOp, OpKind, canonicalize, normalize_dim
from fxprune.passes.channel_rules.base import ChannelEnv, default_rule, nested_nodes, register

logger = logging.getLogger(__name__)

# Ops that read a get_attr'd parameter as a weight (the op's rule binds its dims).
_WEIGHT_READERS = (OpKind.CONV, OpKind.CONV_TRANSPOSE, OpKind.LINEAR, OpKind.NORM, OpKind.EMBEDDING)


@register(OpKind.PLACEHOLDER)
def placeholder(op: CanonicalOp, env: ChannelEnv):
    # Model inputs are untracked: their channels are the user's data and never pruned.
    return env.untracked(op.node)


@register(OpKind.SCALAR)
def scalar(op: CanonicalOp, env: ChannelEnv):
    return None


@register(OpKind.PARAM)
def param(op: CanonicalOp, env: ChannelEnv):
    """A parameter used as a tensor (layer scale, position embedding, class token).

    Its last dim carries channels; dims a weight-reading op binds itself are left to it.
    """
    shape = env.shape(op.node)
    dtype = meta.dtype_of(op.node)
    if shape is None or not shape or dtype is None or not dtype.is_floating_point:
        return env.untracked(op.node)  # integer buffers (position ids, masks) carry no channels
    users = [canonicalize(u, env.gm) for u in op.node.users]
    if users and all(
        u.kind in _WEIGHT_READERS and op.node.target in u.params.values() for u in users
    ):
        return env.untracked(op.node)
    if shape[-1] == 1:
        return env.untracked(op.node)
    if env.head_mode == "heads" and env.is_buffer(op.node.target):
        # A per-dim buffer shared by all heads (rotary frequencies): whole heads never remove
        # its dims, and tracking it would tie every head together.
        return env.untracked(op.node)
    atoms = env.param_dim(op.node.target, len(shape) - 1, shape[-1])
    return Layout.along(atoms, len(shape) - 1, len(shape))


@register(OpKind.OUTPUT)
def output(op: CanonicalOp, env: ChannelEnv):
    for n in nested_nodes(op.node.args):
        lay = env.layouts.get(n)
        for one in lay if isinstance(lay, list) else [lay]:
            if isinstance(one, Layout):
                env.freeze_layout(one, "reaches the model output")
    return None


@register(OpKind.GETITEM)
def getitem(op: CanonicalOp, env: ChannelEnv):
    src = op.inputs[0] if op.inputs else None
    lay = env.layouts.get(src) if src is not None else None
    idx = op.attrs.get("index")
    if isinstance(lay, list) and isinstance(idx, int) and -len(lay) <= idx < len(lay):
        return lay[idx]
    return env.untracked(op.node)


@register(OpKind.IDENTITY)
def identity(op: CanonicalOp, env: ChannelEnv):
    lay = env.layout(op.inputs[0]) if op.inputs else None
    return lay if lay is not None else env.untracked(op.node)


@register(OpKind.ELEMENTWISE)
def elementwise(op: CanonicalOp, env: ChannelEnv):
    out_shape = env.shape(op.node)
    if out_shape is None:
        return default_rule(op, env)
    tensors = [n for n in op.inputs if env.shape(n) is not None]
    if op.params.get("weight") and tensors:  # PReLU with one slope per channel
        x = tensors[0]
        lay = env.layout(x)
        shape = env.shape(x)
        w = env.param_tensor(op.params["weight"])
        if w is not None and w.numel() > 1 and len(shape) > 1:
            env.param_dim(op.params["weight"], 0, w.numel(), bind=env.dim_atoms(lay, shape, 1))
        return lay
    if len(tensors) == 1:
        lay = env.layout(tensors[0])
        zero = lay.zero and _zero_preserving(op, [lay])
        atoms = lay.atoms
        if atoms.ndim != len(out_shape):
            atoms = atoms.reshape((1,) * (len(out_shape) - atoms.ndim) + atoms.shape)
        return Layout(atoms, zero)
    lays = [env.layout(n) for n in tensors]
    atoms = env.unify([(lay, env.shape(n)) for lay, n in zip(lays, tensors)], out_shape)
    atoms = env.rectify(atoms, out_shape, how="freeze")
    return Layout(atoms, _zero_preserving(op, lays))


def _zero_preserving(op: CanonicalOp, lays: list[Layout]) -> bool:
    """Whether pruned (zero) channels stay zero through this op."""
    name = op.name
    if op.attrs.get("arity") == 1 or len(lays) == 1:
        if name in ("add", "sub", "rsub", "add_", "sub_", "iadd", "isub"):
            return lays[0].zero and not any(op.attrs.get("scalar_args") or [])
        if name in ("mul", "mul_", "imul", "div", "div_", "truediv", "itruediv"):
            return lays[0].zero
        zp = op.attrs.get("zero_preserving")
        return lays[0].zero and bool(zp)
    if name in ("add", "sub", "add_", "sub_", "iadd", "isub", "rsub"):
        return all(x.zero for x in lays) and not any(op.attrs.get("scalar_args") or [])
    if name in ("mul", "mul_", "imul"):
        return any(x.zero and x.is_tracked() for x in lays) or all(x.zero for x in lays)
    if name in ("div", "div_", "truediv", "itruediv"):
        return lays[0].zero and not lays[1].is_tracked()
    return False


@register(OpKind.POOL)
def pool(op: CanonicalOp, env: ChannelEnv):
    lay = env.layout(op.inputs[0]) if op.inputs else None
    in_shape, out_shape = env.shape(op.inputs[0]) if op.inputs else None, env.shape(op.node)
    if lay is None or out_shape is None or in_shape is None or len(in_shape) != len(out_shape):
        return default_rule(op, env)
    # Pooling and resizing act on the trailing spatial dims; channels must not live there.
    spatial = range(max(1, len(in_shape) - _spatial_ndim(op, in_shape)), len(in_shape))
    if any(lay.atoms.shape[d] > 1 for d in spatial):
        env.freeze_layout(lay, f"'{op.name}' pools over a dim that carries channels")
        return env.untracked(op.node)
    return lay


def _spatial_ndim(op: CanonicalOp, shape: tuple[int, ...]) -> int:
    return max(len(shape) - 2, 1)


@register(OpKind.PAD)
def pad(op: CanonicalOp, env: ChannelEnv):
    lay = env.layout(op.inputs[0])
    shape = env.shape(op.inputs[0])
    amounts = list(op.attrs.get("pad") or ())
    padded = [len(shape) - 1 - i // 2 for i, p in enumerate(amounts) if p]
    if any(lay.atoms.shape[d] > 1 for d in padded if 0 <= d < len(shape)):
        env.freeze_layout(lay, "padding along a channel dim")
        return env.untracked(op.node)
    value = op.node.kwargs.get("value", op.node.args[3] if len(op.node.args) > 3 else 0) or 0
    if op.node.op == "call_module" and op.module is not None:
        value = getattr(op.module, "value", 0) or 0
    mode = op.node.kwargs.get("mode", op.node.args[2] if len(op.node.args) > 2 else "constant")
    return Layout(lay.atoms, lay.zero and (value == 0 or mode != "constant"))


@register(OpKind.SOFTMAX)
def softmax(op: CanonicalOp, env: ChannelEnv):
    lay = env.layout(op.inputs[0])
    shape = env.shape(op.inputs[0])
    dim = op.attrs.get("dim")
    if dim is None or shape is None:
        return default_rule(op, env)
    dim = normalize_dim(dim, len(shape))
    if lay.atoms.shape[dim] > 1:
        env.inexact(lay.atoms, "softmax over channels")
    return Layout(lay.atoms, False)


@register(OpKind.REDUCE)
def reduce(op: CanonicalOp, env: ChannelEnv):
    src = op.inputs[0] if op.inputs else None
    lay, shape = env.layout(src), env.shape(src)
    if lay is None or shape is None:
        return default_rule(op, env)
    dims = op.attrs.get("dim")
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        dims = list(range(len(shape)))
    dims = [
        normalize_dim(d, len(shape)) for d in (dims if isinstance(dims, (list, tuple)) else [dims])
    ]
    if not all(isinstance(d, int) for d in dims):
        return default_rule(op, env)
    keepdim = bool(op.attrs.get("keepdim"))
    atoms = lay.atoms
    if any(atoms.shape[d] > 1 for d in dims):
        if not (op.name == "sum" and lay.zero):
            env.inexact(atoms, f"'{op.name}' over channels")
        atoms = np.full((1,) * atoms.ndim, NO_ATOM, dtype=np.int64)
    if not keepdim:
        atoms = np.squeeze(atoms, axis=tuple(dims)) if atoms.ndim else atoms
    out = Layout(atoms.reshape(atoms.shape) if atoms.ndim else atoms.reshape(()), lay.zero)
    if meta.output_values(op.node) is not None:  # max/min with dim: (values, indices)
        return [out, Layout.untracked(out.ndim)]
    out_shape = env.shape(op.node)
    if out_shape is not None and out.ndim != len(out_shape):
        return Layout(np.full((1,) * len(out_shape), NO_ATOM, dtype=np.int64))
    return out
