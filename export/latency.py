"""Honest side-by-side latency measurement of an original model and its pruned or sparse variants.

`compare_latency` times every model on every backend and batch size in *interleaved
rounds*: in each round each model runs once for a fixed number of iterations, in an order
that rotates from round to round, so slow drifts of a shared, noisy machine (frequency
scaling, other tenants, thermal state) hit every model alike. The speedup of a model is
the median over rounds of the per-round ratio baseline latency / model latency, reported
with its spread (quartiles and min/max), never a single best-of number.

Backends: "torch" (eager, inference mode), "ort" (ONNX Runtime CPU, each model exported
once by `fxprune.export.to_onnx` with a dynamic batch), and, only when an NVIDIA GPU is
present, "ort-cuda", "ort-trt" (ONNX Runtime's CUDA / TensorRT execution providers) and
"trt" (a TensorRT engine from `fxprune.export.build_engine`). A backend that cannot run
here is skipped with a note in the report.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import gc
import io
import json
import logging
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from fxprune import validate
from fxprune.errors import BenchError
from fxprune.export.onnx import eval_version, named_tensor_inputs, ort_feed, to_onnx
from fxprune.export.tensorrt import (
    TrtEngineRunner,
    available_runtimes,
    build_engine,
    gpu_available,
)
from fxprune.files import write_bytes_atomic
from fxprune.report import count_macs
from fxprune.trace import ExampleInputs

logger = logging.getLogger(__name__)

CPU_BACKENDS = ("torch", "ort")
GPU_BACKENDS = ("ort-cuda", "ort-trt", "trt")
BACKENDS = CPU_BACKENDS + GPU_BACKENDS
_ORT_GPU_PROVIDERS = {"ort-cuda": "CUDAExecutionProvider", "ort-trt": "TensorrtExecutionProvider"}

InputsSpec = Callable[[int], Any] | Mapping[int, Any]


@dataclass
class ModelInfo:
    """Size of one benchmarked model."""

    name: str
    params: int
    macs: int | None = None  # multiply-accumulates for one forward at `macs_batch_size`
    macs_batch_size: int | None = None


@dataclass
class Measurement:
    """Latency of one model on one backend at one batch size, round by round."""

    backend: str
    batch_size: int
    model: str
    iters_per_round: int
    round_ms: list[float]  # mean milliseconds per inference in each round
    median_ms: float
    # Baseline latency / this model's latency, per round; None for the baseline itself.
    round_ratios: list[float] | None = None
    speedup: float | None = None  # median of round_ratios
    speedup_q1: float | None = None
    speedup_q3: float | None = None
    speedup_min: float | None = None
    speedup_max: float | None = None


@dataclass
class BenchReport:
    """Everything `compare_latency` measured, with the settings needed to judge it."""

    baseline: str
    models: list[ModelInfo]
    measurements: list[Measurement]
    backends: list[str]  # the backends that ran
    batch_sizes: list[int]
    rounds: int
    warmup: int
    min_time: float
    num_threads: int
    environment: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def model(self, name: str) -> ModelInfo:
        return next(m for m in self.models if m.name == name)

    def find(self, backend: str, batch_size: int, model: str) -> Measurement:
        for m in self.measurements:
            if (m.backend, m.batch_size, m.model) == (backend, batch_size, model):
                return m
        raise KeyError((backend, batch_size, model))

    def reduction(self, model: str) -> tuple[float | None, str]:
        """How many times fewer MACs (or, when MACs are unknown, parameters) than the baseline."""
        base, this = self.model(self.baseline), self.model(model)
        if base.macs and this.macs:
            return base.macs / this.macs, "MACs"
        if base.params and this.params:
            return base.params / this.params, "params"
        return None, "params"

    # -- output ---------------------------------------------------------------------------

    def table(self, width: int = 120) -> str:
        """The report as a rich table, rendered to plain text."""
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"latency: {self.baseline!r} vs pruned models", show_lines=False)
        for column in ("backend", "batch", "model", "params", "MACs", "reduction"):
            table.add_column(column, justify="left" if column in ("backend", "model") else "right")
        table.add_column("median ms", justify="right")
        table.add_column("speedup (median of rounds)", justify="right")
        table.add_column("IQR", justify="right")
        table.add_column("min-max", justify="right")
        for m in self.measurements:
            info = self.model(m.model)
            factor, unit = self.reduction(m.model)
            if m.speedup is None:
                speedup, iqr, span = "baseline", "", ""
            else:
                speedup = f"{m.speedup:.2f}x"
                iqr = f"{m.speedup_q1:.2f}-{m.speedup_q3:.2f}"
                span = f"{m.speedup_min:.2f}-{m.speedup_max:.2f}"
            table.add_row(
                m.backend,
                str(m.batch_size),
                m.model,
                _si(info.params),
                _si(info.macs) if info.macs is not None else "n/a",
                f"{factor:.2f}x {unit}" if factor is not None else "n/a",
                f"{m.median_ms:.3f}",
                speedup,
                iqr,
                span,
            )
        console = Console(file=io.StringIO(), width=width, color_system=None, highlight=False)
        console.print(table)
        footer = (
            f"{self.rounds} interleaved rounds (order rotated each round), {self.warmup} warm-up "
            f"calls, >= {self.min_time * 1e3:.0f} ms per model per round, {self.num_threads} threads"
        )
        console.print(footer)
        for note in self.notes:
            console.print(f"note: {note}")
        return console.file.getvalue()

    def __str__(self) -> str:
        return self.table()

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> BenchReport:
        data = json.loads(text)
        data["models"] = [ModelInfo(**m) for m in data["models"]]
        data["measurements"] = [Measurement(**m) for m in data["measurements"]]
        return cls(**data)

    def save_json(self, path: str | os.PathLike) -> None:
        _write_whole(Path(path), self.to_json().encode())

    @classmethod
    def load_json(cls, path: str | os.PathLike) -> BenchReport:
        return cls.from_json(Path(path).read_text())

    def plot(self, path: str | os.PathLike) -> None:
        """PNG: measured speedup against the MACs (or params) reduction, with the ideal y = x."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import ScalarFormatter

        # Figure + Agg canvas directly: no pyplot global state, no display needed.
        fig = Figure(figsize=(7, 5), dpi=120)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        markers = dict(zip(BACKENDS, "osD^v"))
        units, values = set(), [1.0]
        for m in self.measurements:
            factor, unit = self.reduction(m.model)
            if m.speedup is None or factor is None:
                continue
            units.add(unit)
            values += [factor, m.speedup_q1, m.speedup_q3]
            ax.errorbar(
                factor,
                m.speedup,
                yerr=[[m.speedup - m.speedup_q1], [m.speedup_q3 - m.speedup]],
                marker=markers.get(m.backend, "o"),
                capsize=3,
                linestyle="none",
                label=f"{m.backend} bs={m.batch_size} {m.model}",
            )
        # Ratios live on a log scale: 2x faster and 2x slower sit symmetrically around 1.
        low, high = min(values) / 1.25, max(values) * 1.25
        ax.plot(
            [low, high],
            [low, high],
            color="gray",
            linestyle="--",
            linewidth=1,
            label="ideal (y = x)",
        )
        ax.axhline(1.0, color="lightgray", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.set_xlim(low, high)
        ax.set_ylim(low, high)
        unit = "MACs" if units == {"MACs"} else "params" if units else "MACs"
        ax.set_xlabel(f"{unit} reduction vs {self.baseline!r} (x)")
        ax.set_ylabel("speedup: median of per-round latency ratios (x), bars = IQR")
        ax.set_title(f"measured speedup vs {unit} reduction")
        ax.legend(fontsize="small", loc="upper left")
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
        _write_whole(Path(path), buffer.getvalue())


def _si(value: int | None) -> str:
    if value is None:
        return "n/a"
    for factor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.2f}{suffix}"
    return str(value)


def _write_whole(path: Path, data: bytes | memoryview) -> None:
    write_bytes_atomic(path, data)


# -- runners: one callable per (backend, model, batch) ----------------------------------


@dataclass
class _Runner:
    call: Callable[[], Any]
    sync: Callable[[], None] = lambda: None


def _block_ms(runner: _Runner, iters: int) -> float:
    """Mean milliseconds per call over `iters` back-to-back calls, the GC held off."""
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        for _ in range(iters):
            runner.call()
        runner.sync()
        return (time.perf_counter() - start) * 1e3 / iters
    finally:
        if gc_was_enabled:
            gc.enable()


def _calibrate(runner: _Runner, min_time: float) -> int:
    """Iterations per round so that one model's block lasts at least `min_time` seconds."""
    iters = 1
    while True:
        per_call_ms = _block_ms(runner, iters)
        # A block of a quarter of the target is long enough to estimate one call's cost.
        if per_call_ms * iters >= min_time * 1e3 / 4 or iters >= 1 << 20:
            break
        iters *= 2
    return max(1, math.ceil(min_time * 1e3 / max(per_call_ms, 1e-9)))


def _split(inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    ex = ExampleInputs.of(inputs)
    return ex.args, dict(ex.kwargs)


def _torch_runner(model: nn.Module, inputs: Any) -> _Runner:
    args, kwargs = _split(inputs)
    return _Runner(call=lambda: model(*args, **kwargs))


class _OrtModels:
    """Each model exported once (dynamic batch) and loaded into one session per provider."""

    def __init__(self, folder: Path, num_threads: int) -> None:
        self.folder = folder
        self.num_threads = num_threads
        self.paths: dict[str, Path] = {}
        self.sessions: dict[tuple[str, str], Any] = {}

    def export(self, name: str, model: nn.Module, inputs: Any) -> Path:
        if name not in self.paths:
            path = self.folder / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.onnx"
            to_onnx(model, inputs, path, dynamic_batch=True)
            self.paths[name] = path
        return self.paths[name]

    def session(self, name: str, provider: str) -> Any:
        import onnxruntime as ort

        key = (name, provider)
        if key not in self.sessions:
            options = ort.SessionOptions()
            # Same thread budget for every model; inter-op parallelism off so that the
            # comparison is of kernels, not of scheduling luck.
            options.intra_op_num_threads = self.num_threads
            options.inter_op_num_threads = 1
            options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            providers = (
                [provider]
                if provider == "CPUExecutionProvider"
                else [provider, "CPUExecutionProvider"]
            )
            self.sessions[key] = ort.InferenceSession(
                str(self.paths[name]), options, providers=providers
            )
        return self.sessions[key]

    def runner(self, name: str, model: nn.Module, inputs: Any, provider: str) -> _Runner:
        session = self.session(name, provider)
        args, kwargs = _split(inputs)
        feed = ort_feed(
            [i.name for i in session.get_inputs()], named_tensor_inputs(model, args, kwargs)
        )
        if provider == "CPUExecutionProvider":
            return _Runner(call=lambda: session.run(None, feed))
        import onnxruntime as ort

        # Inputs and outputs stay on the GPU so host<->device copies are not timed.
        binding = session.io_binding()
        device_values = {n: ort.OrtValue.ortvalue_from_numpy(a, "cuda", 0) for n, a in feed.items()}
        for n, value in device_values.items():
            binding.bind_ortvalue_input(n, value)
        for output in session.get_outputs():
            binding.bind_output(output.name, "cuda")
        return _Runner(call=lambda: session.run_with_iobinding(binding))


@contextlib.contextmanager
def _benchmark_threads(num_threads: int) -> Iterator[None]:
    """The thread count for the run, restored afterwards."""
    threads_before = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(threads_before)


def _spread(ratios: Sequence[float]) -> tuple[float, float]:
    if len(ratios) < 2:
        return ratios[0], ratios[0]
    q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return q1, q3


def _environment(num_threads: int) -> dict[str, str]:
    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": str(os.cpu_count()),
        "torch": torch.__version__,
        "threads": str(num_threads),
        "cuda": str(torch.cuda.is_available()),
    }
    if hasattr(os, "getloadavg"):
        # Other work on the machine is the main source of noise; record how busy it was.
        env["loadavg_1m_at_end"] = f"{os.getloadavg()[0]:.2f}"
    with contextlib.suppress(ImportError):
        import onnxruntime

        env["onnxruntime"] = onnxruntime.__version__
    return env


def compare_latency(
    models: Mapping[str, nn.Module],
    inputs: InputsSpec,
    backends: Sequence[str] = CPU_BACKENDS,
    batch_sizes: Sequence[int] | None = (1, 8),
    rounds: int = 15,
    warmup: int = 5,
    min_time: float = 0.05,
    num_threads: int | None = None,
    macs: Mapping[str, int] | None = None,
    progress: bool | None = None,
    workdir: str | os.PathLike | None = None,
) -> BenchReport:
    """Time `models` side by side; the first model is the baseline every other is compared to.

    inputs: a function batch_size -> example inputs (a tensor, a tuple, or a dict of keyword
        tensors), or a dict {batch_size: inputs} (then batch_sizes=None uses its keys).
    backends: any of "torch", "ort", "ort-cuda", "ort-trt", "trt"; those that cannot run on
        this machine are skipped with a note.
    rounds: interleaved rounds; each yields one latency per model and one ratio per model.
    warmup: calls per model before calibration, on each backend and batch size.
    min_time: seconds each model runs per round (sets its fixed iteration count).
    num_threads: CPU threads for torch and ONNX Runtime alike (default: torch's current).
    macs: {name: MACs} from your own counter; otherwise fxprune's counter is used if this
        version has one, else MACs are left unknown and params stand in for the plot.
    progress: a tqdm bar over rounds; default only when stderr is a terminal.
    workdir: keep the exported ONNX files / engines here (default: a temporary folder).
    """
    if isinstance(backends, str):
        backends = [backends]  # one backend name, not its characters
    if isinstance(batch_sizes, int) and not isinstance(batch_sizes, bool):
        batch_sizes = [batch_sizes]
    _check_arguments(models, inputs, backends, batch_sizes, rounds, warmup, min_time, num_threads)
    if batch_sizes is None:
        batch_sizes = sorted(inputs)
    batch_sizes = list(batch_sizes)

    def inputs_for(batch_size: int) -> Any:
        if isinstance(inputs, Mapping):
            if batch_size not in inputs:
                raise ValueError(f"no inputs given for batch size {batch_size}")
            return inputs[batch_size]
        return inputs(batch_size)

    names = list(models)
    baseline = names[0]
    num_threads = num_threads or torch.get_num_threads()
    notes: list[str] = []
    # Timed in eval mode: a model in train mode is timed as an eval copy, never switched itself.
    models = {name: eval_version(model) for name, model in models.items()}
    infos = _model_infos(models, inputs_for(min(batch_sizes)), min(batch_sizes), macs, notes)
    runnable = _runnable_backends(backends, notes)

    show_progress = sys.stderr.isatty() if progress is None else progress
    with contextlib.ExitStack() as stack:
        folder = (
            Path(workdir)
            if workdir is not None
            else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        )
        stack.enter_context(_benchmark_threads(num_threads))
        bar = stack.enter_context(
            tqdm(
                total=len(runnable) * len(batch_sizes) * rounds,
                disable=not show_progress,
                desc="bench",
                unit="round",
                leave=False,
            )
        )
        plan = _Rounds(rounds, warmup, min_time, bar)
        measurements = _measure_all(
            models, inputs_for, batch_sizes, runnable, plan, _OrtModels(folder, num_threads), notes
        )
    return BenchReport(
        baseline=baseline,
        models=infos,
        measurements=measurements,
        backends=runnable,
        batch_sizes=batch_sizes,
        rounds=rounds,
        warmup=warmup,
        min_time=min_time,
        num_threads=num_threads,
        environment=_environment(num_threads),
        notes=notes,
    )


@dataclass
class _Rounds:
    """How each (backend, batch size) is timed."""

    rounds: int
    warmup: int
    min_time: float
    bar: Any


def _measure_all(
    models: Mapping[str, nn.Module],
    inputs_for: Callable[[int], Any],
    batch_sizes: list[int],
    runnable: list[str],
    plan: _Rounds,
    ort_models: _OrtModels,
    notes: list[str],
) -> list[Measurement]:
    """Every backend and batch size; a backend whose baseline cannot run is dropped from
    ``runnable`` (no ratios without it)."""
    baseline = next(iter(models))
    measurements: list[Measurement] = []
    for backend in list(runnable):
        for batch_size in batch_sizes:
            runners = _make_runners(
                backend,
                models,
                inputs_for(batch_size),
                batch_sizes,
                ort_models,
                ort_models.folder,
                notes,
            )
            if baseline not in runners:
                notes.append(f"{backend}: baseline {baseline!r} could not run; backend skipped")
                runnable.remove(backend)
                measurements = [m for m in measurements if m.backend != backend]
                break
            plan.bar.set_description(f"bench {backend} bs={batch_size}")
            measurements += _measure(
                backend,
                batch_size,
                runners,
                baseline,
                plan.rounds,
                plan.warmup,
                plan.min_time,
                plan.bar,
            )
    return measurements


def inputs_by_batch(inputs: Any) -> Callable[[int], Any]:
    """``batch -> example inputs`` for ``compare_latency``: batch-1 tensors (of a tensor,
    tuple, list or dict of inputs) repeated along dim 0; other values as they are."""

    def at(batch: int) -> Any:
        def grow(t: Any) -> Any:
            if isinstance(t, torch.Tensor) and t.dim() > 0:
                return t[:1].expand(batch, *t.shape[1:]).clone() if t.shape[0] == 1 else t
            return t

        if isinstance(inputs, dict):
            return {k: grow(v) for k, v in inputs.items()}
        if isinstance(inputs, (tuple, list)):
            return tuple(grow(v) for v in inputs)
        return grow(inputs)

    return at


def _check_arguments(
    models: Any,
    inputs: Any,
    backends: Any,
    batch_sizes: Any,
    rounds: Any,
    warmup: Any,
    min_time: Any,
    num_threads: Any,
) -> None:
    """Every argument of `compare_latency`, before any model is exported or timed."""
    if not isinstance(models, Mapping) or not models:
        validate.fail(
            BenchError,
            "models",
            "a dict {name: module} with at least one model (the first is the baseline)",
            models,
        )
    for name, model in models.items():
        validate.module(f"models[{name!r}]", model, BenchError)
    if not callable(inputs) and not isinstance(inputs, Mapping):
        validate.fail(
            BenchError,
            "inputs",
            "a function batch_size -> inputs or a dict {batch_size: inputs}",
            inputs,
        )
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), BACKENDS, n=1)
        raise BenchError(
            f"unknown backends {unknown}; choose from {BACKENDS}."
            + (f" Did you mean {close[0]!r}?" if close else "")
        )
    if batch_sizes is None:
        if not isinstance(inputs, Mapping):
            raise BenchError("batch_sizes=None needs inputs given as {batch_size: inputs}.")
    else:
        if not isinstance(batch_sizes, Iterable) or not list(batch_sizes):
            validate.fail(BenchError, "batch_sizes", "a non-empty list of batch sizes", batch_sizes)
        for b in batch_sizes:
            validate.integer_at_least("batch_sizes", b, 1, "each batch size", BenchError)
        if isinstance(inputs, Mapping):
            missing = [b for b in batch_sizes if b not in inputs]
            if missing:
                raise BenchError(
                    f"batch_sizes {missing} have no inputs: inputs holds {sorted(inputs)}."
                )
    validate.integer_at_least("rounds", rounds, 1, "interleaved timing rounds", BenchError)
    validate.integer_at_least("warmup", warmup, 0, "calls before timing", BenchError)
    validate.number_in(
        "min_time",
        min_time,
        0.0,
        math.inf,
        "seconds per model per round",
        low_open=True,
        error=BenchError,
    )
    if num_threads is not None:
        validate.integer_at_least("num_threads", num_threads, 1, error=BenchError)


def _model_infos(
    models: Mapping[str, nn.Module],
    inputs: Any,
    batch_size: int,
    macs: Mapping[str, int] | None,
    notes: list[str],
) -> list[ModelInfo]:
    infos = []
    for name, model in models.items():
        count = None
        if macs is not None:
            count = macs.get(name)
        else:
            try:
                count = int(count_macs(model, inputs))
            except Exception as exc:  # a counter failure must not lose the latency numbers
                notes.append(f"count_macs failed on {name!r}: {type(exc).__name__}: {exc}")
        infos.append(
            ModelInfo(
                name=name,
                params=sum(p.numel() for p in model.parameters()),
                macs=count,
                macs_batch_size=batch_size if count is not None else None,
            )
        )
    return infos


def _runnable_backends(backends: Sequence[str], notes: list[str]) -> list[str]:
    runnable = []
    for backend in dict.fromkeys(backends):
        if backend in GPU_BACKENDS and not gpu_available():
            notes.append(
                f"{backend} skipped: needs an NVIDIA GPU (torch.cuda.is_available() is False)"
            )
            continue
        if backend in _ORT_GPU_PROVIDERS:
            import onnxruntime as ort

            provider = _ORT_GPU_PROVIDERS[backend]
            if provider not in ort.get_available_providers():
                notes.append(
                    f"{backend} skipped: this onnxruntime has no {provider} "
                    f"({ort.get_available_providers()}); install onnxruntime-gpu"
                )
                continue
        if backend == "trt" and not available_runtimes():
            notes.append("trt skipped: neither tensorrt nor tensorrt_rtx is installed")
            continue
        runnable.append(backend)
    return runnable


def _make_runners(
    backend: str,
    models: Mapping[str, nn.Module],
    inputs: Any,
    batch_sizes: Sequence[int],
    ort_models: _OrtModels,
    folder: Path,
    notes: list[str],
) -> dict[str, _Runner]:
    runners: dict[str, _Runner] = {}
    for name, model in models.items():
        try:
            if backend == "torch":
                runners[name] = _torch_runner(model, inputs)
            elif backend == "ort":
                ort_models.export(name, model, inputs)
                runners[name] = ort_models.runner(name, model, inputs, "CPUExecutionProvider")
            elif backend in _ORT_GPU_PROVIDERS:
                ort_models.export(name, model, inputs)
                runners[name] = ort_models.runner(name, model, inputs, _ORT_GPU_PROVIDERS[backend])
            else:
                runners[name] = _trt_runner(name, model, inputs, batch_sizes, ort_models, folder)
        except Exception as exc:  # one model failing on one backend must not sink the report
            logger.warning("%s: %r cannot run: %s", backend, name, exc)
            notes.append(f"{backend}: {name!r} skipped: {type(exc).__name__}: {exc}")
    return runners


def _trt_runner(
    name: str,
    model: nn.Module,
    inputs: Any,
    batch_sizes: Sequence[int],
    ort_models: _OrtModels,
    folder: Path,
) -> _Runner:

    onnx_path = ort_models.export(name, model, inputs)
    engine_path = onnx_path.with_suffix(".engine")
    if not engine_path.exists():
        build_engine(onnx_path, engine_path, sparse=True, max_batch=max(batch_sizes))
    engine = TrtEngineRunner(engine_path)
    args, kwargs = _split(inputs)
    named = dict(named_tensor_inputs(model, args, kwargs))
    feed = {n: named[n] for n in engine.input_names if n in named}
    if len(feed) < len(engine.input_names):
        feed = dict(zip(engine.input_names, named.values()))
    engine.bind(feed)
    return _Runner(call=engine.execute, sync=engine.synchronize)


def _measure(
    backend: str,
    batch_size: int,
    runners: Mapping[str, _Runner],
    baseline: str,
    rounds: int,
    warmup: int,
    min_time: float,
    bar: Any,
) -> list[Measurement]:
    names = list(runners)
    round_ms: dict[str, list[float]] = {name: [] for name in names}
    # Inference mode only around the timed calls: exporting (ONNX, engines) needs it off.
    with torch.inference_mode():
        for runner in runners.values():
            for _ in range(warmup):
                runner.call()
            runner.sync()
        iters = {name: _calibrate(runner, min_time) for name, runner in runners.items()}
        for r in range(rounds):
            gc.collect()
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                round_ms[name].append(_block_ms(runners[name], iters[name]))
            bar.update(1)
    results = []
    for name in names:
        ms = round_ms[name]
        m = Measurement(
            backend=backend,
            batch_size=batch_size,
            model=name,
            iters_per_round=iters[name],
            round_ms=ms,
            median_ms=statistics.median(ms),
        )
        if name != baseline:
            ratios = [b / c for b, c in zip(round_ms[baseline], ms)]
            m.round_ratios = ratios
            m.speedup = statistics.median(ratios)
            m.speedup_q1, m.speedup_q3 = _spread(ratios)
            m.speedup_min, m.speedup_max = min(ratios), max(ratios)
        results.append(m)
    return results
