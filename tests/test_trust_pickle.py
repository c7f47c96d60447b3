"""Loading never runs code from a file: a crafted pickle must not execute through any path."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from micro_models import micro_models

import fxprune
from fxprune.cli import main
from fxprune.models import load_model
from fxprune.saving import SaveError


class _Payload:
    """Unpickling this runs a shell command that creates the sentinel file."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


@pytest.fixture
def sentinel(tmp_path) -> Path:
    return tmp_path / "PWNED"


@pytest.fixture(params=["raw_pickle", "torch_zip"])
def evil_file(request, tmp_path, sentinel) -> Path:
    path = tmp_path / "model.pt"
    if request.param == "raw_pickle":
        path.write_bytes(pickle.dumps(_Payload(sentinel)))
    else:
        torch.save({"model": _Payload(sentinel)}, path)
    return path


def test_the_payload_really_runs_when_unpickled(tmp_path, sentinel):
    """The fixture is a real exploit: plain pickle.loads executes it."""
    pickle.loads(pickle.dumps(_Payload(sentinel)))
    assert sentinel.exists()


def test_no_api_loading_path_runs_the_payload(evil_file, sentinel):
    model, _ = micro_models()["residual"]
    for call in (
        lambda: fxprune.load(evil_file),
        lambda: fxprune.load(evil_file, model=model),
        lambda: load_model(str(evil_file)),
    ):
        with pytest.raises(SaveError, match="can run any code"):
            call()
    assert not sentinel.exists()


@pytest.mark.parametrize("command", ["inspect", "prune", "export", "sparsify"])
def test_no_cli_command_runs_the_payload(evil_file, sentinel, tmp_path, command, capsys):
    argv = [command, str(evil_file)]
    if command in ("prune", "sparsify"):
        argv += ["--out", str(tmp_path / "out")]
    if command == "export":
        argv += ["--out", str(tmp_path / "m.onnx")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "can run any code" in err and "--trust-pickle" in err and len(err.splitlines()) == 1
    assert not sentinel.exists()


def test_a_pickle_disguised_as_safetensors_in_a_result_folder_does_not_run(tmp_path, sentinel):
    model, x = micro_models()["residual"]
    folder = fxprune.save(fxprune.prune(model, x, ratio=0.5), tmp_path / "r")
    (folder / "model.safetensors").write_bytes(pickle.dumps(_Payload(sentinel)))
    with pytest.raises(SaveError, match="not a readable safetensors file"):
        fxprune.load(folder, model=model)
    assert not sentinel.exists()


def test_a_plan_naming_a_python_factory_is_not_run(tmp_path, sentinel, capsys):
    model, x = micro_models()["residual"]
    folder = fxprune.save(fxprune.prune(model, x, ratio=0.5), tmp_path / "r")
    evil_py = tmp_path / "evil.py"
    evil_py.write_text(f"import os\nos.system('touch {sentinel}')\ndef f():\n    pass\n")
    plan = json.loads((folder / "plan.json").read_text())
    plan["model"] = f"{evil_py}:f"
    (folder / "plan.json").write_text(json.dumps(plan))
    assert main(["inspect", str(folder)]) == 2
    assert "does not run code named inside a saved file" in capsys.readouterr().err
    assert not sentinel.exists()


def test_trust_pickle_loads_a_pickled_module_with_a_warning(tmp_path):
    model, x = micro_models()["residual"]
    path = tmp_path / "whole.pt"
    torch.save(model, path)
    with pytest.raises(SaveError, match="imports Python objects"):
        fxprune.load(path)
    with pytest.warns(UserWarning, match="can run any code"):
        loaded = fxprune.load(path, trust_pickle=True)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_weights_only_and_corrupt_files_get_clear_errors(tmp_path):
    sd = tmp_path / "sd.pt"
    torch.save({"w": torch.ones(2)}, sd)
    with pytest.raises(SaveError, match="weights only"):
        fxprune.load(sd)
    broken = tmp_path / "broken.pt"
    broken.write_bytes(sd.read_bytes()[:100])
    with pytest.raises(SaveError, match="truncated or corrupt"):
        fxprune.load(broken)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(SaveError, match="truncated or corrupt"):
        fxprune.load(empty)


def test_a_saved_result_loads_in_a_fresh_process_without_pickle(tmp_path):
    """The CLI rebuilds a zoo model's result from its plan alone."""
    out = tmp_path / "r18"
    code = (
        "import sys, torch, torchvision, fxprune\n"
        "m = torchvision.models.resnet18().eval()\n"
        "res = fxprune.prune(m, torch.randn(1, 3, 32, 32), ratio=0.5, round_to=8)\n"
        f"fxprune.save(res, {str(out)!r}, model_spec='torchvision:resnet18')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
    proc = subprocess.run(
        [sys.executable, "-m", "fxprune.cli", "inspect", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "layer1_0_conv1" in proc.stdout
