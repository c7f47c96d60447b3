"""Ops that keep channels where they are: activations, arithmetic, identity, softmax, reductions.

Pass-through (activations, dropout, identity, dtype casts), union of broadcast
operands (residual add/sub/mul/div, SE scaling, layer-scale parameters), and
reductions/softmax (which keep the channel space when they reduce other dims and
make it inexact when they reduce the channel dim).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torchvision.ops
from torch import nn

from fxprune import meta
from fxprune.channels import NO_ATOM, Layout
from fxprune.ops import Attrs, CanonicalOp, ParamRef, module_param, normalize_dim
from fxprune.passes.channel_rules.base import ChannelEnv, default_rule, op_spec

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ElementwiseAttrs(Attrs):
    """``zero_preserving``: f(0) == 0 (None: decided per operand, for binary ops)."""

    arity: int
    zero_preserving: bool | None
    scalar_args: tuple[Any, ...] = ()  # python numbers among the arguments (x + 1)
    weight: ParamRef | None = None  # PReLU's slopes


@dataclass(frozen=True)
class DimAttrs(Attrs):
    """The dim a softmax or reduction runs over (None: all dims)."""

    dim: Any
    keepdim: bool = False


# Unary element-wise ops. The flag says whether f(0) == 0: when it holds, a pruned (zeroed)
# channel stays zero through the op, which the correctness oracle relies on.
_UNARY: dict[str, bool] = {
    "relu": True,
    "rrelu": True,
    "relu_": True,
    "relu6": True,
    "gelu": True,
    "silu": True,
    "silu_": True,
    "hardswish": True,
    "hardswish_": True,
    "mish": True,
    "leaky_relu": True,
    "leaky_relu_": True,
    "elu": True,
    "selu": True,
    "celu": True,
    "tanh": True,
    "hardtanh": True,
    "hardtanh_": True,
    "prelu": True,
    "softshrink": True,
    "hardshrink": True,
    "neg": True,
    "abs": True,
    "square": True,
    "sin": True,
    "sqrt": True,
    "erf": True,
    "sign": True,
    "sigmoid": False,
    "sigmoid_": False,
    "hardsigmoid": False,
    "hardsigmoid_": False,
    "exp": False,
    "cos": False,
    "log": False,
    "reciprocal": False,
    "rsqrt": False,
    "softplus": False,
    "logsigmoid": False,
    "log_sigmoid": False,
    "pow": True,  # with a positive scalar exponent; anything else is not zero preserving
    "clamp": False,
    "clip": False,
    "clamp_min": False,
    "clamp_max": False,
}
_BINARY = (
    "add",
    "add_",
    "iadd",
    "sub",
    "sub_",
    "isub",
    "rsub",
    "mul",
    "mul_",
    "imul",
    "div",
    "div_",
    "truediv",
    "itruediv",
    "floordiv",
    "maximum",
    "minimum",
    "where",
    "addcmul",  # input + value * tensor1 * tensor2 (GRN, ResMLP's affine)
    "addcdiv",
)
_ACTIVATIONS = (
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.SiLU,
    nn.Hardswish,
    nn.Mish,
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.Tanh,
    nn.Hardtanh,
    nn.Softshrink,
    nn.Hardshrink,
)
_SATURATING = (nn.Sigmoid, nn.Hardsigmoid, nn.Softplus, nn.LogSigmoid)  # f(0) != 0


# -- views ------------------------------------------------------------------------------------


def _unary_view(op: CanonicalOp) -> CanonicalOp:
    args = op.node.args
    if op.name == "pow" and not (
        len(args) > 1 and isinstance(args[1], (int, float)) and args[1] > 0
    ):
        return op.with_(attrs=ElementwiseAttrs(len(op.inputs), False))
    return op.with_(attrs=ElementwiseAttrs(1, _UNARY.get(op.name, False)))


def _binary_view(op: CanonicalOp) -> CanonicalOp:
    values = list(op.node.args) + list(op.node.kwargs.values())
    numbers = tuple(x for x in values if isinstance(x, (int, float)) and not isinstance(x, bool))
    return op.with_(attrs=ElementwiseAttrs(len(op.inputs), None, numbers))


def _activation_view(op: CanonicalOp) -> CanonicalOp:
    zero = not isinstance(op.module, _SATURATING)
    return op.with_(name=type(op.module).__name__.lower(), attrs=ElementwiseAttrs(1, zero))


def _prelu_view(op: CanonicalOp) -> CanonicalOp:
    return op.with_(
        name="prelu", attrs=ElementwiseAttrs(1, True, weight=module_param(op, "weight"))
    )


def _prelu_rewrite(op: CanonicalOp, s) -> None:
    mod = s.gm.get_submodule(op.node.target)
    mod.num_parameters = mod.weight.numel()


def _identity_view(op: CanonicalOp) -> CanonicalOp:
    if op.module is not None:
        return op.with_(name="identity")
    return op.with_(inputs=op.inputs[:1])


def _softmax_view(op: CanonicalOp) -> CanonicalOp:
    if op.module is not None:
        return op.with_(name="softmax", attrs=DimAttrs(op.module.dim))
    return op.with_(name="softmax", inputs=op.inputs[:1], attrs=DimAttrs(op.arg(1, "dim")))


def _reduce_view(op: CanonicalOp) -> CanonicalOp:
    attrs = DimAttrs(op.arg(1, "dim"), op.arg(2, "keepdim", False))
    return op.with_(inputs=op.inputs[:1], attrs=attrs)


# -- the ops ----------------------------------------------------------------------------------


@op_spec(
    "identity",
    module_types=(
        nn.Dropout,
        nn.Dropout1d,
        nn.Dropout2d,
        nn.Dropout3d,
        nn.AlphaDropout,
        nn.Identity,
    ),
    ops=(
        "dropout",
        "dropout_",
        "alpha_dropout",
        "feature_alpha_dropout",
        "dropout1d",
        "dropout2d",
        "dropout3d",
        "native_dropout",
        "feature_dropout",
        "feature_dropout_",
        "alpha_dropout_",
        "feature_alpha_dropout_",
        "clone",
        "contiguous",
        "detach",
        "identity",
        "lift_fresh_copy",
        "alias",
        "_assert_tensor_metadata",
        # dtype casts
        "to",
        "_to_copy",
        "float",
        "half",
        "bfloat16",
        "type_as",
    ),
    # Identity in eval mode; in training it scales whole samples, never single channels.
    functions=(torchvision.ops.stochastic_depth,),
    view=_identity_view,
    # Dropout in a torch.export graph: train mode passes train=True (fxprune.graph_modes).
    mode_args={
        name: ("train",)
        for name in (
            "dropout",
            "dropout_",
            "feature_dropout",
            "feature_dropout_",
            "alpha_dropout",
            "alpha_dropout_",
            "feature_alpha_dropout",
            "feature_alpha_dropout_",
        )
    },
    same_value=("contiguous",),
)
def identity(op: CanonicalOp, env: ChannelEnv):
    lay = env.layout(op.inputs[0]) if op.inputs else None
    return lay if lay is not None else env.untracked(op.node)


@op_spec("elementwise", modules=(nn.PReLU,), view=_prelu_view, rewrite=_prelu_rewrite)
@op_spec("elementwise", module_types=_ACTIVATIONS, modules=_SATURATING, view=_activation_view)
@op_spec("elementwise", ops=_BINARY, view=_binary_view)
@op_spec("elementwise", ops=tuple(_UNARY), view=_unary_view, mode_args={"rrelu": ("training",)})
def elementwise(op: CanonicalOp, env: ChannelEnv):
    out_shape = env.shape(op.node)
    if out_shape is None:
        return default_rule(op, env)
    tensors = [n for n in op.inputs if env.shape(n) is not None]
    weight = op.attrs.weight
    if weight is not None and tensors:  # PReLU with one slope per channel
        x = tensors[0]
        lay = env.layout(x)
        shape = env.shape(x)
        w = env.param_tensor(weight.fqn)
        if w is not None and w.numel() > 1 and len(shape) > 1:
            env.param_dim(weight.fqn, 0, w.numel(), bind=env.dim_atoms(lay, shape, 1))
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
    a = op.attrs
    if a.arity == 1 or len(lays) == 1:
        if name in ("add", "sub", "rsub", "add_", "sub_", "iadd", "isub"):
            return lays[0].zero and not any(a.scalar_args)
        if name in ("mul", "mul_", "imul", "div", "div_", "truediv", "itruediv"):
            return lays[0].zero
        return lays[0].zero and bool(a.zero_preserving)
    if name in ("add", "sub", "add_", "sub_", "iadd", "isub", "rsub"):
        return all(x.zero for x in lays) and not any(a.scalar_args)
    if name in ("mul", "mul_", "imul"):
        return any(x.zero and x.is_tracked() for x in lays) or all(x.zero for x in lays)
    if name in ("div", "div_", "truediv", "itruediv"):
        return lays[0].zero and not lays[1].is_tracked()
    if name == "addcmul" and len(lays) == 3:
        return lays[0].zero and _zero_preserving(op.with_(name="mul"), lays[1:])
    if name == "addcdiv" and len(lays) == 3:
        return lays[0].zero and lays[1].zero and not lays[2].is_tracked()
    return False


@op_spec(
    "softmax",
    modules=(nn.Softmax, nn.LogSoftmax),
    ops=("softmax", "log_softmax", "_softmax", "_log_softmax", "_safe_softmax"),
    view=_softmax_view,
)
def softmax(op: CanonicalOp, env: ChannelEnv):
    lay = env.layout(op.inputs[0])
    shape = env.shape(op.inputs[0])
    dim = op.attrs.dim
    if dim is None or shape is None:
        return default_rule(op, env)
    dim = normalize_dim(dim, len(shape))
    if lay.atoms.shape[dim] > 1:
        env.inexact(lay.atoms, "softmax over channels")
    return Layout(lay.atoms, False)


@op_spec(
    "reduce",
    ops=("mean", "sum", "amax", "amin", "max", "min", "std", "var", "norm", "logsumexp", "prod"),
    view=_reduce_view,
)
def reduce(op: CanonicalOp, env: ChannelEnv):
    src = op.inputs[0] if op.inputs else None
    lay, shape = env.layout(src), env.shape(src)
    if lay is None or shape is None:
        return default_rule(op, env)
    dims = op.attrs.dim
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        dims = list(range(len(shape)))
    dims = [
        normalize_dim(d, len(shape)) for d in (dims if isinstance(dims, (list, tuple)) else [dims])
    ]
    if not all(isinstance(d, int) for d in dims):
        return default_rule(op, env)
    keepdim = bool(op.attrs.keepdim)
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
