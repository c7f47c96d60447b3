"""Tests of the interleaved latency benchmark: its statistics, its outputs and its manners."""

from __future__ import annotations

import json
import logging
import statistics

import pytest
import torch
from torch import nn

from fxprune.export.latency import BenchReport, compare_latency

logger = logging.getLogger(__name__)

ROUNDS = 4


def tiny_net(width: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, 10),
    )


def conv_macs(width: int, hw: int = 8) -> int:
    return (3 * width * 9 + width * width * 9) * hw * hw + width * 10


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    original = tiny_net(32).train()  # training mode: the benchmark must restore it
    return {"original": original, "narrow": tiny_net(16)}


@pytest.fixture(scope="module")
def report(models, tmp_path_factory):
    threads_before = torch.get_num_threads()
    report = compare_latency(
        models,
        lambda batch: torch.randn(batch, 3, 8, 8),
        backends=("torch", "ort"),
        batch_sizes=(1, 2),
        rounds=ROUNDS,
        warmup=1,
        min_time=0.002,
        num_threads=1,
        macs={"original": conv_macs(32), "narrow": conv_macs(16)},
        progress=False,
        workdir=tmp_path_factory.mktemp("bench"),
    )
    assert torch.get_num_threads() == threads_before
    return report


def test_every_model_backend_and_batch_is_measured(report):
    assert report.baseline == "original" and report.backends == ["torch", "ort"]
    cells = {(m.backend, m.batch_size, m.model) for m in report.measurements}
    assert cells == {
        (b, n, m) for b in ("torch", "ort") for n in (1, 2) for m in ("original", "narrow")
    }
    for m in report.measurements:
        assert len(m.round_ms) == ROUNDS and all(ms > 0 for ms in m.round_ms)
        assert m.iters_per_round >= 1
        assert m.median_ms == statistics.median(m.round_ms)


def test_speedup_is_the_median_of_per_round_ratios(report):
    for m in report.measurements:
        base = report.find(m.backend, m.batch_size, "original")
        if m.model == "original":
            assert m.round_ratios is None and m.speedup is None
            continue
        assert len(m.round_ratios) == ROUNDS
        assert m.round_ratios == [b / c for b, c in zip(base.round_ms, m.round_ms)]
        assert m.speedup == statistics.median(m.round_ratios)
        assert m.speedup_min == min(m.round_ratios) and m.speedup_max == max(m.round_ratios)
        assert m.speedup_min <= m.speedup_q1 <= m.speedup <= m.speedup_q3 <= m.speedup_max


def test_sizes_and_reduction(report):
    original, narrow = report.model("original"), report.model("narrow")
    assert original.params == sum(p.numel() for p in tiny_net(32).parameters())
    assert (original.macs, narrow.macs) == (conv_macs(32), conv_macs(16))
    factor, unit = report.reduction("narrow")
    assert unit == "MACs" and factor == pytest.approx(conv_macs(32) / conv_macs(16))


def test_models_left_as_they_were(models, report):
    assert models["original"].training and not any(
        m.training != models["original"].training for m in models["original"].modules()
    )
    assert all(p.grad is None for p in models["original"].parameters())


def test_json_round_trip(report, tmp_path):
    assert BenchReport.from_json(report.to_json()) == report
    path = tmp_path / "bench.json"
    report.save_json(path)
    assert BenchReport.load_json(path) == report
    assert json.loads(path.read_text())["rounds"] == ROUNDS


def test_plot_writes_a_png(report, tmp_path):
    path = tmp_path / "speedup.png"
    report.plot(path)
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000


def test_table_lists_every_row(report):
    text = report.table()
    assert "narrow" in text and "original" in text and "baseline" in text
    assert text.count("narrow") == len([m for m in report.measurements if m.model == "narrow"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks how GPU backends are skipped")
def test_gpu_backends_are_skipped_with_a_note():
    report = compare_latency(
        {"a": tiny_net(8), "b": tiny_net(4)},
        {1: torch.randn(1, 3, 8, 8)},
        backends=("torch", "trt", "ort-cuda"),
        batch_sizes=None,
        rounds=2,
        warmup=0,
        min_time=0.001,
        progress=False,
    )
    assert report.backends == ["torch"] and report.batch_sizes == [1]
    assert any(n.startswith("trt skipped: needs an NVIDIA GPU") for n in report.notes)
    assert any(n.startswith("ort-cuda skipped") for n in report.notes)
    assert all(m.backend == "torch" for m in report.measurements)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown backends"):
        compare_latency({"a": tiny_net(4)}, lambda b: torch.randn(b, 3, 8, 8), backends=("tpu",))
    with pytest.raises(ValueError, match="at least one model"):
        compare_latency({}, lambda b: torch.randn(b, 3, 8, 8))
