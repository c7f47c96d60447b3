"""Tracing frontends: turn an ``nn.Module`` plus example inputs into a shaped FX graph.

``fx`` uses ``torch.fx.symbolic_trace`` (module-level graph, fast); ``export`` uses
``torch.export`` (aten-level graph, works where symbolic tracing cannot); ``auto``
tries ``fx`` and falls back to ``export``, logging why. Either way every tensor node
carries its shape and dtype in ``node.meta`` (``tensor_meta`` / ``val``).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import operator
import re
import sysconfig
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.func import functional_call
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from fxprune.errors import TraceError
from fxprune.graph_modes import graph_mode, in_mode, make_switchable, record_modes
from fxprune.ops import REGISTRY

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
        requirement = "a tensor, a tuple/list of positional inputs or a dict of keyword inputs"
        hint = "pass a tensor, e.g. torch.randn(1, 3, 224, 224)"
        if isinstance(example_inputs, Sequence) and not isinstance(example_inputs, (str, bytes)):
            if example_inputs and all(
                isinstance(v, int) and not isinstance(v, bool) for v in example_inputs
            ):  # (1, 3, 224, 224): the input's shape rather than the input
                raise TraceError(
                    f"example_inputs must be {requirement}, got {tuple(example_inputs)!r}. "
                    f"This looks like a shape: {hint}."
                )
            return cls(tuple(example_inputs), {})
        raise TraceError(
            f"example_inputs must be {requirement}, got {type(example_inputs).__name__}. "
            f"For a single input {hint}."
        )

    def call(self, module: nn.Module) -> Any:
        return module(*self.args, **self.kwargs)


@contextlib.contextmanager
def _function_apply_replaced(replacement: Callable[..., Any]) -> Iterator[None]:
    """Inside, ``SomeFunction.apply(*a)`` calls ``replacement(original_apply, SomeFunction, *a)``.

    The patch is on ``torch.autograd.Function`` itself (what ``apply`` resolves to for every
    subclass that does not override it) and is undone on exit, nested patches included.
    """
    function = torch.autograd.Function
    previous = function.__dict__["apply"]  # a C classmethod descriptor

    def apply(cls: type, *args: Any, **kwargs: Any) -> Any:
        return replacement(previous.__get__(None, cls), cls, *args, **kwargs)

    function.apply = classmethod(apply)
    try:
        yield
    finally:
        function.apply = previous


def is_user_function(fn_cls: type) -> bool:
    """A custom autograd.Function: defined outside torch, so its backward is the user's own."""
    return (getattr(fn_cls, "__module__", None) or "").split(".")[0] != "torch"


def autograd_function_call(fn_cls: type) -> Callable[..., Any]:
    """A graph target that calls ``fn_cls.apply``: the Function stays one op, backward included.

    Its ``__qualname__`` (``MyFunction.apply``) is how channel analysis names the op when it
    freezes the channels the op touches; ``autograd_function`` holds the class.
    """

    def call(*args: Any, **kwargs: Any) -> Any:
        return fn_cls.apply(*args, **kwargs)

    call.__module__ = fn_cls.__module__
    call.__name__ = f"{fn_cls.__name__}_apply"
    call.__qualname__ = f"{fn_cls.__qualname__}.apply"
    call.autograd_function = fn_cls  # type: ignore[attr-defined]
    return call


def _proxies(args: Any, kwargs: Any) -> list[fx.Proxy]:
    found: list[fx.Proxy] = []

    def visit(a: Any) -> Any:
        if isinstance(a, fx.Proxy):
            found.append(a)
        return a

    fx.node.map_aggregate((args, kwargs), visit)
    return found


class _Tracer(fx.Tracer):
    """``fx.Tracer`` with leaf modules, source lines, and custom autograd.Functions kept whole.

    Symbolic tracing runs ``Function.apply`` like any Python code: ``forward`` is inlined on
    proxies and the custom ``backward`` (a straight-through estimator, say) is silently lost,
    so a pruned model would train with different gradients. Each call of a user-defined
    Function on a traced value becomes one ``call_function`` node calling its ``apply``.
    """

    def __init__(self, leaf_modules: Sequence[type | str | nn.Module] = ()) -> None:
        super().__init__()
        self.record_stack_traces = True
        # Buffers used through an op (``self.mean.view(...)``) stay get_attr nodes under their
        # own names; otherwise fx computes the op eagerly and stores an anonymous constant.
        self.proxy_buffer_attributes = True
        self._leaf_types = tuple(m for m in leaf_modules if isinstance(m, type))
        self._leaf_names = {m for m in leaf_modules if isinstance(m, str)}
        self._leaf_ids = {id(m) for m in leaf_modules if isinstance(m, nn.Module)}
        self._function_calls: dict[type, Callable[..., Any]] = {}

    def trace(self, root: Any, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        with _function_apply_replaced(self._apply_function):
            return super().trace(root, concrete_args)

    def _filter_traceback_frames(self, summary: traceback.StackSummary) -> traceback.StackSummary:
        # A Function's node is created from this file: its source line is the user's call.
        kept = super()._filter_traceback_frames(summary)
        return traceback.StackSummary.from_list([f for f in kept if f.filename != __file__])

    def _apply_function(
        self, apply: Callable[..., Any], fn_cls: type, *args: Any, **kwargs: Any
    ) -> Any:
        proxies = _proxies(args, kwargs)
        if not is_user_function(fn_cls) or not any(p.tracer is self for p in proxies):
            return apply(*args, **kwargs)  # torch's own Functions are traced through, as before
        if fn_cls not in self._function_calls:
            self._function_calls[fn_cls] = autograd_function_call(fn_cls)
        try:
            return self.create_proxy("call_function", self._function_calls[fn_cls], args, kwargs)
        except NotImplementedError as exc:  # an argument a graph cannot hold (a callable, ...)
            raise TraceError(
                f"{fn_cls.__qualname__}.apply (a custom torch.autograd.Function) cannot be kept "
                f"as one op in the graph: {exc}. Tracing through it would lose its backward. "
                f"Mark the submodule that calls it as a leaf: leaf_modules=[...]."
            ) from exc

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if id(m) in self._leaf_ids or qualname in self._leaf_names:
            return True
        if self._leaf_types and isinstance(m, self._leaf_types):
            return True
        if REGISTRY.is_leaf(m):  # a library module an op spec declares whole (timm std convs)
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
    with _without_kv_cache(model):
        return _trace_frontends(model, inputs, frontend, leaf_modules, concrete_args)


@contextlib.contextmanager
def _without_kv_cache(model: nn.Module) -> Iterator[None]:
    """A transformers model's ``config.use_cache`` off while it is traced, as it was after.

    A traced graph cannot return a key/value cache object (``DynamicCache``: neither fx nor
    torch.export can carry it), and pruning is about the forward a deployment runs; the
    traced and pruned model therefore returns no cache, and says so.
    """
    config = getattr(model, "config", None)
    if not getattr(config, "use_cache", False):
        yield
        return
    logger.info(
        "%s: tracing with config.use_cache=False (a traced graph cannot return a key/value "
        "cache); the pruned model returns no past_key_values",
        type(model).__name__,
    )
    config.use_cache = False
    try:
        yield
    finally:
        config.use_cache = True


def _trace_frontends(
    model: nn.Module,
    inputs: ExampleInputs,
    frontend: str,
    leaf_modules: Sequence[type | str | nn.Module],
    concrete_args: dict[str, Any] | None,
) -> fx.GraphModule:
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
    raise _trace_error(model, failures, inputs) from failures[-1][1]


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
    _constants_not_persistent(gm)
    args = _placeholder_args(gm, inputs, concrete)
    propagate_shapes(gm, args)
    return gm


def _constants_not_persistent(gm: fx.GraphModule) -> None:
    """Tensors fx captured by value (``_tensor_constantN``) stay out of the state_dict.

    They are not parameters or buffers of the user's model, so a checkpoint of the traced
    module keeps exactly the original's keys; a rebuilt module re-creates them by tracing.
    """
    for node in gm.graph.nodes:
        if node.op != "get_attr" or "." in node.target:
            continue
        if node.target.startswith("_tensor_constant") and node.target in gm._buffers:
            gm._non_persistent_buffers_set.add(node.target)


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


class _MetaShapeProp(torch.fx.Interpreter):
    """Record each node's output shape/dtype on meta tensors: parameters, buffers and inputs
    are stand-ins on the meta device, so nothing real is read, written or computed.

    Several times faster than fake tensors (no per-op caching or real-to-fake conversion),
    which matters after every surgery of an iterative prune. Any op a meta tensor cannot
    run (data-dependent shapes, a real tensor captured by the graph) raises, and
    :func:`propagate_shapes` falls back to fake tensors.
    """

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self._cache: dict[Any, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        if n.op == "get_attr":
            value = self.fetch_attr(n.target)
            result = value.to("meta") if isinstance(value, torch.Tensor) else value
        elif n.op == "call_module":
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            mod = self.fetch_attr(n.target)
            if _keeps_shape(mod):
                x = args[0]
                result = torch.empty_like(x) if isinstance(x, torch.Tensor) else super().run_node(n)
            elif not mod._modules:
                result = _on_meta_module(mod)(*args, **kwargs)
            else:
                state = {
                    name: t.to("meta")
                    for name, t in [
                        *mod.named_parameters(remove_duplicate=False),
                        *mod.named_buffers(remove_duplicate=False),
                    ]
                }
                result = functional_call(mod, state, tuple(args), kwargs, strict=True)
        else:
            result = super().run_node(n)
        _record(n, result)
        return result

    # Tensors made or moved on a real device (an export graph's mask.to(cpu), arange on
    # cpu) stay on meta: the device is the one thing meta tensors cannot reproduce.
    def call_function(self, target: Any, args: tuple, kwargs: dict) -> Any:
        if target in _SAME_SHAPE_BINARY and not kwargs and len(args) == 2:
            a, b = args
            # Same shape and dtype: the result is shaped like either (a residual add);
            # anything else runs the op's own meta kernel, which checks broadcasting.
            if (
                isinstance(a, torch.Tensor)
                and isinstance(b, torch.Tensor)
                and a.shape == b.shape
                and a.dtype == b.dtype
            ):
                return torch.empty_like(a)
        args, kwargs = _on_meta(args, kwargs)
        # Meta kernels are deterministic in their inputs' metadata: an op seen before with
        # the same shapes and arguments (the same layer repeated) gives the same result.
        key = _cache_key(target, args, kwargs)
        known = self._cache.get(key) if key is not None else None
        if known is not None:
            return _from_spec(known)
        result = super().call_function(target, args, kwargs)
        if key is not None:
            spec = _to_spec(result)
            if spec is not None:
                self._cache[key] = spec
        return result

    def call_method(self, target: Any, args: tuple, kwargs: dict) -> Any:
        return super().call_method(target, *_on_meta(args, kwargs))


_META = torch.device("meta")
_SAME_SHAPE_BINARY = frozenset(
    {operator.add, operator.sub, operator.mul, torch.add, torch.sub, torch.mul}
)


def _cache_key(target: Any, args: tuple, kwargs: dict) -> Any:
    """A hashable key of an op call on meta tensors, or None when an argument has none."""
    try:
        key = (target, _key_of(args), _key_of(tuple(sorted(kwargs.items()))))
        hash(key)
    except TypeError:
        return None
    return key


def _key_of(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype, tuple(value.stride()))
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, tuple(_key_of(v) for v in value))
    if isinstance(value, (slice, dict, set)):
        raise TypeError("not a key")
    return value


def _to_spec(result: Any) -> Any:
    """(shape, stride, dtype) of a tensor result, a tuple of them for tuples; else None."""
    if isinstance(result, torch.Tensor):
        return (tuple(result.shape), tuple(result.stride()), result.dtype)
    if isinstance(result, tuple) and result and all(isinstance(r, torch.Tensor) for r in result):
        return tuple(_to_spec(r) for r in result)
    return None


def _from_spec(spec: Any) -> Any:
    if isinstance(spec[0], tuple) and spec and isinstance(spec[-1], torch.dtype):
        shape, stride, dtype = spec
        return torch.empty_strided(shape, stride, dtype=dtype, device=_META)
    return tuple(_from_spec(s) for s in spec)


def _on_meta_module(mod: nn.Module) -> nn.Module:
    """A shallow copy of a leaf module whose parameters and buffers are meta tensors
    (cheaper than functional_call's reparametrization, which nested modules need)."""
    copy_ = object.__new__(type(mod))
    copy_.__dict__.update(mod.__dict__)
    copy_.__dict__["_parameters"] = {
        k: None if v is None else nn.Parameter(v.to(_META), v.requires_grad)
        for k, v in mod._parameters.items()
    }
    copy_.__dict__["_buffers"] = {
        k: None if v is None else v.to(_META) for k, v in mod._buffers.items()
    }
    return copy_


def _on_meta(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    if "device" in kwargs:
        kwargs = {**kwargs, "device": _META}
    if any(isinstance(a, torch.device) for a in args):  # aten.to.device(x, device, ...)
        args = tuple(_META if isinstance(a, torch.device) else a for a in args)
    return args, kwargs


def propagate_shapes(gm: fx.GraphModule, args: Sequence[Any]) -> None:
    """Fill ``tensor_meta`` of every node: on meta tensors when possible, else on fake
    tensors, else for real."""
    try:
        meta_args = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in args]
        with torch.no_grad():
            _MetaShapeProp(gm).run(*meta_args)
        return
    except Exception as exc:
        logger.debug("meta shape propagation failed (%s); trying fake tensors", _one_line(exc))
    fake_log = logging.getLogger("torch._subclasses.fake_tensor")
    level = fake_log.level
    fake_log.setLevel(logging.CRITICAL)  # a failed fake run is expected for data-dependent ops
    try:
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        with torch.no_grad(), state_preserved(gm):
            _FakeShapeProp(gm, mode).run(*fake_args)
        return
    except Exception as exc:
        logger.debug("fake shape propagation failed (%s); running for real", _one_line(exc))
    finally:
        fake_log.setLevel(level)
    with torch.no_grad(), state_preserved(gm):
        _RealShapeProp(gm).run(*args)


@contextlib.contextmanager
def state_preserved(module: nn.Module) -> Iterator[None]:
    """Buffers and the global RNG are as they were after the block, whatever ran inside it.

    A traced graph shares its modules with the caller's model. Running it updates the
    BatchNorm statistics of a ``train()`` model and draws dropout masks from the global RNG;
    even a fake-tensor run performs in-place ops whose operands are all real
    (``num_batches_tracked += 1`` of a torch.export graph). Buffers are small next to the
    parameters, which a forward does not write, so saving them is cheap. (Restored by
    value, always: the batch_norm kernel updates running statistics without bumping their
    version counter.)
    """
    modules = list(module.modules())
    slots = [(m, dict(m._buffers)) for m in modules]  # a forward may also rebind a buffer
    buffers = list({id(b): b for _, d in slots for b in d.values() if b is not None}.values())
    saved = [(b, b.detach().clone()) for b in buffers]
    cuda = {t.device.index or 0 for t in [*buffers, *module.parameters()] if t.is_cuda}
    with torch.random.fork_rng(devices=sorted(cuda)):
        try:
            yield
        finally:
            for m, before in slots:
                now = m._buffers
                if now.keys() != before.keys() or any(now[k] is not v for k, v in before.items()):
                    m._buffers.clear()
                    m._buffers.update(before)
            with torch.no_grad():
                for b, value in saved:
                    if b.is_inference() and not torch.is_inference_mode_enabled():
                        continue  # read-only here, so unchanged (and copy_ would raise)
                    if not _same(b, value):  # unchanged ones keep their version counter
                        b.copy_(value)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal, NaNs included (torch.equal says a NaN differs from itself)."""
    return a.shape == b.shape and bool(torch.eq(a, b).logical_or_(a.ne(a) & b.ne(b)).all())


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
    functions: dict[type, None] = {}

    def record(apply: Callable[..., Any], fn_cls: type, *args: Any, **kwargs: Any) -> Any:
        if is_user_function(fn_cls):
            functions[fn_cls] = None
        return apply(*args, **kwargs)

    mode = graph_mode(model)
    others: dict[bool, fx.GraphModule | BaseException] = {}
    with _function_apply_replaced(record), state_preserved(model):
        gm, example, dynamic = _export_dynamic_batch(model, inputs)
        # The other mode's graph, exported the same way: its mode arguments (dropout's
        # train flag, attention dropout p, batch_norm's training) let the result switch.
        for training in (True, False):
            if training is mode:
                continue
            try:
                with in_mode(model, training):
                    other = torch.export.export(
                        model,
                        example.args,
                        example.kwargs or None,
                        strict=False,
                        dynamic_shapes=dynamic,
                    ).module()
                inline_wrapped_regions(other)
                views_as_reshapes(other)
                others[training] = other
            except Exception as exc:
                others[training] = exc
    if functions:
        # torch.export inlines a Function's forward and drops its backward: the pruned model
        # would compute the same outputs but train with different gradients.
        names = ", ".join(f"{f.__qualname__}.apply" for f in functions)
        raise TraceError(
            f"the model calls custom torch.autograd.Function(s) {names}, which torch.export "
            f"inlines (their backward would be lost, so fine-tuning the pruned model would use "
            f"wrong gradients). Use frontend='fx', which keeps each one as a single op."
        )
    inline_wrapped_regions(gm)
    views_as_reshapes(gm)
    record_modes(gm, {mode: gm, **others} if mode is not None else others)
    make_switchable(gm, model.training if mode is None else mode)
    # Record concrete shapes of the example (export's own metadata may be symbolic, or
    # for the batch-2 copy of the example the graph was exported with).
    propagate_shapes(gm, flat_inputs(gm, inputs))
    return gm


def _export_dynamic_batch(
    model: nn.Module, inputs: ExampleInputs
) -> tuple[fx.GraphModule, ExampleInputs, Any]:
    """``ep.module()`` of ``model`` exported with batch (and token sequence) dims dynamic where the model allows.

    torch.export specializes a size-1 dim to the constant 1 (its "0/1 specialization"), so
    a batch-1 example would lock the graph to batch 1: export with the example repeated to
    batch 2 instead. Code that branches on the batch size (``if x.shape[0] > 1``) would then
    take the batch-2 branch at batch 1 without failing a guard, so the graph must give the
    model's own outputs on the user's example; otherwise, and when the model fixes its
    batch, the graph is the example's (logged). Returns the graph, the example it was
    exported with and its dynamic shapes, for exporting the other mode the same way.
    """
    doubled = _batch_of_two(inputs)
    attempts = [doubled, inputs] if doubled is not None else [inputs]
    for example in attempts:
        dynamic = _auto_dynamic(model, example)
        try:
            gm = torch.export.export(
                model, example.args, example.kwargs or None, strict=False, dynamic_shapes=dynamic
            ).module()
        except Exception as exc:
            logger.info("torch.export with dynamic batch failed (%s)", _one_line(exc))
            continue
        if example is doubled and not _same_outputs(model, gm, inputs):
            logger.warning(
                "%s: the graph exported at batch 2 does not reproduce the model at batch 1 "
                "(it branches on the batch size?); the traced graph takes batch 1 only.",
                type(model).__name__,
            )
            continue
        return gm, example, dynamic
    logger.warning(
        "%s: torch.export could not keep the batch dim dynamic; the traced graph takes the "
        "example's shapes only.",
        type(model).__name__,
    )
    ep = torch.export.export(model, inputs.args, inputs.kwargs or None, strict=False)
    return ep.module(), inputs, None


def _is_batch_one(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.dim() > 0 and len(t) == 1


def batch_of_two(value: Any) -> Any:
    """``value`` (any pytree) with every batch-1 tensor repeated to batch 2.

    torch.export specialises a size-1 dim to the constant 1 (its "0/1 specialization"), which
    silently fixes the batch; exporting with batch 2 keeps it dynamic.
    """
    return pytree.tree_map(lambda t: torch.cat([t, t]) if _is_batch_one(t) else t, value)


def _batch_of_two(inputs: ExampleInputs) -> ExampleInputs | None:
    """The example at batch 2 (None: it has no batch-1 tensor)."""
    if not any(_is_batch_one(t) for t in pytree.tree_leaves((inputs.args, inputs.kwargs))):
        return None
    return ExampleInputs(batch_of_two(inputs.args), batch_of_two(inputs.kwargs))


def _same_outputs(model: nn.Module, gm: fx.GraphModule, inputs: ExampleInputs) -> bool:
    """``gm`` gives ``model``'s outputs on ``inputs`` (same random draws for both)."""
    outputs = []
    for module in (model, gm):
        with torch.no_grad(), state_preserved(module):
            torch.manual_seed(0)
            try:
                outputs.append(pytree.tree_leaves(inputs.call(module)))
            except Exception as exc:
                logger.info("the batch-2 graph fails on the example (%s)", _one_line(exc))
                return False
    want, got = outputs
    if len(want) != len(got):
        return False
    for a, b in zip(want, got):
        if not isinstance(a, torch.Tensor):
            if a != b:
                return False
            continue
        if not isinstance(b, torch.Tensor) or a.shape != b.shape or a.dtype != b.dtype:
            return False
        if a.is_floating_point() or a.is_complex():
            scale = a.abs().max().item() if a.numel() else 0.0
            if not torch.allclose(a, b, rtol=1e-4, atol=1e-5 * max(1.0, scale), equal_nan=True):
                return False
        elif not torch.equal(a, b):
            return False
    return True


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


def inline_wrapped_regions(gm: fx.GraphModule) -> int:
    """Inline the bodies torch.export wraps in a higher-order op: ``torch.no_grad()`` blocks
    (``wrap_with_set_grad_enabled``) and ``torch.autocast`` blocks (``wrap_with_autocast``).

    Channel rules cannot see inside such an op, so e.g. rotary cos/sin computed under
    no_grad would freeze every q/k head dim, and EfficientViT's attention, which runs in an
    ``autocast(enabled=False)`` block, would freeze its channels. For inference and pruning the
    grad mode is irrelevant: its body is inlined. An autocast block's body is inlined between
    ``_enter_autocast`` and ``_exit_autocast`` nodes (side-effectful, so never removed as dead
    code), which set the same autocast state around the same ops when the graph runs.
    """
    try:
        from torch._higher_order_ops.wrap import wrap_with_autocast, wrap_with_set_grad_enabled
    except ImportError:  # pragma: no cover - older torch
        return 0
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is wrap_with_set_grad_enabled:
            state, sub_node, inputs = None, node.args[1], node.args[2:]
        elif node.target is wrap_with_autocast:
            state, sub_node, inputs = node.args[:4], node.args[4], node.args[5:]
        else:
            continue
        sub = getattr(gm, sub_node.target, None)
        if not isinstance(sub, fx.GraphModule) or any(n.op == "get_attr" for n in sub.graph.nodes):
            continue
        placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != len(inputs):
            continue
        with gm.graph.inserting_before(node):
            if state is not None:
                mode = gm.graph.call_function(torch.amp.autocast_mode._enter_autocast, state)
            out = gm.graph.graph_copy(sub.graph, dict(zip(placeholders, inputs)))
            if state is not None:
                gm.graph.call_function(torch.amp.autocast_mode._exit_autocast, (mode,))
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


def views_as_reshapes(gm: fx.GraphModule) -> int:
    """Turn torch.export's ``aten.view`` nodes into ``aten.reshape``.

    torch.export records ``x.reshape(...)`` as a view, and drops ``.contiguous()``, where the
    tensor it traced was contiguous: Hugging Face attention's ``transpose(1, 2).contiguous()``
    then ``reshape`` becomes a bare view of a transposed tensor, valid only for the strides
    the traced attention kernel returned; another kernel (another device's) may return
    others, and the view fails. ``reshape`` gives the same values, and is the same view
    wherever a view is possible.
    """
    count = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.aten.view.default:
            node.target = torch.ops.aten.reshape.default
            count += 1
    if count:
        gm.recompile()
    return count


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _user_frame(exc: BaseException) -> str | None:
    """The innermost frame of the model's code in a traceback: the user's own if any, else a
    model library's (torchvision, timm...), never torch's, fxprune's or the standard library's."""
    frames = traceback.extract_tb(exc.__traceback__)
    stdlib = sysconfig.get_paths()["stdlib"].replace("\\", "/")
    library = None
    for fr in reversed(frames):
        f = fr.filename.replace("\\", "/")
        if "/torch/" in f or "/fxprune/" in f or f.startswith(("<", stdlib)):
            continue
        where = f"{f}:{fr.lineno} ({fr.name}): {fr.line or ''}".strip()
        if "/site-packages/" not in f:
            return where
        library = library or where
    if library is None:
        # fx's interpreter names the failing node's source line in the message instead
        match = re.search(r'File "([^"]+)", line (\d+), in (\w+)\n\s*(.*)', str(exc))
        if match and "/torch/" not in match.group(1):
            library = f"{match.group(1)}:{match.group(2)} ({match.group(3)}): {match.group(4)}"
    return library


# What went wrong, recognised from the exception (type name and message), most specific
# first: a wrong input is reported as such, never as data-dependent control flow.
_CAUSES: tuple[tuple[str, re.Pattern[str]], ...] = (
    (
        "arguments",
        re.compile(
            r"missing (a|\d+) required|positional argument|unexpected keyword argument"
            r"|no example input for the model's argument|takes \d+ positional",
            re.I,
        ),
    ),
    (
        "control_flow",
        re.compile(
            r"control flow|data.dependent|GuardOnDataDependent|cannot be iterated"
            r"|symbolically traced variables|Proxy.*(bool|len|iter)",
            re.I,
        ),
    ),
    (
        "device",
        re.compile(
            r"DeviceMismatch|same device|on the expected device|cuda\.\w*Tensor\).*should be"
            r"|device type",
            re.I,
        ),
    ),
    (
        "dtype",
        re.compile(
            r"scalar type|dtype|should be the same|found (Double|Half|Float|Long|Int)"
            r"|expected .*(Long|Int|Float).* but got",
            re.I,
        ),
    ),
    (
        "shape",
        re.compile(
            r"shape|size|channels|dimension|\d+D input|cannot be multiplied|reduction dim"
            r"|out of range|mismatch",
            re.I,
        ),
    ),
    ("unsupported", re.compile(r"NotImplemented|not supported|unsupported|could not run", re.I)),
)


def _cause(failures: list[tuple[str, BaseException]]) -> str:
    """The most specific cause any frontend reported ("other" when none is recognised)."""
    found = {
        kind
        for _, exc in failures
        for kind, pattern in _CAUSES
        if pattern.search(f"{type(exc).__name__}: {exc}")
    }
    return next((kind for kind, _ in _CAUSES if kind in found), "other")


def _describe_inputs(inputs: ExampleInputs | None) -> str:
    if inputs is None:
        return "?"

    def one(v: Any) -> str:
        if isinstance(v, torch.Tensor):
            return f"{str(v.dtype).replace('torch.', '')} {tuple(v.shape)} on {v.device}"
        return type(v).__name__

    parts = [one(a) for a in inputs.args] + [f"{k}={one(v)}" for k, v in inputs.kwargs.items()]
    return ", ".join(parts) or "nothing"


def _forward_signature(model: nn.Module) -> str:
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return "forward(...)"
    # names and defaults only: annotations are often strings under postponed evaluation
    params = [p.replace(annotation=p.empty) for p in sig.parameters.values()]
    return f"forward{sig.replace(parameters=params, return_annotation=sig.empty)}"


def _shape_detail(failures: list[tuple[str, BaseException]]) -> str:
    """What the failing layer expected, when torch's message says it."""
    text = "\n".join(str(exc) for _, exc in failures)
    conv = re.search(
        r"weight of size \[([^\]]*)\], expected input\[([^\]]*)\] to have (\d+) channels, "
        r"but got (\d+)",
        text,
    )
    if conv:
        return (
            f"a convolution (weight [{conv.group(1)}]) expects {conv.group(3)} input channels "
            f"but its input [{conv.group(2)}] has {conv.group(4)}"
        )
    linear = re.search(r"shapes cannot be multiplied \((\d+)x(\d+) and (\d+)x(\d+)\)", text)
    if linear:
        return (
            f"a Linear layer expects {linear.group(3)} input features (the last dim) "
            f"but got {linear.group(2)}"
        )
    rank = re.search(r"expected (\d+)D input \(got (\d+)D input\)", text, re.I)
    if rank:
        return (
            f"a layer expects a {rank.group(1)}-D input but got {rank.group(2)}-D "
            f"(a missing batch dimension? x.unsqueeze(0) adds one)"
        )
    return ""


def _advice(cause: str, model: nn.Module, failures, inputs: ExampleInputs | None) -> list[str]:
    given = _describe_inputs(inputs)
    params = [p for p in model.parameters()]
    if cause == "shape":
        detail = _shape_detail(failures)
        return [
            "  - the example inputs do not have the shape the model expects"
            + (f": {detail}" if detail else "")
            + ".",
            f"  - inputs given to {_forward_signature(model)}: {given}.",
            "  - pass inputs shaped like real ones, e.g. torch.randn(1, 3, 224, 224) for an "
            "image model (batch, channels, height, width).",
        ]
    if cause == "dtype":
        dtype = str(params[0].dtype).replace("torch.", "") if params else "?"
        return [
            f"  - an input has a dtype the model cannot take (inputs given: {given}; "
            f"parameters are {dtype}).",
            "  - cast it: x.float() (or the parameters' dtype) for images and features, "
            "ids.long() for token ids.",
        ]
    if cause == "device":
        device = str(params[0].device) if params else "?"
        return [
            f"  - the inputs and the model are on different devices (inputs: {given}; "
            f"parameters on {device}).",
            "  - move them together: model.to(x.device), or x.to(next(model.parameters()).device).",
        ]
    if cause == "arguments":
        return [
            f"  - the example inputs do not match {_forward_signature(model)}: given {given}.",
            "  - pass one input per required argument: a tuple in order, or a dict by name, "
            "e.g. {'x': x, 'mask': mask}.",
        ]
    if cause == "unsupported":
        return [
            "  - the model uses an op or module the tracers cannot handle: mark the submodule "
            "as a leaf, fxprune.trace(..., leaf_modules=[MyBlock]) (its channels are then frozen),",
            "  - or try the other frontend (frontend='export' or frontend='fx').",
        ]
    return [
        "  - mark the submodule with data-dependent control flow as a leaf: "
        "fxprune.trace(..., leaf_modules=[MyBlock]) (its channels are then frozen),",
        "  - fix non-tensor arguments with concrete_args={'flag': False},",
        "  - or try the other frontend (frontend='export' or frontend='fx').",
    ]


def _trace_error(
    model: nn.Module,
    failures: list[tuple[str, BaseException]],
    inputs: ExampleInputs | None = None,
) -> TraceError:
    lines = [f"could not trace {type(model).__name__}:"]
    for frontend, exc in failures:
        where = _user_frame(exc)
        lines.append(f"  - {frontend}: {_one_line(exc)}")
        if where:
            lines.append(f"      at {where}")
    lines += ["How to fix:", *_advice(_cause(failures), model, failures, inputs)]
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
