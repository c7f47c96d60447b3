"""Eager vs torch.compile(inductor) vs torch.compile(fxprune.backend -> inductor), on CPU.

The model: a torchvision ResNet-50 (random init, random batch-norm statistics so that no
channel is accidentally dead) whose channels were mask-pruned by
``fxprune.mask_channels(ratio=0.5, round_to=8, ignore=[fc])`` and whose parametrizations
were then removed (``fxprune.remove_masks``: the zeros stay, the ``weight * mask`` per
call goes), so all variants run the very same weights:

* ``eager``: the masked model, run as it is;
* ``inductor``: ``torch.compile(model)`` (Inductor, default settings);
* ``inductor_frozen``: the same with Inductor's ``freezing`` option (weights as constants,
  as fxprune's backend treats them under ``no_grad``);
* ``fxprune``: ``torch.compile(model, backend=fxprune.backend(then="inductor"))``:
  fxprune's lossless passes cut the zero channels, Inductor compiles what is left.

Everything runs under ``torch.no_grad()``. After compiling each variant (and checking its
output against eager: max abs error), rounds are interleaved: in each round every variant
runs ``CALLS`` times and its median is taken; the ratio to ``inductor`` is computed per
round, and the report gives the median of those per-round ratios with their min-max. The
whole interleaved measurement is repeated twice (``--repeats``) to show its spread.

    python bench/compile_pipeline.py --out docs/compile_pipeline.json --markdown
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torchvision

import fxprune

ROOT = Path(__file__).resolve().parent.parent
RATIO, ROUND_TO = 0.5, 8


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random batch-norm statistics and affine parameters (no channel is dead by accident)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


def masked_resnet50(batch: int) -> tuple[torch.nn.Module, torch.Tensor, fxprune.ChannelMasks]:
    torch.manual_seed(0)
    model = randomize(torchvision.models.resnet50())
    x = torch.randn(batch, 3, 224, 224)
    masks = fxprune.mask_channels(model, x, ratio=RATIO, round_to=ROUND_TO, ignore=[model.fc])
    fxprune.remove_masks(model)
    return model, x, masks


def compile_variants(model: torch.nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """name -> (callable, compile seconds, max abs error vs eager, MACs of the graphs run)."""
    with torch.no_grad():
        ref = model(x)
    variants: dict[str, Any] = {}
    macs = fxprune.count_macs(model, x)

    def add(name: str, fn, macs_run: int | None = None) -> None:
        start = time.perf_counter()
        with torch.no_grad():
            out = fn(x)  # compiles
        seconds = time.perf_counter() - start
        err = float((out - ref).abs().max())
        variants[name] = {"fn": fn, "compile_s": seconds, "max_abs_error": err, "macs": macs_run}
        print(f"  {name}: compiled in {seconds:.1f} s, max abs error {err:.2e}", flush=True)

    add("eager", model, macs)
    torch._dynamo.reset()
    add("inductor", torch.compile(copy.deepcopy(model)), macs)
    # options=: its own backend object, so Dynamo compiles again rather than reusing the above
    frozen = torch.compile(copy.deepcopy(model), options={"freezing": True})
    add("inductor_frozen", frozen, macs)
    be = fxprune.backend(then="inductor")
    fn = torch.compile(copy.deepcopy(model), backend=be)
    add("fxprune", fn)
    variants["fxprune"]["macs"] = sum(g.macs_after for g in be.compiled)
    variants["fxprune"]["dead_channels"] = sum(g.dead_channels for g in be.compiled)
    return variants


def interleaved(variants: dict[str, Any], x: torch.Tensor, rounds: int, calls: int) -> dict:
    """Per round, each variant's median of ``calls`` runs; ratios to inductor per round."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    with torch.no_grad():
        for _ in range(rounds):
            for name, v in variants.items():
                runs = []
                for _ in range(calls):
                    start = time.perf_counter()
                    v["fn"](x)
                    runs.append(time.perf_counter() - start)
                times[name].append(statistics.median(runs))
    out = {}
    for name, ts in times.items():
        ratios = [b / t for b, t in zip(times["inductor"], ts)]  # speedup over inductor
        eager = [b / t for b, t in zip(times["eager"], ts)]
        out[name] = {
            "median_s": statistics.median(ts),
            "speedup_vs_inductor": statistics.median(ratios),
            "speedup_vs_inductor_range": [min(ratios), max(ratios)],
            "speedup_vs_eager": statistics.median(eager),
        }
    return out


def run(batch: int, rounds: int, calls: int, repeats: int) -> dict:
    print(f"ResNet-50, batch {batch}: masking ...", flush=True)
    model, x, masks = masked_resnet50(batch)
    variants = compile_variants(model, x)
    record: dict[str, Any] = {"batch": batch, "masks": str(masks), "repeats": []}
    for name, v in variants.items():
        record[name] = {k: v[k] for k in v if k != "fn"}
    for r in range(repeats):
        record["repeats"].append(interleaved(variants, x, rounds, calls))
        print(
            f"  repeat {r + 1}: "
            + ", ".join(
                f"{n} {m['speedup_vs_inductor']:.2f}x" for n, m in record["repeats"][-1].items()
            ),
            flush=True,
        )
    record["macs_reduction"] = variants["eager"]["macs"] / variants["fxprune"]["macs"]
    return record


def markdown(results: dict) -> str:
    lines = [
        "| batch | variant | compile s | max abs error | median ms | speedup vs inductor, "
        "median of per-round ratios (min-max), repeat 1 / repeat 2 | speedup vs eager |",
        "|---|---|---|---|---|---|---|",
    ]
    for rec in results["runs"]:
        for name in ("eager", "inductor", "inductor_frozen", "fxprune"):
            reps = [r[name] for r in rec["repeats"]]
            spread = " / ".join(
                f"{r['speedup_vs_inductor']:.2f}x ({r['speedup_vs_inductor_range'][0]:.2f}-"
                f"{r['speedup_vs_inductor_range'][1]:.2f})"
                for r in reps
            )
            lines.append(
                f"| {rec['batch']} | {name} | {rec[name]['compile_s']:.1f} | "
                f"{rec[name]['max_abs_error']:.1e} | {reps[0]['median_s'] * 1e3:.1f} | {spread} | "
                f"{reps[0]['speedup_vs_eager']:.2f}x |"
            )
    lines.append("")
    for rec in results["runs"]:
        lines.append(
            f"Batch {rec['batch']}: MACs reduction {rec['macs_reduction']:.2f}x "
            f"({rec['fxprune']['dead_channels']} dead channels cut by the backend); {rec['masks']}."
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "compile_pipeline.json")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--calls", type=int, default=5)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--markdown", action="store_true", help="print the table for BENCHMARKS.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {
        "command": "python bench/compile_pipeline.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "load_at_start": os.getloadavg()[0],
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads},
        "versions": {"torch": torch.__version__, "fxprune": fxprune.__version__},
        "runs": [run(b, args.rounds, args.calls, args.repeats) for b in args.batches],
    }
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(args.out)  # whole or not at all
    if args.markdown:
        print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
