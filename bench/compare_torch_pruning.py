"""fxprune against Torch-Pruning at the same ratio: pruning time, MACs, and ONNX Runtime CPU latency.

For each model (default: ResNet-50, MobileNetV2, RegNetY-800MF; random init, eval mode,
input 1x3x224x224), in its own subprocess:

1. prune at ratio 0.5 with round_to=8 by fxprune (``fxprune.prune(m, x, ratio=0.5,
   round_to=8)``, defaults otherwise, so ``verify=True``: the correctness oracle runs;
   the time without it is recorded too) and by Torch-Pruning's equivalent
   (``tp.pruner.MetaPruner`` with ``MagnitudeImportance(p=2)``, ``pruning_ratio=0.5``,
   ``round_to=8``, the classifier in ``ignored_layers``, ``global_pruning=False``).
   Each is timed ``--prune-runs`` times, in alternating order, on a fresh copy; the median
   wall time is reported;
2. count MACs and parameters of the original and both pruned models with
   ``fxprune.count_macs`` (the same counter for all three), and
   ``tp.utils.count_ops_and_params`` for reference;
3. time original / fxprune / torch-pruning side by side with
   ``fxprune.export.compare_latency`` on ONNX Runtime CPU at batch 1 and 8: one
   interleaved run per model, ``--rounds`` rounds, ``--threads`` intra-op threads.

Reported per model and batch: MACs reduction (original MACs / pruned MACs), speedup
(median of per-round latency ratios original / pruned, with its IQR), efficiency
(speedup / MACs reduction; 1.0 is ideal) for both tools, and fxprune vs Torch-Pruning
(median of per-round ratios of their latencies: > 1 means fxprune's model is faster).

    python bench/compare_torch_pruning.py                      # all three, JSON + PNG to docs/
    python bench/compare_torch_pruning.py --models resnet50 --rounds 20 --threads 1
    python bench/compare_torch_pruning.py --from-json docs/compare_torch_pruning.json --markdown
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

logger = logging.getLogger(__name__)

DEFAULT_MODELS = ("resnet50", "mobilenet_v2", "regnet_y_800mf")
INPUT_SHAPE = (1, 3, 224, 224)
NUM_CLASSES = 1000
TOOLS = ("fxprune", "torch-pruning")
RATIO = 0.5
ROUND_TO = 8


# --------------------------------------------------------------------------- pruning


def build(name: str):
    import torch
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    return model, torch.randn(*INPUT_SHAPE)


def classifiers(model) -> list:
    """The final classifier: every Linear that maps to the class scores."""
    from torch import nn

    found = [
        m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == NUM_CLASSES
    ]
    if not found:
        raise RuntimeError(f"no Linear with {NUM_CLASSES} outputs in {type(model).__name__}")
    return found


def prune_fxprune(model, x, verify: bool = True):
    import fxprune

    return fxprune.prune(model, x, ratio=RATIO, round_to=ROUND_TO, verify=verify).module


def prune_torch_pruning(model, x):
    """Torch-Pruning 1.6's equivalent of fxprune's call; prunes ``model`` in place."""
    import torch_pruning as tp

    pruner = tp.pruner.MetaPruner(
        model,
        x,
        importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=RATIO,
        round_to=ROUND_TO,
        ignored_layers=classifiers(model),
        global_pruning=False,
    )
    pruner.step()
    return model


def _timed(fn, *args, **kwargs) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def conv_widths(model) -> dict[str, int]:
    from torch import nn

    return {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def measure_one(name: str, rounds: int, threads: int, prune_runs: int) -> dict[str, Any]:
    import torch
    import torch_pruning as tp

    import fxprune
    from fxprune.export.latency import compare_latency

    torch.set_num_threads(threads)
    model, x = build(name)
    with torch.no_grad():
        model(x)  # lazy kernel initialisation is nobody's pruning time

    times: dict[str, list[float]] = {"fxprune": [], "fxprune_noverify": [], "torch-pruning": []}
    pruned: dict[str, Any] = {}
    for r in range(prune_runs):
        order = ["fxprune", "fxprune_noverify", "torch-pruning"]
        for tool in order if r % 2 == 0 else order[::-1]:
            if tool == "torch-pruning":
                fresh = copy.deepcopy(model)  # copying is not part of the pruning time
                out, elapsed = _timed(prune_torch_pruning, fresh, x)
            else:
                out, elapsed = _timed(prune_fxprune, model, x, verify=tool == "fxprune")
            times[tool].append(elapsed)
            if tool in TOOLS:
                pruned[tool] = out
    models = {
        "original": model,
        "fxprune": pruned["fxprune"],
        "torch-pruning": pruned["torch-pruning"],
    }
    for m in models.values():
        m.eval()

    record: dict[str, Any] = {"model": name, "input": "x".join(map(str, INPUT_SHAPE))}
    macs = {}
    with torch.no_grad():
        reference_shape = tuple(model(x).shape)
        for key, m in models.items():
            macs[key] = int(fxprune.count_macs(m, x))
            tp_macs, tp_params = tp.utils.count_ops_and_params(m, x)
            shape = tuple(m(x).shape)
            record[key] = {
                "macs": macs[key],
                "params": sum(p.numel() for p in m.parameters()),
                "tp_count_macs": int(tp_macs),
                "tp_count_params": int(tp_params),
                "output_shape_ok": shape == reference_shape,
                "conv_widths": conv_widths(m),
            }
    for key, values in times.items():
        target = record["fxprune"] if key.startswith("fxprune") else record["torch-pruning"]
        label = "prune_noverify_s" if key == "fxprune_noverify" else "prune_s"
        target[label] = statistics.median(values)
        target[label.replace("_s", "_runs_s")] = values

    g = torch.Generator().manual_seed(0)
    fixed = {b: torch.randn(b, *INPUT_SHAPE[1:], generator=g) for b in (1, 8)}
    report = compare_latency(
        models,
        lambda b: fixed[b] if b in fixed else torch.randn(b, *INPUT_SHAPE[1:]),
        backends=("ort",),
        batch_sizes=(1, 8),
        rounds=rounds,
        num_threads=threads,
        macs=macs,
        progress=False,
    )
    record["bench"] = json.loads(report.to_json())
    record["bench_table"] = report.table()
    record["rows"] = summarise(report)
    return record


def _quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3


def summarise(report) -> list[dict[str, Any]]:
    """One row per (backend, batch): both tools' reduction, speedup, efficiency, and their ratio."""
    out = []
    for backend in report.backends:
        for batch in report.batch_sizes:
            row: dict[str, Any] = {"backend": backend, "batch": batch}
            try:
                base = report.find(backend, batch, "original")
            except KeyError:
                continue
            row["original_ms"] = base.median_ms
            for tool in TOOLS:
                try:
                    m = report.find(backend, batch, tool)
                except KeyError:
                    row[tool] = None
                    continue
                reduction, _ = report.reduction(tool)
                row[tool] = {
                    "median_ms": m.median_ms,
                    "macs_reduction": reduction,
                    "speedup": m.speedup,
                    "speedup_q1": m.speedup_q1,
                    "speedup_q3": m.speedup_q3,
                    "efficiency": m.speedup / reduction if reduction else None,
                }
            if row.get("fxprune") and row.get("torch-pruning"):
                fx = report.find(backend, batch, "fxprune").round_ms
                tpr = report.find(backend, batch, "torch-pruning").round_ms
                ratios = [t / f for f, t in zip(fx, tpr)]  # same rounds: > 1 = fxprune faster
                q1, q3 = _quartiles(ratios)
                row["fx_over_tp_speedup"] = statistics.median(ratios)
                row["fx_over_tp_q1"], row["fx_over_tp_q3"] = q1, q3
            out.append(row)
    return out


# --------------------------------------------------------------------------- driver


def run_in_subprocess(name: str, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="compare_tp_") as folder:
        result = Path(folder) / "result.json"
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--one",
            name,
            "--result",
            str(result),
            "--rounds",
            str(args.rounds),
            "--threads",
            str(args.threads),
            "--prune-runs",
            str(args.prune_runs),
        ]
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            return {"model": name, "error": f"timeout after {args.timeout:.0f} s"}
        if not result.exists():
            tail = [line for line in proc.stderr.strip().splitlines() if line.strip()][-5:]
            return {"model": name, "error": f"exit code {proc.returncode}", "stderr_tail": tail}
        record = json.loads(result.read_text())
        record["subprocess_s"] = time.perf_counter() - start
        return record


def git_state() -> str:
    """The commit of the fxprune sources measured, "+dirty" when they differ from it."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "fxprune", "passes", "export"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown"
    return (commit or "unknown") + ("+dirty" if dirty else "")


def environment(args: argparse.Namespace) -> dict[str, Any]:
    import onnxruntime
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
        "threads": args.threads,
        "rounds": args.rounds,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "onnxruntime": onnxruntime.__version__,
        "torch_pruning": getattr(tp, "__version__", "?"),
        "fxprune": fxprune.__version__,
        "fxprune_git": git_state(),
        "ratio": RATIO,
        "round_to": ROUND_TO,
    }


def _fmt(v: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "n/a" if v is None else f"{v:{spec}}{suffix}"


PRUNE_HEADER = [
    "model",
    "tool",
    "prune s",
    "prune s (no verify)",
    "MACs (fxprune count)",
    "MACs (TP count)",
    "params",
    "MACs reduction",
]
LATENCY_HEADER = [
    "model",
    "batch",
    "original ms",
    "fxprune: MACs red.",
    "fxprune: speedup [IQR]",
    "fxprune: eff.",
    "TP: MACs red.",
    "TP: speedup [IQR]",
    "TP: eff.",
    "fxprune/TP [IQR]",
]


def prune_rows(data: dict[str, Any]) -> list[list[str]]:
    rows = []
    for r in data["results"]:
        if "error" in r:
            rows.append([r["model"], "-", r["error"], "", "", "", "", ""])
            continue
        base = r["original"]["macs"]
        for tool in ("original", *TOOLS):
            t = r[tool]
            rows.append(
                [
                    r["model"],
                    tool,
                    _fmt(t.get("prune_s")) if tool != "original" else "",
                    _fmt(t.get("prune_noverify_s")) if tool == "fxprune" else "",
                    f"{t['macs'] / 1e6:.1f}M",
                    f"{t['tp_count_macs'] / 1e6:.1f}M",
                    f"{t['params'] / 1e6:.2f}M",
                    f"{base / t['macs']:.2f}x" if tool != "original" else "",
                ]
            )
    return rows


def latency_rows(data: dict[str, Any]) -> list[list[str]]:
    rows = []
    for r in data["results"]:
        for row in r.get("rows", []):
            cells = [r["model"], str(row["batch"]), _fmt(row["original_ms"])]
            for tool in TOOLS:
                t = row.get(tool)
                if t is None:
                    cells += ["n/a", "n/a", "n/a"]
                    continue
                cells += [
                    _fmt(t["macs_reduction"], suffix="x"),
                    f"{t['speedup']:.2f}x [{t['speedup_q1']:.2f}-{t['speedup_q3']:.2f}]",
                    _fmt(t["efficiency"]),
                ]
            if "fx_over_tp_speedup" in row:
                cells.append(
                    f"{row['fx_over_tp_speedup']:.2f}x "
                    f"[{row['fx_over_tp_q1']:.2f}-{row['fx_over_tp_q3']:.2f}]"
                )
            else:
                cells.append("n/a")
            rows.append(cells)
    return rows


def notes(data: dict[str, Any]) -> list[str]:
    out = []
    for r in data["results"]:
        for note in r.get("bench", {}).get("notes", []):
            out.append(f"{r['model']}: {note}")
        for tool in ("original", *TOOLS):
            if tool in r and not r[tool].get("output_shape_ok", True):
                out.append(f"{r['model']}: {tool} output shape differs from the original's")
    return out


def print_report(data: dict[str, Any], markdown: bool) -> None:
    env = data["environment"]
    footer = (
        f"ONNX Runtime CPU, {env['threads']} intra-op thread(s), {env['rounds']} interleaved "
        f"rounds per model; speedup = median of per-round ratios original/pruned [IQR]; "
        f"eff. = speedup / MACs reduction; fxprune/TP = median of per-round ratios of TP's "
        f"latency to fxprune's (> 1: fxprune faster)"
    )
    tables = [
        ("pruning", PRUNE_HEADER, prune_rows(data)),
        ("latency", LATENCY_HEADER, latency_rows(data)),
    ]
    if markdown:
        for _, header, rows in tables:
            print("| " + " | ".join(header) + " |")
            print("|" + "|".join("---" for _ in header) + "|")
            for row in rows:
                print("| " + " | ".join(row) + " |")
            print()
        print(footer)
        for note in notes(data):
            print(f"- note: {note}")
        return
    from rich.console import Console
    from rich.table import Table

    console = Console(width=200)
    for title, header, rows in tables:
        table = Table(
            title=f"fxprune vs Torch-Pruning (ratio {RATIO}, round_to {ROUND_TO}): {title}"
        )
        for column in header:
            table.add_column(column, justify="left" if column in ("model", "tool") else "right")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    console.print(footer)
    for note in notes(data):
        console.print(f"note: {note}")


def plot(data: dict[str, Any], path: Path) -> None:
    """Speedup against MACs reduction, one panel per batch size, with the ideal and target lines."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import ScalarFormatter

    results = [r for r in data["results"] if r.get("rows")]
    batches = sorted({row["batch"] for r in results for row in r["rows"]})
    colors = {"fxprune": "tab:blue", "torch-pruning": "tab:orange"}
    # Both tools often reach the same MACs: draw them side by side (x offset only, noted).
    dodge = {"fxprune": 1 / 1.02, "torch-pruning": 1.02}
    markers = dict(zip([r["model"] for r in results], "osD^vP*X"))
    values = [1.0]
    for r in results:
        for row in r["rows"]:
            for tool in TOOLS:
                t = row.get(tool)
                if t and t["macs_reduction"]:
                    values += [t["macs_reduction"], t["speedup_q1"], t["speedup_q3"]]
    low, high = min(values) / 1.2, max(values) * 1.2

    fig = Figure(figsize=(6 * len(batches), 5.5), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(batches), squeeze=False)[0]
    for ax, batch in zip(axes, batches):
        for r in results:
            for row in r["rows"]:
                if row["batch"] != batch:
                    continue
                for tool in TOOLS:
                    t = row.get(tool)
                    if not t or not t["macs_reduction"]:
                        continue
                    ax.errorbar(
                        t["macs_reduction"] * dodge[tool],
                        t["speedup"],
                        yerr=[[t["speedup"] - t["speedup_q1"]], [t["speedup_q3"] - t["speedup"]]],
                        marker=markers.get(r["model"], "o"),
                        color=colors[tool],
                        capsize=3,
                        linestyle="none",
                        label=f"{tool} {r['model']}",
                    )
        ax.plot([low, high], [low, high], "--", color="gray", linewidth=1, label="ideal (y = x)")
        ax.plot(
            [low, high],
            [0.75 * low, 0.75 * high],
            ":",
            color="gray",
            linewidth=1,
            label="target (y = 0.75 x)",
        )
        ax.axhline(1.0, color="lightgray", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.set_xlim(low, high)
        ax.set_ylim(low, high)
        ax.set_title(f"batch {batch}")
        ax.set_xlabel("MACs reduction vs original (x, fxprune.count_macs)")
        ax.set_ylabel("speedup: median of per-round ratios (x), bars = IQR")
        ax.legend(fontsize="x-small", loc="upper left")
    env = data["environment"]
    fig.suptitle(
        f"fxprune vs Torch-Pruning, ratio {RATIO}, round_to {ROUND_TO}: ONNX Runtime CPU, "
        f"{env['threads']} thread(s), {env['rounds']} rounds "
        f"(points dodged 2% left/right so equal MACs stay visible)",
        fontsize="medium",
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")


# --------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help="torchvision names")
    parser.add_argument("--rounds", type=int, default=30, help="interleaved rounds (>= 20)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch and ORT intra-op threads (default 1)"
    )
    parser.add_argument("--prune-runs", type=int, default=3, help="timed pruning runs per tool")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per model")
    parser.add_argument("--out", default=str(ROOT / "docs" / "compare_torch_pruning.json"))
    parser.add_argument("--plot", default=None, help="PNG path (default: --out with .png)")
    parser.add_argument("--from-json", help="only print (and plot) the report of an earlier run")
    parser.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
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
        record = measure_one(args.one, args.rounds, args.threads, args.prune_runs)
        Path(args.result).write_text(json.dumps(record, indent=2))
        return 0
    if args.rounds < 20:
        logger.warning("--rounds %d: fewer than 20 rounds gives wide IQRs", args.rounds)
    png = Path(args.plot) if args.plot else Path(args.out).with_suffix(".png")
    if args.from_json:
        data = json.loads(Path(args.from_json).read_text())
    else:
        from tqdm import tqdm

        data = {"environment": environment(args), "results": []}
        bar = tqdm([m.strip() for m in args.models.split(",") if m.strip()], unit="model")
        for name in bar:
            bar.set_postfix_str(name)
            record = run_in_subprocess(name, args)
            if "error" in record:
                bar.write(f"{name}: {record['error']} {record.get('stderr_tail', '')}")
            data["results"].append(record)
        data["environment"]["loadavg_1m_at_end"] = (
            os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        )
        data["environment"]["fxprune_git_at_end"] = git_state()
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(data, indent=2))
        print(f"wrote {out}")
    for r in data["results"]:
        if "bench_table" in r and not args.markdown:
            print(f"\n{r['model']}:\n{r['bench_table']}")
    print_report(data, args.markdown)
    if any(r.get("rows") for r in data["results"]):
        plot(data, png)
        print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
