"""The Markdown report and the staircase plot of a ``bench/gpu.py`` run, from its JSON.

Runs without a GPU: ``python bench/gpu.py --from-json docs/gpu.json`` re-renders
``docs/BENCHMARKS_gpu.md`` and ``docs/gpu_staircase.png``. Every number printed comes from
the JSON; the sentences under "What this means" are computed from it too.
"""

from __future__ import annotations

import io
import json
import statistics
from pathlib import Path
from typing import Any

from fxprune.files import write_bytes_atomic

PAYS = 1.05


def _med(values: list[float] | None) -> float | None:
    return statistics.median(values) if values else None


def _pair(values: list[float] | None, fmt: str = "{:.2f}") -> str:
    """Both repeats of a comparison, e.g. ``1.84 / 1.86``: the spread is their difference."""
    if not values:
        return "–"
    return " / ".join(fmt.format(v) for v in values)


def _err(value: float | None) -> str:
    return "–" if value is None else f"{value:.1e}"


# -- sections ------------------------------------------------------------------------------------


def env_rows(env: dict[str, Any]) -> list[tuple[str, str]]:
    smi = env.get("nvidia_smi", {})
    ceilings = env.get("ceilings", {})
    pk = env.get("packages", {})
    rows = [
        (
            "GPU",
            f"{env.get('gpu', '?')} (compute capability {env.get('capability', '?')}, "
            f"{env.get('multiprocessors', '?')} SMs, {env.get('memory_gib', '?')} GiB, "
            f"L2 {env.get('l2_mib', '?')} MiB)",
        ),
        ("driver", smi.get("driver_version", "?")),
        (
            "clocks / power",
            f"SM max {smi.get('clocks.max.sm', '?')}, memory max "
            f"{smi.get('clocks.max.mem', '?')}, power limit {smi.get('power.limit', '?')}",
        ),
        (
            "CUDA / cuDNN / cuSPARSELt",
            f"{env.get('cuda')} / {env.get('cudnn')} / {env.get('cusparselt', 'not available')}",
        ),
        ("PyTorch / Triton", f"{env.get('torch')} / {pk.get('triton')}"),
        (
            "torchvision / timm / transformers",
            f"{pk.get('torchvision')} / {pk.get('timm')} / {pk.get('transformers')}",
        ),
        ("Torch-Pruning", pk.get("torch-pruning") or "not installed"),
        ("Python", env.get("python")),
        ("fxprune commit", env.get("git")),
    ]
    if ceilings:
        rows.append(
            (
                "measured ceilings",
                f"bf16 matmul 8192³ {ceilings['bf16_matmul_tflops']:.0f} "
                f"TFLOP/s; device copy {ceilings['copy_tb_per_s']:.2f} TB/s (read + write)",
            )
        )
    return rows


def env_lines(data: dict[str, Any]) -> list[str]:
    """The machine of each run, one column per run."""
    runs = runs_of(data)
    envs = [r.get("env") or {} for r in runs]
    table = [env_rows(e) for e in envs]
    if len(runs) == 1:
        lines = ["| | |", "|---|---|"]
        return lines + [f"| {k} | {v} |" for k, v in table[0]]
    lines = ["| | " + " | ".join(f"run {i + 1}" for i in range(len(runs))) + " |"]
    lines.append("|---|" + "---|" * len(runs))
    for i, (label, _) in enumerate(table[0]):
        lines.append(f"| {label} | " + " | ".join(str(t[i][1]) for t in table) + " |")
    return lines


# -- several runs as one report --------------------------------------------------------------


def merge_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Several runs' JSON as one report: each section from the last run that measured it
    without failing as a whole (a later run adds what an earlier one skipped or could not
    run, on the same kind of machine). Every section records which run it came from."""
    merged: dict[str, Any] = {"runs": [], "sections": {}}
    for i, data in enumerate(runs):
        merged["runs"].append(
            {
                "command": data.get("command"),
                "started": data.get("started"),
                "env": data["sections"].get("env", {}),
                "sections": [k for k in data["sections"] if k != "env"],
            }
        )
        for name, section in data["sections"].items():
            if name == "env" or ("error" in section and name in merged["sections"]):
                continue
            merged["sections"][name] = {**section, "run": i + 1}
    merged["sections"]["env"] = merged["runs"][-1]["env"]
    return merged


def runs_of(data: dict[str, Any]) -> list[dict[str, Any]]:
    if "runs" in data:
        return data["runs"]
    env = data["sections"].get("env", {})
    sections = [k for k in data["sections"] if k != "env"]
    return [
        dict(command=data.get("command"), started=data.get("started"), env=env, sections=sections)
    ]


def alignment_lines(section: dict[str, Any]) -> list[str]:
    summary = section.get("alignment", [])
    if not summary:
        return ["(not measured)"]
    multiples = sorted({int(m) for row in summary for m in row["gains"]})
    head = "| op | dtype | " + " | ".join(f"pad to ×{m}" for m in multiples) + " | round_to |"
    lines = [head, "|---|---|" + "---|" * (len(multiples) + 1)]
    for row in summary:
        cells = []
        for m in multiples:
            g = row["gains"].get(str(m)) or row["gains"].get(m)
            cells.append(
                "–" if not g else f"{g['median']:.2f}x ({g['min']:.2f}–{g['max']:.2f}, n={g['n']})"
            )
        lines.append(
            f"| {row['op']} | {row['dtype']} | " + " | ".join(cells) + f" | **{row['round_to']}** |"
        )
    return lines


def staircase_lines(section: dict[str, Any]) -> list[str]:
    """Per window: the fastest count, multiples of 8 against the rest, the biggest steps."""
    lines = [
        "| op | window | dtype | mode | fastest count | mean ms ×8 / others | "
        "biggest steps (c→c+1: ratio) | max rel. error | repeats' spread |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in section.get("rows", []):
        mode = "compile" if row.get("compiled") else "eager"
        if "ms" not in row:
            why = row.get("skipped") or row.get("error", "?").splitlines()[0]
            lines.append(
                f"| {row['op']} | {row['window']} | {row['dtype']} | {mode} | {why} | | | | |"
            )
            continue
        cs, ms = row["channels"], [statistics.median(m) for m in row["ms"]]
        fastest = cs[ms.index(min(ms))]
        eight = [t for c, t in zip(cs, ms) if c % 8 == 0]
        rest = [t for c, t in zip(cs, ms) if c % 8]
        steps = sorted(
            ((ms[i + 1] / ms[i], cs[i]) for i in range(len(cs) - 1)),
            key=lambda r: -abs(r[0] - 1),
        )[:3]
        step_text = ", ".join(f"{c}→{c + 1}: {r:.2f}" for r, c in steps)
        spread = max(max(m) / min(m) for m in row["ms"])
        ratio = (
            f"{statistics.mean(eight):.3f} / {statistics.mean(rest):.3f}" if eight and rest else "–"
        )
        lines.append(
            f"| {row['op']} | {row['window']} | {row['dtype']} | {mode} | {fastest} | {ratio} | "
            f"{step_text} | {_err(row.get('rel_error_max'))} | {spread:.3f} |"
        )
    return lines


def _mode(row: dict[str, Any], section: dict[str, Any]) -> str:
    if row.get("mode") == "compile":
        return f"torch.compile ({section.get('compile_mode') or 'default'})"
    return row.get("mode", "eager")


def models_lines(section: dict[str, Any]) -> list[str]:
    lines = []
    for rec in section.get("rows", []):
        lines += ["", f"**{rec['model']}, fp16, channels_last**", ""]
        if "skipped" in rec:
            lines.append(f"skipped: {rec['skipped']}")
            continue
        for name, v in rec.get("variants", {}).items():
            if "error" in v:
                lines.append(f"- {name}: could not be built: `{v['error'].splitlines()[0]}`")
            elif "same_as" in v:
                lines.append(
                    f"- {name}: every parameter shape equals {v['same_as']}'s (the same "
                    "architecture), so it was timed once, as that one"
                )
        lines += [
            "| batch | run as | variant | MACs reduction | latency ms (repeat 1 / 2) | speedup | "
            "speedup / MACs reduction | rel. error vs fp32 |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for b in rec.get("batches", []):
            mode = _mode(b, section)
            if "variants" not in b:
                why = b.get("skipped") or b.get("error", "?").splitlines()[0]
                lines.append(f"| {b['batch']} | {mode} | {why} | | | | | |")
                continue
            for name, v in b["variants"].items():
                macs = f"{v['macs_reduction']:.2f}x" if v.get("macs_reduction") else "–"
                frac = f"{v['fraction_of_macs']:.2f}" if v.get("fraction_of_macs") else "–"
                lines.append(
                    f"| {b['batch']} | {mode} | {name} | {macs} | {_pair(v['ms'], '{:.3f}')} | "
                    f"{_pair(v['speedup'])} | {frac} | {_err(v.get('rel_error_vs_fp32'))} |"
                )
    return lines


def sparse_lines(section: dict[str, Any]) -> list[str]:
    kernels = section.get("kernels", [])
    lines = [
        "| shape (in→out) | dtype | tokens | dense ms | dense TFLOP/s | "
        + " | ".join(f"{k} speedup" for k in kernels)
        + " | rel. error (dense / "
        + " / ".join(kernels)
        + ") |",
        "|---|---|---|---|---|" + "---|" * len(kernels) + "---|",
    ]
    for kname, why in section.get("unsupported", {}).items():
        lines.insert(0, f"{kname} does not run here: `{why}`\n")
    for row in section.get("rows", []):
        if "dense" not in row:
            why = row.get("skipped") or row.get("error", "?")
            lines.append(
                f"| {row['shape']} | {row['dtype']} | {row.get('tokens', '')} | "
                f"{why.splitlines()[0]} |" + " |" * (len(kernels) + 2)
            )
            continue
        d = row["dense"]
        speed = " | ".join(_pair(row[k]["speedup"]) if k in row else "–" for k in kernels)
        errs = " / ".join(
            _err(row[k]["rel_error_vs_fp64"]) for k in ["dense", *kernels] if k in row
        )
        lines.append(
            f"| {row['shape']} ({row['in']}→{row['out']}) | {row['dtype']} | {row['tokens']} | "
            f"{_med(d['ms']):.3f} | {d['dense_tflops']:.0f} | {speed} | {errs} |"
        )
    return lines


def sparse_fits(section: dict[str, Any]) -> list[dict[str, Any]]:
    """Per shape, dtype and kernel, two costs the raw speedups mix: the fixed cost of a 2:4
    call (its extra time over dense at the fewest tokens, where kernels take microseconds)
    and the kernels' marginal speedup (extra dense time over extra 2:4 time between the two
    largest token counts, where fixed costs cancel; left out when 2:4's extra time is under
    0.1 ms, too little to tell from noise)."""
    groups: dict[tuple, list[dict]] = {}
    for row in section.get("rows", []):
        if "dense" in row:
            groups.setdefault((row["shape"], row["in"], row["out"], row["dtype"]), []).append(row)
    fits = []
    for (shape, fin, fout, dtype), rows in groups.items():
        rows = sorted(rows, key=lambda r: r["tokens"])
        if len(rows) < 3:
            continue
        for k in section.get("kernels", []):
            if not all(k in r for r in rows):
                continue
            dense = [_med(r["dense"]["ms"]) for r in rows]
            sparse = [_med(r[k]["ms"]) for r in rows]
            extra = sparse[-1] - sparse[-2]
            fits.append(
                {
                    "shape": f"{shape} ({fin}→{fout})",
                    "dtype": dtype,
                    "kernel": k,
                    "tokens": (rows[0]["tokens"], rows[-2]["tokens"], rows[-1]["tokens"]),
                    "fixed_ms": sparse[0] - dense[0],
                    "marginal": (dense[-1] - dense[-2]) / extra if extra > 0.1 else None,
                }
            )
    return fits


def sparse_fit_lines(section: dict[str, Any]) -> list[str]:
    lines = [
        "| shape | dtype | kernel | fixed ms per call (2:4 − dense, fewest tokens) | "
        "marginal speedup (two largest token counts) |",
        "|---|---|---|---|---|",
    ]
    for f in sparse_fits(section):
        marginal = f"{f['marginal']:.2f}x" if f["marginal"] else "– (too little time)"
        lines.append(
            f"| {f['shape']} | {f['dtype']} | {f['kernel']} | {f['fixed_ms']:.3f} "
            f"({f['tokens'][0]} tokens) | {marginal} |"
        )
    return lines


def sparse_model_lines(section: dict[str, Any]) -> list[str]:
    lines = [
        "| model | batch × tokens | Linear layers: 2:4 / lowered / all | dense ms | 2:4 ms | "
        "speedup (repeat 1 / 2) | rel. error: 2:4 vs dense / dense vs fp32 |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in section.get("rows", []):
        shape = f"{row.get('batch', '')} × {row.get('tokens', '')}"
        if "timed" not in row:
            why = row.get("skipped") or row.get("error", "?").splitlines()[0]
            lines.append(f"| {row['model']} | {shape} | {why} | | | | |")
            continue
        dense, sparse = row["timed"]["dense (masked)"], row["timed"]["2:4 semi-structured"]
        lines.append(
            f"| {row['model']} | {shape} | {row['two_four']} / {row['converted']} / "
            f"{row['linears']} | {_med(dense['ms']):.3f} | {_med(sparse['ms']):.3f} | "
            f"{_pair(sparse['speedup'])} | {_err(row['rel_error_sparse_vs_dense'])} / "
            f"{_err(row['rel_error_dense_vs_fp32'])} |"
        )
    return lines


# -- conclusions ---------------------------------------------------------------------------------


def dtype_alignment(summary: list[dict[str, Any]]) -> list[str]:
    """Per dtype and multiple: the range over ops of what padding up to it buys."""
    out = []
    for dtype in dict.fromkeys(row["dtype"] for row in summary):
        rows = [r for r in summary if r["dtype"] == dtype]
        parts = []
        for m in (4, 8, 16, 32):
            gains = [
                (r["gains"].get(str(m)) or r["gains"].get(m))["median"]
                for r in rows
                if (r["gains"].get(str(m)) or r["gains"].get(m))
            ]
            if gains:
                pays = sum(g >= PAYS for g in gains)
                parts.append(
                    f"×{m} {min(gains):.2f}–{max(gains):.2f}x (pays in {pays} of {len(gains)} ops)"
                )
        out.append(f"- **{dtype}**, what padding up to a multiple buys: " + "; ".join(parts) + ".")
    return out


def _variant(rec: dict, batch: dict, tool: str, ratio: float, align: str) -> dict[str, Any]:
    """A variant's timings in one batch row, through ``same_as`` (the same architecture,
    timed once) and the names of runs before ratios were named (``fxprune round_to=8``)."""
    timed = batch.get("variants", {})
    for name in (f"{tool} {ratio:g} {align}", f"{tool} {align}" if ratio == 0.5 else None):
        if name is None:
            continue
        name = rec.get("variants", {}).get(name, {}).get("same_as", name)
        if name in timed:
            return timed[name]
    return {}


def model_conclusions(section: dict[str, Any]) -> list[str]:
    """Per model and mode: fxprune and Torch-Pruning at the first ratio; what the alignment
    is worth at the others (where round_to=1, 8 and padding give different widths)."""
    out = []
    ratios = section.get("ratios", [0.5])
    for rec in section.get("rows", []):
        by_mode: dict[str, list[str]] = {}
        aligned: dict[tuple[str, float], list[str]] = {}
        macs: dict[tuple, float] = {}
        for b in rec.get("batches", []):
            mode = _mode(b, section)
            fx = _variant(rec, b, "fxprune", ratios[0], "round_to=8")
            tp = _variant(rec, b, "Torch-Pruning", ratios[0], "round_to=8")
            if fx.get("speedup"):
                text = f"batch {b['batch']} {_med(fx['speedup']):.2f}x"
                if tp.get("speedup"):
                    text += f" (Torch-Pruning {_med(tp['speedup']):.2f}x)"
                by_mode.setdefault(mode, []).append(text)
                macs[(ratios[0], "round_to=8")] = fx["macs_reduction"]
            for ratio in ratios[1:]:
                parts = []
                for align in ("round_to=1", "round_to=8", "pad 8"):
                    v = _variant(rec, b, "fxprune", ratio, align)
                    if v.get("speedup"):
                        parts.append(f"`{align}` {_med(v['speedup']):.2f}x")
                        macs[(ratio, align)] = v["macs_reduction"]
                if parts:
                    aligned.setdefault((mode, ratio), []).append(
                        f"batch {b['batch']}: " + ", ".join(parts)
                    )
        for mode, texts in by_mode.items():
            out.append(
                f"- {rec['model']}, {mode}: fxprune ratio {ratios[0]:g} `round_to=8` "
                f"({macs[(ratios[0], 'round_to=8')]:.2f}x fewer MACs) runs "
                + ", ".join(texts)
                + " faster."
            )
        for (mode, ratio), texts in aligned.items():
            fewer = ", ".join(
                f"`{a}` {macs[(ratio, a)]:.2f}x"
                for a in ("round_to=1", "round_to=8", "pad 8")
                if (ratio, a) in macs
            )
            out.append(
                f"- {rec['model']}, {mode}, ratio {ratio:g} (fewer MACs: {fewer}): "
                + "; ".join(texts)
                + "."
            )
    return out


def conclusions(data: dict[str, Any]) -> list[str]:
    """Sentences for users, computed from the numbers (nothing here is typed by hand)."""
    out = []
    sec = data["sections"]
    out += dtype_alignment(sec.get("staircase", {}).get("alignment", []))
    for row in sec.get("staircase", {}).get("alignment", []):
        gains = {int(m): g for m, g in row["gains"].items()}
        paying = ", ".join(
            f"×{m} {g['median']:.2f}x" for m, g in sorted(gains.items()) if g["median"] >= PAYS
        )
        beyond = [m for m in gains if m > row["round_to"]]
        tail = (
            f"; going further (×{', ×'.join(map(str, sorted(beyond)))}) gains "
            + ", ".join(f"{gains[m]['median']:.2f}x" for m in sorted(beyond))
            if beyond
            else ""
        )
        out.append(
            f"- {row['op']} {row['dtype']}: padding up pays at {paying or 'no multiple'}"
            f" → `round_to={row['round_to']}`{tail}."
        )
    for key in ("models", "models_compile"):
        out += model_conclusions(sec.get(key, {}))
    best: dict[str, list] = {}
    for row in sec.get("sparse24", {}).get("rows", []):
        for k in sec.get("sparse24", {}).get("kernels", []):
            if k in row and row[k].get("speedup"):
                best.setdefault(k, []).append((_med(row[k]["speedup"]), row))
    fits = sparse_fits(sec.get("sparse24", {}))
    if fits:
        fixed = [f["fixed_ms"] for f in fits]
        rate = [f["marginal"] for f in fits if f["marginal"]]
        rate_text = f"{min(rate):.2f}–{max(rate):.2f}x" if rate else "not measurable"
        out.append(
            f"- 2:4 Linear: each call carries a fixed {min(fixed):.2f}–{max(fixed):.2f} ms "
            f"over dense; beyond it the sparse kernels run {rate_text} faster per extra token "
            "(the largest shapes), so 2:4 pays only where a layer's dense time is well above "
            "that fixed cost."
        )
    for k, items in best.items():
        pays = [r for s, r in items if s >= 1.1]
        top = max(items, key=lambda t: t[0])
        out.append(
            f"- 2:4 Linear with {k}: faster by ≥1.1x in {len(pays)} of {len(items)} "
            f"shape/dtype/token cases; best {top[0]:.2f}x ({top[1]['shape']}, "
            f"{top[1]['dtype']}, {top[1]['tokens']} tokens); worst "
            f"{min(items, key=lambda t: t[0])[0]:.2f}x."
        )
    for row in sec.get("sparse24_models", {}).get("rows", []):
        if "timed" in row:
            sp = row["timed"]["2:4 semi-structured"]
            out.append(
                f"- {row['model']}, {row['batch']}×{row['tokens']} tokens: 2:4 lowered model "
                f"{_med(sp['speedup']):.2f}x vs the same masked weights dense."
            )
    return out


# -- writing -------------------------------------------------------------------------------------


def _run(section: dict[str, Any]) -> str:
    return f" (run {section['run']})" if "run" in section else ""


def render(data: dict[str, Any], plot_name: str | None, models_plot: str | None = None) -> str:
    sec = data["sections"]
    runs = runs_of(data)
    sources = data.get("sources") or ["docs/gpu.json"]
    lines = [
        "# GPU benchmarks",
        "",
        f"Generated by `bench/gpu_report.py` from {', '.join(f'`{x}`' for x in sources)}; "
        "every number below was measured by the run of `bench/gpu.py` named beside it. "
        "Latencies are medians of many calls (CUDA events, warm-up, rotating random inputs); "
        "each comparison ran in interleaved rounds and was repeated twice: `a / b` gives "
        "both repeats, so their difference is the spread.",
        "",
    ]
    for i, run in enumerate(runs):
        used = [k for k, v in sec.items() if k != "env" and v.get("run") == i + 1]
        label = (
            f"Run {i + 1}, behind {', '.join(used) or 'no section'}" if len(runs) > 1 else "Command"
        )
        lines += [f"{label}: `{run.get('command')}`, started {run.get('started')}.", ""]
    lines += [
        "## Machine",
        "",
        *env_lines(data),
        "",
        "## What this means",
        "",
        *(conclusions(data) or ["(nothing measured)"]),
        "",
    ]
    if "staircase" in sec:
        lines += [
            f"## Channel alignment (the `round_to` staircase){_run(sec['staircase'])}",
            "",
            "Each cell: how much slower a channel count that is a multiple of m/2 but not of",
            "m runs than the next multiple of m (median over every such count of every",
            "window; min–max and count in brackets). Above 1: padding up to ×m is faster",
            f"despite the extra channels. `round_to`: the largest m that pays ≥{PAYS:.2f}x.",
            "",
            *alignment_lines(sec["staircase"]),
            "",
        ]
        if plot_name:
            lines += [f"![latency against channel count]({plot_name})", ""]
        lines += staircase_lines(sec["staircase"])
        lines.append("")
    if "staircase_compile" in sec:
        lines += [
            f"### Through torch.compile{_run(sec['staircase_compile'])}",
            "",
            *staircase_lines(sec["staircase_compile"]),
            "",
        ]
    if models_plot and ("models" in sec or "models_compile" in sec):
        lines += [
            "## Pruned models end to end",
            "",
            f"![speedup of pruned models]({models_plot})",
            "",
        ]
    for key, title in (("models", "eager"), ("models_compile", "torch.compile")):
        if key in sec:
            lines += [f"## Pruned models end to end ({title}){_run(sec[key])}"]
            lines += [*models_lines(sec[key]), ""]
    if "sparse24" in sec:
        lines += [
            f"## 2:4 Linear layers on sparse tensor cores{_run(sec['sparse24'])}",
            "",
            *sparse_lines(sec["sparse24"]),
            "",
        ]
    if "sparse24_models" in sec:
        lines += [
            f"## 2:4 models through fxprune (sparsify → semi-structured lowering){_run(sec['sparse24_models'])}",
            "",
            *sparse_model_lines(sec["sparse24_models"]),
            "",
        ]
    if "AcceleratorError" in json.dumps(sec):
        lines += [
            "Rows reading `AcceleratorError`: a CUDA error that poisons a process's context (an",
            "illegal memory access) fails every later row of that section; each section runs in",
            "a process of its own, so the other sections are unaffected.",
            "",
        ]
    errors = [(k, v["error"]) for k, v in sec.items() if isinstance(v, dict) and "error" in v]
    if errors:
        lines += ["## Sections that failed", ""]
        lines += [f"- {k}: `{e.splitlines()[0]}`" for k, e in errors]
    return "\n".join(lines) + "\n"


def _pyplot():
    """matplotlib's pyplot without a display (imported only when a plot is drawn)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _write_png(fig, path: Path) -> None:
    """The figure as a PNG, written whole or not at all; the figure is closed."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    _pyplot().close(fig)
    write_bytes_atomic(path, buf.getvalue())


def plot_staircase(data: dict[str, Any], path: Path) -> bool:
    """Latency against channel count, one panel per op and window; False if nothing to draw."""
    rows = [
        r
        for key in ("staircase", "staircase_compile")
        for r in data["sections"].get(key, {}).get("rows", [])
        if "ms" in r
    ]
    if not rows:
        return False
    plt = _pyplot()

    panels = list(dict.fromkeys((r["op"], r["window"]) for r in rows))  # in the run's order
    cols = 4
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.1 * nrows), squeeze=False)
    for ax, (op, window) in zip(axes.flat, panels):
        mine = [r for r in rows if (r["op"], r["window"]) == (op, window)]
        for r in mine:
            label = f"{r['dtype']} {'compile' if r.get('compiled') else 'eager'}"
            med = [statistics.median(m) * 1e3 for m in r["ms"]]
            lo = [min(m) * 1e3 for m in r["ms"]]
            hi = [max(m) * 1e3 for m in r["ms"]]
            ax.plot(r["channels"], med, marker=".", label=label)
            ax.fill_between(r["channels"], lo, hi, alpha=0.25)
        counts = [c for r in mine for c in r["channels"]]
        for c in range(min(counts), max(counts) + 1):
            if c % 8 == 0:
                ax.axvline(c, color="grey", lw=0.6, ls=":")
        ax.set_title(f"{op} ({window})", fontsize=9)
        ax.set_xlabel("channels")
        ax.set_ylabel("µs")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle("Latency against channel count (dotted: multiples of 8; band: repeats)")
    fig.tight_layout()
    _write_png(fig, path)
    return True


def plot_models(data: dict[str, Any], path: Path) -> bool:
    """Speedup over the original per variant and batch: one panel per model and way of
    running (eager, torch.compile); False if nothing to draw."""
    panels = []
    for key in ("models", "models_compile"):
        section = data["sections"].get(key, {})
        for rec in section.get("rows", []):
            batches = [b for b in rec.get("batches", []) if "variants" in b]
            if batches:
                panels.append((rec, section, sorted(batches, key=lambda b: b["batch"])))
    if not panels:
        return False
    plt = _pyplot()

    cols = min(2, len(panels))
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(6.4 * cols, 3.4 * nrows + 1.2), squeeze=False)
    legend: dict[str, Any] = {}
    for ax, (rec, section, batches) in zip(axes.flat, panels):
        names = [n for n in batches[0]["variants"] if n != "original"]
        same = {}
        for n, v in rec["variants"].items():
            if "same_as" in v:
                same.setdefault(v["same_as"], []).append(n.split(" ", 2)[-1])
        width = 0.8 / max(1, len(names))
        for i, name in enumerate(names):
            xs, meds, lo, hi = [], [], [], []
            for j, b in enumerate(batches):
                v = b["variants"].get(name)
                if v and v.get("speedup"):
                    xs.append(j + (i - (len(names) - 1) / 2) * width)
                    meds.append(_med(v["speedup"]))
                    lo.append(meds[-1] - min(v["speedup"]))
                    hi.append(max(v["speedup"]) - meds[-1])
            label = name + (f" (= {', '.join(same[name])})" if name in same else "")
            bars = ax.bar(xs, meds, width, yerr=[lo, hi], label=label, color=f"C{i}")
            legend.setdefault(label, bars)
            macs = rec["variants"].get(name, {}).get("macs")
            if macs:
                fewer = rec["variants"]["original"]["macs"] / macs
                for x, m in zip(xs, meds):
                    ax.text(x, m, f"{fewer:.1f}", ha="center", va="bottom", fontsize=5)
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_xticks(range(len(batches)), [f"batch {b['batch']}" for b in batches])
        ax.set_ylabel("speedup over the original")
        ax.set_title(f"{rec['model']}, {_mode(batches[0], section)}", fontsize=9)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.legend(legend.values(), legend.keys(), loc="lower center", ncol=3, fontsize=7)
    fig.suptitle(
        "Pruned models, fp16 channels_last: speedup over the original (bars: median of the "
        "repeats, whiskers: spread; above each bar: MACs reduction)",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    _write_png(fig, path)
    return True


def models_plot_path(plot: Path) -> Path:
    """The models' plot beside the staircase's: ``gpu_staircase.png`` → ``gpu_models.png``."""
    stem = plot.stem.replace("staircase", "models")
    return plot.with_name((stem if stem != plot.stem else plot.stem + "_models") + plot.suffix)


def write_report(data: dict[str, Any], markdown: Path, plot: Path) -> None:
    def relative(path: Path, drawn: bool) -> str | None:
        if not drawn:
            return None
        return path.name if path.parent == markdown.parent else str(path)

    staircase = relative(plot, plot_staircase(data, plot))
    models = models_plot_path(plot)
    write_bytes_atomic(
        markdown, render(data, staircase, relative(models, plot_models(data, models))).encode()
    )


def summary_lines(data: dict[str, Any]) -> str:
    return "\n".join(["", "What this means:", *conclusions(data)])
