"""Tracing frontends: turn an ``nn.Module`` plus example inputs into a shaped FX graph.

``fx`` uses ``torch.fx.symbolic_trace`` (module-level graph, fast); ``export`` uses
``torch.export`` (aten-level graph, works where symbolic tracing cannot); ``auto``
tries ``fx`` and falls back to ``export``, logging why. Either way every tensor node
carries its shape and dtype in ``node.meta`` (``tensor_meta`` / ``val``).
"""

from __future__ import annotations

import inspect
import logging
import operator
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from fxprune.errors import TraceError

logger = logging.getLogger(__name__)

FRONTENDS = ("auto", "fx", "export")


@dataclass
class ExampleInputs:
    """Example inputs normalised to positional args plus keyword args."""

    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, example_inputs: Any) -> ExampleInputs:
        if isinstance(example_inputs, ExampleInputs):
            return example_inputs
        if isinstance(example_inputs, torch.Tensor):
            return cls((example_inputs,), {})
        if isinstance(example_inputs, Mapping):
            return cls((), dict(example_inputs))
        if isinstance(example_inputs, Sequence) and not isinstance(example_inputs, str):
            return cls(tuple(example_inputs), {})
        raise TraceError(
            f"example_inputs must be a tensor, a tuple/list of inputs or a dict of keyword "
            f"inputs, got {type(example_inputs).__name__}."
        )

    def call(self, module: nn.Module) -> Any:
        return module(*self.args, **self.kwargs)


class _Tracer(fx.Tracer):
    """``fx.Tracer`` with user leaf modules and stack traces for source lines."""

    def __init__(self, leaf_modules: Sequence[type | str | nn.Module] = ()) -> None:
        super().__init__()
        self.record_stack_traces = True
        self._leaf_types = tuple(m for m in leaf_modules if isinstance(m, type))
        self._leaf_names = {m for m in leaf_modules if isinstance(m, str)}
        self._leaf_ids = {id(m) for m in leaf_modules if isinstance(m, nn.Module)}

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if id(m) in self._leaf_ids or qualname in self._leaf_names:
            return True
        if self._leaf_types and isinstance(m, self._leaf_types):
            return True
        return super().is_leaf_module(m, qualname)


def trace(
    model: nn.Module,
    example_inputs: Any,
    frontend: str = "auto",
    leaf_modules: Sequence[type | str | nn.Module] = (),
    concrete_args: dict[str, Any] | None = None,
) -> fx.GraphModule:
    """Trace ``model`` to a GraphModule whose tensor nodes carry shapes in ``node.meta``.

    The model is not modified. The returned graph shares parameters with ``model``;
    copy the model first if you intend to rewrite the graph's parameters.
    """
    if frontend not in FRONTENDS:
        raise TraceError(f"unknown frontend {frontend!r}; choose one of {', '.join(FRONTENDS)}.")
    if not isinstance(model, nn.Module):
        raise TraceError(f"expected a torch.nn.Module to trace, got {type(model).__name__}.")
    inputs = ExampleInputs.of(example_inputs)
    failures: list[tuple[str, BaseException]] = []
    if frontend in ("auto", "fx"):
        try:
            gm = _trace_fx(model, inputs, leaf_modules, concrete_args)
            gm.meta["fxprune.frontend"] = "fx"
            return gm
        except Exception as exc:
            failures.append(("fx", exc))
            if frontend == "auto":
                logger.info(
                    "fx symbolic tracing failed (%s); falling back to torch.export", _one_line(exc)
                )
    if frontend in ("auto", "export"):
        try:
            gm = _trace_export(model, inputs)
            gm.meta["fxprune.frontend"] = "export"
            gm.meta["fxprune.example_inputs"] = inputs  # to re-export when saving
            return gm
        except Exception as exc:
            failures.append(("export", exc))
    raise _trace_error(model, failures) from failures[-1][1]


def _trace_fx(
    model: nn.Module,
    inputs: ExampleInputs,
    leaf_modules: Sequence[type | str | nn.Module],
    concrete_args: dict[str, Any] | None,
) -> fx.GraphModule:
    tracer = _Tracer(leaf_modules)
    concrete = dict(concrete_args or {})
    if inputs.kwargs:
        # Keyword inputs: every forward parameter the user did not give is fixed to its default.
        sig = inspect.signature(model.forward)
        given = set(inputs.kwargs) | set(list(sig.parameters)[: len(inputs.args)])
        for name, p in sig.parameters.items():
            if name in given or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            if p.default is not inspect.Parameter.empty:
                concrete.setdefault(name, p.default)
    graph = tracer.trace(model, concrete_args=concrete or None)
    name = type(model).__name__
    gm = fx.GraphModule(tracer.root, graph, name)
    args = _placeholder_args(gm, inputs, concrete)
    propagate_shapes(gm, args)
    return gm


class _FakeShapeProp(torch.fx.Interpreter):
    """Record each node's output shape/dtype by running the graph on fake tensors (no compute)."""

    def __init__(self, gm: fx.GraphModule, mode: Any) -> None:
        super().__init__(gm)
        self.mode = mode

    def run_node(self, n: fx.Node) -> Any:
        with self.mode:
            if n.op == "call_module" and _keeps_shape(self.fetch_attr(n.target)):
                # Fake batch_norm & co. decompose slowly; their output is shaped like the input.
                x = self.env[n.args[0]] if isinstance(n.args[0], fx.Node) else n.args[0]
                result = torch.empty_like(x)
            else:
                result = super().run_node(n)
        _record(n, result)
        return result


def _keeps_shape(mod: nn.Module) -> bool:
    return any(isinstance(mod, c) and type(mod).forward is c.forward for c in _SHAPE_KEEPING)


_SHAPE_KEEPING = (
    nn.modules.batchnorm._BatchNorm,
    nn.ReLU,
    nn.ReLU6,
    nn.SiLU,
    nn.GELU,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.Softmax,
    nn.ELU,
    nn.PReLU,
    nn.Sigmoid,
    nn.Tanh,
    nn.Dropout,
    nn.Identity,
    nn.LeakyReLU,
    nn.Mish,
)


def _record(n: fx.Node, result: Any) -> None:
    from torch.fx.node import map_aggregate
    from torch.fx.passes.shape_prop import _extract_tensor_metadata

    found = False

    def extract(obj: Any) -> Any:
        nonlocal found
        if isinstance(obj, torch.Tensor):
            found = True
            return _extract_tensor_metadata(obj)
        return obj

    if isinstance(result, int) and not isinstance(result, bool):
        n.meta["fxprune.value"] = result  # sizes computed in the graph, e.g. x.shape[-1] // 2
    tm = map_aggregate(result, extract)
    if found:
        n.meta["tensor_meta"] = tm
    else:
        n.meta.pop("tensor_meta", None)
    n.meta["type"] = type(result)


def propagate_shapes(gm: fx.GraphModule, args: Sequence[Any]) -> None:
    """Fill ``tensor_meta`` of every node: on fake tensors when possible, else for real."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    fake_log = logging.getLogger("torch._subclasses.fake_tensor")
    level = fake_log.level
    fake_log.setLevel(logging.CRITICAL)  # a failed fake run is expected for data-dependent ops
    try:
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        with torch.no_grad():
            _FakeShapeProp(gm, mode).run(*fake_args)
        return
    except Exception as exc:
        logger.debug("fake shape propagation failed (%s); running for real", _one_line(exc))
    finally:
        fake_log.setLevel(level)
    with torch.no_grad():
        _RealShapeProp(gm).run(*args)


class _RealShapeProp(torch.fx.Interpreter):
    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        _record(n, result)
        return result


def _placeholder_args(gm: fx.GraphModule, inputs: ExampleInputs, concrete: dict) -> list[Any]:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    positional = list(inputs.args)
    out = []
    for ph in placeholders:
        name = ph.target.lstrip("*")
        if name in inputs.kwargs:
            out.append(inputs.kwargs[name])
        elif positional:
            out.append(positional.pop(0))
        elif name in concrete:
            out.append(concrete[name])
        elif ph.args:  # placeholder default
            out.append(ph.args[0])
        else:
            raise TraceError(f"no example input for the model's argument {name!r}.")
    return out


def _trace_export(model: nn.Module, inputs: ExampleInputs) -> fx.GraphModule:
    try:
        ep = torch.export.export(
            model,
            inputs.args,
            inputs.kwargs or None,
            strict=False,
            dynamic_shapes=_auto_dynamic(model, inputs),
        )
    except Exception:
        ep = torch.export.export(model, inputs.args, inputs.kwargs or None, strict=False)
    gm = ep.module()
    inline_grad_mode_regions(gm)
    # Record concrete shapes of the example (export's own metadata may be symbolic).
    propagate_shapes(gm, flat_inputs(gm, inputs))
    return gm


def _auto_dynamic(model: nn.Module, inputs: ExampleInputs) -> Any:
    """Let batch (and token sequence) dims stay dynamic where the model allows it."""
    auto = torch.export.Dim.AUTO

    def spec(t: Any) -> Any:
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            return None
        dims = {0: auto}
        if not t.is_floating_point() and t.dim() >= 2:
            dims[1] = auto  # token ids: (batch, sequence)
        return dims

    sig = inspect.signature(model.forward).parameters
    names = [n for n, p in sig.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    out = {names[i]: spec(a) for i, a in enumerate(inputs.args) if i < len(names)}
    out.update({k: spec(v) for k, v in inputs.kwargs.items()})
    return out


def inline_grad_mode_regions(gm: fx.GraphModule) -> int:
    """Inline ``wrap_with_set_grad_enabled`` subgraphs (``torch.no_grad()`` blocks in forward).

    torch.export keeps such blocks as a higher-order op whose body is a submodule; channel
    rules cannot see inside, so e.g. rotary cos/sin computed under no_grad would freeze every
    q/k head dim. For inference and pruning the grad mode is irrelevant: inline the body.
    """
    try:
        from torch._higher_order_ops.wrap import wrap_with_set_grad_enabled
    except ImportError:  # pragma: no cover - older torch
        return 0
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not wrap_with_set_grad_enabled:
            continue
        sub_node, inputs = node.args[1], node.args[2:]
        sub = getattr(gm, sub_node.target, None)
        if not isinstance(sub, fx.GraphModule) or any(n.op == "get_attr" for n in sub.graph.nodes):
            continue
        placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != len(inputs):
            continue
        with gm.graph.inserting_before(node):
            out = gm.graph.graph_copy(sub.graph, dict(zip(placeholders, inputs)))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        for user in list(node.users):
            if user.op == "call_function" and user.target is operator.getitem:
                user.replace_all_uses_with(outs[user.args[1]])
                gm.graph.erase_node(user)
        if not node.users:
            gm.graph.erase_node(node)
            if not sub_node.users:
                gm.graph.erase_node(sub_node)
                delattr(gm, sub_node.target)
            count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return count


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _user_frame(exc: BaseException) -> str | None:
    """The innermost frame of the user's code (not torch's, not fxprune's) in a traceback."""
    frames = traceback.extract_tb(exc.__traceback__)
    for fr in reversed(frames):
        f = fr.filename.replace("\\", "/")
        if "/torch/" in f or "/fxprune/" in f or "/site-packages/" in f or f.startswith("<"):
            continue
        return f"{f}:{fr.lineno} ({fr.name}): {fr.line or ''}".strip()
    return None


def _trace_error(model: nn.Module, failures: list[tuple[str, BaseException]]) -> TraceError:
    lines = [f"could not trace {type(model).__name__}:"]
    for frontend, exc in failures:
        where = _user_frame(exc)
        lines.append(f"  - {frontend}: {_one_line(exc)}")
        if where:
            lines.append(f"      at {where}")
    lines += [
        "How to fix:",
        "  - mark the submodule with data-dependent control flow as a leaf: "
        "fxprune.trace(..., leaf_modules=[MyBlock]) (its channels are then frozen),",
        "  - fix non-tensor arguments with concrete_args={'flag': False},",
        "  - or try the other frontend (frontend='export' or frontend='fx').",
    ]
    return TraceError("\n".join(lines))


def flat_inputs(gm: fx.GraphModule, inputs: Any) -> list[Any]:
    """Example inputs as the values of the graph's placeholders, in order."""
    ex = ExampleInputs.of(inputs)
    spec = getattr(gm, "_in_spec", None)
    if spec is not None:  # torch.export graphs take pytree-flattened (args, kwargs)
        import torch.fx._pytree as fx_pytree

        return list(fx_pytree.tree_flatten_spec((ex.args, ex.kwargs), spec))
    return _placeholder_args(gm, ex, {})


def reshape_shapes(gm: fx.GraphModule, inputs: Any) -> None:
    """Re-propagate shapes through ``gm`` (after surgery) from example inputs."""
    propagate_shapes(gm, flat_inputs(gm, inputs))
