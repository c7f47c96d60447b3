"""Build TensorRT engines (optionally with 2:4 sparse weights) from ONNX files, and run them.

Two runtimes share one Python API: NVIDIA TensorRT (`tensorrt`, needs a GPU to build)
and TensorRT-RTX (`tensorrt_rtx`, builds ahead of time on the CPU; running needs a GPU).
`build_engine` picks TensorRT when it is installed and a GPU is present, TensorRT-RTX
otherwise, and smooths over the API differences between TensorRT 8/10/11 and RTX:

- precision: TensorRT 10 has FP16/INT8 builder flags; TensorRT 11 and RTX removed them
  and networks are strongly typed, so precision must already be in the ONNX file
  (`to_onnx(..., fp16=True)`);
- `BuilderFlag.SPARSE_WEIGHTS` exists everywhere and lets the builder pick sparse kernels
  for layers whose weights have a 2:4 pattern;
- timing caches are no-ops (deprecated) in TensorRT-RTX.

After a build on a GPU, the engine inspector says which layers picked sparse kernels.
Without a GPU the engine cannot be deserialized, so the result says so and keeps what
the builder reported instead.
"""

from __future__ import annotations

import difflib
import importlib
import json
import logging
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fxprune.errors import ExportError
from fxprune.export.onnx import META_EXAMPLE_SHAPES
from fxprune.files import write_bytes_atomic

logger = logging.getLogger(__name__)

RUNTIMES = ("tensorrt", "tensorrt_rtx")
INSTALL_HINT = "pip install 'fxprune[trt-rtx]' (CPU-only ahead-of-time builds) or 'fxprune[trt]'"
NO_GPU_REASON = (
    "engine built ahead of time on the CPU; it cannot be deserialized, run or inspected for "
    "tactics without an NVIDIA GPU"
)
# ONNX TensorProto element types that decide the engine's precision in strongly typed mode.
_ONNX_FLOAT_TYPES = {1: "fp32", 10: "fp16", 16: "bf16"}


@dataclass
class EngineLayer:
    """One layer of a built engine: its kernel (tactic) and whether that kernel is sparse."""

    name: str
    layer_type: str
    tactic: str
    sparse: bool | None  # None: the source does not say
    source: str  # "inspector" (engine inspector JSON) or "builder log"


@dataclass
class EngineBuildResult:
    """What `build_engine` produced and what is known about the engine's kernels."""

    engine_path: str
    onnx_path: str
    runtime: str  # "tensorrt" or "tensorrt_rtx"
    runtime_version: str
    build_seconds: float
    engine_bytes: int
    sparse_weights: bool  # BuilderFlag.SPARSE_WEIGHTS was set
    builder_flags: list[str]  # every BuilderFlag the config had at build time
    precision: str  # floating types found in the ONNX file: fp32, fp16, bf16 or a mix
    profile: dict[str, list[list[int]]]  # input -> [min, opt, max] shape
    gpu_present: bool
    runnable: bool  # deserialized on this machine
    runnable_reason: str  # why not, or "" when runnable
    engine_validity: str | None = None  # TensorRT-RTX header check, when available
    layers: list[EngineLayer] = field(default_factory=list)
    sparse_layers: list[str] = field(default_factory=list)
    sparsity_log: list[str] = field(default_factory=list)  # builder's "(Sparsity) ..." lines
    timing_cache: str | None = None  # file saved after the build
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def inspected(self) -> bool:
        """Whether the layers come from the engine inspector (a GPU was needed for that)."""
        return any(layer.source == "inspector" for layer in self.layers)

    def __str__(self) -> str:
        lines = [
            f"{self.engine_path}: {self.runtime} {self.runtime_version}, {self.precision}, "
            f"{self.engine_bytes} bytes, built in {self.build_seconds:.2f} s, "
            f"SPARSE_WEIGHTS {'on' if self.sparse_weights else 'off'}",
            f"profile: {self.profile}",
        ]
        if self.runnable:
            lines.append(
                f"sparse kernels in {len(self.sparse_layers)}/{len(self.layers)} layers: "
                f"{self.sparse_layers}"
            )
        else:
            lines.append(f"not runnable here: {self.runnable_reason}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def gpu_available() -> bool:
    """Whether an NVIDIA GPU with a working driver is visible (through torch's CUDA runtime)."""
    return torch.cuda.is_available()


def available_runtimes() -> list[str]:
    """TensorRT Python modules importable here, in preference order."""
    found = []
    for name in RUNTIMES:
        try:
            importlib.import_module(name)
        except ImportError:
            continue
        found.append(name)
    return found


def _select_runtime(runtime: str) -> tuple[Any, str]:
    if runtime not in ("auto", *RUNTIMES):
        raise ExportError(f"runtime must be 'auto' or one of {RUNTIMES}, not {runtime!r}")
    found = available_runtimes()
    if runtime == "auto":
        if "tensorrt" in found and gpu_available():
            runtime = "tensorrt"
        elif "tensorrt_rtx" in found:
            runtime = "tensorrt_rtx"
        elif "tensorrt" in found:
            raise ExportError(
                "only the standard `tensorrt` module is installed and it needs an NVIDIA GPU to "
                "build engines, but none is visible; for CPU-only ahead-of-time builds "
                f"install TensorRT-RTX: {INSTALL_HINT}"
            )
        else:
            raise ExportError(f"neither `tensorrt` nor `tensorrt_rtx` is installed: {INSTALL_HINT}")
    elif runtime not in found:
        raise ExportError(f"`{runtime}` is not installed: {INSTALL_HINT}")
    return importlib.import_module(runtime), runtime


def _major(trt: Any) -> int:
    return int(str(trt.__version__).split(".")[0])


def _make_logger(trt: Any) -> Any:
    """A TensorRT logger that keeps every message (for error reports) and forwards to logging."""

    severity = trt.ILogger.Severity
    to_python = {
        severity.INTERNAL_ERROR: logging.ERROR,
        severity.ERROR: logging.ERROR,
        severity.WARNING: logging.WARNING,
        severity.INFO: logging.DEBUG,
        severity.VERBOSE: logging.DEBUG - 5,
    }

    class CapturingLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.messages: list[tuple[Any, str]] = []

        def log(self, sev: Any, msg: str) -> None:
            # Verbose messages can run to many megabytes; only the layer report is needed.
            if sev != severity.VERBOSE or msg.startswith("Layers:"):
                self.messages.append((sev, msg))
            level = to_python.get(sev, logging.DEBUG)
            if level >= logging.ERROR and "cudaError 35" in msg:
                # No GPU driver: expected when an engine is built ahead of time on a CPU; the
                # build result says so once instead of three error lines.
                level = logging.DEBUG
            logger.log(level, "[%s] %s", trt.__name__, msg)

        def errors(self, since: int = 0) -> list[str]:
            bad = (severity.INTERNAL_ERROR, severity.ERROR)
            return [m for s, m in self.messages[since:] if s in bad]

        def of_severity(self, sev: Any, since: int = 0) -> list[str]:
            return [m for s, m in self.messages[since:] if s == sev]

    return CapturingLogger()


@dataclass
class _OnnxFacts:
    precision: str
    example_shapes: dict[str, list[int]]


def _onnx_facts(onnx_path: Path) -> _OnnxFacts:
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    graph = model.graph
    types = {init.data_type for init in graph.initializer}
    types |= {v.type.tensor_type.elem_type for v in graph.input}
    floats = sorted({_ONNX_FLOAT_TYPES[t] for t in types if t in _ONNX_FLOAT_TYPES})
    meta = {p.key: p.value for p in model.metadata_props}
    example_shapes = json.loads(meta[META_EXAMPLE_SHAPES]) if META_EXAMPLE_SHAPES in meta else {}
    return _OnnxFacts(precision="+".join(floats) or "none", example_shapes=example_shapes)


def _profile_shapes(
    name: str,
    shape: Sequence[int],
    example: Sequence[int] | None,
    min_batch: int,
    opt_batch: int | None,
    max_batch: int,
) -> list[list[int]]:
    """[min, opt, max] for one input: dim 0 spans the batch range, other dynamic dims the example."""
    lows, opts, highs = [], [], []
    for axis, dim in enumerate(shape):
        if dim >= 0:
            lows.append(dim), opts.append(dim), highs.append(dim)
        elif axis == 0:
            example_batch = example[0] if example else None
            opt = opt_batch if opt_batch is not None else (example_batch or min_batch)
            lows.append(min_batch), opts.append(min(max(opt, min_batch), max_batch))
            highs.append(max_batch)
        elif example is not None and len(example) == len(shape):
            lows.append(example[axis]), opts.append(example[axis]), highs.append(example[axis])
        else:
            raise ExportError(
                f"input {name!r} has a dynamic dimension {axis} (shape {list(shape)}) and the ONNX "
                "file records no example shape for it (files from fxprune.export.to_onnx do); "
                "pass shapes={name: (min, opt, max)}"
            )
    return [lows, opts, highs]


def _network_flags(trt: Any, runtime: str, weakly_typed: bool) -> int:
    flags = 0
    creation = trt.NetworkDefinitionCreationFlag
    if hasattr(creation, "EXPLICIT_BATCH") and runtime == "tensorrt" and _major(trt) < 10:
        flags |= 1 << int(creation.EXPLICIT_BATCH)
    # TensorRT 10 defaults to weak typing; strong typing makes it honour the ONNX precision,
    # as TensorRT 11 and RTX always do (there the flag is deprecated and ignored).
    if (
        runtime == "tensorrt"
        and _major(trt) == 10
        and not weakly_typed
        and hasattr(creation, "STRONGLY_TYPED")
    ):
        flags |= 1 << int(creation.STRONGLY_TYPED)
    return flags


def _parse_onnx(trt: Any, network: Any, trt_logger: Any, onnx_path: Path) -> None:
    parser = trt.OnnxParser(network, trt_logger)
    # parse_from_file (not parse(bytes)) so weights in external-data files are found.
    if parser.parse_from_file(str(onnx_path)):
        return
    errors = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        where = f"node {err.node()} {err.node_name()!r} ({err.node_operator()})"
        errors.append(f"{where}: {err.desc()}")
    detail = "\n  ".join(errors or trt_logger.errors() or ["no error reported"])
    raise ExportError(f"{onnx_path}: the TensorRT ONNX parser failed:\n  {detail}")


def _write_whole(path: Path, data: bytes | memoryview) -> None:
    write_bytes_atomic(path, data)


_LAYER_LINE = re.compile(
    r"^Name: (?P<name>.*?), LayerType: (?P<type>[^,]*),.*?TacticName: (?P<tactic>[^,]*),"
)


def _layers_from_builder_log(messages: Sequence[str]) -> list[EngineLayer]:
    """Layers from the builder's detailed layer report (a verbose log message starting "Layers:").

    This is all that is known about the kernels when the engine cannot be deserialized.
    """
    layers: list[EngineLayer] = []
    for message in messages:
        if not message.startswith("Layers:"):
            continue
        for line in message.splitlines()[1:]:
            match = _LAYER_LINE.match(line.strip())
            if match is None:
                continue
            has_sparse = re.search(r"HasSparseWeights: (\d)", line)
            tactic = match["tactic"].strip()
            layers.append(
                EngineLayer(
                    name=match["name"],
                    layer_type=match["type"].strip(),
                    tactic=tactic,
                    sparse=_is_sparse(tactic, has_sparse[1] if has_sparse else None),
                    source="builder log",
                )
            )
    return layers


def _is_sparse(tactic: str, has_sparse_weights: Any) -> bool | None:
    if "sparse" in tactic.lower():
        return True
    if has_sparse_weights is None:
        return None
    return str(has_sparse_weights).strip().lower() in ("1", "true")


def _layers_from_inspector(engine: Any, trt: Any) -> list[EngineLayer]:
    inspector = engine.create_engine_inspector()
    info = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    layers = []
    for layer in info.get("Layers", []):
        if isinstance(layer, str):  # engines built without DETAILED verbosity give names only
            layers.append(EngineLayer(layer, "", "", None, "inspector"))
            continue
        tactic = str(layer.get("TacticName", ""))
        layers.append(
            EngineLayer(
                name=str(layer.get("Name", "")),
                layer_type=str(layer.get("LayerType", "")),
                tactic=tactic,
                sparse=_is_sparse(tactic, layer.get("HasSparseWeights")),
                source="inspector",
            )
        )
    return layers


def _engine_validity(trt: Any, runtime: Any, data: bytes) -> str | None:
    if not hasattr(runtime, "get_engine_validity"):
        return None
    try:
        validity, diagnostics = runtime.get_engine_validity(data)
    except Exception as exc:  # an optional diagnostic; its failure must not fail the build
        return f"unknown ({exc})"
    reasons = [
        name
        for name, flag in trt.EngineInvalidityDiagnostics.__members__.items()
        if diagnostics & int(flag)
    ]
    return f"{validity.name} (diagnostics: {', '.join(reasons) or 'none reported'})"


def _needs_fp16_flag(
    trt: Any,
    runtime_name: str,
    fp16: bool | None,
    facts: _OnnxFacts,
    onnx_path: Path,
    notes: list[str],
) -> bool:
    """Whether to build weakly typed with the FP16 flag (TensorRT 10 only); else keep the ONNX types."""
    has_fp16_flag = hasattr(trt.BuilderFlag, "FP16")
    if fp16 and not has_fp16_flag and "fp16" not in facts.precision:
        raise ExportError(
            f"fp16=True, but {runtime_name} {trt.__version__} has no FP16 builder flag (networks "
            f"are strongly typed) and {onnx_path} holds {facts.precision} weights: export it "
            "with fxprune.export.to_onnx(..., fp16=True)"
        )
    if fp16 is False and "fp16" in facts.precision:
        notes.append("fp16=False, but the ONNX file holds fp16 weights; its precision is kept")
    return bool(fp16) and has_fp16_flag and "fp16" not in facts.precision


def _add_profile(
    builder: Any,
    network: Any,
    config: Any,
    facts: _OnnxFacts,
    shapes: Mapping[str, Sequence[Sequence[int]]] | None,
    min_batch: int,
    opt_batch: int | None,
    max_batch: int,
) -> dict[str, list[list[int]]]:
    """One optimization profile covering every dynamic input; returns {input: [min, opt, max]}."""
    profile_shapes: dict[str, list[list[int]]] = {}
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    for name in shapes or {}:
        if name not in names:
            # a typo would otherwise silently build with the default profile
            close = difflib.get_close_matches(str(name), names, n=1)
            raise ExportError(
                f"shapes: {name!r} is not an input of the ONNX graph (inputs: {names})."
                + (f" Did you mean {close[0]!r}?" if close else "")
            )
        if len(shapes[name]) != 3:
            raise ExportError(
                f"shapes[{name!r}] must be (min_shape, opt_shape, max_shape), got {shapes[name]!r}."
            )
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = list(tensor.shape)
        if shapes and tensor.name in shapes:
            profile_shapes[tensor.name] = [list(s) for s in shapes[tensor.name]]
        elif any(d < 0 for d in shape):
            example = facts.example_shapes.get(tensor.name)
            profile_shapes[tensor.name] = _profile_shapes(
                tensor.name, shape, example, min_batch, opt_batch, max_batch
            )
    if profile_shapes:
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in profile_shapes.items():
            profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(profile)
    return profile_shapes


def build_engine(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike,
    sparse: bool = True,
    workspace: int | None = None,
    timing_cache: str | os.PathLike | None = None,
    fp16: bool | None = None,
    *,
    runtime: str = "auto",
    min_batch: int = 1,
    opt_batch: int | None = None,
    max_batch: int = 32,
    shapes: Mapping[str, Sequence[Sequence[int]]] | None = None,
) -> EngineBuildResult:
    """Build a serialized TensorRT engine from an ONNX file and write it whole to `engine_path`.

    sparse: set BuilderFlag.SPARSE_WEIGHTS so layers with 2:4 sparse weights may get sparse
        kernels (the builder decides per layer, by timing, on a GPU).
    workspace: workspace memory pool limit in bytes (None: the runtime's default).
    timing_cache: file to load the timing cache from (if it exists) and save it to after the
        build (TensorRT only; a no-op in TensorRT-RTX, noted in the result).
    fp16: None takes the precision from the ONNX file. True on TensorRT 10 sets the FP16
        builder flag; on TensorRT 11 and RTX (no such flag) it requires an fp16 ONNX file.
    runtime: "auto" (TensorRT with a GPU, else TensorRT-RTX), "tensorrt" or "tensorrt_rtx".
    min_batch, opt_batch, max_batch: optimization profile for a dynamic dim 0; opt defaults
        to the example batch recorded by `to_onnx`. `shapes` overrides it per input:
        {name: (min_shape, opt_shape, max_shape)}.
    """
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    _check_build_arguments(onnx_path, engine_path, min_batch, max_batch)
    trt, runtime_name = _select_runtime(runtime)
    gpu = gpu_available()
    if runtime_name == "tensorrt" and not gpu:
        raise ExportError(
            f"the standard TensorRT builder needs an NVIDIA GPU and none is visible; use "
            f"runtime='tensorrt_rtx' for CPU-only ahead-of-time builds ({INSTALL_HINT})"
        )
    facts = _onnx_facts(onnx_path)
    notes: list[str] = []
    weakly_typed = _needs_fp16_flag(trt, runtime_name, fp16, facts, onnx_path, notes)

    trt_logger = _make_logger(trt)
    builder = trt.Builder(trt_logger)
    network = builder.create_network(_network_flags(trt, runtime_name, weakly_typed))
    _parse_onnx(trt, network, trt_logger, onnx_path)
    config = _builder_config(trt, builder, runtime_name, weakly_typed, sparse, workspace)
    profile_shapes = _add_profile(
        builder, network, config, facts, shapes, min_batch, opt_batch, max_batch
    )
    cache_path = _use_timing_cache(config, runtime_name, timing_cache, notes)
    flags_set = [
        name for name, flag in trt.BuilderFlag.__members__.items() if config.get_flag(flag)
    ]
    start = time.perf_counter()
    try:
        serialized = builder.build_serialized_network(network, config)
    except Exception as exc:  # the bindings raise on some failures, return None on others
        raise ExportError(f"TensorRT build of {onnx_path} failed: {exc}") from exc
    build_seconds = time.perf_counter() - start
    if serialized is None:
        detail = "\n  ".join(trt_logger.errors() or ["no error was logged"])
        hint = "" if gpu else " (no GPU is visible on this machine)"
        raise ExportError(f"TensorRT build of {onnx_path} failed{hint}:\n  {detail}")
    data = bytes(serialized)
    _write_whole(engine_path, data)
    saved_cache = None
    if cache_path is not None:
        _write_whole(cache_path, bytes(config.get_timing_cache().serialize()))
        saved_cache = str(cache_path)

    result = EngineBuildResult(
        engine_path=str(engine_path),
        onnx_path=str(onnx_path),
        runtime=runtime_name,
        runtime_version=str(trt.__version__),
        build_seconds=build_seconds,
        engine_bytes=len(data),
        sparse_weights=bool(sparse),
        builder_flags=flags_set,
        precision=facts.precision,
        profile=profile_shapes,
        gpu_present=gpu,
        runnable=False,
        runnable_reason="",
        timing_cache=saved_cache,
        notes=notes,
        sparsity_log=[m for _, m in trt_logger.messages if "(Sparsity)" in m],
    )
    _inspect(result, trt, trt_logger, data)
    result.warnings = trt_logger.of_severity(trt.ILogger.Severity.WARNING)
    logger.info("built %s", result)
    return result


def _check_build_arguments(
    onnx_path: Path, engine_path: Path, min_batch: int, max_batch: int
) -> None:
    """What ``build_engine`` can check before loading TensorRT."""
    if not onnx_path.is_file():
        raise ExportError(f"ONNX file {onnx_path} does not exist")
    if not engine_path.parent.resolve().is_dir():
        raise ExportError(
            f"cannot write {engine_path}: the folder {engine_path.parent.resolve()} does not "
            "exist (create it first)"
        )
    if not 1 <= min_batch <= max_batch:
        raise ExportError(f"need 1 <= min_batch <= max_batch, got {min_batch}, {max_batch}")


def _builder_config(
    trt: Any,
    builder: Any,
    runtime_name: str,
    weakly_typed: bool,
    sparse: bool,
    workspace: int | None,
) -> Any:
    config = builder.create_builder_config()
    if weakly_typed:
        config.set_flag(trt.BuilderFlag.FP16)
    if sparse:
        if not hasattr(trt.BuilderFlag, "SPARSE_WEIGHTS"):
            raise ExportError(f"{runtime_name} {trt.__version__} has no SPARSE_WEIGHTS flag")
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    if workspace is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace))
    # DETAILED keeps tactic names and HasSparseWeights in the engine for the inspector.
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    return config


def _use_timing_cache(
    config: Any, runtime_name: str, timing_cache: Any, notes: list[str]
) -> Path | None:
    """Load the timing cache into ``config``; the path to save it to after the build, if any."""
    cache_path = Path(timing_cache) if timing_cache is not None else None
    if cache_path is not None and runtime_name == "tensorrt_rtx":
        # RTX >= 1.2 made timing caches no-ops; 1.0/1.1 even queried a GPU because of them.
        notes.append(
            f"timing_cache ignored: timing caches are no-ops in TensorRT-RTX ({cache_path})"
        )
        return None
    if cache_path is not None:
        blob = cache_path.read_bytes() if cache_path.is_file() else b""
        config.set_timing_cache(config.create_timing_cache(blob), False)
    return cache_path


def _inspect(result: EngineBuildResult, trt: Any, trt_logger: Any, data: bytes) -> None:
    """Deserialize the engine if this machine can, and record its kernels."""
    runtime = trt.Runtime(trt_logger)
    result.engine_validity = _engine_validity(trt, runtime, data)
    mark = len(trt_logger.messages)
    engine = None
    try:
        engine = runtime.deserialize_cuda_engine(data)
    except Exception as exc:  # no driver: some versions raise instead of returning None
        trt_logger.messages.append((trt.ILogger.Severity.ERROR, str(exc)))
    if engine is None:
        said = "; ".join(dict.fromkeys(trt_logger.errors(since=mark))) or "no error logged"
        result.runnable_reason = (
            f"{NO_GPU_REASON} ({result.runtime} said: {said})"
            if not result.gpu_present
            else f"the engine failed to deserialize: {said}"
        )
        result.layers = _layers_from_builder_log(
            trt_logger.of_severity(trt.ILogger.Severity.VERBOSE)
        )
        stubs = [layer.name for layer in result.layers if "STUB" in layer.tactic.upper()]
        if stubs:
            result.notes.append(
                f"layers come from the builder's layer report; {len(stubs)} conv/matmul layers "
                "have a placeholder tactic (…CASK_STUB): their kernels are picked on the GPU, so "
                "whether they use sparse kernels cannot be known without one"
            )
        return
    result.runnable = True
    result.layers = _layers_from_inspector(engine, trt)
    result.sparse_layers = [layer.name for layer in result.layers if layer.sparse]


def _torch_dtype(trt: Any, dtype: Any) -> torch.dtype:
    table = {
        "FLOAT": torch.float32,
        "HALF": torch.float16,
        "BF16": torch.bfloat16,
        "INT8": torch.int8,
        "UINT8": torch.uint8,
        "INT32": torch.int32,
        "INT64": torch.int64,
        "BOOL": torch.bool,
    }
    for name, torch_dtype in table.items():
        if hasattr(trt.DataType, name) and dtype == getattr(trt.DataType, name):
            return torch_dtype
    raise ExportError(f"engine tensor type {dtype} has no torch equivalent")


def _require_gpu(what: str) -> None:
    if not gpu_available():
        raise ExportError(
            f"{what} needs an NVIDIA GPU with a CUDA driver, and torch.cuda.is_available() is "
            "False on this machine; engines built here ahead of time run on Ampere or newer GPUs"
        )


class TrtEngineRunner:
    """A deserialized engine with an execution context; inputs and outputs are CUDA tensors."""

    def __init__(self, engine_path: str | os.PathLike, runtime: str = "auto") -> None:
        _require_gpu(f"running the TensorRT engine {engine_path}")
        self._trt, self.runtime = _select_runtime(runtime)
        trt = self._trt
        self._logger = _make_logger(trt)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise ExportError(
                f"{engine_path} failed to deserialize: {'; '.join(self._logger.errors())}"
            )
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == mode]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) != mode]
        self.stream = torch.cuda.Stream()
        self._bound: dict[str, torch.Tensor] = {}

    def bind(
        self, inputs: Mapping[str, torch.Tensor] | Sequence[torch.Tensor] | torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Copy inputs to the GPU, set shapes and addresses; returns the output buffers."""
        if isinstance(inputs, torch.Tensor):
            inputs = [inputs]
        named = dict(inputs) if isinstance(inputs, Mapping) else dict(zip(self.input_names, inputs))
        missing = [n for n in self.input_names if n not in named]
        if missing:
            raise ExportError(
                f"engine inputs {missing} not given (engine expects {self.input_names})"
            )
        self._bound = {}
        for name in self.input_names:
            dtype = _torch_dtype(self._trt, self.engine.get_tensor_dtype(name))
            tensor = named[name].to(device="cuda", dtype=dtype).contiguous()
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
            self._bound[name] = tensor
        outputs = {}
        for name in self.output_names:
            dtype = _torch_dtype(self._trt, self.engine.get_tensor_dtype(name))
            shape = tuple(self.context.get_tensor_shape(name))
            outputs[name] = torch.empty(shape, dtype=dtype, device="cuda")
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        self._bound.update(outputs)
        return outputs

    def execute(self) -> None:
        """Enqueue one inference on the runner's stream (not synchronized)."""
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise ExportError(f"TensorRT execution failed: {'; '.join(self._logger.errors())}")

    def synchronize(self) -> None:
        self.stream.synchronize()

    def __call__(self, inputs: Any) -> dict[str, torch.Tensor]:
        outputs = self.bind(inputs)
        self.execute()
        self.synchronize()
        return outputs

    def time(self, inputs: Any, iters: int, warmup: int = 0) -> float:
        """Mean milliseconds per inference over `iters` back-to-back runs (CUDA events)."""
        self.bind(inputs)
        for _ in range(warmup):
            self.execute()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record(self.stream)
        for _ in range(iters):
            self.execute()
        end.record(self.stream)
        end.synchronize()
        return begin.elapsed_time(end) / iters


def run_engine(
    engine_path: str | os.PathLike, inputs: Any, runtime: str = "auto"
) -> dict[str, torch.Tensor]:
    """Run a serialized engine once on CUDA tensors; returns {output name: CUDA tensor}."""
    return TrtEngineRunner(engine_path, runtime=runtime)(inputs)


def time_engine(
    engine_path: str | os.PathLike,
    inputs: Any,
    iters: int = 100,
    warmup: int = 10,
    runtime: str = "auto",
) -> float:
    """Mean GPU milliseconds per inference of a serialized engine."""
    return TrtEngineRunner(engine_path, runtime=runtime).time(inputs, iters, warmup)
