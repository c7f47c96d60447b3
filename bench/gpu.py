"""Measured on a GPU: the channel-alignment staircase, pruned models end to end, and 2:4
sparse tensor cores, in one call.

Sections (each checks its outputs against an fp32 reference, relative L2 error, before it
times anything; a section that fails is recorded with its error and the others go on):

* ``env``: device, driver, CUDA, cuDNN, cuSPARSELt, PyTorch and library versions, and the
  two ceilings measured once (a bf16 8192^3 matrix product, a device-to-device copy).
* ``staircase``: latency of conv 1x1 / 3x3 (ResNet-50 stage shapes, channels_last) and
  linear (transformer MLP shapes, the channel count as output or input features) as the
  channel count sweeps every value of a window, fp16 and tf32, eager (cuDNN / cuBLAS); and
  fp16 through ``torch.compile`` on one window per op (``staircase_compile``).
* ``models``: ResNet-50 and ViT-B/16 pruned by fxprune at ratio 0.5 and 0.4 (``--ratios``)
  with ``round_to=1``, ``8`` and ``align="pad"`` (one architecture is timed once: at 0.5 all
  three agree), and by Torch-Pruning at the first ratio (its documented usage,
  ``round_to=8``), fp16 channels_last, batch 1, 32 and 256, eager (and as CUDA graphs with
  ``--cuda-graph``); and through ``torch.compile`` (``models_compile``).
* ``sparse24``: Linear layers of BERT-base / ViT-B and LLaMA-7B MLP shapes, fp16 and bf16,
  128 to 16384 tokens: dense vs ``to_sparse_semi_structured`` (cuSPARSELt and CUTLASS).
* ``sparse24_models``: a BERT-base-shaped encoder and a LLaMA-shaped decoder stack
  sparsified by ``fxprune.sparsify`` (2:4) and lowered by ``fxprune.backend``'s
  semi-structured pass: latency against the same masked weights run dense.

Timing: CUDA events around every call, warm-up first, several input buffers used in turn
(rotating, random data, together larger than the L2 cache where memory allows), the median
of many calls per round; the variants of one comparison run in interleaved rounds whose
order rotates, the ratio is taken per round, and the whole comparison is repeated (twice
by default) so that the report shows its spread. Kernel-level sections let the CPU queue
work ahead (``torch.cuda._sleep``) so that launch gaps stay out of kernel times; model
sections time what a caller sees, launches included.

    python bench/gpu.py                                 # everything; docs/gpu.json, docs/BENCHMARKS_gpu.md
    python bench/gpu.py --sections staircase,sparse24   # a part
    python bench/gpu.py --quick                         # minutes: fewer points, fewer calls
    python bench/gpu.py --sections env,models_compile --compile-mode max-autotune \
        --models vit --batches 32 --ratios 0.4          # one narrow, slow-compiling check
    python bench/gpu.py --from-json docs/gpu.json       # redo the Markdown and the plots
    python bench/gpu.py --from-json docs/gpu.json,docs/gpu_run2.json,docs/gpu_run3.json
                                                        # several runs: each section from the last

Without CUDA it stops with exit status 2. ``--smoke-cpu`` runs every section on the CPU with
tiny shapes and small models: it checks this script's logic (the tests do), and its
numbers mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.metadata
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import fxprune
from fxprune.files import write_bytes_atomic
from fxprune.oracle import allow_tf32
from fxprune.passes.semi_structured import SemiStructuredPass, is_two_four

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the harness's neighbours
import gpu_report
from compare_torch_pruning import git_state

ROOT = Path(__file__).resolve().parent.parent

SECTIONS = (  # the default order: cheap and central first, compiles (minutes) last
    "env",
    "sparse24",
    "models",
    "sparse24_models",
    "staircase",
    "models_compile",
    "staircase_compile",
)
PAD_MULTIPLES = (2, 4, 8, 16, 32, 64)
PAYS = 1.05  # padding up to a multiple "pays" when the unaligned count is this much slower
NO_CUDA = (
    "bench/gpu.py measures NVIDIA GPU kernels and needs CUDA, but torch.cuda.is_available() is "
    "False here (torch {torch}, built for CUDA {cuda}). Run it on a machine with an NVIDIA GPU "
    "and a CUDA build of PyTorch; `--smoke-cpu` checks the script's logic on the CPU "
    "(its numbers mean nothing); `--from-json FILE` re-renders an earlier run's report."
)


# -- settings --------------------------------------------------------------------------------


@dataclass
class Settings:
    """Sizes and repeat counts of one run: full, ``--quick`` or ``--smoke-cpu``."""

    device: str
    repeats: int = 2  # each interleaved comparison, whole, this many times (its spread)
    rounds: int = 2
    calls: int = 15  # timed calls per variant per round (kernels)
    model_rounds: int = 4
    model_calls: int = 8
    warmup: int = 5
    conv_batch: int = 32
    conv_stages: tuple = ((56, 64), (28, 128), (14, 256), (7, 512))  # (H = W, window centre)
    tokens: int = 8192  # rows of the staircase's linear layers
    linear_centres: tuple = (1024, 1536)
    # A window: every count within ``half`` of its centre, plus the centre + ``probes``
    # (counts aligned to 16 and 32 only, so that padding to x32 and x64 is measured too).
    half: int = 8
    probes: tuple = (-32, -16, 16, 32, 64)
    compile_windows: int = 1  # windows per op swept through torch.compile
    compile_mode: str | None = "reduce-overhead"
    compile_reserve: float = 60.0  # seconds a model compile needs left of the budget
    compile_backend: str = "inductor"
    batches: tuple = (1, 32, 256)
    # Pruning ratios of the end-to-end models: 0.5 (the peer's comparison) and one where the
    # alignments give different widths (0.4 keeps 38.4 of 64: 38, 32 or padded 40).
    ratios: tuple = (0.5, 0.4)
    models: tuple = ("resnet", "vit")  # ``--models``: which of the two end-to-end models
    # How the models run besides torch.compile: "eager", and "cuda graph" (``--cuda-graph``:
    # eager kernels replayed as CUDA graphs, Dynamo's cudagraphs backend).
    model_modes: tuple = ("eager",)
    image: int = 224
    resnet: str = "resnet50"
    vit: str = "vit_base_patch16_224"
    sparse_tokens: tuple = (128, 512, 2048, 8192, 16384)
    sparse_shapes: tuple = (
        ("BERT-base / ViT-B fc1", 768, 3072),
        ("BERT-base / ViT-B fc2", 3072, 768),
        ("LLaMA-7B up/gate", 4096, 11008),
        ("LLaMA-7B down", 11008, 4096),
    )
    sparse_dtypes: tuple = ("float16", "bfloat16")
    bert: dict = field(default_factory=lambda: dict(hidden=768, layers=12, heads=12, ffn=3072))
    llama: dict = field(default_factory=lambda: dict(hidden=4096, layers=2, heads=32, ffn=11008))
    encoder_shapes: tuple = ((8, 512), (32, 512))  # (batch, tokens)
    decoder_shapes: tuple = ((1, 2048), (4, 2048))

    @classmethod
    def quick(cls) -> Settings:
        return cls(
            device="cuda",
            repeats=2,
            rounds=2,
            calls=10,
            model_rounds=3,
            model_calls=5,
            conv_stages=((56, 64), (14, 256)),
            linear_centres=(1024,),
            half=2,
            probes=(16,),
            batches=(1, 32),
            sparse_tokens=(512, 8192),
            encoder_shapes=((8, 512),),
            decoder_shapes=((1, 1024),),
        )

    @classmethod
    def smoke_cpu(cls) -> Settings:
        return cls(
            device="cpu",
            repeats=2,
            rounds=2,
            calls=2,
            model_rounds=2,
            model_calls=1,
            warmup=1,
            conv_batch=2,
            conv_stages=((8, 16),),
            tokens=16,
            linear_centres=(16,),
            half=2,
            probes=(8,),
            compile_mode=None,
            compile_backend="eager",
            compile_reserve=0.0,
            batches=(1, 2),
            image=64,
            resnet="resnet18",
            vit="vit_tiny_patch16_224",
            sparse_tokens=(16,),
            sparse_shapes=(("tiny", 64, 128),),
            sparse_dtypes=("float32",),
            bert=dict(hidden=64, layers=1, heads=2, ffn=128),
            llama=dict(hidden=64, layers=1, heads=2, ffn=128),
            encoder_shapes=((2, 16),),
            decoder_shapes=((1, 16),),
        )


class Deadline:
    """Seconds left of the run's budget; sections skip what no longer fits."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def passed(self) -> bool:
        return self.left() <= 0


# -- timing ------------------------------------------------------------------------------------


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def call_times_ms(
    fn: Callable[[Any], Any], inputs: Sequence[Any], calls: int, device: str, queue_ahead: bool
) -> list[float]:
    """Milliseconds of each of ``calls`` calls, input buffers used in turn.

    On CUDA each call is bracketed by events. ``queue_ahead``: a sleep kernel first holds
    the GPU while the CPU enqueues the calls, so their times are the kernels' own."""
    if not device.startswith("cuda"):
        times = []
        for i in range(calls):
            start = time.perf_counter()
            fn(inputs[i % len(inputs)])
            times.append((time.perf_counter() - start) * 1e3)
        return times
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))]
    events += [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        for _ in range(calls - 1)
    ]
    torch.cuda.synchronize()
    if queue_ahead:
        torch.cuda._sleep(5_000_000)  # ~2.5 ms at 2 GHz: the CPU queues the calls meanwhile
    for i, (start, end) in enumerate(events):
        start.record()
        fn(inputs[i % len(inputs)])
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in events]


def interleaved(
    variants: dict[Any, tuple[Callable, Sequence[Any]]],
    s: Settings,
    rounds: int,
    calls: int,
    queue_ahead: bool,
) -> dict[Any, list[float]]:
    """Per variant, its median call time (ms) in each round; round r starts at variant r."""
    names = list(variants)
    with torch.inference_mode():
        for fn, inputs in variants.values():  # warm-up: allocator, cuDNN's search, handles
            for i in range(s.warmup):
                fn(inputs[i % len(inputs)])
        sync(s.device)
        medians: dict[Any, list[float]] = {n: [] for n in names}
        for r in range(rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                fn, inputs = variants[name]
                times = call_times_ms(fn, inputs, calls, s.device, queue_ahead)
                medians[name].append(statistics.median(times))
    return medians


def repeated(
    variants: dict[Any, tuple[Callable, Sequence[Any]]],
    s: Settings,
    baseline: Any = None,
    model_level: bool = False,
) -> dict[Any, dict[str, Any]]:
    """The interleaved comparison, repeated ``s.repeats`` times.

    Per variant: ``ms`` (median over rounds, one value per repeat) and, when ``baseline``
    is named, ``speedup`` (median of per-round baseline/variant ratios, one per repeat)."""
    rounds, calls = (s.model_rounds, s.model_calls) if model_level else (s.rounds, s.calls)
    out: dict[Any, dict[str, Any]] = {n: {"ms": [], "speedup": []} for n in variants}
    for _ in range(s.repeats):
        medians = interleaved(variants, s, rounds, calls, queue_ahead=not model_level)
        for name, ms in medians.items():
            out[name]["ms"].append(statistics.median(ms))
            if baseline is not None:
                ratios = [b / t for b, t in zip(medians[baseline], ms)]
                out[name]["speedup"].append(statistics.median(ratios))
    return out


def buffers(make: Callable[[], torch.Tensor], device: str, l2_bytes: int) -> list[torch.Tensor]:
    """Random input buffers, together over three times the L2 cache (2 to 8 of them)."""
    first = make()
    size = first.numel() * first.element_size()
    count = 2 if not device.startswith("cuda") else min(8, max(2, math.ceil(3 * l2_bytes / size)))
    return [first] + [make() for _ in range(count - 1)]


def l2_bytes(device: str) -> int:
    if not device.startswith("cuda"):
        return 1 << 20
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "L2_cache_size", 50 << 20))


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64; NaN or inf in ``out`` gives inf."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(out).all():
        return math.inf
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


# -- env -----------------------------------------------------------------------------------------


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def section_env(s: Settings, deadline: Deadline) -> dict[str, Any]:
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "packages": {
            n: _version(n)
            for n in ("torchvision", "timm", "transformers", "triton", "torch-pruning", "fxprune")
        },
        "git": os.environ.get("FXPRUNE_GIT") or git_state(),
        "device": s.device,
    }
    cusparselt = getattr(torch.backends, "cusparselt", None)
    if cusparselt is not None and cusparselt.is_available():
        env["cusparselt"] = cusparselt.version()
    if not s.device.startswith("cuda"):
        return env
    props = torch.cuda.get_device_properties(0)
    env.update(
        gpu=torch.cuda.get_device_name(0),
        capability=".".join(map(str, torch.cuda.get_device_capability(0))),
        multiprocessors=props.multi_processor_count,
        memory_gib=round(props.total_memory / 2**30, 1),
        l2_mib=round(l2_bytes(s.device) / 2**20, 1),
        nvidia_smi=_nvidia_smi(),
    )
    env["ceilings"] = _ceilings()
    torch.cuda.empty_cache()  # the ceilings' 8 GiB back to the driver
    return env


def _nvidia_smi() -> dict[str, str]:
    fields = "name,driver_version,clocks.max.sm,clocks.max.mem,power.limit,temperature.gpu"
    try:
        line = subprocess.run(
            ["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout.splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return {}
    return dict(zip(fields.split(","), (v.strip() for v in line.split(","))))


def _ceilings() -> dict[str, float]:
    """bf16 matrix-product rate and device-to-device copy bandwidth, each a median of 10."""
    n = 8192
    lhs = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    rhs = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    mm = statistics.median(call_times_ms(lambda x: x @ rhs, [lhs], 10, "cuda", True))
    src = torch.randn(1 << 30, device="cuda", dtype=torch.float32)  # 4 GiB
    dst = torch.empty_like(src)
    copy_ms = statistics.median(call_times_ms(dst.copy_, [src], 10, "cuda", True))
    moved = 2 * src.numel() * src.element_size()
    return {"bf16_matmul_tflops": 2 * n**3 / mm / 1e9, "copy_tb_per_s": moved / copy_ms / 1e9}


# -- staircase -----------------------------------------------------------------------------------


@dataclass
class StairOp:
    """One op of the staircase: how to build it and its input for a channel count ``c``."""

    name: str
    windows: tuple  # ((label, channel counts), ...)
    build: Callable[[int, torch.dtype], tuple[nn.Module, Callable[[], torch.Tensor]]]


def stair_ops(s: Settings) -> list[StairOp]:
    dev, cl = s.device, torch.channels_last

    def conv(k: int, hw: int) -> Callable:
        def build(c: int, dtype: torch.dtype):
            m = nn.Conv2d(c, c, k, padding=k // 2, bias=False).to(dev, dtype).eval()
            m = m.to(memory_format=cl)
            shape = (s.conv_batch, c, hw, hw)
            return m, lambda: torch.randn(shape, device=dev, dtype=dtype).to(memory_format=cl)

        return build

    def linear(as_output: bool) -> Callable:
        def build(c: int, dtype: torch.dtype):
            fin, fout = (768, c) if as_output else (c, 768)
            m = nn.Linear(fin, fout).to(dev, dtype).eval()
            return m, lambda: torch.randn(s.tokens, fin, device=dev, dtype=dtype)

        return build

    ops = []
    for k in (1, 3):
        for hw, centre in s.conv_stages:
            window = ((f"{hw}x{hw}, around {centre}", window_counts(centre, s)),)
            ops.append(StairOp(f"conv{k}x{k}", window, conv(k, hw)))
    for as_output, what in ((True, "out"), (False, "in")):
        windows = tuple(
            (f"{s.tokens} rows, around {c}", window_counts(c, s)) for c in s.linear_centres
        )
        ops.append(StairOp(f"linear {what}", windows, linear(as_output)))
    return ops


def window_counts(centre: int, s: Settings) -> list[int]:
    counts = set(range(centre - s.half, centre + s.half + 1)) | {centre + p for p in s.probes}
    return sorted(c for c in counts if c > 0)


def _stair_dtypes(s: Settings) -> dict[str, tuple[torch.dtype, bool]]:
    if not s.device.startswith("cuda"):
        return {"fp32": (torch.float32, False)}
    return {"fp16": (torch.float16, False), "tf32": (torch.float32, True)}


def staircase_window(
    op: StairOp, counts: list[int], dtype: torch.dtype, s: Settings, compiled: bool
) -> dict[str, Any]:
    """Times every channel count of the window in one interleaved comparison."""
    l2 = l2_bytes(s.device)
    variants, errors = {}, {}
    for c in counts:
        module, make = op.build(c, dtype)
        inputs = buffers(make, s.device, l2)
        with torch.inference_mode():
            want = _fp32_reference(module, inputs[0])
            fn = _compiled(module, s) if compiled else module
            errors[c] = rel_error(fn(inputs[0]), want)
        variants[c] = (fn, inputs)
    timed = repeated(variants, s)
    return {
        "channels": counts,
        "ms": [timed[c]["ms"] for c in counts],
        "rel_error_max": max(errors.values()),
    }


def _fp32_reference(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    ref = copy.deepcopy(module).float()
    with allow_tf32(False):
        return ref(x.float())


def _compiled(module: nn.Module, s: Settings) -> Callable:
    # Every channel count is a new module of one class: without a higher limit Dynamo would
    # stop recompiling after 8 and silently run the rest eagerly.
    for knob in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 4096)
    kwargs: dict[str, Any] = {"backend": s.compile_backend, "dynamic": False}
    if s.compile_backend == "inductor" and s.compile_mode:
        kwargs["mode"] = s.compile_mode
    return torch.compile(module, **kwargs)


def section_staircase(s: Settings, deadline: Deadline, compiled: bool = False) -> dict:
    torch.backends.cudnn.benchmark = True
    results: list[dict[str, Any]] = []
    dtypes = _stair_dtypes(s)
    if compiled:
        dtypes = dict(list(dtypes.items())[:1])  # fp16 only (fp32 on the CPU)
    for op in stair_ops(s):
        windows = op.windows[: s.compile_windows] if compiled else op.windows
        for label, counts in windows:
            for dname, (dtype, use_tf32) in dtypes.items():
                row = {"op": op.name, "window": label, "dtype": dname, "compiled": compiled}
                if deadline.passed():
                    results.append({**row, "skipped": "the run's time budget was spent"})
                    continue
                start = time.monotonic()
                try:
                    with allow_tf32(use_tf32):
                        row.update(staircase_window(op, counts, dtype, s, compiled))
                except Exception as exc:  # one op failing must not lose the others
                    row["error"] = _error(exc)
                row["seconds"] = round(time.monotonic() - start, 1)
                results.append(row)
                _progress(f"staircase {op.name} {label} {dname}", row)
        if compiled:
            torch._dynamo.reset()
    return {"rows": results, "alignment": alignment_summary(results)}


def alignment_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per op and dtype, what padding up to each multiple m buys.

    For every measured count c that is a multiple of m/2 but not of m (odd counts for
    m=2), the ratio t(c) / t(next multiple of m) — over 1 means padding up to the multiple
    is faster despite the extra channels. The median over the windows says whether moving
    from m/2 to m pays; the recommended ``round_to`` is the largest m that pays by
    ``PAYS`` or more."""
    by_key: dict[tuple, dict[int, float]] = {}
    for row in rows:
        if "ms" not in row or row.get("compiled"):
            continue
        times = by_key.setdefault((row["op"], row["dtype"]), {})
        for c, ms in zip(row["channels"], row["ms"]):
            times[c] = statistics.median(ms)
    summary = []
    for (op, dtype), times in sorted(by_key.items()):
        gains = {}
        for m in PAD_MULTIPLES:
            ratios = [
                times[c] / times[-(-c // m) * m]
                for c in times
                if c % m and c % max(m // 2, 1) == 0 and -(-c // m) * m in times
            ]
            if ratios:
                gains[m] = {
                    "median": statistics.median(ratios),
                    "min": min(ratios),
                    "max": max(ratios),
                    "n": len(ratios),
                }
        paying = [m for m, g in gains.items() if g["median"] >= PAYS]
        summary.append(
            {"op": op, "dtype": dtype, "gains": gains, "round_to": max(paying, default=1)}
        )
    return summary


# -- pruned models -------------------------------------------------------------------------------


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random batch-norm statistics and affine parameters (no channel dead by accident)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


@dataclass
class Built:
    name: str
    model: nn.Module
    head: nn.Module
    example: torch.Tensor  # batch 1, CPU, fp32


def build_models(s: Settings) -> list[Built]:
    import timm
    import torchvision

    torch.manual_seed(0)
    x = torch.randn(1, 3, s.image, s.image)
    built = []
    if "resnet" in s.models:
        resnet = randomize_bn(getattr(torchvision.models, s.resnet)())
        built.append(Built(s.resnet, resnet, resnet.fc, x))
    if "vit" in s.models:
        vit = timm.create_model(s.vit, pretrained=False, img_size=s.image).eval()
        built.append(Built(s.vit, vit, vit.head, x))
    return built


def variant_name(tool: str, ratio: float, align: str) -> str:
    """``fxprune 0.5 round_to=8``: the report finds variants by these names."""
    return f"{tool} {ratio:g} {align}"


FXPRUNE_ALIGNS = {"round_to=1": dict(round_to=1), "round_to=8": dict(round_to=8)}
FXPRUNE_ALIGNS["pad 8"] = dict(round_to=8, align="pad")


def prune_variants(b: Built, s: Settings) -> dict[str, dict[str, Any]]:
    """The original, fxprune's three alignments at each of ``s.ratios`` and Torch-Pruning's
    model at the first ratio (all fp32, CPU). A variant whose every parameter shape equals an
    earlier one's is the same architecture: it is recorded as ``same_as`` and not timed
    again (at ratio 0.5 the widths halve to multiples of 8, so all three alignments agree;
    at 0.4 they differ: 38, 32 or 40 of 64 channels)."""
    out: dict[str, dict[str, Any]] = {"original": {"module": b.model}}
    for ratio in s.ratios:
        for align, kwargs in FXPRUNE_ALIGNS.items():
            name = variant_name("fxprune", ratio, align)
            start = time.monotonic()
            try:
                res = fxprune.prune(b.model, b.example, ratio=ratio, ignore=[b.head], **kwargs)
                out[name] = {"module": res.module, "prune_s": time.monotonic() - start}
            except Exception as exc:
                out[name] = {"error": _error(exc)}
            out[name]["ratio"] = ratio
    name = variant_name("Torch-Pruning", s.ratios[0], "round_to=8")
    start = time.monotonic()
    try:
        out[name] = {"module": prune_torch_pruning(b, s.ratios[0])}
        out[name]["prune_s"] = time.monotonic() - start
    except Exception as exc:
        out[name] = {"error": _error(exc)}
    out[name]["ratio"] = s.ratios[0]
    shapes: dict[tuple, str] = {}
    for name, v in out.items():
        if "module" not in v:
            continue
        v["macs"] = fxprune.count_macs(v["module"], b.example)
        v["params"] = fxprune.count_params(v["module"])
        key = tuple((k, tuple(t.shape)) for k, t in v["module"].state_dict().items())
        if key in shapes and not name.startswith("Torch-Pruning"):
            v["same_as"] = shapes[key]
            del v["module"]
        else:
            shapes.setdefault(key, name)
    return out


def prune_torch_pruning(b: Built, ratio: float) -> nn.Module:
    """Torch-Pruning 1.6's documented usage at the same ratio; its timm ViT recipe for ViTs
    (heads declared on qkv, head dims pruned, the attention modules' sizes set after)."""
    import torch_pruning as tp

    model = copy.deepcopy(b.model)
    names = {id(m): n for n, m in b.model.named_modules()}
    head = model.get_submodule(names[id(b.head)])
    attention = [m for m in model.modules() if type(m).__name__ == "Attention"]
    extra: dict[str, Any] = {}
    if attention:
        extra = dict(
            num_heads={m.qkv: m.num_heads for m in attention},
            prune_head_dims=True,
            prune_num_heads=False,
        )
    pruner = tp.pruner.MetaPruner(
        model,
        b.example,
        importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=ratio,
        round_to=8,
        ignored_layers=[head],
        global_pruning=False,
        **extra,
    )
    pruner.step()
    for m in attention:
        m.num_heads = pruner.num_heads[m.qkv]
        m.head_dim = m.qkv.out_features // (3 * m.num_heads)
        if hasattr(m, "attn_dim"):
            m.attn_dim = m.num_heads * m.head_dim
    return model.eval()


def _to_device(module: nn.Module, s: Settings, dtype: torch.dtype) -> nn.Module:
    module = copy.deepcopy(module).to(s.device, dtype).eval()
    return module.to(memory_format=torch.channels_last)


def section_models(s: Settings, deadline: Deadline, compiled: bool = False) -> dict:
    """Eager and CUDA-graph replay (``models``) or torch.compile (``models_compile``)."""
    torch.backends.cudnn.benchmark = True
    dtype = torch.float16 if s.device.startswith("cuda") else torch.float32
    if compiled:
        modes = ("compile",)
    else:
        modes = s.model_modes if s.device.startswith("cuda") else ("eager",)
    results = []
    lost = ""  # after an error that poisons the CUDA context, nothing else runs here
    for b in build_models(s):
        if deadline.passed():
            results.append({"model": b.name, "skipped": "the run's time budget was spent"})
            continue
        variants = prune_variants(b, s)
        record: dict[str, Any] = {"model": b.name, "variants": {}, "batches": []}
        for name, v in variants.items():
            record["variants"][name] = {k: v[k] for k in v if k != "module"}
        runnable = {n: v["module"] for n, v in variants.items() if "module" in v}
        for mode in modes:  # all of eager before any capture: a failed capture loses less
            for batch in _compile_batches(s) if compiled else s.batches:
                row = {"batch": batch, "mode": mode}
                # A compile cannot be cut short: start one only with time for it.
                if deadline.left() < (s.compile_reserve if compiled else 0):
                    record["batches"].append({**row, "skipped": "the run's time budget was spent"})
                    continue
                if lost:
                    record["batches"].append({**row, "skipped": lost})
                    continue
                try:
                    with sdpa_backends():
                        row.update(time_models(runnable, batch, b.example, s, dtype, mode, record))
                    torch._dynamo.reset()
                    if s.device.startswith("cuda"):
                        torch.cuda.empty_cache()
                except Exception as exc:
                    row["error"] = _error(exc)
                    if type(exc).__name__ == "AcceleratorError":
                        lost = f"not run: the CUDA context was lost ({type(exc).__name__})"
                record["batches"].append(row)
                _progress(f"models {b.name} batch {batch} {mode}", row)
        results.append(record)
    return {
        "rows": results,
        "compiled": compiled,
        "compile_mode": s.compile_mode,
        "ratios": list(s.ratios),
    }


def sdpa_backends() -> contextlib.AbstractContextManager:
    """Flash, memory-efficient or math attention: not cuDNN's, which a CUDA-graph capture of
    a ViT on the H200 (torch 2.11) ended in an illegal memory access."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return sdpa_kernel(backends)


def cuda_graphed(module: nn.Module) -> Callable:
    """``module`` replayed as CUDA graphs of its eager kernels (Dynamo's "cudagraphs" backend:
    no Inductor, no fusion): the time is the GPU's, without Python's and the launches'
    overhead, as serving stacks run it.

    A hand-made ``torch.cuda.CUDAGraph`` per variant was tried first (H200, torch 2.11):
    the second batch's capture hit an illegal memory access once the first batch's graphs
    were freed, which is the kind of pool and workspace bookkeeping PyTorch's cudagraph
    trees do (``mode="reduce-overhead"`` ran every batch in that same run)."""
    return torch.compile(module, backend="cudagraphs", dynamic=False)


def _compile_batches(s: Settings) -> tuple:
    """The batches through torch.compile, most telling first (the budget may end early)."""
    order = [b for b in (32, 256, 1) if b in s.batches]
    return tuple(order + [b for b in s.batches if b not in order])


def time_models(
    modules: dict[str, nn.Module],
    batch: int,
    example: torch.Tensor,
    s: Settings,
    dtype: torch.dtype,
    mode: str,
    record: dict[str, Any],
) -> dict[str, Any]:
    """One interleaved comparison of every variant at ``batch`` run as ``mode`` ("eager",
    "cuda graph", "compile"), speedups over the original run the same way."""
    gen = torch.Generator().manual_seed(batch)
    shape = (batch, *example.shape[1:])
    inputs = [
        torch.randn(shape, generator=gen).to(s.device, dtype).to(memory_format=torch.channels_last)
        for _ in range(2 if batch > 32 else 4)
    ]
    variants, checks = {}, {}
    for name, module in modules.items():
        on_device = _to_device(module, s, dtype)
        start = time.monotonic()
        with torch.inference_mode():
            if mode == "cuda graph":
                fn = cuda_graphed(on_device)
            else:
                fn = _compiled(on_device, s) if mode == "compile" else on_device
            out = fn(inputs[0])[:2]  # the reference runs on the CPU: two samples suffice
            sync(s.device)
            want = module(inputs[0][:2].float().cpu().contiguous())
        checks[name] = {
            "rel_error_vs_fp32": rel_error(out, want),
            "first_call_s": round(time.monotonic() - start, 2),
        }
        variants[name] = (fn, inputs)
    timed = repeated(variants, s, baseline="original", model_level=True)
    macs = {n: v.get("macs") for n, v in record["variants"].items()}
    rows = {}
    for name, t in timed.items():
        macs_x = macs["original"] / macs[name] if macs.get(name) else None
        rows[name] = {
            **t,
            **checks[name],
            "macs_reduction": macs_x,
            "fraction_of_macs": statistics.median(t["speedup"]) / macs_x if macs_x else None,
        }
    return {"variants": rows}


# -- 2:4 on sparse tensor cores ------------------------------------------------------------------


def two_four(weight: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest magnitudes of every 4 consecutive input features."""
    groups = weight.reshape(-1, 4)
    drop = groups.abs().argsort(-1)[:, :2]
    return groups.scatter(1, drop, 0).reshape(weight.shape)


@contextlib.contextmanager
def cutlass(force: bool) -> Iterator[None]:
    from torch.sparse import SparseSemiStructuredTensor

    before = SparseSemiStructuredTensor._FORCE_CUTLASS
    SparseSemiStructuredTensor._FORCE_CUTLASS = force
    try:
        yield
    finally:
        SparseSemiStructuredTensor._FORCE_CUTLASS = before


def sparse_kernels(s: Settings) -> dict[str, bool]:
    """Which semi-structured kernels to time: {name: force CUTLASS}."""
    if not s.device.startswith("cuda"):
        return {}
    kernels = {"CUTLASS": True}
    cusparselt = getattr(torch.backends, "cusparselt", None)
    if cusparselt is not None and cusparselt.is_available():
        kernels = {"cuSPARSELt": False, **kernels}
    return kernels


def section_sparse24(s: Settings, deadline: Deadline) -> dict:
    from torch.sparse import to_sparse_semi_structured

    l2 = l2_bytes(s.device)
    rows: list[dict[str, Any]] = []
    unsupported: dict[str, str] = {}
    for label, fin, fout in s.sparse_shapes:
        for dname in s.sparse_dtypes:
            dtype = getattr(torch, dname)
            weight = two_four(torch.randn(fout, fin, device=s.device, dtype=dtype))
            sparse = {}
            probe = torch.randn(128, fin, device=s.device, dtype=dtype)
            for kname, force in sparse_kernels(s).items():
                try:  # a kernel this GPU or build lacks fails here, not in the timed rows
                    with cutlass(force):
                        sparse[kname] = to_sparse_semi_structured(weight)
                        F.linear(probe, sparse[kname])
                except Exception as exc:
                    sparse.pop(kname, None)
                    unsupported.setdefault(kname, _error(exc).splitlines()[0])
            for tokens in s.sparse_tokens:
                row = {"shape": label, "in": fin, "out": fout, "dtype": dname, "tokens": tokens}
                if deadline.passed():
                    rows.append({**row, "skipped": "the run's time budget was spent"})
                    continue
                try:
                    row.update(_time_sparse(weight, sparse, tokens, dtype, s, l2))
                except Exception as exc:
                    row["error"] = _error(exc)
                rows.append(row)
                _progress(f"2:4 {label} {dname} {tokens} tokens", row)
    kernels = [k for k in sparse_kernels(s) if k not in unsupported]
    return {"rows": rows, "kernels": kernels, "unsupported": unsupported}


def _time_sparse(weight, sparse, tokens, dtype, s, l2) -> dict[str, Any]:
    make = lambda: torch.randn(tokens, weight.shape[1], device=s.device, dtype=dtype)  # noqa: E731
    inputs = buffers(make, s.device, l2)
    want = F.linear(inputs[0].double(), weight.double())
    variants = {"dense": (lambda x: F.linear(x, weight), inputs)}
    errors = {}
    for kname, ws in sparse.items():
        variants[kname] = (lambda x, ws=ws: F.linear(x, ws), inputs)
    with torch.inference_mode():
        for name, (fn, _) in variants.items():
            errors[name] = rel_error(fn(inputs[0]), want)
    timed = repeated(variants, s, baseline="dense")
    flops = 2 * tokens * weight.shape[0] * weight.shape[1]
    return {
        name: {**t, "rel_error_vs_fp64": errors[name], "dense_tflops": _tflops(flops, t["ms"])}
        for name, t in timed.items()
    }


def _tflops(flops: int, ms: list[float]) -> float:
    return flops / statistics.median(ms) / 1e9


# -- 2:4 models through fxprune ------------------------------------------------------------------


def build_sparse_models(s: Settings) -> list[tuple[str, nn.Module, tuple]]:
    """(name, model, (batch, tokens) shapes): BERT-base and a LLaMA-shaped stack."""
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaModel

    torch.manual_seed(0)
    b, ll = s.bert, s.llama
    bert = BertModel(
        BertConfig(
            hidden_size=b["hidden"],
            num_hidden_layers=b["layers"],
            num_attention_heads=b["heads"],
            intermediate_size=b["ffn"],
            vocab_size=1024,
        ),
        add_pooling_layer=False,
    ).eval()
    llama = LlamaModel(
        LlamaConfig(
            hidden_size=ll["hidden"],
            num_hidden_layers=ll["layers"],
            num_attention_heads=ll["heads"],
            num_key_value_heads=ll["heads"],
            intermediate_size=ll["ffn"],
            vocab_size=1024,
            max_position_embeddings=4096,
            use_cache=False,
        )
    ).eval()
    name_b = f"BERT-base-shaped encoder ({b['layers']} layers, {b['hidden']})"
    name_l = f"LLaMA-7B-shaped decoder ({ll['layers']} blocks, {ll['hidden']}/{ll['ffn']})"
    return [
        (name_b, bert, s.encoder_shapes),
        (name_l, llama, s.decoder_shapes),
    ]


class _LastHidden(nn.Module):
    """The model's last hidden state as a plain tensor (what is timed and compared)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).last_hidden_state


def section_sparse24_models(s: Settings, deadline: Deadline) -> dict:
    dtype = torch.float16 if s.device.startswith("cuda") else torch.float32
    rows = []
    for name, model, shapes in build_sparse_models(s):
        if deadline.passed():
            rows.append({"model": name, "skipped": "the run's time budget was spent"})
            continue
        try:
            dense, prep = sparse_dense_model(_LastHidden(model), s, dtype)
        except Exception as exc:
            rows.append({"model": name, "error": _error(exc)})
            _progress(f"2:4 model {name}", rows[-1])
            continue
        for batch, tokens in shapes:
            row: dict[str, Any] = {"model": name, "batch": batch, "tokens": tokens, **prep}
            if deadline.passed():
                rows.append({**row, "skipped": "the run's time budget was spent"})
                continue
            try:
                row.update(time_sparse_model(dense, batch, tokens, s))
            except Exception as exc:
                row["error"] = _error(exc)
            rows.append(row)
            _progress(f"2:4 model {name} {batch}x{tokens}", row)
            torch._dynamo.reset()
        del dense
        if s.device.startswith("cuda"):
            torch.cuda.empty_cache()
    return {"rows": rows}


def sparse_dense_model(model: nn.Module, s: Settings, dtype) -> tuple[nn.Module, dict]:
    """``fxprune.sparsify`` (2:4; no permutation: speed is the question here) on the CPU in
    fp32, its weights loaded back into the model itself (the state_dict keys are the
    original's), on the device in ``dtype``: the masked model, run dense."""
    ids = torch.randint(0, 1024, (1, 64), generator=torch.Generator().manual_seed(0))
    start = time.monotonic()
    sp = fxprune.sparsify(model, ids, pattern="2:4", permute=False)
    seconds = time.monotonic() - start
    dense = copy.deepcopy(model)
    dense.load_state_dict(sp.module.state_dict())
    linears = [m for m in dense.modules() if isinstance(m, nn.Linear)]
    two_four_linears = sum(is_two_four(m.weight) for m in linears)
    prep = {"sparsify_s": round(seconds, 1), "linears": len(linears), "two_four": two_four_linears}
    return dense.to(s.device, dtype).eval(), prep


def time_sparse_model(dense: nn.Module, batch: int, tokens: int, s: Settings) -> dict:
    """The masked model dense against ``torch.compile(backend=fxprune.backend(...))`` with
    only the semi-structured lowering, which turns its 2:4 Linear weights into sparse
    tensors (cuSPARSELt); outputs against the same masked model in fp32. Both go through
    Dynamo (the dense one with its plain "eager" backend), so that the ratio is the
    sparse kernels' and not Dynamo's lower Python overhead."""
    gen = torch.Generator().manual_seed(tokens)
    ids = [torch.randint(0, 1024, (batch, tokens), generator=gen).to(s.device) for _ in range(3)]
    be = fxprune.backend(passes=[SemiStructuredPass()], then="eager", round_to=1)
    lowered = torch.compile(copy.deepcopy(dense), backend=be, dynamic=False)
    plain = torch.compile(dense, backend="eager", dynamic=False)
    with torch.inference_mode(), allow_tf32(False):
        want = copy.deepcopy(dense).float()(ids[0])
        out_dense, out_sparse = plain(ids[0]), lowered(ids[0])
    reasons = [r for g in be.compiled for r in g.semi_structured.values()]
    variants = {"dense (masked)": (plain, ids), "2:4 semi-structured": (lowered, ids)}
    timed = repeated(variants, s, baseline="dense (masked)", model_level=True)
    return {
        "converted": sum(r == "converted" for r in reasons),
        "not_converted": sorted({r for r in reasons if r != "converted"})[:5],
        "fell_through": [g.reason for g in be.compiled if g.mode == "unchanged"][:3],
        "rel_error_dense_vs_fp32": rel_error(out_dense, want),
        "rel_error_sparse_vs_fp32": rel_error(out_sparse, want),
        "rel_error_sparse_vs_dense": rel_error(out_sparse, out_dense),
        "timed": timed,
    }


# -- running and reporting -----------------------------------------------------------------------


def _error(exc: BaseException) -> str:
    tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
    return f"{type(exc).__name__}: {exc}"[:600] + "\n" + "".join(tb[-3:])[-1200:]


def _progress(what: str, row: dict[str, Any]) -> None:
    state = "error" if "error" in row else "skipped" if "skipped" in row else "ok"
    print(f"[{time.strftime('%H:%M:%S')}] {what}: {state}", flush=True)
    if state == "error":
        print("    " + row["error"].splitlines()[0], flush=True)


RUNNERS: dict[str, Callable[[Settings, Deadline], dict]] = {
    "env": section_env,
    "sparse24": section_sparse24,
    "staircase": section_staircase,
    "models": section_models,
    "sparse24_models": section_sparse24_models,
    "staircase_compile": lambda s, d: section_staircase(s, d, compiled=True),
    "models_compile": lambda s, d: section_models(s, d, compiled=True),
}


def run_isolated(name: str, deadline: Deadline, flags: list[str]) -> dict[str, Any]:
    """One section in a process of its own: a CUDA error that poisons the context (an
    illegal memory access) then costs that section, not every one after it."""
    with tempfile.TemporaryDirectory(prefix="fxprune-gpu-") as tmp:
        part = Path(tmp) / "section.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--sections", name]
        cmd += ["--in-process", "--no-report", "--out", str(part)]
        cmd += ["--budget", f"{max(deadline.left(), 1):.0f}", *flags]
        try:
            proc = subprocess.run(cmd, timeout=max(deadline.left(), 1) + 240)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = "killed at the time limit"
        if part.exists():
            section = json.loads(part.read_text())["sections"].get(name)
            if section is not None:
                return section
        return {"error": f"the section's process ended ({code}) before writing its results"}


def run(
    s: Settings,
    sections: Sequence[str],
    budget: float,
    out: Path | None,
    argv: list,
    isolate: list[str] | None = None,
) -> dict:
    """Run ``sections`` in order; ``isolate``: run each in a child process given these
    flags (``--quick``, ...), else in this one."""
    deadline = Deadline(budget)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {
        "command": "python bench/gpu.py " + " ".join(argv),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "settings": {k: v for k, v in vars(s).items()},
        "sections": {},
    }
    for name in sections:
        start = time.monotonic()
        print(f"== {name} ({deadline.left():.0f} s of the budget left)", flush=True)
        try:
            if isolate is not None:
                data["sections"][name] = run_isolated(name, deadline, isolate)
            else:
                data["sections"][name] = RUNNERS[name](s, deadline)
        except Exception as exc:
            data["sections"][name] = {"error": _error(exc)}
            _progress(name, data["sections"][name])
        data["sections"][name]["seconds"] = round(time.monotonic() - start, 1)
        if out is not None:  # after every section: a cut-off run keeps what it measured
            write_bytes_atomic(out, json.dumps(data, indent=1, default=str).encode())
    return data


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated, in order")
    p.add_argument("--out", default=str(ROOT / "docs" / "gpu.json"), help="JSON results")
    p.add_argument("--markdown", default=str(ROOT / "docs" / "BENCHMARKS_gpu.md"))
    p.add_argument("--plot", default=str(ROOT / "docs" / "gpu_staircase.png"))
    p.add_argument("--budget", type=float, default=3600, help="seconds for the whole run")
    p.add_argument("--quick", action="store_true", help="fewer points and calls (minutes)")
    p.add_argument("--smoke-cpu", action="store_true", help="tiny shapes on the CPU (tests)")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode for *_compile")
    p.add_argument("--cuda-graph", action="store_true", help="models also as CUDA graphs")
    p.add_argument("--ratios", default=None, help="models' pruning ratios, e.g. 0.5,0.4")
    p.add_argument("--models", default=None, help="end-to-end models: resnet,vit (both)")
    p.add_argument("--batches", default=None, help="end-to-end batch sizes, e.g. 1,32,256")
    p.add_argument(
        "--from-json",
        default=None,
        help="render earlier runs' JSON only; a.json,b.json: each section from the last run",
    )
    p.add_argument("--in-process", action="store_true", help="run every section in this process")
    p.add_argument("--no-report", action="store_true", help="write the JSON only")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.from_json:
        runs = [json.loads(Path(f).read_text()) for f in args.from_json.split(",")]
        data = runs[0] if len(runs) == 1 else gpu_report.merge_runs(runs)
        if len(runs) > 1:
            data["sources"] = args.from_json.split(",")
        gpu_report.write_report(data, Path(args.markdown), Path(args.plot))
        return 0
    unknown = [n for n in args.sections.split(",") if n not in SECTIONS]
    if unknown:
        print(f"error: unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
        return 2
    if args.smoke_cpu:
        s = Settings.smoke_cpu()
    elif not torch.cuda.is_available():
        print("error: " + NO_CUDA.format(torch=torch.__version__, cuda=torch.version.cuda))
        return 2
    else:
        s = Settings.quick() if args.quick else Settings(device="cuda")
    if args.compile_mode:
        s.compile_mode = None if args.compile_mode == "default" else args.compile_mode
    if args.cuda_graph:
        s.model_modes = (*s.model_modes, "cuda graph")
    if args.ratios:
        s.ratios = tuple(float(r) for r in args.ratios.split(","))
    flags = ["--quick"] * args.quick + ["--smoke-cpu"] * args.smoke_cpu
    flags += ["--compile-mode", args.compile_mode] if args.compile_mode else []
    if args.models:
        s.models = tuple(m.strip() for m in args.models.split(","))
        if not set(s.models) <= {"resnet", "vit"}:
            print(f"error: --models {args.models}: choose from resnet, vit")
            return 2
    if args.batches:
        s.batches = tuple(int(b) for b in args.batches.split(","))
    flags += ["--cuda-graph"] * args.cuda_graph + (["--ratios", args.ratios] if args.ratios else [])
    flags += (["--models", args.models] if args.models else []) + (
        ["--batches", args.batches] if args.batches else []
    )
    isolate = None if args.in_process else flags
    data = run(s, args.sections.split(","), args.budget, Path(args.out), argv, isolate)
    if not args.no_report:
        gpu_report.write_report(data, Path(args.markdown), Path(args.plot))
        print(gpu_report.summary_lines(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
