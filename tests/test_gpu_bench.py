"""bench/gpu.py without a GPU: its refusal, its logic on tiny CPU shapes, and the rule that
turns a measured staircase into a recommended ``round_to``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import gpu  # noqa: E402
import gpu_report  # noqa: E402


def _stair_rows(time_of, centres=(64, 128)) -> list[dict]:
    settings = gpu.Settings(device="cpu")
    return [
        {
            "op": "conv3x3",
            "window": str(centre),
            "dtype": "fp16",
            "channels": (counts := gpu.window_counts(centre, settings)),
            "ms": [[time_of(c), time_of(c) * 1.01] for c in counts],
        }
        for centre in centres
    ]


def test_alignment_rule_recommends_the_largest_multiple_that_pays():
    # Counts off a multiple of 8 run 1.6x slower; nothing changes between 8 and 16.
    summary = gpu.alignment_summary(_stair_rows(lambda c: c * (1.0 if c % 8 == 0 else 1.6)))
    (row,) = summary
    assert row["round_to"] == 8
    assert row["gains"][8]["median"] > 1.4 and row["gains"][16]["median"] < 1.0


def test_alignment_rule_finds_no_step_in_a_smooth_staircase():
    (row,) = gpu.alignment_summary(_stair_rows(lambda c: float(c)))
    assert row["round_to"] == 1 and all(g["median"] < 1.0 for g in row["gains"].values())


def test_alignment_rule_sees_a_step_at_64_where_padding_costs_few_channels():
    def time_of(c):
        return c * (1.0 if c % 64 == 0 else 1.5)

    (row,) = gpu.alignment_summary(_stair_rows(time_of, centres=(512, 1024)))
    assert row["round_to"] == 64 and row["gains"][64]["median"] > 1.3


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_refuses_without_cuda_before_any_work(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu.py"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "needs CUDA" in proc.stdout and "--smoke-cpu" in proc.stdout
    assert not out.exists()


def test_smoke_run_on_the_cpu_checks_and_reports(tmp_path):
    out, md, png = tmp_path / "gpu.json", tmp_path / "B.md", tmp_path / "s.png"
    args = ["--smoke-cpu", "--sections", "env,staircase,models,sparse24_models"]
    args += ["--out", str(out), "--markdown", str(md), "--plot", str(png)]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu.py"), *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    data = json.loads(out.read_text())
    sec = data["sections"]
    assert all("error" not in sec[k] for k in sec)
    stair = sec["staircase"]["rows"]
    assert stair and all("ms" in r and r["rel_error_max"] < 1e-5 for r in stair)
    for rec in sec["models"]["rows"]:
        variants = rec["variants"]
        aligns = ("round_to=1", "round_to=8", "pad 8")
        assert set(variants) == {
            "original",
            "Torch-Pruning 0.5 round_to=8",
            *(f"fxprune {r} {a}" for r in (0.5, 0.4) for a in aligns),
        }
        # Ratio 0.5 halves every width to a multiple of 8: one architecture, timed once.
        assert variants["fxprune 0.5 round_to=8"]["same_as"] == "fxprune 0.5 round_to=1"
        assert variants["fxprune 0.5 pad 8"]["same_as"] == "fxprune 0.5 round_to=1"
        # Ratio 0.4 keeps 38.4 of 64: three widths, three architectures, all timed.
        ms = [variants[f"fxprune 0.4 {a}"]["macs"] for a in aligns]
        assert ms[1] < ms[0] < ms[2] and not any(
            "same_as" in variants[f"fxprune 0.4 {a}"] for a in aligns
        )
        for b in rec["batches"]:
            assert "fxprune 0.5 round_to=8" not in b["variants"]
            assert {"original", "fxprune 0.4 pad 8", "Torch-Pruning 0.5 round_to=8"} <= set(
                b["variants"]
            )
            for name, v in b["variants"].items():
                assert v["rel_error_vs_fp32"] < 1e-4, (rec["model"], name)
                assert len(v["speedup"]) == 2  # both repeats
            assert b["variants"]["fxprune 0.5 round_to=1"]["macs_reduction"] > 2
    for row in sec["sparse24_models"]["rows"]:
        assert row["rel_error_sparse_vs_dense"] < 1e-5  # no GPU: nothing was converted
    text = md.read_text()
    assert "## Channel alignment" in text and "Torch-Pruning 0.5 round_to=8" in text
    assert (
        "fxprune ratio 0.5 `round_to=8`" in text and ", ratio 0.4 (fewer MACs: `round_to=1`" in text
    )
    assert png.read_bytes()[:4] == b"\x89PNG"
    # Re-rendering from the JSON alone gives the same report.
    md2 = tmp_path / "again.md"
    gpu.main(["--from-json", str(out), "--markdown", str(md2), "--plot", str(png)])
    assert md2.read_text() == text


def test_a_later_run_adds_sections_and_the_report_names_each_one_s_run(tmp_path):
    def run(command, sections, gpu):
        env = {"gpu": gpu, "git": command}
        return {"command": command, "started": "t", "sections": {"env": env, **sections}}

    first = run("first", {"staircase": {"rows": [], "alignment": []}, "models": {"rows": []}}, "A")
    second = run(
        "second", {"models": {"rows": [], "ratios": [0.5, 0.4]}, "sparse24": {"error": "x"}}, "B"
    )
    merged = gpu_report.merge_runs([first, second])
    sec = merged["sections"]
    assert sec["staircase"]["run"] == 1 and sec["models"]["run"] == 2
    assert sec["sparse24"] == {"error": "x", "run": 2}  # nothing earlier to keep
    assert merged["runs"][1]["sections"] == ["models", "sparse24"]
    text = gpu_report.render(merged, None)
    assert "Run 1, behind staircase: `first`" in text and "Run 2, behind models, sparse24" in text
    assert "| GPU | A (" in text and "| B (" in text  # one machine column per run
    assert "## Channel alignment (the `round_to` staircase) (run 1)" in text
    assert "## Pruned models end to end (eager) (run 2)" in text
    # A failed section of a later run does not replace what an earlier run measured.
    again = gpu_report.merge_runs([second, run("third", {"models": {"error": "lost"}}, "C")])
    assert again["sections"]["models"]["run"] == 1
