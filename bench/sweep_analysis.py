"""Sweep: trace + channel analysis time of fxprune against Torch-Pruning's DependencyGraph.

For every torchvision classification model, every torchvision segmentation model, the
pretrained MiniLM BERT (``hf:minilm``) and a tiny random LLaMA (transformers), one fresh
subprocess per model (one model in memory at a time) builds the model and measures, on
the same model and example input:

- ``fxprune.analyze(model, x)`` (trace + channel analysis): ok or the error's first line,
  the frontend used, the number of groups and of prunable groups;
- ``tp.DependencyGraph().build_dependency(model, example_inputs=x)``: ok or the error.

Each tool is called once as a warm-up (its time is kept as ``first_s``), then three
times in interleaved rounds (the order alternates from round to round, so drifts of a
shared machine hit both tools alike); the reported time is the median of the three, and
``tp_over_fxprune`` is the median of the per-round ratios TP time / fxprune time.

Inputs: 1x3x224x224 (1x3x299x299 for inception_v3). Segmentation models use 1x3x256x256
instead of their 520x520 default: at 520x520 a sweep on a 2-core CPU takes too long, and
the analysis cost grows with the activations' size, so these times are lower bounds.
Segmentation models are built with ``weights=None, weights_backbone=None`` (random init).

    python bench/sweep_analysis.py                          # full sweep, JSON to docs/
    python bench/sweep_analysis.py --models resnet50,vit_b_16,hf:minilm,llama-tiny
    python bench/sweep_analysis.py --from-json docs/sweep_analysis.json --markdown
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# The Hugging Face loaders must never reach for the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_torch_pruning import git_state  # noqa: E402  one definition for every harness

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

logger = logging.getLogger(__name__)

CLASSIFIER_SHAPE = (1, 3, 224, 224)
INCEPTION_SHAPE = (1, 3, 299, 299)
SEGMENTATION_SHAPE = (1, 3, 256, 256)  # not the 520x520 default: see the module docstring
EXTRA_MODELS = ("hf:minilm", "llama-tiny")
# Models whose construction alone takes minutes or several GB: they get --long-timeout.
LARGE_MODELS = frozenset(
    {
        "vit_h_14",
        "vit_l_16",
        "vit_l_32",
        "regnet_y_128gf",
        "regnet_y_32gf",
        "regnet_x_32gf",
        "regnet_y_16gf",
        "efficientnet_v2_l",
        "efficientnet_b7",
        "convnext_large",
        "swin_v2_b",
    }
)


# --------------------------------------------------------------------------- model list


def all_models() -> list[tuple[str, str]]:
    """(name, family) of every model of the sweep, in sweep order."""
    import torchvision

    classifiers = torchvision.models.list_models(module=torchvision.models)
    segmenters = torchvision.models.list_models(module=torchvision.models.segmentation)
    return (
        [(n, "classification") for n in classifiers]
        + [(n, "segmentation") for n in segmenters]
        + [(n, "transformers") for n in EXTRA_MODELS]
    )


def family_of(name: str) -> str:
    for model, family in all_models():
        if model == name:
            return family
    raise SystemExit(
        f"unknown model {name!r}: use a torchvision classification or "
        f"segmentation model name, or one of {', '.join(EXTRA_MODELS)}"
    )


def build_model(name: str, family: str) -> tuple[Any, Any, str]:
    """(model in eval mode, example inputs, a description of the inputs)."""
    import torch
    import torchvision

    torch.manual_seed(0)
    if family == "classification":
        model = torchvision.models.get_model(name, weights=None).eval()
        shape = INCEPTION_SHAPE if name == "inception_v3" else CLASSIFIER_SHAPE
        return model, torch.randn(*shape), "x".join(map(str, shape))
    if family == "segmentation":
        model = torchvision.models.get_model(name, weights=None, weights_backbone=None).eval()
        return model, torch.randn(*SEGMENTATION_SHAPE), "x".join(map(str, SEGMENTATION_SHAPE))
    if name == "hf:minilm":
        from fxprune.models import load_model

        model, inputs = load_model("hf:minilm")
        shape = tuple(inputs["input_ids"].shape)
        return model, inputs, f"input_ids+attention_mask {shape[0]}x{shape[1]}"
    if name == "llama-tiny":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            use_cache=False,
        )
        model = LlamaForCausalLM(config).eval()
        return model, {"input_ids": torch.randint(0, 128, (1, 8))}, "input_ids 1x8"
    raise SystemExit(f"no builder for {name!r}")


# --------------------------------------------------------------------------- one model


def _error(exc: BaseException) -> dict[str, str]:
    """The error's type and first line, and the innermost frame that raised it."""
    lines = str(exc).strip().splitlines()
    frames = traceback.extract_tb(exc.__traceback__)
    where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else ""
    return {"error": f"{type(exc).__name__}: {lines[0] if lines else ''}".strip(), "where": where}


class _Tool:
    """One timed callable: a warm-up call, then timed calls while it keeps succeeding."""

    def __init__(self, name: str, fn: Callable[[], Any]) -> None:
        self.name = name
        self.fn = fn
        self.times: list[float] = []
        self.record: dict[str, Any] = {"ok": False}
        self.result: Any = None

    def call(self) -> float | None:
        start = time.perf_counter()
        try:
            result = self.fn()
        except Exception as exc:  # a tool failing on one model is a result, not a crash
            self.record.update(ok=False, **_error(exc))
            logger.debug("%s failed", self.name, exc_info=True)
            return None
        elapsed = time.perf_counter() - start
        self.result = result
        return elapsed


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Raise TimeoutError in the main thread after ``seconds`` (pure-Python loops only)."""

    def expire(signum: int, frame: Any) -> None:
        raise TimeoutError(f"no result within {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def measure_one(
    name: str, runs: int, threads: int, tp_groups_timeout: float = 60
) -> dict[str, Any]:
    import torch
    import torch_pruning as tp

    import fxprune

    torch.set_num_threads(threads)
    family = family_of(name)
    record: dict[str, Any] = {"model": name, "family": family, "threads": threads}
    start = time.perf_counter()
    try:
        model, inputs, described = build_model(name, family)
    except Exception as exc:
        record.update(status="error", stage="build", **_error(exc))
        return record
    record.update(
        input=described,
        build_s=time.perf_counter() - start,
        params=sum(p.numel() for p in model.parameters()),
    )

    fx_tool = _Tool("fxprune", lambda: fxprune.analyze(model, inputs))
    tp_tool = _Tool(
        "torch-pruning", lambda: tp.DependencyGraph().build_dependency(model, example_inputs=inputs)
    )
    tools = (fx_tool, tp_tool)
    for tool in tools:
        first = tool.call()
        if first is not None:
            tool.record.update(ok=True, first_s=first)
    analysis = fx_tool.result
    if analysis is not None:
        fx_tool.record.update(
            frontend=analysis.frontend,
            groups=len(analysis.groups),
            prunable=len(analysis.prunable_groups),
            frozen_reasons=sorted({str(g.reason)[:160] for g in analysis.groups if not g.prunable}),
        )
    if tp_tool.result is not None:
        # Outside the timing: what the DepGraph offers to prune (its default root types).
        # get_all_groups can loop for minutes or exhaust memory on attention models.
        try:
            with _time_limit(tp_groups_timeout):
                tp_tool.record["groups"] = len(list(tp_tool.result.get_all_groups()))
        except (Exception, MemoryError) as exc:
            tp_tool.record["groups_error"] = _error(exc)["error"]
    fx_tool.result = tp_tool.result = analysis = None  # free the graphs before timing

    live = [t for t in tools if t.record["ok"]]
    for r in range(runs):
        for tool in live if r % 2 == 0 else live[::-1]:
            if not tool.record["ok"]:
                continue
            elapsed = tool.call()
            tool.result = None
            if elapsed is not None:
                tool.times.append(elapsed)
    for tool in live:
        if tool.times:
            tool.record.update(median_s=statistics.median(tool.times), times_s=tool.times)
    if len(fx_tool.times) == len(tp_tool.times) == runs:
        ratios = [b / a for a, b in zip(fx_tool.times, tp_tool.times)]
        record["tp_over_fxprune"] = statistics.median(ratios)
    record["fxprune"] = fx_tool.record
    record["torch_pruning"] = tp_tool.record
    record["status"] = "ok" if fx_tool.record["ok"] else "error"
    record["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return record


# --------------------------------------------------------------------------- the sweep


def _limit_memory(max_gb: float) -> Callable[[], None]:
    def apply() -> None:
        # Address space, not RSS: a runaway model fails with an allocation error in the
        # child instead of pushing the shared machine into the OOM killer.
        limit = int(max_gb * (1 << 30))
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return apply


def run_in_subprocess(
    name: str,
    timeout: float,
    runs: int,
    threads: int,
    max_memory_gb: float,
    tp_groups_timeout: float = 60,
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="sweep_analysis_") as folder:
        result_path = Path(folder) / "result.json"
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--one",
            name,
            "--result",
            str(result_path),
            "--runs",
            str(runs),
            "--threads",
            str(threads),
            "--tp-groups-timeout",
            str(tp_groups_timeout),
        ]
        start = time.perf_counter()
        try:
            proc = subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                timeout=timeout,
                preexec_fn=_limit_memory(max_memory_gb) if max_memory_gb > 0 else None,
            )
        except subprocess.TimeoutExpired:
            return {
                "model": name,
                "family": family_of(name),
                "status": "skip",
                "error": f"timeout: no result within {timeout:.0f} s (subprocess killed)",
                "subprocess_s": time.perf_counter() - start,
            }
        wall = time.perf_counter() - start
        if result_path.exists():
            record = json.loads(result_path.read_text())
        else:
            tail = [line for line in proc.stderr.strip().splitlines() if line.strip()][-3:]
            reason = f"subprocess exited with code {proc.returncode}"
            if proc.returncode < 0:
                reason += f" ({signal.Signals(-proc.returncode).name})"
            if any("MemoryError" in t or "can't allocate" in t for t in tail):
                reason += f": out of memory (address-space limit {max_memory_gb:g} GB)"
            record = {
                "model": name,
                "family": family_of(name),
                "status": "skip",
                "error": reason,
                "stderr_tail": tail,
            }
    record["subprocess_s"] = wall
    return record


def _environment(threads: int, max_memory_gb: float) -> dict[str, Any]:
    import torch
    import torch_pruning as tp
    import torchvision

    import fxprune

    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "loadavg_1m_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "threads": threads,
        "max_memory_gb": max_memory_gb,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "torch_pruning": getattr(tp, "__version__", "?"),
        "fxprune": fxprune.__version__,
        "fxprune_git": git_state(),
        "inputs": {
            "classification": "1x3x224x224 (inception_v3: 1x3x299x299)",
            "segmentation": "1x3x256x256 (not the 520x520 default, to keep the sweep short)",
        },
    }


def _save(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def sweep(args: argparse.Namespace) -> dict[str, Any]:
    from tqdm import tqdm

    names = (
        [n.strip() for n in args.models.split(",") if n.strip()]
        if args.models
        else [n for n, _ in all_models()]
    )
    for name in names:
        family_of(name)  # fail early on a typo
    out = Path(args.out)
    previous = json.loads(out.read_text()) if (args.resume or args.redo) and out.exists() else None
    if args.redo and previous is None:
        raise SystemExit(f"--redo needs an earlier run in {out}")
    if args.redo:
        # Re-measure only the named models; every other record stays as it was measured.
        data = previous
        data["environment"].setdefault("redone", []).append(
            {
                "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                "command": " ".join([Path(sys.executable).name, *sys.argv]),
                "models": names,
                "loadavg_1m_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            }
        )
    else:
        data = {"environment": _environment(args.threads, args.max_memory_gb), "results": []}
    done: dict[str, dict[str, Any]] = {}
    if args.resume and previous is not None:
        done = {r["model"]: r for r in previous.get("results", [])}
        data["environment"]["resumed_from"] = previous.get("environment", {}).get("date")
    bar = tqdm(names, desc="sweep", unit="model")
    for name in bar:
        bar.set_postfix_str(name)
        if name in done and done[name].get("status") == "ok":
            data["results"].append(done[name])
            continue
        timeout = args.long_timeout if name in LARGE_MODELS else args.timeout
        record = run_in_subprocess(
            name, timeout, args.runs, args.threads, args.max_memory_gb, args.tp_groups_timeout
        )
        if record.get("status") != "ok":
            bar.write(f"{name}: {record.get('status')}: {record.get('error')}")
        if args.redo:
            record["remeasured"] = data["environment"]["redone"][-1]["date"]
            index = [r["model"] for r in data["results"]]
            if name in index:
                data["results"][index.index(name)] = record
            else:
                data["results"].append(record)
        else:
            data["results"].append(record)
        _save(out, data)  # after each model: a long sweep can be polled and resumed
    if args.redo:
        return data
    data["environment"]["loadavg_1m_at_end"] = (
        os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    )
    data["environment"]["fxprune_git_at_end"] = git_state()
    _save(out, data)
    return data


# --------------------------------------------------------------------------- report


def _ms(seconds: float | None) -> str:
    return "" if seconds is None else f"{seconds * 1e3:.0f}"


def rows(data: dict[str, Any]) -> list[list[str]]:
    table = []
    for r in data["results"]:
        fx, tpr = r.get("fxprune", {}), r.get("torch_pruning", {})
        ratio = r.get("tp_over_fxprune")
        if r.get("status") == "ok":
            status = "ok"
        else:
            status = r.get("status", "?")
        notes = []
        if r.get("status") != "ok":
            notes.append(fx.get("error") or r.get("error", ""))
        if tpr and not tpr.get("ok"):
            notes.append(f"TP: {tpr.get('error', '')}")
        elif tpr.get("groups_error"):
            notes.append(f"TP get_all_groups: {tpr['groups_error']}")
        if r.get("remeasured"):
            notes.append(f"re-measured {r['remeasured']}")
        table.append(
            [
                r["model"],
                r.get("family", ""),
                r.get("input", ""),
                status,
                fx.get("frontend", ""),
                str(fx.get("groups", "")),
                str(fx.get("prunable", "")),
                _ms(fx.get("median_s")),
                _ms(fx.get("first_s")),
                _ms(tpr.get("median_s")) if tpr.get("ok") else "fail" if tpr else "",
                str(tpr.get("groups", "err" if tpr.get("groups_error") else "")),
                f"{ratio:.2f}x" if ratio else "",
                "; ".join(n for n in notes if n)[:160],
            ]
        )
    return table


HEADER = [
    "model",
    "family",
    "input",
    "status",
    "frontend",
    "groups",
    "prunable",
    "fxprune ms",
    "fxprune 1st ms",
    "TP ms",
    "TP groups",
    "TP/fxprune",
    "notes",
]


def summary(data: dict[str, Any]) -> list[str]:
    results = data["results"]
    lines = []
    for family in ("classification", "segmentation", "transformers"):
        fam = [r for r in results if r.get("family") == family]
        if not fam:
            continue
        ok = [r for r in fam if r.get("status") == "ok" and "median_s" in r["fxprune"]]
        times = [r["fxprune"]["median_s"] for r in ok]
        line = f"{family}: {len(ok)}/{len(fam)} analysed by fxprune"
        if times:
            worst = max(ok, key=lambda r: r["fxprune"]["median_s"])
            under = sum(t < 1.0 for t in times)
            line += (
                f"; fxprune median {statistics.median(times) * 1e3:.0f} ms, "
                f"max {max(times) * 1e3:.0f} ms ({worst['model']}), {under}/{len(times)} under 1 s"
            )
        # What tests/test_trace.py once asserted for every classifier: analysed by fx, with
        # something to prune. The sweep reports the exceptions instead of failing on them.
        nothing = [r["model"] for r in ok if not r["fxprune"].get("prunable")]
        if nothing:
            line += f"; no prunable group: {', '.join(nothing)}"
        if family != "transformers":
            not_fx = [r["model"] for r in ok if r["fxprune"].get("frontend") != "fx"]
            if not_fx:
                line += f"; not traced by fx: {', '.join(not_fx)}"
        tp_ok = [r for r in fam if r.get("torch_pruning", {}).get("ok")]
        line += f"; Torch-Pruning DepGraph built on {len(tp_ok)}/{len(fam)}"
        ratios = [r["tp_over_fxprune"] for r in fam if r.get("tp_over_fxprune")]
        if ratios:
            line += (
                f"; TP/fxprune time ratio median {statistics.median(ratios):.1f}x "
                f"(min {min(ratios):.1f}x, max {max(ratios):.1f}x, n={len(ratios)})"
            )
        lines.append(line)
    return lines


def print_report(data: dict[str, Any], markdown: bool) -> None:
    env = data["environment"]
    if markdown:
        print("| " + " | ".join(HEADER) + " |")
        print("|" + "|".join("---" for _ in HEADER) + "|")
        for row in rows(data):
            print("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |")
        print()
        for line in summary(data):
            print(f"- {line}")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"trace + analysis: fxprune vs Torch-Pruning DepGraph ({env['threads']} thread(s))"
    )
    for column in HEADER:
        table.add_column(column, justify="left" if column in [*HEADER[:5], "notes"] else "right")
    for row in rows(data):
        table.add_row(*row)
    console = Console(width=220)
    console.print(table)
    console.print(
        "times: median of 3 interleaved runs after one warm-up (fxprune 1st = the warm-up call); "
        "TP/fxprune = median of per-round ratios (> 1: fxprune faster)"
    )
    for line in summary(data):
        console.print(line)


# --------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", help="comma-separated subset (default: the whole sweep)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "sweep_analysis.json"))
    parser.add_argument("--runs", type=int, default=3, help="timed runs after the warm-up")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads in each subprocess (default 1)"
    )
    parser.add_argument("--timeout", type=float, default=600, help="seconds per model")
    parser.add_argument(
        "--long-timeout", type=float, default=1800, help="seconds for the very large models"
    )
    parser.add_argument(
        "--max-memory-gb",
        type=float,
        default=16,
        help="address-space limit of each subprocess (0: none)",
    )
    parser.add_argument("--resume", action="store_true", help="keep models already ok in --out")
    parser.add_argument(
        "--redo",
        action="store_true",
        help="re-measure only --models and replace their records in --out, keeping the rest",
    )
    parser.add_argument(
        "--tp-groups-timeout",
        type=float,
        default=60,
        help="seconds allowed for counting Torch-Pruning's groups (not timed)",
    )
    parser.add_argument("--from-json", help="only print the report of an earlier run")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if args.one:
        record = measure_one(args.one, args.runs, args.threads, args.tp_groups_timeout)
        Path(args.result).write_text(json.dumps(record, indent=2))
        return 0
    if args.from_json:
        data = json.loads(Path(args.from_json).read_text())
    else:
        data = sweep(args)
        print(f"wrote {args.out}")
    print_report(data, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
