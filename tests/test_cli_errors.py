"""Every bad command line gets one line, ``fxprune CMD: error: ...``, exit 2, before any work.

``BAD_CLI`` is also the source of the "Command line" table in docs/errors.md
(``python docs/errors_table.py --cli``).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fxprune.cli import main

SLOW_MODEL = "torchvision:resnet152"  # seconds to build: a fast error proves nothing was built

# (argv with {tmp} for a scratch folder, text the one-line error must contain)
BAD_CLI: list[tuple[list[str], str]] = [
    (["prune", SLOW_MODEL, "--ratio", "1.5"], "ratio must be in [0, 1)"),
    (["prune", SLOW_MODEL, "--ratio", "half"], "expected a number, got 'half'"),
    (["prune", SLOW_MODEL, "--round-to", "0"], "expected a positive whole number"),
    (["prune", SLOW_MODEL, "--align", "up"], "invalid choice: 'up'"),
    (["prune", SLOW_MODEL, "--importance", "42"], "invalid choice: '42'"),
    (["prune", SLOW_MODEL, "--target-macs", "2"], "must be in (0, 1]"),
    (["prune", SLOW_MODEL, "--out", "{tmp}/a_file"], "a file with that name exists"),
    (["prune", SLOW_MODEL, "--out", "{tmp}/user_dir", "--force"], "fxprune did not write"),
    (["prune", SLOW_MODEL, "--out", "."], "the folder you are working in"),
    (["prune", SLOW_MODEL, "--out", "{tmp}/earlier"], "pass --force to replace it"),
    (["prune", "torchvision:not_a_model", "--out", "{tmp}/o"], "torchvision has no model"),
    (["prune", "{tmp}/factory.py:nothing", "--out", "{tmp}/o"], "has no function 'nothing'"),
    (["prune", "{tmp}/factory.py:broken", "--out", "{tmp}/o"], "broken() raised ValueError"),
    (["prune", "{tmp}/missing.py:f", "--out", "{tmp}/o"], "no such file"),
    (["inspect", "{tmp}/a_file"], "not a readable model file"),
    (["inspect", "{tmp}/evil.pt"], "can run any code"),
    (["inspect", "{tmp}/nowhere.pt"], "no such model file"),
    (["inspect", "{tmp}/user_dir"], "not an fxprune"),
    (["inspect", SLOW_MODEL, "--input-shape", "1,a"], "--input-shape must look like"),
    (["export", SLOW_MODEL, "--out", "{tmp}"], "is a folder; give a file name"),
    (["export", SLOW_MODEL, "--out", "{tmp}/nofolder/m.onnx"], "does not exist"),
    (["export", SLOW_MODEL, "--out", "{tmp}/a_file"], "exists; pass --force"),
    (["sparsify", SLOW_MODEL, "--pattern", "4:2"], "expected an N:M pattern"),
    (["sparsify", SLOW_MODEL, "--time-budget", "-1"], "must be a positive number"),
    (["bench", SLOW_MODEL, "--batch-sizes", "1,x"], "expected batch sizes like 1,8"),
    (["bench", SLOW_MODEL, "--backends", "tpu"], "unknown backend 'tpu'"),
    (["bench", SLOW_MODEL, "--rounds", "0"], "must be at least 1"),
    (["demo", "--out", "{tmp}/user_dir"], "fxprune did not write"),
    (["prune"], "the following arguments are required: model"),
]

FACTORY = """
import torch
from torch import nn

def broken():
    raise ValueError("checkpoint missing")
"""


def scratch(tmp: Path) -> None:
    """The files the table's arguments refer to."""
    import os
    import pickle

    (tmp / "a_file").write_text("not a model")
    (tmp / "user_dir").mkdir()
    (tmp / "user_dir" / "notes.txt").write_text("mine")
    (tmp / "earlier").mkdir()
    (tmp / "earlier" / ".fxprune-result.json").write_text('{"files": ["plan.json"]}')
    (tmp / "earlier" / "plan.json").write_text("{}")
    (tmp / "factory.py").write_text(FACTORY)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo should-never-run",))

    (tmp / "evil.pt").write_bytes(pickle.dumps(Evil()))


def run_cli(argv: list[str], tmp: Path) -> tuple[int, str]:
    argv = [a.replace("{tmp}", str(tmp)) for a in argv]
    proc = subprocess.run(
        [sys.executable, "-m", "fxprune.cli", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp,
    )
    return proc.returncode, proc.stderr


@pytest.mark.parametrize(
    "argv,expected", BAD_CLI, ids=lambda v: " ".join(v) if isinstance(v, list) else ""
)
def test_bad_command_lines_get_one_clear_line_and_exit_2(tmp_path, argv, expected, capsys):
    scratch(tmp_path)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"fxprune {argv[0]}: error:") or lines[0].startswith("fxprune "), err
    assert expected in lines[0], err
    assert (tmp_path / "user_dir" / "notes.txt").read_text() == "mine"


def test_tracebacks_only_with_verbose(tmp_path):
    scratch(tmp_path)
    code, err = run_cli(["prune", "{tmp}/factory.py:broken", "--out", "{tmp}/o"], tmp_path)
    assert code == 2 and "Traceback" not in err
    code, err = run_cli(["-v", "prune", "{tmp}/factory.py:broken", "--out", "{tmp}/o"], tmp_path)
    assert code == 2 and "Traceback" in err and "checkpoint missing" in err
