"""Interrupting ``prune --force`` or ``export`` at any moment leaves a whole result.

Each run is a real subprocess signalled at moments spread over a measured full run; after
every signal the output is the complete earlier result or the complete new one, and the
next run removes whatever temp files a killed run left.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest
import torch

import fxprune
from fxprune.files import remove_stale_temps

FACTORY = """
import torch
from torch import nn

def small():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                      nn.Conv2d(64, 256, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                      nn.Flatten(), nn.Linear(256, 10))
    return m.eval(), torch.randn(1, 3, 32, 32)
"""
FRACTIONS = (0.3, 0.7, 0.95)


@pytest.fixture
def factory(tmp_path) -> str:
    path = tmp_path / "small_model.py"
    path.write_text(FACTORY)
    return f"{path}:small"


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "fxprune.cli", *args]


def _timed_run(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    return time.perf_counter() - t0


def _signal_at(cmd: list[str], delay: float, sig: int) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _stray(folder: Path, name: str) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(f".{name}.fxprune-")]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_interrupting_prune_force_leaves_the_earlier_or_the_new_result(tmp_path, factory, sig):
    out = tmp_path / "out"
    full = _timed_run(_cli("prune", factory, "--out", str(out), "--ratio", "0.25"))
    model, x = _load_factory(factory)
    for frac in FRACTIONS:
        before = _snapshot(out)
        cmd = _cli("prune", factory, "--out", str(out), "--ratio", "0.5", "--force")
        done = _signal_at(cmd, frac * full, sig)
        after = _snapshot(out)
        if after != before:  # then the new result must be complete
            assert done.returncode in (0, 130, -sig), done.stderr  # -sig: it had finished
            assert set(after) >= {"plan.json", "model.safetensors", "report.txt", "report.json"}
        loaded = fxprune.load(out, model=model)  # whole either way
        with torch.no_grad():
            assert loaded(x).shape == (1, 10)
        if sig != signal.SIGKILL and done.returncode == 130:
            assert done.stderr.strip().endswith(
                ("is unchanged.", "is complete.", "nothing was written.")
            ), done.stderr
            assert len(done.stderr.strip().splitlines()) == 1
            assert _stray(tmp_path, "out") == []
        remove_stale_temps(out)  # what the next run does first
        assert _stray(tmp_path, "out") == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_interrupting_export_leaves_the_earlier_or_the_new_file(tmp_path, factory, sig):
    onnx_path = tmp_path / "m.onnx"
    full = _timed_run(_cli("export", factory, "--out", str(onnx_path)))
    for frac in FRACTIONS:
        before = onnx_path.read_bytes()
        _signal_at(_cli("export", factory, "--out", str(onnx_path), "--force"), frac * full, sig)
        if onnx_path.read_bytes() != before:
            onnx.checker.check_model(str(onnx_path), full_check=True)
        if sig == signal.SIGINT:
            assert _stray(tmp_path, "m.onnx") == []
    _timed_run(_cli("export", factory, "--out", str(onnx_path), "--force"))
    assert _stray(tmp_path, "m.onnx") == []  # the next run cleaned up after the killed ones


def _load_factory(spec: str):
    from fxprune.models import load_model

    return load_model(spec)
