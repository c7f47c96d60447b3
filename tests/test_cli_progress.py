"""Long CLI work shows what it is doing on a terminal and stays quiet when piped."""

from __future__ import annotations

import os
import pty
import subprocess
import sys

FACTORY = """
import torch
from torch import nn

def tiny():
    m = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3))
    return m.eval(), torch.randn(1, 3, 16, 16)
"""


def _on_a_terminal(argv: list[str], cwd) -> tuple[int, str]:
    """Run with stdout/stderr on a pseudo-terminal; returns (exit code, what the terminal got)."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(argv, stdout=follower, stderr=follower, cwd=cwd)
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 4096)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(leader)
    return proc.wait(timeout=300), b"".join(chunks).decode(errors="replace")


def test_progress_on_a_terminal_and_silence_when_piped(tmp_path):
    (tmp_path / "tiny.py").write_text(FACTORY)
    cmd = [sys.executable, "-m", "fxprune.cli", "prune", "tiny.py:tiny", "--round-to", "1"]
    code, screen = _on_a_terminal([*cmd, "--out", "a"], tmp_path)
    assert code == 0, screen
    # The spinner line names the current step (which ones render depends on the machine's speed).
    steps = ("loading tiny.py:tiny ...", "tracing ...", "pruning: ", "writing a ...")
    assert any(step in screen for step in steps), screen
    piped = subprocess.run([*cmd, "--out", "b"], cwd=tmp_path, capture_output=True, text=True)
    assert piped.returncode == 0 and piped.stderr == ""
    assert "loading" not in piped.stdout and "MACs" in piped.stdout
