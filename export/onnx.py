"""Lower a PyTorch module to a checked ONNX file whose numbers agree with PyTorch.

`to_onnx` exports with the dynamo exporter (the TorchScript exporter where torch.export
cannot capture the model, as for torchvision's detectors; optionally with a dynamic batch
dimension and in float16), runs the full ONNX checker, then runs the file in ONNX Runtime on
the CPU and compares every output with the PyTorch module. The file appears at its path only
after all of that passed, so a reader never sees a half-written or unverified model.
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils import _pytree as pytree

from fxprune import validate
from fxprune.errors import ExportError, TraceError
from fxprune.files import temp_dir_beside
from fxprune.trace import ExampleInputs as Inputs
from fxprune.trace import batch_of_two

logger = logging.getLogger(__name__)

# Weights of this size or more go to an external-data file beside the model: a protobuf file
# holds at most 2 GiB. Counted on the module's state and on the exported initializers, which
# can hold more (constants the exporter folded).
_EXTERNAL_DATA_BYTES = 2**31 - 1
# Metadata keys that build_engine reads to pick optimization-profile shapes.
META_EXAMPLE_SHAPES = "fxprune.example_shapes"
META_DYNAMIC_BATCH = "fxprune.dynamic_batch"
# Tolerances relative to each output's scale (max |reference|); fp16 keeps ~3 decimal digits.
_DEFAULT_TOLERANCE = {False: (1e-3, 1e-4), True: (1e-2, 1e-4)}

ExampleInputs = torch.Tensor | Sequence[Any] | Mapping[str, Any]


@dataclass
class OutputError:
    """How far one ONNX Runtime output is from PyTorch's."""

    name: str
    max_abs_err: float
    max_rel_err: float  # max_abs_err / max |reference|
    scale: float
    allowed_abs_err: float

    @property
    def ok(self) -> bool:
        return self.max_abs_err <= self.allowed_abs_err


@dataclass
class OnnxExportResult:
    """What `to_onnx` wrote and how closely ONNX Runtime reproduces PyTorch on it."""

    path: str
    max_abs_err: float
    max_rel_err: float
    input_names: list[str]
    output_names: list[str]
    opset: int
    fp16: bool = False
    dynamic_batch: bool = True
    outputs: list[OutputError] = field(default_factory=list)

    def __str__(self) -> str:
        precision = "fp16" if self.fp16 else "fp32"
        return (
            f"{self.path} (opset {self.opset}, {precision}, "
            f"{'dynamic' if self.dynamic_batch else 'static'} batch): "
            f"max abs err {self.max_abs_err:.3g}, max rel err {self.max_rel_err:.3g}"
        )


def split_example_inputs(example_inputs: ExampleInputs) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Turn a tensor, a tuple/list of positional inputs or a dict of keyword inputs into (args, kwargs)."""
    try:
        ex = Inputs.of(example_inputs)  # the one rule every frontend uses
    except TraceError as exc:
        raise ExportError(str(exc)) from None
    return ex.args, dict(ex.kwargs)


def named_tensor_inputs(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> list[tuple[str, torch.Tensor]]:
    """The tensor leaves of the inputs, in the order the exporter makes graph inputs, with names.

    The dynamo exporter names a graph input after the forward parameter it binds to (or
    the keyword), so binding to the signature recovers the names ONNX Runtime expects.
    """
    named: list[tuple[str, torch.Tensor]] = []
    for param_name, value in _bound_arguments(module, args, kwargs).items():
        leaves = [leaf for leaf in pytree.tree_leaves(value) if isinstance(leaf, torch.Tensor)]
        if isinstance(value, torch.Tensor):
            named.append((param_name, value))
        else:
            named.extend((f"{param_name}_{i}", leaf) for i, leaf in enumerate(leaves))
    return named


def _bound_arguments(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> dict[str, Any]:
    """The inputs by the name of the forward parameter each binds to (``input_<i>`` when
    the signature cannot bind them)."""
    try:
        return dict(inspect.signature(module.forward).bind(*args, **kwargs).arguments)
    except (TypeError, ValueError):
        return {**{f"input_{i}": a for i, a in enumerate(args)}, **kwargs}


def ort_feed(
    input_names: Sequence[str], named_inputs: Sequence[tuple[str, torch.Tensor]]
) -> dict[str, np.ndarray]:
    """Numpy feeds for an ONNX Runtime session: matched by name, the rest by position."""
    by_name = dict(named_inputs)
    unnamed = [t for n, t in named_inputs if n not in input_names]
    feed: dict[str, np.ndarray] = {}
    for name in input_names:
        tensor = by_name[name] if name in by_name else (unnamed.pop(0) if unnamed else None)
        if tensor is None:
            raise ExportError(
                f"the ONNX graph expects an input {name!r} that the example inputs do not "
                f"provide (given: {[n for n, _ in named_inputs]})"
            )
        feed[name] = tensor.detach().cpu().contiguous().numpy()
    return feed


def _is_tensor(x: Any) -> bool:
    return isinstance(x, torch.Tensor)


def _keyed_outputs(outputs: Any) -> bool:
    """Whether the exporter can flatten ``outputs`` with key paths (it needs them)."""
    try:
        pytree.tree_flatten_with_path(outputs)
    except ValueError:
        return False
    return True


class _TensorOutputs(nn.Module):
    """``module`` returning its output's tensors as a tuple: for output containers the
    exporter cannot flatten (registered with pytree but without key paths)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, ...]:
        return tuple(t for _, t in flatten_outputs(self.module(*args, **kwargs)))


def _tensor_outputs(module: nn.Module) -> nn.Module:
    """A :class:`_TensorOutputs` whose ``forward`` has ``module``'s signature, which the
    exporter matches inputs and dynamic shapes against."""
    sig = inspect.signature(module.forward)
    this = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)

    def forward(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, ...]:
        return _TensorOutputs.forward(self, *args, **kwargs)

    forward.__signature__ = sig.replace(parameters=[this, *sig.parameters.values()])
    cls = type(f"{type(module).__name__}TensorOutputs", (_TensorOutputs,), {"forward": forward})
    wrapper = cls(module)
    wrapper.training = False  # its own flag only: the module inside keeps its mode
    return wrapper


def flatten_outputs(outputs: Any) -> list[tuple[str, torch.Tensor]]:
    """Tensor leaves of a model output (tensor, tuple, dict, ModelOutput) with readable names.

    The names follow the pytree path (`logits`, `output.0`, `pooled.1`) because the
    exporter flattens outputs in the same pytree order.
    """
    if isinstance(outputs, torch.Tensor):
        return [("output", outputs)]
    if not _keyed_outputs(outputs):  # a container registered without key paths (diffusers)
        leaves = pytree.tree_flatten(outputs)[0]
        return [(f"output.{i}", t) for i, t in enumerate(x for x in leaves if _is_tensor(x))]
    leaves, _ = pytree.tree_flatten_with_path(outputs)
    named = []
    for key_path, leaf in leaves:
        if not isinstance(leaf, torch.Tensor):
            continue
        parts = []
        for key in key_path:
            for attr in ("key", "idx", "name"):
                if hasattr(key, attr):
                    parts.append(str(getattr(key, attr)))
                    break
        name = ".".join(parts)
        if not name or name[0].isdigit():
            name = f"output.{name}" if name else "output"
        named.append((name, leaf))
    return named


def _batch_dynamic_shapes(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """dynamic_shapes marking dim 0 of every tensor input (of rank >= 1) as one shared batch."""
    batch = torch.export.Dim("batch")

    def spec(value: Any) -> Any:
        return pytree.tree_map(
            lambda leaf: {0: batch} if isinstance(leaf, torch.Tensor) and leaf.dim() > 0 else None,
            value,
        )

    if kwargs:
        return {name: spec(value) for name, value in kwargs.items()}
    return tuple(spec(a) for a in args)


def _check_batch_is_dynamic(program: Any, module_name: str) -> None:
    static = [
        f"{value.name} {list(value.shape.dims)}"
        for value in program.model.graph.inputs
        if value.shape is not None and len(value.shape) > 0 and isinstance(value.shape[0], int)
    ]
    if static:
        raise ExportError(
            f"dynamic_batch=True but the exported {module_name} has a fixed batch size on inputs "
            f"{static}: the model fixes dim 0 somewhere (a view/reshape with a constant batch?). "
            "Export with dynamic_batch=False, or make the model batch-agnostic."
        )


def _to_half(value: Any) -> Any:
    return pytree.tree_map(
        lambda t: t.half() if isinstance(t, torch.Tensor) and t.is_floating_point() else t, value
    )


def _state_bytes(module: nn.Module, fp16: bool) -> int:
    tensors = [*module.parameters(), *module.buffers()]
    return sum(
        t.numel() * (2 if fp16 and t.is_floating_point() else t.element_size()) for t in tensors
    )


def _initializer_bytes(program: Any) -> int:
    """Bytes of the exported model's initializers (its weights as written)."""
    values = program.model.graph.initializers.values()
    return sum(v.const_value.nbytes for v in values if v.const_value is not None)


def eval_version(module: nn.Module) -> nn.Module:
    """``module`` itself when it is in eval mode, else an eval-mode copy.

    Switching the caller's module to eval, even for the duration of the export, would change
    an object the caller owns (and may be training in another thread).
    """
    if not any(m.training for m in module.modules()):
        return module
    copied = copy.deepcopy(module)
    for m in copied.modules():  # per module: torch.export graph modules refuse .eval()
        m.training = False
    return copied


def _ort_session(path: Path, fp16: bool):
    import onnxruntime as ort

    options = ort.SessionOptions()
    # ORT 1.31 crashes (SIGSEGV, uncatchable) while applying its ENABLE_ALL fusions to
    # float16 attention graphs on the CPU; EXTENDED keeps every semantic-preserving rewrite
    # that matters for a numerical check.
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        if fp16
        else ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    )
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _output_error(
    name: str, got: np.ndarray, want: np.ndarray, rtol: float, atol: float
) -> OutputError:
    got64 = got.astype(np.float64)
    want64 = want.astype(np.float64)
    diff = np.abs(got64 - want64)
    # NaN in the same place on both sides is agreement; anywhere else it is an infinite error.
    both_nan = np.isnan(got64) & np.isnan(want64)
    diff = np.where(both_nan, 0.0, np.nan_to_num(diff, nan=np.inf))
    finite_ref = np.abs(want64[np.isfinite(want64)])
    scale = float(finite_ref.max()) if finite_ref.size else 0.0
    max_abs = float(diff.max()) if diff.size else 0.0
    return OutputError(
        name=name,
        max_abs_err=max_abs,
        max_rel_err=max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf),
        scale=scale,
        allowed_abs_err=atol + rtol * scale,
    )


def compare_with_ort(
    path: str | os.PathLike,
    named_inputs: Sequence[tuple[str, torch.Tensor]],
    reference: Sequence[tuple[str, torch.Tensor]],
    *,
    rtol: float,
    atol: float,
    fp16: bool = False,
) -> list[OutputError]:
    """Run the ONNX file in ONNX Runtime (CPU) and measure each output against `reference`."""
    session = _ort_session(Path(path), fp16)
    input_names = [i.name for i in session.get_inputs()]
    output_names = [o.name for o in session.get_outputs()]
    if len(output_names) != len(reference):
        raise ExportError(
            f"{path}: ONNX graph has {len(output_names)} outputs {output_names} but the "
            f"PyTorch module returns {len(reference)} tensors {[n for n, _ in reference]}"
        )
    got = session.run(None, ort_feed(input_names, named_inputs))
    errors = []
    for onnx_name, array, (ref_name, ref) in zip(output_names, got, reference):
        want = ref.detach().float().cpu().numpy() if ref.is_floating_point() else ref.cpu().numpy()
        if array.shape != want.shape:
            raise ExportError(
                f"{path}: output {onnx_name!r} has shape {list(array.shape)} in ONNX Runtime but "
                f"{list(want.shape)} in PyTorch ({ref_name})"
            )
        errors.append(_output_error(onnx_name, array, want, rtol, atol))
    return errors


def _worst(errors: Sequence[OutputError]) -> OutputError:
    return max(
        errors,
        key=lambda e: (
            e.max_abs_err / e.allowed_abs_err
            if e.allowed_abs_err
            else (math.inf if e.max_abs_err else 0.0)
        ),
    )


def to_onnx(
    module: nn.Module,
    example_inputs: ExampleInputs,
    path: str | os.PathLike,
    fp16: bool = False,
    dynamic_batch: bool = True,
    opset: int | None = None,
    rtol: float | None = None,
    atol: float | None = None,
) -> OnnxExportResult:
    """Export `module` to a checked ONNX file at `path` and verify it in ONNX Runtime.

    example_inputs: a tensor, a tuple of positional inputs, or a dict of keyword inputs.
    fp16: write float16 weights and activations (exported from a half copy of the module);
        the check compares with the float32 module, so the default tolerance loosens.
    dynamic_batch: dim 0 of every tensor input becomes one symbolic `batch` dimension.
    rtol, atol: an output passes when max |onnx - torch| <= atol + rtol * max |torch|;
        defaults are (1e-3, 1e-4) for fp32 and (1e-2, 1e-4) for fp16.

    Raises ExportError (and writes nothing at `path`) when the folder is missing, the
    exporter or the checker fails, or an output exceeds the tolerance.
    """
    _check_arguments(module, example_inputs, path, fp16, dynamic_batch, opset, rtol, atol)
    default_rtol, default_atol = _DEFAULT_TOLERANCE[bool(fp16)]
    rtol = default_rtol if rtol is None else rtol
    atol = default_atol if atol is None else atol
    path = Path(path)
    folder = path.parent.resolve()
    if not folder.is_dir():
        raise ExportError(
            f"cannot write {path}: the folder {folder} does not exist (create it first)"
        )
    args, kwargs = split_example_inputs(example_inputs)
    named_inputs = named_tensor_inputs(module, args, kwargs)

    module = eval_version(module)
    with torch.no_grad():
        raw = module(*args, **kwargs)
        reference = flatten_outputs(raw)
    if not _keyed_outputs(raw):
        module = _tensor_outputs(module)
    if not reference:
        raise ExportError(f"{type(module).__name__} returns no tensors; nothing to export")
    if fp16:
        # A copy: the caller keeps a float32 module, and .half() would change it in place.
        export_module = copy.deepcopy(module).half()
        for m in export_module.modules():
            m.training = False
        args, kwargs = _to_half(args), _to_half(kwargs)
        named_inputs = [(n, _to_half(t)) for n, t in named_inputs]
    else:
        export_module = module
    if dynamic_batch:
        # torch.export specializes a size-1 dimension to the constant 1 (its "0/1
        # specialization"), silently making the batch static, so trace with batch 2.
        args, kwargs = batch_of_two(args), batch_of_two(kwargs)
        program = _export(
            export_module, args, kwargs, _batch_dynamic_shapes(args, kwargs), opset, reference
        )
        _check_batch_is_dynamic(program, type(module).__name__)
    else:
        program = _export(export_module, args, kwargs, None, opset, reference)

    program.model.metadata_props[META_EXAMPLE_SHAPES] = json.dumps(
        {name: list(t.shape) for name, t in named_inputs}
    )
    program.model.metadata_props[META_DYNAMIC_BATCH] = json.dumps(bool(dynamic_batch))
    large = max(_state_bytes(module, fp16), _initializer_bytes(program)) >= _EXTERNAL_DATA_BYTES
    # The temp folder sits beside the target so the final os.replace is an atomic rename on
    # the same filesystem, and it uses the final file name so external-data locations
    # written into the model stay valid after the move.
    model_proto, errors = _write_checked(
        program, path, named_inputs, reference, large, rtol, atol, fp16
    )

    opset_version = next(
        (o.version for o in model_proto.opset_import if o.domain in ("", "ai.onnx")), -1
    )
    result = OnnxExportResult(
        path=str(path),
        max_abs_err=max(e.max_abs_err for e in errors),
        max_rel_err=max(e.max_rel_err for e in errors),
        input_names=[i.name for i in model_proto.graph.input],
        output_names=[o.name for o in model_proto.graph.output],
        opset=opset_version,
        fp16=bool(fp16),
        dynamic_batch=bool(dynamic_batch),
        outputs=errors,
    )
    logger.info("exported %s", result)
    return result


def supported_opsets() -> tuple[int, int]:
    """(lowest, highest) opset the installed dynamo exporter writes as asked.

    Below torchlib's own opset the exporter warns and keeps that opset, so the file
    would silently not be what was asked for.
    """
    try:
        from torch.onnx._constants import ONNX_MAX_OPSET
        from torch.onnx._internal.exporter._constants import TORCHLIB_OPSET
    except ImportError:  # private modules: fall back to the torch 2.9 values
        return 18, 23
    return int(TORCHLIB_OPSET), int(ONNX_MAX_OPSET)


def _check_arguments(
    module: Any,
    example_inputs: Any,
    path: Any,
    fp16: Any,
    dynamic_batch: Any,
    opset: Any,
    rtol: Any,
    atol: Any,
) -> None:
    """Every argument of `to_onnx`, before the (slow) export starts."""
    validate.module("module", module, ExportError)
    validate.example_inputs(example_inputs, ExportError)
    validate.path_like("path", path, ExportError)
    validate.boolean("fp16", fp16, ExportError)
    validate.boolean("dynamic_batch", dynamic_batch, ExportError)
    if opset is not None:
        low, high = supported_opsets()
        if not isinstance(opset, int) or isinstance(opset, bool) or not low <= opset <= high:
            raise ExportError(
                f"opset must be an integer in [{low}, {high}] (the opsets the installed "
                f"torch.onnx dynamo exporter writes), got {validate.show(opset)}. Leave it "
                f"None for the exporter's default."
            )
    for name, value in (("rtol", rtol), ("atol", atol)):
        if value is not None:
            validate.finite_non_negative(
                name,
                value,
                "an output passes when |onnx - torch| <= atol + rtol * scale",
                ExportError,
            )


def _tensor_arguments(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> set[str]:
    """Names of the forward arguments that are tensors themselves (not lists of them)."""
    bound = _bound_arguments(module, args, kwargs)
    return {n for n, v in bound.items() if isinstance(v, torch.Tensor) and v.dim() > 0}


class _ScriptProgram:
    """What the TorchScript exporter wrote, read back as an ONNX IR model: the two things
    :func:`to_onnx` uses of the dynamo exporter's ``ONNXProgram``."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def save(self, path: str | os.PathLike, external_data: bool = False) -> None:
        import onnx_ir as ir

        ir.save(
            self.model, path, external_data=f"{Path(path).name}.data" if external_data else None
        )


@dataclass(frozen=True)
class _ExportCall:
    """What every exporter is given: the module, its example inputs, the batch's dynamic
    shapes (None: static), the opset and the reference outputs (their names)."""

    module: nn.Module
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    dynamic_shapes: Any
    opset: int | None
    reference: Sequence[tuple[str, torch.Tensor]]

    @property
    def output_names(self) -> list[str]:
        return [n for n, _ in self.reference]


def _export_dynamo(call: _ExportCall, rewrite: bool = False):
    """``torch.onnx.export(dynamo=True)`` of the module; ``rewrite``: of its exported
    program with the ops in :data:`_ONNX_REWRITES` rewritten into forms the exporter
    translates."""
    model: Any = call.module
    if rewrite:
        program = torch.export.export(
            call.module,
            call.args,
            call.kwargs or None,
            dynamic_shapes=call.dynamic_shapes,
            strict=False,
        )
        model = program.run_decompositions(dict(_ONNX_REWRITES))
    return torch.onnx.export(
        model,
        call.args,
        kwargs=call.kwargs or None,
        dynamo=True,
        dynamic_shapes=None if rewrite else call.dynamic_shapes,
        opset_version=call.opset,
        output_names=call.output_names,
        verbose=False,
        report=False,
    )


def _sdpa_as_matmuls(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    *,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Any:
    """``scaled_dot_product_attention`` as the products and softmax it stands for, at any
    rank. The exporter translates the op at rank 4 only (Twins', NesT's and Hiera's grouped
    attention is (batch, groups, heads, tokens, dim)), and a graph torch.export recorded
    around the attention kernel's output strides (a bare view of its transposed output, in
    Hugging Face's Swin) fails once the exporter swaps that kernel for its own. Dropout
    (``dropout_p > 0``) is left to the exporter (``NotImplemented``)."""
    if dropout_p:
        return NotImplemented
    if enable_gqa and query.shape[-3] != key.shape[-3]:
        repeat = query.shape[-3] // key.shape[-3]
        key = key.repeat_interleave(repeat, dim=-3)
        value = value.repeat_interleave(repeat, dim=-3)
    factor = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    scores = torch.matmul(query, key.transpose(-2, -1)) * factor
    if is_causal:
        keep = torch.ones(
            query.shape[-2], key.shape[-2], dtype=torch.bool, device=query.device
        ).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    return torch.matmul(scores.softmax(dim=-1), value)


# aten ops the ONNX exporter fails on in some forms, and their rewrites into forms it takes
_ONNX_REWRITES = {torch.ops.aten.scaled_dot_product_attention.default: _sdpa_as_matmuls}


def _export_torchscript(call: _ExportCall) -> _ScriptProgram:
    """Export with ``torch.onnx.export(..., dynamo=False)`` (tracing, as torchvision's own
    ONNX tests do for its detectors), to a temporary file read back into memory."""
    import tempfile

    import onnx_ir as ir

    module, args, kwargs, dynamic_shapes = call.module, call.args, call.kwargs, call.dynamic_shapes
    named = named_tensor_inputs(module, args, kwargs)
    names = [n for n, _ in named]
    axes = None
    if dynamic_shapes is not None:
        # Only a tensor argument has a batch dim; one in a list is a sample (a detector's
        # unbatched images), and the list's length is fixed by tracing.
        axes = {n: {0: "batch"} for n, t in named if n in _tensor_arguments(module, args, kwargs)}
        if not axes:
            raise ExportError(
                "no input is a batched tensor (a list of unbatched images?), so the batch "
                "cannot be dynamic: export with dynamic_batch=False"
            )
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer warns on every python-level shape read
        file = Path(tmp) / "model.onnx"
        torch.onnx.export(
            module,
            args + ((kwargs,) if kwargs else ()),
            str(file),
            dynamo=False,
            opset_version=call.opset or 17,
            input_names=names,
            output_names=call.output_names,
            dynamic_axes=axes,
        )
        model = ir.load(file)
        for value in model.graph.initializers.values():  # read before the folder goes
            if value.const_value is not None:
                value.const_value = ir.Tensor(value.const_value.numpy())
    return _ScriptProgram(model)


def _write_checked(program, path: Path, named_inputs, reference, large: bool, rtol, atol, fp16):
    """Save ``program`` beside ``path``, check it (ONNX checker, ONNX Runtime vs ``reference``)
    and move it into place; nothing is written at ``path`` when a check fails."""
    import onnx  # here, not at import time: fxprune.export loads without onnx until used

    folder = path.parent.resolve()
    with temp_dir_beside(path) as tmp:  # pid-tagged: a killed run's folder is removed next time
        tmp_path = Path(tmp) / path.name
        program.save(tmp_path, external_data=large)
        try:
            onnx.checker.check_model(str(tmp_path), full_check=True)
        except Exception as exc:  # the checker raises several unrelated exception types
            raise ExportError(f"{path}: the exported model fails the ONNX checker: {exc}") from exc
        errors = compare_with_ort(
            tmp_path, named_inputs, reference, rtol=rtol, atol=atol, fp16=fp16
        )
        worst = _worst(errors)
        if not worst.ok:
            raise ExportError(
                f"{path}: ONNX Runtime disagrees with PyTorch on output {worst.name!r}: max abs "
                f"err {worst.max_abs_err:.3g} > allowed {worst.allowed_abs_err:.3g} (atol {atol:g} "
                f"+ rtol {rtol:g} x output scale {worst.scale:.3g}); max rel err "
                f"{worst.max_rel_err:.3g}. Nothing was written."
            )
        model_proto = onnx.load(str(tmp_path), load_external_data=False)
        for side_file in sorted(Path(tmp).iterdir()):
            if side_file != tmp_path:
                os.replace(side_file, folder / side_file.name)
        os.replace(tmp_path, path)
    return model_proto, errors


def _export(
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    dynamic_shapes: Any,
    opset: int | None,
    reference: Sequence[tuple[str, torch.Tensor]],
):
    """The dynamo exporter's program; where it fails, the same on the exported program with
    :data:`_ONNX_REWRITES` applied; where torch.export cannot capture the model (a
    torchvision detector's data-dependent box decoding and NMS), the TorchScript exporter's."""
    call = _ExportCall(module, args, kwargs, dynamic_shapes, opset, reference)
    rewritten = ", ".join(str(op) for op in _ONNX_REWRITES)
    attempts = (  # (how, export, what the log says when this one is the first to succeed)
        ("dynamo", lambda: _export_dynamo(call), ""),
        (
            "dynamo, rewritten",
            lambda: _export_dynamo(call, rewrite=True),
            f"with {rewritten} rewritten for the ONNX exporter",
        ),
        ("TorchScript", lambda: _export_torchscript(call), "with the TorchScript exporter"),
    )
    failures: list[Exception] = []
    with warnings.catch_warnings():
        # One shared Dim for every input's batch makes the exporter say it keeps one name.
        warnings.filterwarnings("ignore", message=r".*axis name.*will not be used.*")
        for how, export, note in attempts:
            try:
                program = export()
            except Exception as exc:  # the exporters raise many types; all mean "could not"
                logger.debug("the %s export of %s failed: %s", how, type(module).__name__, exc)
                failures.append(exc)
                continue
            if failures:
                first = failures[0]
                logger.info(
                    "the dynamo exporter failed for %s (%s: %s); exported %s",
                    type(module).__name__,
                    type(first).__name__,
                    str(first).splitlines()[0] if str(first) else "",
                    note,
                )
            break
        else:
            first, last = failures[0], failures[-1]
            hint = (
                " If the model fixes its batch size somewhere (or takes a list of "
                "unbatched images, as torchvision's detectors do), retry with "
                "dynamic_batch=False."
                if dynamic_shapes is not None
                else ""
            )
            raise ExportError(
                f"torch.onnx.export (dynamo) failed for {type(module).__name__}: "
                f"{type(first).__name__}: {first}; the TorchScript exporter failed too: "
                f"{type(last).__name__}: {last}.{hint}"
            ) from first
    if program is None:
        raise ExportError("torch.onnx.export returned no program")
    return program
