"""The wheel installs fxprune, fxprune.passes and fxprune.export, and the CLI runs from it."""

from __future__ import annotations

import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(dist),
            str(ROOT),
        ],
        check=True,
    )
    wheel = next(dist.glob("fxprune-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "fxprune/passes/surgery.py" in names and "fxprune/export/onnx.py" in names
    assert not any(
        n.startswith(("passes/", "export/", "tests/")) for n in names
    )  # nothing else top-level
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True
    )
    # Dependencies (torch & co.) come from this environment rather than a 5 GB reinstall.
    purelib = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(purelib) / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    code = (
        "import fxprune, fxprune.passes, fxprune.export; "
        f"assert str(fxprune.__file__).startswith({str(venv)!r}); print(fxprune.__version__)"
    )
    out = subprocess.run([str(py), "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    cli = subprocess.run(
        [str(venv / "bin" / "fxprune"), "--help"], capture_output=True, text=True, cwd=tmp_path
    )
    assert cli.returncode == 0 and "inspect" in cli.stdout, cli.stderr
