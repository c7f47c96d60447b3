"""The canonical op view: every node of either frontend seen as one op kind.

``canonicalize(node, gm)`` classifies an FX node (``call_module``, ``call_function``
on torch / ``torch.nn.functional`` / ``operator`` / aten ops, ``call_method``,
``get_attr``, placeholders, outputs) into an :class:`OpKind` with uniform
accessors: the tensor inputs, the parameters it reads by fully qualified name, and
normalised attributes (groups, dims, sizes, normalised dims, head counts). Channel
rules are written once against this view and serve both frontends.

Nodes are matched by the identity of their target (module type, function object,
aten overload packet), never by substrings of names. Anything not in the tables is
``OpKind.UNKNOWN`` — an explicit kind whose channels the analysis freezes.
"""

from __future__ import annotations

import enum
import logging
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fxprune import meta

logger = logging.getLogger(__name__)


class OpKind(str, enum.Enum):
    PLACEHOLDER = "placeholder"
    OUTPUT = "output"
    PARAM = "param"  # get_attr of a parameter or buffer
    SCALAR = "scalar"  # produces no tensor (sizes, python arithmetic, guards)
    CONV = "conv"
    CONV_TRANSPOSE = "conv_transpose"
    LINEAR = "linear"
    NORM = "norm"
    ELEMENTWISE = "elementwise"
    IDENTITY = "identity"
    POOL = "pool"
    PAD = "pad"
    CAT = "cat"
    SPLIT = "split"
    GETITEM = "getitem"
    SLICE = "slice"
    SELECT = "select"
    RESHAPE = "reshape"
    PERMUTE = "permute"
    EXPAND = "expand"
    MATMUL = "matmul"
    SDPA = "sdpa"
    MHA = "mha"
    SOFTMAX = "softmax"
    REDUCE = "reduce"
    EMBEDDING = "embedding"
    PIXEL_SHUFFLE = "pixel_shuffle"
    UNKNOWN = "unknown"


@dataclass
class CanonicalOp:
    """One node as fxprune sees it.

    ``name`` is the canonical op name (``"conv"``, ``"add"``, ``"view"``, ...),
    ``inputs`` the tensor operands in order, ``params`` maps a role (``weight``,
    ``bias``, ``in_proj_weight``...) to a parameter's fully qualified name, and
    ``attrs`` holds normalised attributes.
    """

    node: fx.Node
    kind: OpKind
    name: str
    inputs: list[fx.Node] = field(default_factory=list)
    params: dict[str, str] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)
    module: nn.Module | None = None

    @property
    def target_str(self) -> str:
        t = self.node.target
        if isinstance(t, str):
            return t
        return getattr(t, "__name__", str(t))

    def arg(self, index: int, name: str, default: Any = None) -> Any:
        """Positional-or-keyword argument of the node."""
        if index < len(self.node.args):
            return self.node.args[index]
        return self.node.kwargs.get(name, default)


# ---------------------------------------------------------------------------------------------
# Canonical names of callables: aten overload packets, torch / F / operator / math functions.
# ---------------------------------------------------------------------------------------------

_TRUSTED_MODULES = ("torch", "operator", "_operator", "math", "builtins")


def _known_library_functions() -> dict[Any, str]:
    """Functions of other libraries that fxprune has a rule for, by identity."""
    known: dict[Any, str] = {}
    try:
        import torchvision.ops

        # Identity in eval mode; in training it scales whole samples, never single channels.
        known[torchvision.ops.stochastic_depth] = "identity"
    except ImportError:  # pragma: no cover - torchvision is a dependency
        pass
    return known


_LIBRARY_FUNCTIONS: dict[Any, str] | None = None


def callable_name(target: Any) -> str | None:
    """Canonical name of a call_function target, or None for user-defined functions."""
    global _LIBRARY_FUNCTIONS
    if _LIBRARY_FUNCTIONS is None:
        _LIBRARY_FUNCTIONS = _known_library_functions()
    try:
        if target in _LIBRARY_FUNCTIONS:
            return _LIBRARY_FUNCTIONS[target]
    except TypeError:  # unhashable target
        pass
    if isinstance(target, torch._ops.OpOverload):
        return target.overloadpacket.__name__
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target.__name__
    mod = getattr(target, "__module__", None) or ""
    name = getattr(target, "__name__", None)
    if name is None:
        return None
    if mod.split(".")[0] in _TRUSTED_MODULES or mod in (
        "torch._C._nn",
        "torch._C._VariableFunctions",
    ):
        return name
    if target in (getattr, len):
        return name
    return None


# Unary element-wise ops. The flag says whether f(0) == 0: when it holds, a pruned (zeroed)
# channel stays zero through the op, which the correctness oracle relies on.
_UNARY: dict[str, bool] = {
    "relu": True,
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
    "pow": True,
    "clamp": False,
    "clip": False,
    "clamp_min": False,
    "clamp_max": False,
    "float": True,
    "half": True,
    "bfloat16": True,
    "to": True,
    "type_as": True,
    "_to_copy": True,
}
_BINARY = {
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
}
_IDENTITY = {
    "dropout",
    "dropout_",
    "alpha_dropout",
    "feature_alpha_dropout",
    "dropout1d",
    "dropout2d",
    "dropout3d",
    "clone",
    "contiguous",
    "detach",
    "identity",
    "lift_fresh_copy",
    "alias",
    "_assert_tensor_metadata",
    "native_dropout",
}
_POOL = {
    "max_pool1d",
    "max_pool2d",
    "max_pool3d",
    "avg_pool1d",
    "avg_pool2d",
    "avg_pool3d",
    "adaptive_avg_pool1d",
    "adaptive_avg_pool2d",
    "adaptive_avg_pool3d",
    "adaptive_max_pool1d",
    "adaptive_max_pool2d",
    "adaptive_max_pool3d",
    "interpolate",
    "upsample",
    "upsample_nearest2d",
    "upsample_bilinear2d",
    "upsample_bicubic2d",
    "_upsample_bilinear2d_aa",
    "max_pool2d_with_indices",
    "lp_pool2d",
}
_RESHAPE = {
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
}
_PERMUTE = {
    "permute",
    "transpose",
    "transpose_",
    "movedim",
    "moveaxis",
    "t",
    "swapaxes",
    "swapdims",
}
_EXPAND = {"expand", "expand_as", "repeat", "repeat_interleave", "tile"}
_SPLIT = {"split", "chunk", "unbind", "split_with_sizes", "tensor_split", "unsafe_split"}
_REDUCE = {"mean", "sum", "amax", "amin", "max", "min", "std", "var", "norm", "logsumexp", "prod"}
_SCALAR_FUNCS = {
    "size",
    "dim",
    "numel",
    "getattr",
    "len",
    "sym_size",
    "floordiv",
    "sqrt",
    "_guards_fn",
    "_assert_scalar",
    "sym_constrain_range_for_size",
    "scalar_tensor",
}


def canonicalize(node: fx.Node, gm: fx.GraphModule) -> CanonicalOp:
    """Classify ``node`` of ``gm`` into a :class:`CanonicalOp` (cached in ``node.meta``)."""
    cached = meta.get(node, meta.OP)
    # A deep-copied graph shares node.meta shallowly: an op made for another node (and its
    # module) is not this one's.
    if cached is not None and cached.node is node:
        return cached
    op = _classify(node, gm)
    meta.put(node, meta.OP, op)
    return op


def _tensor_inputs(node: fx.Node) -> list[fx.Node]:
    return [
        a
        for a in node.all_input_nodes
        if meta.is_tensor_node(a) or meta.tensor_value(a) is not None
    ]


def _classify(node: fx.Node, gm: fx.GraphModule) -> CanonicalOp:
    if node.op == "placeholder":
        return CanonicalOp(node, OpKind.PLACEHOLDER, "input")
    if node.op == "output":
        return CanonicalOp(node, OpKind.OUTPUT, "output", list(node.all_input_nodes))
    if node.op == "get_attr":
        return _classify_get_attr(node, gm)
    if node.op == "call_module":
        return _classify_module(node, gm)
    if node.op == "call_method":
        return _classify_call(node, node.target, is_method=True)
    if node.op == "call_function":
        name = callable_name(node.target)
        if name is None:
            return CanonicalOp(
                node, OpKind.UNKNOWN, _target_label(node.target), _tensor_inputs(node)
            )
        return _classify_call(node, name, is_method=False)
    return CanonicalOp(node, OpKind.UNKNOWN, str(node.op), _tensor_inputs(node))


def _target_label(target: Any) -> str:
    return getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or str(target)


def _classify_get_attr(node: fx.Node, gm: fx.GraphModule) -> CanonicalOp:
    try:
        value = _fetch_attr(gm, node.target)
    except AttributeError:
        value = None
    if isinstance(value, torch.Tensor):
        return CanonicalOp(node, OpKind.PARAM, "param", params={"value": node.target})
    return CanonicalOp(node, OpKind.SCALAR, "attr")


def _fetch_attr(gm: nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _plain(mod: nn.Module, classes: type | tuple[type, ...]) -> bool:
    """``mod`` is one of ``classes`` and does not override its forward.

    A subclass with its own forward (timm's weight-standardised conv, a channels-first
    LayerNorm) computes something else: treating it as its base would be a guess.
    """
    classes = classes if isinstance(classes, tuple) else (classes,)
    return any(isinstance(mod, c) and type(mod).forward is c.forward for c in classes)


def _classify_module(node: fx.Node, gm: fx.GraphModule) -> CanonicalOp:
    mod = _fetch_attr(gm, node.target)
    ins = _tensor_inputs(node)
    prefix = node.target
    if meta.tensor_value(node) is None and not node.users:
        # torch.export's input guards (_guards_fn) and other calls made for effect only.
        return CanonicalOp(node, OpKind.SCALAR, f"module {type(mod).__name__}", ins, module=mod)

    def params(*roles: str) -> dict[str, str]:
        return {r: f"{prefix}.{r}" for r in roles if getattr(mod, r, None) is not None}

    if _plain(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return CanonicalOp(
            node,
            OpKind.CONV,
            "conv",
            ins,
            params("weight", "bias"),
            {"groups": mod.groups, "channel_dim": 1},
            mod,
        )
    if _plain(mod, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        return CanonicalOp(
            node,
            OpKind.CONV_TRANSPOSE,
            "conv_transpose",
            ins,
            params("weight", "bias"),
            {"groups": mod.groups, "channel_dim": 1},
            mod,
        )
    if _plain(mod, nn.Linear):
        return CanonicalOp(node, OpKind.LINEAR, "linear", ins, params("weight", "bias"), {}, mod)
    if _plain(mod, nn.modules.batchnorm._BatchNorm):
        return CanonicalOp(
            node,
            OpKind.NORM,
            "batch_norm",
            ins,
            params("weight", "bias", "running_mean", "running_var"),
            {"norm": "batch", "channel_dim": 1},
            mod,
        )
    if _plain(mod, nn.modules.instancenorm._InstanceNorm):
        return CanonicalOp(
            node,
            OpKind.NORM,
            "instance_norm",
            ins,
            params("weight", "bias", "running_mean", "running_var"),
            {"norm": "instance", "channel_dim": 1},
            mod,
        )
    if _plain(mod, nn.LayerNorm):
        return CanonicalOp(
            node,
            OpKind.NORM,
            "layer_norm",
            ins,
            params("weight", "bias"),
            {"norm": "layer", "normalized_ndim": len(mod.normalized_shape)},
            mod,
        )
    if _plain(mod, nn.GroupNorm):
        return CanonicalOp(
            node,
            OpKind.NORM,
            "group_norm",
            ins,
            params("weight", "bias"),
            {"norm": "group", "num_groups": mod.num_groups, "channel_dim": 1},
            mod,
        )
    if hasattr(nn, "RMSNorm") and _plain(mod, nn.RMSNorm):
        shape = mod.normalized_shape
        return CanonicalOp(
            node,
            OpKind.NORM,
            "rms_norm",
            ins,
            params("weight"),
            {"norm": "rms", "normalized_ndim": len(shape)},
            mod,
        )
    if _plain(mod, nn.Embedding):
        return CanonicalOp(node, OpKind.EMBEDDING, "embedding", ins, params("weight"), {}, mod)
    from fxprune.modules import PrunedMultiheadAttention

    if _plain(mod, (nn.MultiheadAttention, PrunedMultiheadAttention)):
        roles = (
            "in_proj_weight",
            "in_proj_bias",
            "q_proj_weight",
            "k_proj_weight",
            "v_proj_weight",
            "bias_k",
            "bias_v",
        )
        p = params(*roles)
        p["out_proj.weight"] = f"{prefix}.out_proj.weight"
        if mod.out_proj.bias is not None:
            p["out_proj.bias"] = f"{prefix}.out_proj.bias"
        return CanonicalOp(
            node,
            OpKind.MHA,
            "multihead_attention",
            ins,
            p,
            {
                "num_heads": mod.num_heads,
                "embed_dim": mod.embed_dim,
                "head_dim": getattr(mod, "head_dim", mod.embed_dim // mod.num_heads),
                "v_head_dim": getattr(mod, "v_head_dim", mod.embed_dim // mod.num_heads),
                "batch_first": mod.batch_first,
            },
            mod,
        )
    if _plain(mod, nn.PReLU):
        kind = OpKind.ELEMENTWISE
        return CanonicalOp(
            node,
            kind,
            "prelu",
            ins,
            params("weight"),
            {"arity": 1, "zero_preserving": True, "channel_dim": 1},
            mod,
        )
    if isinstance(
        mod, (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity)
    ):
        return CanonicalOp(node, OpKind.IDENTITY, "identity", ins, {}, {}, mod)
    if isinstance(
        mod,
        (
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
        ),
    ):
        return CanonicalOp(
            node,
            OpKind.ELEMENTWISE,
            type(mod).__name__.lower(),
            ins,
            {},
            {"arity": 1, "zero_preserving": True},
            mod,
        )
    if _plain(mod, (nn.Sigmoid, nn.Hardsigmoid, nn.Softplus, nn.LogSigmoid)):
        return CanonicalOp(
            node,
            OpKind.ELEMENTWISE,
            type(mod).__name__.lower(),
            ins,
            {},
            {"arity": 1, "zero_preserving": False},
            mod,
        )
    if isinstance(
        mod,
        (
            nn.MaxPool1d,
            nn.MaxPool2d,
            nn.MaxPool3d,
            nn.AvgPool1d,
            nn.AvgPool2d,
            nn.AvgPool3d,
            nn.AdaptiveAvgPool1d,
            nn.AdaptiveAvgPool2d,
            nn.AdaptiveAvgPool3d,
            nn.AdaptiveMaxPool1d,
            nn.AdaptiveMaxPool2d,
            nn.AdaptiveMaxPool3d,
            nn.Upsample,
            nn.UpsamplingNearest2d,
            nn.UpsamplingBilinear2d,
            nn.LPPool2d,
        ),
    ):
        return CanonicalOp(node, OpKind.POOL, "pool", ins, {}, {"channel_dim": 1}, mod)
    if isinstance(
        mod,
        (
            nn.ZeroPad2d,
            nn.ConstantPad1d,
            nn.ConstantPad2d,
            nn.ConstantPad3d,
            nn.ReflectionPad1d,
            nn.ReflectionPad2d,
            nn.ReplicationPad1d,
            nn.ReplicationPad2d,
        ),
    ):
        return CanonicalOp(node, OpKind.PAD, "pad", ins, {}, {"pad": tuple(mod.padding)}, mod)
    if _plain(mod, nn.Flatten):
        return CanonicalOp(node, OpKind.RESHAPE, "flatten", ins, {}, {}, mod)
    if _plain(mod, nn.Unflatten):
        return CanonicalOp(node, OpKind.RESHAPE, "unflatten", ins, {}, {}, mod)
    if _plain(mod, (nn.Softmax, nn.LogSoftmax)):
        return CanonicalOp(node, OpKind.SOFTMAX, "softmax", ins, {}, {"dim": mod.dim}, mod)
    if _plain(mod, (nn.PixelShuffle, nn.PixelUnshuffle)):
        up = _plain(mod, nn.PixelShuffle)
        factor = mod.upscale_factor if up else mod.downscale_factor
        return CanonicalOp(
            node,
            OpKind.PIXEL_SHUFFLE,
            "pixel_shuffle" if up else "pixel_unshuffle",
            ins,
            {},
            {"factor": factor, "up": up},
            mod,
        )
    if _plain(mod, nn.ChannelShuffle):
        return CanonicalOp(node, OpKind.UNKNOWN, "ChannelShuffle module", ins, {}, {}, mod)
    return CanonicalOp(node, OpKind.UNKNOWN, f"module {type(mod).__name__}", ins, {}, {}, mod)


def _is_param_node(n: Any) -> bool:
    return isinstance(n, fx.Node) and n.op == "get_attr"


def _classify_call(node: fx.Node, name: str, is_method: bool) -> CanonicalOp:
    ins = _tensor_inputs(node)
    args = node.args
    kw = node.kwargs

    def a(i: int, key: str, default: Any = None) -> Any:
        return args[i] if i < len(args) else kw.get(key, default)

    if (
        not meta.is_tensor_node(node)
        and meta.output_values(node) is None
        and (name in _SCALAR_FUNCS or meta.tensor_value(node) is None or not ins)
    ):
        return CanonicalOp(node, OpKind.SCALAR, name, ins)
    if name in ("conv1d", "conv2d", "conv3d", "convolution", "_convolution"):
        if name in ("convolution", "_convolution") and a(6, "transposed", False):
            return CanonicalOp(
                node,
                OpKind.CONV_TRANSPOSE,
                "conv_transpose",
                [args[0]],
                _fn_params(node, 1, 2),
                {"groups": a(8, "groups", 1), "channel_dim": 1},
            )
        groups = a(8 if name in ("convolution", "_convolution") else 6, "groups", 1)
        return CanonicalOp(
            node,
            OpKind.CONV,
            "conv",
            [args[0]],
            _fn_params(node, 1, 2),
            {"groups": groups, "channel_dim": 1},
        )
    if name in ("conv_transpose1d", "conv_transpose2d", "conv_transpose3d"):
        return CanonicalOp(
            node,
            OpKind.CONV_TRANSPOSE,
            "conv_transpose",
            [args[0]],
            _fn_params(node, 1, 2),
            {"groups": a(6, "groups", 1), "channel_dim": 1},
        )
    if name in ("linear", "addmm"):
        if name == "addmm":  # addmm(bias, x, w.t()) is not produced by our frontends; be safe
            return CanonicalOp(node, OpKind.UNKNOWN, name, ins)
        return CanonicalOp(node, OpKind.LINEAR, "linear", [args[0]], _fn_params(node, 1, 2))
    if name in (
        "batch_norm",
        "_native_batch_norm_legit_no_training",
        "_native_batch_norm_legit",
        "native_batch_norm",
        "cudnn_batch_norm",
    ):
        return CanonicalOp(
            node,
            OpKind.NORM,
            "batch_norm",
            [args[0]],
            _norm_params(node),
            {"norm": "batch", "channel_dim": 1},
        )
    if name in ("instance_norm",):
        return CanonicalOp(
            node,
            OpKind.NORM,
            "instance_norm",
            [args[0]],
            _norm_params(node),
            {"norm": "instance", "channel_dim": 1},
        )
    if name in ("layer_norm", "native_layer_norm"):
        shape = a(1, "normalized_shape")
        return CanonicalOp(
            node,
            OpKind.NORM,
            "layer_norm",
            [args[0]],
            _fn_params(node, 2, 3),
            {"norm": "layer", "normalized_ndim": len(shape)},
        )
    if name in ("rms_norm", "_fused_rms_norm"):
        shape = a(1, "normalized_shape")
        return CanonicalOp(
            node,
            OpKind.NORM,
            "rms_norm",
            [args[0]],
            _fn_params(node, 2, None),
            {"norm": "rms", "normalized_ndim": len(shape)},
        )
    if name in ("group_norm", "native_group_norm"):
        return CanonicalOp(
            node,
            OpKind.NORM,
            "group_norm",
            [args[0]],
            _fn_params(node, 2, 3),
            {"norm": "group", "num_groups": a(1, "num_groups"), "channel_dim": 1},
        )
    if name == "embedding":
        # F.embedding(input, weight) vs aten.embedding(weight, indices)
        w_idx = 0 if isinstance(node.target, torch._ops.OpOverload) else 1
        w = args[w_idx]
        idx = args[1 - w_idx]
        p = {"weight": w.target} if _is_param_node(w) else {}
        return CanonicalOp(node, OpKind.EMBEDDING, "embedding", [idx], p, {"weight_node": w})
    if name in _UNARY:
        if name in ("to", "_to_copy", "float", "half", "bfloat16", "type_as"):
            return CanonicalOp(node, OpKind.IDENTITY, name, ins[:1])
        if name == "pow" and not (
            len(args) > 1 and isinstance(args[1], (int, float)) and args[1] > 0
        ):
            return CanonicalOp(
                node,
                OpKind.ELEMENTWISE,
                name,
                ins,
                attrs={"arity": len(ins), "zero_preserving": False},
            )
        return CanonicalOp(
            node, OpKind.ELEMENTWISE, name, ins, attrs={"arity": 1, "zero_preserving": _UNARY[name]}
        )
    if name in _BINARY:
        return CanonicalOp(
            node,
            OpKind.ELEMENTWISE,
            name,
            ins,
            attrs={
                "arity": len(ins),
                "zero_preserving": None,
                "scalar_args": [
                    x
                    for x in list(args) + list(kw.values())
                    if isinstance(x, (int, float)) and not isinstance(x, bool)
                ],
            },
        )
    if name in _IDENTITY:
        return CanonicalOp(node, OpKind.IDENTITY, name, ins[:1])
    if name in _POOL:
        return CanonicalOp(node, OpKind.POOL, name, ins[:1], attrs={"channel_dim": 1})
    if name in ("pad", "constant_pad_nd", "reflection_pad2d", "replication_pad2d"):
        return CanonicalOp(node, OpKind.PAD, "pad", ins[:1], attrs={"pad": tuple(a(1, "pad"))})
    if name == "cat" or name == "concat" or name == "concatenate":
        tensors = a(0, "tensors")
        return CanonicalOp(node, OpKind.CAT, "cat", list(tensors), attrs={"dim": a(1, "dim", 0)})
    if name == "stack":
        return CanonicalOp(node, OpKind.UNKNOWN, "stack", ins)
    if name in _SPLIT:
        return _split_op(node, name, ins, a)
    if name == "getitem":
        src = args[0]
        if isinstance(src, fx.Node) and meta.is_tensor_node(src):
            return CanonicalOp(node, OpKind.SLICE, "getitem", [src], attrs={"index": args[1]})
        return CanonicalOp(
            node,
            OpKind.GETITEM,
            "getitem",
            [src] if isinstance(src, fx.Node) else [],
            attrs={"index": args[1]},
        )
    if name in ("narrow", "slice"):
        if name == "narrow":
            dim, start, length = a(1, "dim"), a(2, "start"), a(3, "length")
            return CanonicalOp(
                node,
                OpKind.SLICE,
                "narrow",
                ins[:1],
                attrs={"dim": dim, "start": start, "end": start + length, "step": 1},
            )
        return CanonicalOp(
            node,
            OpKind.SLICE,
            "slice",
            ins[:1],
            attrs={
                "dim": a(1, "dim", 0),
                "start": a(2, "start"),
                "end": a(3, "end"),
                "step": a(4, "step", 1),
            },
        )
    if name == "select":
        return CanonicalOp(
            node,
            OpKind.SELECT,
            "select",
            ins[:1],
            attrs={"dim": a(1, "dim"), "index": a(2, "index")},
        )
    if name in _RESHAPE:
        return CanonicalOp(node, OpKind.RESHAPE, name, ins[:1])
    if name in _PERMUTE:
        return CanonicalOp(node, OpKind.PERMUTE, name, ins[:1])
    if name in _EXPAND:
        return CanonicalOp(node, OpKind.EXPAND, name, ins[:1])
    if name in ("matmul", "bmm", "mm", "__matmul__"):
        return CanonicalOp(node, OpKind.MATMUL, "matmul", [args[0], args[1]])
    if name == "einsum":
        return CanonicalOp(node, OpKind.MATMUL, "einsum", ins, attrs={"equation": args[0]})
    if name in ("scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu"):
        scale = kw.get("scale", None)
        return CanonicalOp(
            node,
            OpKind.SDPA,
            "sdpa",
            [args[0], args[1], args[2]],
            attrs={
                "mask": a(3, "attn_mask"),
                "scale": scale,
                "enable_gqa": kw.get("enable_gqa", False),
            },
        )
    if name in ("softmax", "log_softmax", "_softmax", "_log_softmax", "_safe_softmax"):
        return CanonicalOp(node, OpKind.SOFTMAX, "softmax", ins[:1], attrs={"dim": a(1, "dim")})
    if name in _REDUCE:
        dim = a(1, "dim")
        return CanonicalOp(
            node,
            OpKind.REDUCE,
            name,
            ins[:1],
            attrs={
                "dim": dim,
                "keepdim": a(2, "keepdim", False),
                "normalizing": name in ("mean", "std", "var", "norm", "logsumexp"),
            },
        )
    if name in ("pixel_shuffle", "pixel_unshuffle"):
        return CanonicalOp(
            node,
            OpKind.PIXEL_SHUFFLE,
            name,
            ins[:1],
            attrs={
                "factor": a(1, "upscale_factor" if name == "pixel_shuffle" else "downscale_factor"),
                "up": name == "pixel_shuffle",
            },
        )
    if name in _SCALAR_FUNCS:
        return CanonicalOp(node, OpKind.SCALAR, name, ins)
    return CanonicalOp(node, OpKind.UNKNOWN, name, ins)


def _split_op(node: fx.Node, name: str, ins: list[fx.Node], a: Callable) -> CanonicalOp:
    if name == "unbind":
        return CanonicalOp(
            node, OpKind.SPLIT, name, ins[:1], attrs={"dim": a(1, "dim", 0), "unbind": True}
        )
    if name == "chunk":
        return CanonicalOp(
            node,
            OpKind.SPLIT,
            name,
            ins[:1],
            attrs={"dim": a(2, "dim", 0), "chunks": a(1, "chunks")},
        )
    if name == "tensor_split":
        return CanonicalOp(node, OpKind.UNKNOWN, name, ins)
    size = a(1, "split_size_or_sections", a(1, "split_size", a(1, "split_sizes")))
    return CanonicalOp(
        node, OpKind.SPLIT, name, ins[:1], attrs={"dim": a(2, "dim", 0), "size": size}
    )


def _norm_params(node: fx.Node) -> dict[str, str]:
    """Parameters of batch/instance norm calls, whose argument order depends on the API."""
    if node.target in (F.batch_norm, F.instance_norm):
        # F.batch_norm(input, running_mean, running_var, weight, bias, ...)
        p = _fn_params(node, 1, 2, roles=("running_mean", "running_var"))
        p.update(_fn_params(node, 3, 4))
        return p
    # aten / torch.batch_norm(input, weight, bias, running_mean, running_var, ...)
    p = _fn_params(node, 1, 2)
    p.update(_fn_params(node, 3, 4, roles=("running_mean", "running_var")))
    return p


def _fn_params(
    node: fx.Node, w: int | None, b: int | None, roles: tuple[str, str] = ("weight", "bias")
) -> dict[str, str]:
    out = {}
    for role, idx in zip(roles, (w, b)):
        if idx is None:
            continue
        v = node.args[idx] if idx < len(node.args) else node.kwargs.get(role)
        if _is_param_node(v):
            out[role] = v.target
        elif isinstance(v, fx.Node):
            out[role] = f"<tensor {v.name}>"
    return out


def normalize_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def prod(xs: Any) -> int:
    return math.prod(int(x) for x in xs)


__all__ = ["CanonicalOp", "OpKind", "callable_name", "canonicalize", "normalize_dim", "prod"]
_ = (F, operator)
