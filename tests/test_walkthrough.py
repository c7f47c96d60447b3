"""The prune -> fine-tune walkthrough (bench/walkthrough.py --quick) runs and its numbers hold up.

One quick run (2 steps, width 16, a subset of digits, few timing rounds) is shared by the
tests below; each asserts one property of what it recorded.
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import pytest
import torch

import fxprune

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import walkthrough  # noqa: E402

CHANCE = 0.1  # ten balanced classes


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("walkthrough") / "walkthrough.json"
    threads = torch.get_num_threads()
    assert walkthrough.main(["--quick", "--steps", "2", "--out", str(out)]) == 0
    assert torch.get_num_threads() == threads, "the run must restore torch's thread count"
    return out, json.loads(out.read_text())


def test_dense_and_pruned_accuracy_are_far_above_chance(quick):
    _, data = quick
    assert data["dense"]["accuracy"] > 0.8
    for tool in walkthrough.TOOLS:
        assert data["final"][tool]["accuracy"] > 5 * CHANCE, tool
        assert data["steps"][-1][tool]["accuracy_after_ft"] > 2 * CHANCE, tool


def test_every_fxprune_step_passed_the_oracle(quick):
    _, data = quick
    for step in data["steps"]:
        assert step["fxprune"]["verified"] == "outputs equal the masked original", step["step"]
        assert step["fxprune"]["max_error"] is not None
        assert step["fxprune"]["max_error"] < 1e-4


def test_both_tools_shrink_at_every_step(quick):
    _, data = quick
    for tool in walkthrough.TOOLS:
        params = [data["dense"]["params"]] + [s[tool]["params"] for s in data["steps"]]
        macs = [data["dense"]["macs"]] + [s[tool]["macs"] for s in data["steps"]]
        assert all(a > b for a, b in itertools.pairwise(params)), (tool, params)
        assert all(a > b for a, b in itertools.pairwise(macs)), (tool, macs)


def test_json_has_every_field(quick):
    _, data = quick
    cfg = data["config"]
    assert cfg["quick"] is True and len(data["steps"]) == cfg["steps"] == 2
    for key in ("torch", "onnxruntime", "torch_pruning", "fxprune", "date", "command"):
        assert data["environment"][key], key
    assert {"accuracy", "params", "macs", "widths", "train_s"} <= set(data["dense"])
    per_tool = {
        "prune_s",
        "accuracy_before_ft",
        "accuracy_after_ft",
        "finetune_s",
        "params",
        "macs",
        "widths",
    }
    for step in data["steps"]:
        assert {"step", "target_kept", "bench", "latency", "latency_s"} <= set(step)
        for tool in walkthrough.TOOLS:
            assert per_tool <= set(step[tool]), (tool, per_tool - set(step[tool]))
            assert step[tool]["prune_s"] > 0
        fx = step["fxprune"]
        assert "prune_oneshot_error" in fx or (
            fx["prune_oneshot_verify_s"] > 0 and fx["prune_oneshot_noverify_s"] > 0
        )
        # One interleaved compare_latency call per step: all three models, both batch sizes.
        assert {m["model"] for m in step["bench"]["measurements"]} == {
            "original",
            *walkthrough.TOOLS,
        }
        assert sorted(r["batch"] for r in step["latency"]) == sorted(cfg["batch_sizes"])
        for row in step["latency"]:
            assert row["fx_over_tp_speedup"] > 0
            for tool in walkthrough.TOOLS:
                t = row[tool]
                assert t["speedup_q1"] <= t["speedup"] <= t["speedup_q3"], (tool, t)
                assert t["speedup_min"] <= t["speedup_q1"] and t["speedup_q3"] <= t["speedup_max"]
    for tool in walkthrough.TOOLS:
        assert {"accuracy", "finetune_s"} <= set(data["final"][tool])


def test_writes_markdown_and_plot_beside_the_json(quick):
    out, _data = quick
    md = out.with_suffix(".md").read_text()
    assert "bench/walkthrough.py" in md and "## Environment" in md
    assert md.count("\n| 2 |") >= 2  # the last step in both tools' tables
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_oracle_holds_at_every_step_of_the_walkthrough_model():
    """fxprune.verify on each step's composed result, against the unchanged dense model."""
    model = walkthrough.build_model(width=8, seed=0).eval()
    x = torch.randn(2, 1, 8, 8)
    pruner = fxprune.Pruner(model, x, ratio=0.75, steps=3, round_to=1, ignore=[model.fc])
    while not pruner.done:
        res = pruner.step()
        report = fxprune.verify(model, res, x)
        assert report.exact and report.max_error < 1e-4
