"""Pinned analysis snapshots: what fxprune finds and removes on a dozen real architectures.

For each model of ``MODELS`` (one per family of channel relations: residual, bottleneck,
squeeze-excite, concat, channel shuffle, grouped conv, fire modules, LayerNorm, attention,
windowed attention, and a Hugging Face BERT through the export frontend) it records:

- ``fxprune.analyze(model, x)``: the frontend, the number of groups and of prunable
  groups, the channels they hold, the fraction of channels that are prunable, the fraction
  of prunable channels whose removal is exact, and the prunable groups by structure;
- ``fxprune.prune(model, x, ratio=0.5, round_to=8, verify=False)``: MACs and parameters
  before and after.

``tests/test_trace.py`` compares the working tree against ``analysis.json`` exactly, so a
change in what the analysis finds fails a test instead of passing silently. Regenerate the
file only when the change in behaviour is intended, and say so in the commit:

    python tests/snapshots/make_snapshots.py            # rewrite tests/snapshots/analysis.json
    python tests/snapshots/make_snapshots.py --check    # print the differences, exit 1 if any
    python tests/snapshots/make_snapshots.py --check --models resnet18,hf:minilm

Every model is built after ``torch.manual_seed(0)``, in eval mode, on a 1x3x64x64 input
(MiniLM: 1x16 token ids), so the numbers do not depend on the machine. Here each model
runs in its own subprocess (``--one NAME`` prints one record as JSON), one model in memory
at a time; the test calls :func:`snapshot` in its own process, one model after the other.
To take the reference from another install of fxprune (the last commit's, before a
refactor), run this script from outside the repository with that install first on
``PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SNAPSHOT = Path(__file__).resolve().parent / "analysis.json"
COMMAND = "python tests/snapshots/make_snapshots.py"
INPUT_SHAPE = (1, 3, 64, 64)
FLOAT_TOLERANCE = 1e-9

# name -> (builder keyword arguments, what the model covers)
MODELS: dict[str, tuple[dict[str, Any], str]] = {
    "resnet18": ({}, "basic residual blocks"),
    "resnet50": ({}, "bottleneck residual blocks, downsample projections"),
    "mobilenet_v3_small": ({}, "depthwise convs, squeeze-excite, hardswish"),
    "efficientnet_b0": ({}, "depthwise convs, squeeze-excite, stochastic depth"),
    "densenet121": ({}, "dense concatenation"),
    "shufflenet_v2_x0_5": ({}, "channel split and channel shuffle"),
    "regnet_x_400mf": ({}, "grouped convs in residual blocks"),
    "squeezenet1_0": ({}, "fire modules: concat of two expand convs"),
    "convnext_tiny": ({}, "LayerNorm over permuted channels, layer scale"),
    "vit_b_16": ({"image_size": 64}, "nn.MultiheadAttention, class token, LayerNorm"),
    "swin_t": ({}, "windowed attention, relative position bias, patch merging"),
    "hf:minilm": ({}, "Hugging Face BERT through the torch.export frontend"),
}


def build(name: str) -> tuple[Any, Any]:
    """(model in eval mode, example inputs), both from seed 0."""
    import torch
    import torchvision

    from fxprune.models import load_model

    if name.startswith("hf:"):
        return load_model(name)  # seeds torch itself; token ids from a seeded generator
    kwargs, _ = MODELS[name]
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, **kwargs).eval()
    torch.manual_seed(0)
    return model, torch.randn(*INPUT_SHAPE)


def describe_inputs(inputs: Any) -> str:
    if isinstance(inputs, dict):
        return ", ".join(f"{k} {'x'.join(map(str, v.shape))}" for k, v in inputs.items())
    return "x".join(map(str, inputs.shape))


def snapshot(name: str) -> dict[str, Any]:
    """The record of one model (see the module docstring)."""
    import fxprune

    model, x = build(name)
    a = fxprune.analyze(model, x)
    prunable = a.prunable_groups
    channels = sum(g.size for g in a.groups)
    prunable_channels = sum(g.size for g in prunable)
    exact_channels = sum(g.size for g in prunable if g.exact)
    res = fxprune.prune(model, x, ratio=0.5, round_to=8, verify=False)
    report = res.report
    return {
        "covers": MODELS[name][1],
        "input": describe_inputs(x),
        "frontend": a.frontend,
        "groups": len(a.groups),
        "prunable_groups": len(prunable),
        "exact_prunable_groups": sum(g.exact for g in prunable),
        "channels": channels,
        "prunable_channels": prunable_channels,
        "prunable_fraction": prunable_channels / channels if channels else 0.0,
        "exact_fraction": exact_channels / prunable_channels if prunable_channels else 0.0,
        "prunable_by_structure": dict(sorted(Counter(g.structure for g in prunable).items())),
        "macs_before": report.macs_before,
        "macs_after": report.macs_after,
        "params_before": report.params_before,
        "params_after": report.params_after,
    }


def snapshot_in_subprocess(name: str) -> dict[str, Any]:
    """``snapshot(name)`` in a fresh interpreter, so that only one model is in memory."""
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--one", name],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"snapshot of {name} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def load() -> dict[str, dict[str, Any]]:
    return json.loads(SNAPSHOT.read_text())["models"]


def differences(want: dict[str, Any], got: dict[str, Any]) -> list[str]:
    """One line per field that differs: integers and strings exactly, floats to 1e-9."""
    lines = []
    for key in sorted(set(want) | set(got)):
        w, g = want.get(key, "<missing>"), got.get(key, "<missing>")
        if isinstance(w, float) and isinstance(g, (int, float)):
            same = math.isclose(w, g, rel_tol=0, abs_tol=FLOAT_TOLERANCE)
        else:
            same = w == g
        if not same:
            lines.append(f"  {key}: snapshot {w!r}, now {g!r}")
    return lines


def mismatch_message(name: str, lines: list[str]) -> str:
    return (
        f"{name}: the analysis differs from tests/snapshots/analysis.json\n"
        + "\n".join(lines)
        + "\nIf this change in behaviour is intended, regenerate the snapshot with\n"
        + f"    {COMMAND} --models {name}\n"
        + "and say why in the commit. Otherwise the change under test broke the analysis."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="print differences, write nothing")
    parser.add_argument("--models", help="comma-separated subset of: " + ", ".join(MODELS))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(snapshot(args.one)))
        return 0
    names = [n.strip() for n in args.models.split(",")] if args.models else list(MODELS)
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {', '.join(MODELS)}")
    stored = load() if SNAPSHOT.exists() else {}
    failed = 0
    for name in names:
        got = snapshot_in_subprocess(name)
        if args.check:
            lines = differences(stored.get(name, {}), got)
            print(mismatch_message(name, lines) if lines else f"{name}: same")
            failed += bool(lines)
        else:
            stored[name] = got
            print(f"{name}: {got['prunable_groups']}/{got['groups']} groups prunable")
    if not args.check:
        ordered = {n: stored[n] for n in MODELS if n in stored}
        SNAPSHOT.write_text(json.dumps({"command": COMMAND, "models": ordered}, indent=2) + "\n")
        print(f"wrote {SNAPSHOT}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
