"""Train/eval switching for graphs made by ``torch.export`` (the export frontend).

torch.export writes the model's mode into the graph as arguments: ``aten.dropout(x, p,
train)``, ``aten.batch_norm(..., training, momentum, eps, ...)`` (and, in train mode only,
``num_batches_tracked.add_(1)`` before it), ``scaled_dot_product_attention(...,
dropout_p)`` with ``dropout_p=0`` when traced in eval mode. ``ep.module()`` therefore
refuses ``train()`` and ``eval()``, and a pruned transformers model could not be fine-tuned.

The export frontend exports the model once more in the other mode and pairs the two graphs
node by node (:func:`record_modes`). Where they differ only in the mode arguments of the ops
in an op spec's ``mode_args``, every such node keeps its arguments for both modes in
``node.meta[MODE_ARGS]`` and the train-only counter increments are listed in
``gm.meta[COUNTERS]``; :class:`ExportedModule` switches by rewriting those arguments in
place (no re-export; a recompile only when an argument changes). These are scalars, so they
survive channel surgery unchanged. Where the two graphs differ in any other way (stochastic
depth draws random numbers only in training, a model branches on ``self.training``), no
argument can express the difference: switching to that mode raises, naming the first op
that differs, rather than train a graph that is not the model.

Invariants: a graph's mode arguments are always one mode's record; ops are matched by
identity (``OpOverload``), never by name.
"""

from __future__ import annotations

import contextlib
import logging
import operator
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.export._unlift import _StatefulGraphModule

from fxprune.errors import TraceError
from fxprune.ops import REGISTRY

logger = logging.getLogger(__name__)

MODE_ARGS = "fxprune.mode_args"  # node.meta: {training (bool): {argument name: value}}
COUNTER = "fxprune.train_counter"  # node.meta: True on a train-only ``buffer.add_(1)`` node
COUNTERS = "fxprune.train_counters"  # gm.meta: {training: [buffer targets incremented]}
UNSWITCHABLE = "fxprune.unswitchable"  # gm.meta: {training: why the graph cannot take it}

aten = torch.ops.aten

# The arguments by which an op's train-mode call differs from its eval-mode call, and the
# ops whose result is their input's value, are declared with each op's spec
# (``OpSpec.mode_args``, ``OpSpec.same_value`` in passes/channel_rules/).
mode_arguments = REGISTRY.mode_arguments


class ExportedModule(_StatefulGraphModule):
    """An ``ep.module()`` graph whose ``train()`` / ``eval()`` switch the graph's mode."""

    def train(self, mode: bool = True) -> ExportedModule:
        if not isinstance(mode, bool):
            raise ValueError("training mode is expected to be boolean")
        set_graph_mode(self, mode)  # first: it raises when the graph cannot take the mode
        return super().train(mode)


def make_switchable(gm: fx.GraphModule, training: bool) -> fx.GraphModule:
    """Give ``gm`` (an ``ep.module()`` traced in mode ``training``) a working train/eval."""
    if not isinstance(gm, _StatefulGraphModule):
        return gm
    for name in ("train", "eval"):  # ep.module() binds methods that raise
        gm.__dict__.pop(name, None)
    # Each GraphModule has its own class (recompile installs forward on it); the name is
    # what GraphModule.__new__ skips to find the base class when copying.
    gm.__class__ = type("GraphModuleImpl", (ExportedModule,), {})
    gm.recompile()
    nn.Module.train(gm, training)
    return gm


def graph_mode(model: nn.Module) -> bool | None:
    """The model's mode when all its modules agree, else None (a mixed-mode model)."""
    modes = {m.training for m in model.modules()}
    return modes.pop() if len(modes) == 1 else None


@contextlib.contextmanager
def in_mode(model: nn.Module, training: bool) -> Iterator[None]:
    """``model`` in mode ``training`` inside; every module's own flag restored after."""
    flags = [(m, m.training) for m in model.modules()]
    model.train(training)
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def set_graph_mode(gm: fx.GraphModule, training: bool) -> bool:
    """Rewrite ``gm``'s mode arguments and counters for ``training``; True if any changed."""
    why = gm.meta.get(UNSWITCHABLE, {}).get(training)
    if why is not None:
        mode = "training" if training else "eval"
        raise TraceError(
            f"this export-traced graph cannot be switched to {mode} mode: {why}. Only the "
            f"mode arguments of dropout, batch_norm, instance_norm and attention dropout "
            f"can be switched in a torch.export graph. Prune with frontend='fx' (module "
            f"graph; train()/eval() work as on the original), or prune the model in the "
            f"mode you will use it in, with verify=False for train mode."
        )
    changed = False
    for node in gm.graph.nodes:
        record = node.meta.get(MODE_ARGS)
        if record is not None and training in record:
            for name, value in record[training].items():
                changed |= _set_argument(node, name, value)
    counters = gm.meta.get(COUNTERS)
    if counters is not None:
        changed |= _set_counters(gm, counters.get(training, ()))
    if changed:
        gm.graph.lint()
        gm.recompile()
    return changed


def _set_argument(node: fx.Node, name: str, value: Any) -> bool:
    arguments = node.target._schema.arguments
    index = next(i for i, a in enumerate(arguments) if a.name == name)
    if index < len(node.args) and not arguments[index].kwarg_only:
        if _equal(node.args[index], value):
            return False
        args = list(node.args)
        args[index] = value
        node.args = tuple(args)
        return True
    default = arguments[index].default_value if arguments[index].has_default_value() else None
    if _equal(node.kwargs.get(name, default), value):
        return False
    node.kwargs = {**node.kwargs, name: value}
    return True


def _set_counters(gm: fx.GraphModule, targets: Any) -> bool:
    graph = gm.graph
    present = [n for n in graph.nodes if n.op == "call_function" and n.meta.get(COUNTER)]
    if sorted(n.args[0].target for n in present) == sorted(targets):
        return False
    for node in present:
        attr = node.args[0]
        graph.erase_node(node)
        if not attr.users and attr.meta.get(COUNTER):
            graph.erase_node(attr)
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    for target in targets:  # last: a forward that raises counts no batch
        with graph.inserting_before(output):
            attr = graph.get_attr(target)
            add = graph.call_function(aten.add_.Tensor, (attr, 1))
        attr.meta[COUNTER] = add.meta[COUNTER] = True
    return True


# -- pairing the graphs exported in the two modes ---------------------------------------------
def record_modes(gm: fx.GraphModule, graphs: Mapping[bool, fx.GraphModule | BaseException]) -> None:
    """Record on ``gm`` how to switch it to each mode in ``graphs``.

    ``graphs[mode]`` is the same model exported in ``mode`` (``gm`` itself for the mode it
    was traced in), or the exception its export raised. A mode whose graph differs from
    ``gm`` beyond the ops' ``mode_args`` is recorded as unswitchable, with the reason.
    """
    for node in gm.graph.nodes:
        if _is_counter(node):
            node.meta[COUNTER] = True
            node.args[0].meta.setdefault(COUNTER, False)  # the buffer's own get_attr stays
    values: dict[fx.Node, dict[bool, dict[str, Any]]] = {}
    unswitchable: dict[bool, str] = {}
    counters: dict[bool, list[str]] = {}
    for training, other in graphs.items():
        if isinstance(other, BaseException):
            text = str(other).strip().splitlines()
            unswitchable[training] = (
                f"exporting the model in that mode failed ({type(other).__name__}: "
                f"{text[0] if text else ''})"
            )
            continue
        pairs, why = _pair(gm, other)
        if why is not None:
            unswitchable[training] = why
            continue
        counters[training] = sorted(n.args[0].target for n in other.graph.nodes if _is_counter(n))
        for mine, theirs in pairs:
            if mode_arguments(mine.target):
                values.setdefault(mine, {})[training] = _named_args(theirs)
    for node, by_mode in values.items():
        own = _named_args(node)
        names = {
            name
            for args in by_mode.values()
            for name in mode_arguments(node.target)
            if not _equal(args.get(name), own.get(name))
        }
        if names:
            node.meta[MODE_ARGS] = {
                training: {name: args.get(name) for name in sorted(names)}
                for training, args in by_mode.items()
            }
    gm.meta[COUNTERS] = counters
    gm.meta[UNSWITCHABLE] = unswitchable
    for training, why in unswitchable.items():
        logger.info("export graph: %s mode unavailable: %s", "train" if training else "eval", why)


def _is_counter(node: fx.Node) -> bool:
    """``buffer.add_(1)`` on a graph attribute, unused: BatchNorm's ``num_batches_tracked``."""
    return (
        node.op == "call_function"
        and node.target is aten.add_.Tensor
        and isinstance(node.args[0], fx.Node)
        and node.args[0].op == "get_attr"
        and node.args[1:] == (1,)
        and not node.kwargs
        and not node.users
    )


def _compared(gm: fx.GraphModule) -> list[fx.Node]:
    """The nodes whose sequence must match between modes (what each mode computes)."""
    return [
        n
        for n in gm.graph.nodes
        if n.op in ("placeholder", "output", "call_method")
        or (n.op == "call_module" and n.users)
        or (n.op == "call_function" and not REGISTRY.is_same_value(n.target) and not _is_counter(n))
    ]


def _resolve(node: Any) -> Any:
    while (
        isinstance(node, fx.Node)
        and node.op == "call_function"
        and REGISTRY.is_same_value(node.target)
    ):
        node = node.args[0]
    return node


def _pair(
    gm: fx.GraphModule, other: fx.GraphModule
) -> tuple[list[tuple[fx.Node, fx.Node]], str | None]:
    """Pair ``gm``'s nodes with ``other``'s; a reason when they compute different things."""
    if other is gm:
        return [(n, n) for n in _compared(gm)], None
    mine, theirs = _compared(gm), _compared(other)
    mapping: dict[fx.Node, fx.Node] = {}  # other's node -> gm's

    def same(a: Any, b: Any) -> bool:  # a in gm, b in other
        a, b = _resolve(a), _resolve(b)
        if isinstance(b, fx.Node):
            if b.op == "get_attr":
                return isinstance(a, fx.Node) and a.op == "get_attr" and a.target == b.target
            return mapping.get(b) is a
        if isinstance(b, (list, tuple)):
            return (
                isinstance(a, (list, tuple))
                and len(a) == len(b)
                and all(same(x, y) for x, y in zip(a, b))
            )
        if isinstance(b, dict):
            return isinstance(a, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in b)
        return _equal(a, b)

    for a, b in zip(mine, theirs):
        if a.op != b.op or a.target != b.target:
            return [], f"{_describe(b)} where the traced graph has {_describe(a)}"
        args_a, args_b = _named_args(a), _named_args(b)
        allowed = mode_arguments(a.target)
        for name in args_a.keys() | args_b.keys():
            if name not in allowed and not same(args_a.get(name), args_b.get(name)):
                return [], (
                    f"{_describe(b)} takes {name}={_show(args_b.get(name))} in that mode, "
                    f"{_show(args_a.get(name))} in the traced one"
                )
        mapping[b] = a
    if len(mine) != len(theirs):
        extra = theirs[len(mine)] if len(theirs) > len(mine) else mine[len(theirs)]
        return [], f"the graphs differ in length, from {_describe(extra)}"
    return list(zip(mine, theirs)), None


def _named_args(node: fx.Node) -> dict[Any, Any]:
    """Arguments by schema name with defaults filled (positions for ops without a schema)."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return {**dict(enumerate(node.args)), **node.kwargs}
    out = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args) and not arg.kwarg_only:
            out[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            out[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            out[arg.name] = arg.default_value
    return out


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, fx.Node) or isinstance(b, fx.Node):
        return a is b
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return a is b
    if isinstance(a, bool) != isinstance(b, bool):
        return False
    try:
        return bool(a == b)
    except Exception:  # a value that does not compare (a symbolic size...): not provably equal
        return False


def _describe(node: fx.Node) -> str:
    """``aten.bernoulli_.float (File "model.py", line 12, in forward)``: the op and its line."""
    target = node.target
    if node.op == "call_function":
        target = "getitem" if target is operator.getitem else getattr(target, "__name__", target)
    lines = [
        line.strip()
        for line in (node.meta.get("stack_trace") or "").splitlines()
        if line.strip().startswith("File ")
    ]
    return f"{target} ({lines[-1]})" if lines else str(target)


def _show(value: Any) -> str:
    if isinstance(value, fx.Node):
        return f"%{value.name}"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
