"""The command line: inspect, prune (refusing to overwrite), export, errors."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from fxprune.cli import main

ROOT = Path(__file__).resolve().parent.parent


def test_version_and_help():
    out = subprocess.run(
        [sys.executable, "-m", "fxprune.cli", "--version"], capture_output=True, text=True
    )
    assert out.returncode == 0 and out.stdout.startswith("fxprune ")
    out = subprocess.run(
        [sys.executable, "-m", "fxprune.cli", "--help"], capture_output=True, text=True
    )
    for cmd in ("inspect", "prune", "sparsify", "export", "bench", "demo"):
        assert cmd in out.stdout


def test_inspect_resnet18_prints_every_node(capsys):
    assert main(["inspect", "torchvision:resnet18"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("layer1_0_conv1 "))
    assert "[1, 64, 56, 56]" in row and "conv" in row
    import torch
    import torchvision

    import fxprune

    gm = fxprune.trace(torchvision.models.resnet18(), torch.randn(1, 3, 224, 224))
    names = {line.split()[0] for line in out.splitlines() if line.strip()}
    assert {n.name for n in gm.graph.nodes} <= names


def test_prune_writes_a_safe_result_and_refuses_to_overwrite(tmp_path, factory, capsys):
    out = tmp_path / "out"
    assert main(["prune", factory, "--ratio", "0.5", "--round-to", "8", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "MACs" in printed and "verified: outputs equal the masked original" in printed
    assert {p.name for p in out.iterdir()} == {
        ".fxprune-result.json",
        "plan.json",
        "model.safetensors",
        "inputs.safetensors",
        "kept.safetensors",
        "report.txt",
        "report.json",
    }
    import torch

    import fxprune
    from fxprune.models import load_model

    original, _ = load_model(factory)
    loaded = fxprune.load(out, model=original)
    assert loaded(torch.randn(2, 3, 16, 16)).shape == (2, 4)
    assert main(["prune", factory, "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["prune", factory, "--out", str(out), "--force", "--align", "pad"]) == 0


def test_export_command(tmp_path, factory, capsys):
    onnx_path = tmp_path / "m.onnx"
    assert main(["export", factory, "--out", str(onnx_path)]) == 0
    assert onnx_path.exists() and "max abs error" in capsys.readouterr().out


def test_bad_input_errors_are_one_line(capsys):
    assert main(["inspect", "torchvision:not_a_model"]) == 2
    assert "torchvision has no model 'not_a_model'" in capsys.readouterr().err
    assert main(["inspect", "nowhere/model.pt"]) == 2
    assert "no such model file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["prune", "torchvision:resnet18", "--ratio", "1.5", "--out", "/tmp/x"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "ratio must be in [0, 1)" in err and len(err.splitlines()) == 1
    assert main(["inspect", "torchvision:resnet18", "--input-shape", "1,a"]) == 2


def make_recipe(target: str) -> list[str]:
    """The command ``make TARGET`` runs (``make -n``, the install step taken as done)."""
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    # Under `make test` (CI) the parent make's MAKEFLAGS/MAKELEVEL make a nested make print
    # "Entering directory" lines: run it as a top-level make.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    dry = subprocess.run(
        [make, "--no-print-directory", "-n", "-o", ".venv/.fxprune-installed", target],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
    )
    assert dry.returncode == 0, dry.stderr
    lines = [line for line in dry.stdout.strip().splitlines() if not line.startswith("make")]
    return shlex.split(lines[-1])


def test_readme_first_commands_are_make_targets():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].split() for line in block.splitlines()]
    assert commands == [["make", "demo"], ["make", "test"]]
    assert make_recipe("test")[1:] == ["-m", "pytest", "-q"]


def test_make_demo_prunes_verifies_exports_and_measures(tmp_path, factory, capsys):
    """README: `make demo` prunes 50% aligned to 8, verifies, exports ONNX, measures speedup.

    The Makefile's recipe, run on a tiny model instead of ResNet-50, must do each step.
    """
    argv = make_recipe("demo")
    assert Path(argv[0]).name == "fxprune" and argv[1:] == ["demo"]
    (script,) = entry_points(group="console_scripts", name="fxprune")
    assert script.value == "fxprune.cli:main"
    out = tmp_path / "demo"
    assert main([*argv[1:], "--model", factory, "--rounds", "2", "--out", str(out)]) == 0
    assert "ratio 0.5, round_to=8" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["verified"] == "outputs equal the masked original"
    assert summary["macs_ratio"] > 1 and summary["ort_cpu_speedup_batch1"] > 0
    assert {"original.onnx", "pruned.onnx", "report.txt", "bench.json"} <= {
        p.name for p in out.iterdir()
    }
    kept = re.findall(r"^\s+\d+\s+(\d+)/(\d+)\s", (out / "report.txt").read_text(), re.M)
    assert kept and all(int(k) % 8 == 0 and int(k) <= int(n) // 2 for k, n in kept)


def test_public_api_names_from_design():
    import fxprune

    for name in (
        "trace",
        "analyze",
        "prune",
        "sparsify",
        "Pruner",
        "save",
        "load",
        "count_macs",
        "PassManager",
        "TraceError",
        "PruneError",
    ):
        assert hasattr(fxprune, name), name
    assert callable(fxprune.export.to_onnx) and callable(fxprune.export.build_engine)
    assert callable(fxprune.nm_permutation.search_permutation)
