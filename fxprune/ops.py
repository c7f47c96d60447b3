"""The canonical op view and the op-spec registry: how fxprune sees one FX node.

``canonicalize(node, gm)`` looks a node up in :data:`REGISTRY` by the identity of its
target — the module's class (walking its MRO), the function object or aten overload
packet, the ``call_method`` name — and lets the matching :class:`OpSpec` build a
:class:`CanonicalOp`: the tensor inputs, typed attributes (a small frozen dataclass per
op family, parameters as :class:`ParamRef`) and the spec itself, which carries the
op's channel rule, its post-surgery rewrite and its MACs.

This module is generic machinery only: it names no op. Every op is declared once, in
its family file under ``passes/channel_rules/``, which registers its spec here when
``fxprune.passes.channel_rules`` is imported (importing ``fxprune`` does that). The
foundation never imports the passes; :func:`canonicalize` refuses to run on an empty
registry rather than call every op unknown.

Placeholders, outputs, ``get_attr`` and calls that compute no tensor get the
foundation's own kinds (:class:`OpKind`); anything without a spec is ``unknown``, an
explicit kind whose channels the analysis freezes.
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import enum
import logging
import math
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fxprune import meta

logger = logging.getLogger(__name__)


class OpKind(str, enum.Enum):
    """The kinds the foundation gives nodes itself; every other kind is a spec's ``kind``
    (an ``OpKind`` compares equal to its plain string)."""

    PLACEHOLDER = "placeholder"
    OUTPUT = "output"
    PARAM = "param"  # get_attr of a parameter or buffer
    SCALAR = "scalar"  # produces no tensor (sizes, python arithmetic, guards)
    UNKNOWN = "unknown"


_FOUNDATION_KINDS = frozenset(
    k.value for k in (OpKind.PLACEHOLDER, OpKind.OUTPUT, OpKind.PARAM, OpKind.SCALAR)
)


@dataclass(frozen=True)
class ParamRef:
    """A parameter or buffer of the graph module, by fully qualified name."""

    fqn: str


@dataclass(frozen=True)
class Attrs:
    """Base of the typed attributes of an op family (frozen dataclasses)."""

    pass


NO_ATTRS = Attrs()


@dataclass(frozen=True)
class ValueAttrs(Attrs):
    """A ``get_attr`` of a tensor: the parameter or buffer it reads."""

    value: ParamRef


@dataclass
class CanonicalOp:
    """One node as fxprune sees it.

    ``spec`` is the op's :class:`OpSpec` (its kind, channel rule, rewrite and MACs),
    ``name`` the canonical op name (``"conv"``, ``"add"``, ``"view"``, ...), ``inputs``
    the tensor operands in order, ``attrs`` the family's typed attributes.
    """

    node: fx.Node
    spec: OpSpec
    name: str
    inputs: list[fx.Node] = field(default_factory=list)
    attrs: Attrs = NO_ATTRS
    module: nn.Module | None = None

    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def params(self) -> dict[str, str]:
        """Role -> fully qualified name of every parameter the op reads (from ``attrs``)."""
        return {
            f.name: v.fqn
            for f in dataclasses.fields(self.attrs)
            if isinstance(v := getattr(self.attrs, f.name), ParamRef)
        }

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

    def with_(self, **changes: Any) -> CanonicalOp:
        return dataclasses.replace(self, **changes)


View = Callable[[CanonicalOp], CanonicalOp]


@dataclass(frozen=True, eq=False)
class OpSpec:
    """Everything fxprune knows about one op family, declared once in its family file.

    Matching, by identity: ``modules`` (classes whose ``forward`` the module does not
    override), ``module_types`` (classes matched with ``isinstance``, any forward),
    ``ops`` (names of torch / ``torch.nn.functional`` / aten / ``operator`` / ``math``
    callables, resolved once to the objects, and the same ``Tensor`` method names),
    ``functions`` (other callables). Hooks: ``view`` fills inputs and typed attrs (and
    may hand the node to another spec), ``rule(op, env)`` relates channels,
    ``rewrite(op, surgery)`` fixes graph constants and module attributes after surgery,
    ``macs(op, gm, shape)`` counts multiply-accumulates. Train/eval (for torch.export
    graphs, which bake the mode in): ``mode_args`` {op name: the arguments by which its
    train-mode call differs from its eval-mode one}; ``same_value``: op names whose result
    always equals their input's value (a mode may add one without changing the graph).
    """

    kind: str
    modules: tuple[type, ...] = ()
    module_types: tuple[type, ...] = ()
    ops: tuple[str, ...] = ()
    functions: tuple[Any, ...] = ()
    view: View | None = None
    rule: Callable[..., Any] | None = None
    rewrite: Callable[..., None] | None = None
    macs: Callable[..., int] | None = None
    mode_args: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    same_value: tuple[str, ...] = ()
    # Module classes of optional libraries, by "module.QualName" (no import of the library),
    # traced as leaves (one call_module node) so the spec sees the whole module.
    leaf_modules: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return f"OpSpec({self.kind!r})"


# Where the names of ``OpSpec.ops`` are looked up: the namespaces of torch's callables.
_NAMESPACES: tuple[Any, ...] = (
    torch,
    F,
    torch._C._nn,
    torch._C._VariableFunctions,
    operator,
    math,
    builtins,
)


def _resolve(name: str) -> list[Any]:
    """The callables named ``name`` in torch's namespaces and the aten packet."""
    found = []
    for ns in _NAMESPACES:
        obj = getattr(ns, name, None)
        if obj is not None and callable(obj):
            found.append(obj)
    with contextlib.suppress(AttributeError, RuntimeError):
        found.append(getattr(torch.ops.aten, name))
    return found


def _class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


class OpRegistry:
    """Specs by target identity: module class, function object / aten packet, method name."""

    def __init__(self) -> None:
        self.specs: list[OpSpec] = []
        self.modules: dict[type, tuple[OpSpec, bool]] = {}  # class -> (spec, plain forward only)
        self.functions: dict[Any, OpSpec] = {}
        self.methods: dict[str, OpSpec] = {}
        self.kinds: dict[str, OpSpec] = {}
        self.mode_args: dict[Any, frozenset[str]] = {}  # function / aten packet -> names
        self.same_value: set[Any] = set()
        self.leaf_names: dict[str, OpSpec] = {}  # "module.QualName" -> spec, traced as leaves
        self.loaded_by: str | None = None

    def register(self, spec: OpSpec) -> OpSpec:
        self.specs.append(spec)
        if spec.kind in _FOUNDATION_KINDS:
            self._put(self.kinds, spec.kind, spec)
        for cls in spec.modules:
            self._put(self.modules, cls, (spec, True))
        for cls in spec.module_types:
            self._put(self.modules, cls, (spec, False))
        for name in spec.ops:
            self._put(self.methods, name, spec)
            for fn in _resolve(name):
                self._put(self.functions, fn, spec)
        for fn in spec.functions:
            self._put(self.functions, fn, spec)
        for name, args in spec.mode_args.items():
            for fn in _resolve(name):
                self.mode_args[fn] = frozenset(args)
        for name in spec.same_value:
            self.same_value.update(_resolve(name))
        for name in spec.leaf_modules:
            self._put(self.leaf_names, name, spec)
        return spec

    def is_leaf(self, mod: nn.Module) -> bool:
        """Whether a spec declares ``mod``'s class a leaf (fx must not trace into it)."""
        return _class_name(type(mod)) in self.leaf_names

    @staticmethod
    def _put(table: dict, key: Any, value: Any) -> None:
        have = table.get(key)
        if have is not None and have != value:
            raise ValueError(f"{key!r} is declared by two op specs: {have} and {value}")
        table[key] = value

    def mark_loaded(self, by: str) -> None:
        self.loaded_by = by

    def kind(self, kind: str) -> OpSpec:
        """The spec of one of the foundation's own kinds (a bare one if none is declared)."""
        spec = self.kinds.get(kind)
        if spec is None:
            spec = self.kinds[kind] = OpSpec(kind)
        return spec

    def for_module(self, mod: nn.Module) -> OpSpec | None:
        named = self.leaf_names.get(_class_name(type(mod)))
        if named is not None:
            return named
        for cls in type(mod).__mro__:
            entry = self.modules.get(cls)
            if entry is None:
                continue
            spec, plain = entry
            # A subclass with its own forward (timm's weight-standardised conv, a
            # channels-first LayerNorm) computes something else: treating it as its
            # base would be a guess.
            if not plain or type(mod).forward is cls.forward:
                return spec
        return None

    def mode_arguments(self, target: Any) -> frozenset[str]:
        """The arguments by which a call of ``target`` differs between train and eval."""
        return self.mode_args.get(_packet(target), frozenset())

    def is_same_value(self, target: Any) -> bool:
        return _packet(target) in self.same_value

    def for_function(self, target: Any) -> OpSpec | None:
        if isinstance(target, torch._ops.OpOverload):
            target = target.overloadpacket
        try:
            return self.functions.get(target)
        except TypeError:  # unhashable target
            return None


def _packet(target: Any) -> Any:
    """An aten overload's packet (specs name packets); any other target as it is."""
    target = target.overloadpacket if isinstance(target, torch._ops.OpOverload) else target
    try:
        hash(target)
    except TypeError:
        return None
    return target


REGISTRY = OpRegistry()
UNKNOWN = OpSpec(OpKind.UNKNOWN.value)


# ---------------------------------------------------------------------------------------------
# Canonical names of callables: aten overload packets, torch / F / operator / math functions.
# ---------------------------------------------------------------------------------------------

_TRUSTED_MODULES = ("torch", "operator", "_operator", "math", "builtins")


def callable_name(target: Any) -> str | None:
    """Canonical name of a call_function target, or None for user-defined functions."""
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


def _target_label(target: Any) -> str:
    return getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or str(target)


# ---------------------------------------------------------------------------------------------
# canonicalize
# ---------------------------------------------------------------------------------------------


def canonicalize(node: fx.Node, gm: fx.GraphModule, *, cache: bool = True) -> CanonicalOp:
    """Classify ``node`` of ``gm`` into a :class:`CanonicalOp` (cached in ``node.meta``
    unless ``cache=False``: for a look at a graph that is about to be rewritten)."""
    cached = meta.get(node, meta.OP)
    # A deep-copied graph shares node.meta shallowly: an op made for another node (and its
    # module) is not this one's.
    if cached is not None and cached.node is node:
        return cached
    if REGISTRY.loaded_by is None:
        raise RuntimeError(
            "no op specs are registered: import fxprune (or fxprune.passes.channel_rules) "
            "before canonicalizing a graph."
        )
    op = _classify(node, gm)
    if cache:
        meta.put(node, meta.OP, op)
    return op


def tensor_inputs(node: fx.Node) -> list[fx.Node]:
    return [
        a
        for a in node.all_input_nodes
        if meta.is_tensor_node(a) or meta.tensor_value(a) is not None
    ]


def _classify(node: fx.Node, gm: fx.GraphModule) -> CanonicalOp:
    if node.op == "placeholder":
        return CanonicalOp(node, REGISTRY.kind(OpKind.PLACEHOLDER.value), "input")
    if node.op == "output":
        return CanonicalOp(
            node, REGISTRY.kind(OpKind.OUTPUT.value), "output", list(node.all_input_nodes)
        )
    if node.op == "get_attr":
        return _classify_get_attr(node, gm)
    if node.op == "call_module":
        return _classify_module(node, gm)
    if node.op == "call_method":
        return _classify_call(node, node.target, REGISTRY.methods.get(node.target))
    if node.op == "call_function":
        spec = REGISTRY.for_function(node.target)
        name = callable_name(node.target)
        if name is None and spec is None:
            return CanonicalOp(node, UNKNOWN, _target_label(node.target), tensor_inputs(node))
        return _classify_call(node, name or _target_label(node.target), spec)
    return CanonicalOp(node, UNKNOWN, str(node.op), tensor_inputs(node))


def _classify_get_attr(node: fx.Node, gm: fx.GraphModule) -> CanonicalOp:
    try:
        value = fetch_attr(gm, node.target)
    except AttributeError:
        value = None
    if isinstance(value, torch.Tensor):
        return CanonicalOp(
            node,
            REGISTRY.kind(OpKind.PARAM.value),
            "param",
            attrs=ValueAttrs(ParamRef(node.target)),
        )
    return CanonicalOp(node, REGISTRY.kind(OpKind.SCALAR.value), "attr")


def fetch_attr(gm: nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _classify_module(node: fx.Node, gm: fx.GraphModule) -> CanonicalOp:
    mod = fetch_attr(gm, node.target)
    ins = tensor_inputs(node)
    label = f"module {type(mod).__name__}"
    if meta.tensor_value(node) is None and not node.users:
        # torch.export's input guards (_guards_fn) and other calls made for effect only.
        return CanonicalOp(node, REGISTRY.kind(OpKind.SCALAR.value), label, ins, module=mod)
    spec = REGISTRY.for_module(mod)
    op = CanonicalOp(node, spec or UNKNOWN, label, ins, module=mod)
    return spec.view(op) if spec is not None and spec.view is not None else op


_NUMBERS = (int, float, bool, torch.SymInt, torch.SymFloat, torch.SymBool)


def _classify_call(node: fx.Node, name: str, spec: OpSpec | None) -> CanonicalOp:
    ins = tensor_inputs(node)
    value = meta.tensor_value(node)
    if (
        not meta.is_tensor_node(node)
        and meta.output_values(node) is None
        and (
            (spec is not None and spec.kind == OpKind.SCALAR)
            or value is None
            or isinstance(value, _NUMBERS)
            or not ins
        )
    ):
        return CanonicalOp(node, REGISTRY.kind(OpKind.SCALAR.value), name, ins)
    op = CanonicalOp(node, spec or UNKNOWN, name, ins)
    return spec.view(op) if spec is not None and spec.view is not None else op


# ---------------------------------------------------------------------------------------------
# Helpers for views and rules
# ---------------------------------------------------------------------------------------------


def param_arg(op: CanonicalOp, index: int, key: str) -> ParamRef | fx.Node | None:
    """Argument ``index``/``key`` as a parameter (``get_attr``), a computed tensor, or None."""
    v = op.arg(index, key)
    if isinstance(v, fx.Node):
        return ParamRef(v.target) if v.op == "get_attr" else v
    return None


def module_param(op: CanonicalOp, attr: str) -> ParamRef | None:
    """The module's parameter or buffer ``attr`` (dotted), if it has one."""
    obj: Any = op.module
    for part in attr.split("."):
        obj = getattr(obj, part, None)
    return ParamRef(f"{op.node.target}.{attr}") if obj is not None else None


def param_shape(gm: nn.Module, ref: Any) -> tuple[int, ...] | None:
    """Shape of the parameter ``ref`` names (None for anything else)."""
    if not isinstance(ref, ParamRef):
        return None
    try:
        return tuple(fetch_attr(gm, ref.fqn).shape)
    except AttributeError:
        return None


def normalize_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def prod(xs: Any) -> int:
    return math.prod(int(x) for x in xs)


__all__ = [
    "NO_ATTRS",
    "REGISTRY",
    "Attrs",
    "CanonicalOp",
    "OpKind",
    "OpSpec",
    "ParamRef",
    "callable_name",
    "canonicalize",
    "fetch_attr",
    "module_param",
    "normalize_dim",
    "param_arg",
    "param_shape",
    "prod",
    "tensor_inputs",
]
