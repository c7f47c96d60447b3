"""Recipes: checked whole before any work (file:line, nearest names), run into one folder."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from micro_models import Residual, randomize

import fxprune
from fxprune.recipes import STEPS, RecipeError, load_recipe, run_recipe

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.toml"))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_every_example_recipe_is_valid(example):
    recipe = load_recipe(example)
    assert recipe.steps and all(step["pass"] in STEPS for step in recipe.steps)


def test_there_are_examples_for_each_workflow():
    names = {p.stem for p in EXAMPLES}
    assert {
        "resnet50_prune_onnx_engine",
        "minilm_prune_onnx",
        "sparsify_engine",
        "mask_compile",
    } <= names


@pytest.mark.parametrize(
    "text, where, message",
    [
        (
            'model = "torchvision:resnet18"\n\n[[steps]]\npass = "prun"\n',
            ":4:",
            "did you mean 'prune'",
        ),
        (
            'model = "torchvision:resnet18"\n[[steps]]\npass = "prune"\nratio = 0.5\nroud_to = 8\n',
            ":5:",
            "prune has no option 'roud_to'; did you mean 'round_to'",
        ),
        (
            'model = "torchvision:resnet18"\n[[steps]]\npass = "prune"\n\n'
            '[[steps]]\npass = "export.onnx"\nfp16 = "yes"\n',
            ":7: step 2",
            "fp16 must be true or false",
        ),
        (
            'model = "torchvision:resnet18"\n[[steps]]\npass = "prune"\nratio = 1.5\n',
            ":4:",
            "ratio must be in [0, 1)",
        ),
        (
            'modle = "x"\n[[steps]]\npass = "prune"\n',
            ":1:",
            "unknown key 'modle'; did you mean 'model'",
        ),
        ('model = "torchvision:resnet18"\n', "", "at least one [[steps]]"),
        ('model = "torchvision:resnet18"\n[[steps]\npass = "prune"\n', "", "not valid TOML"),
    ],
)
def test_bad_recipes_say_where_and_how_to_fix(tmp_path, text, where, message):
    path = write(tmp_path, text)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert str(info.value).startswith(str(path)) and where in str(info.value)
    assert message in str(info.value)


def test_a_bad_recipe_fails_before_any_model_is_loaded(tmp_path, monkeypatch):
    loaded = []
    monkeypatch.setattr("fxprune.recipes.load_model", lambda *a, **k: loaded.append(a))
    path = write(tmp_path, 'model = "torchvision:resnet18"\n[[steps]]\npass = "prune"\nratio = 2\n')
    with pytest.raises(RecipeError):
        run_recipe(path, tmp_path / "out")
    assert loaded == [] and not (tmp_path / "out").exists()


def test_run_recipe_prunes_exports_and_writes_one_folder(tmp_path):
    model = randomize(Residual()).eval()
    x = torch.randn(1, 3, 8, 8)
    recipe = {
        "model": "unused: the model is passed",
        "steps": [
            {"pass": "prune", "ratio": 0.5, "round_to": 2},
            {"pass": "export.onnx"},
        ],
    }
    res = run_recipe(recipe, tmp_path / "out", model=model, example_inputs=x)
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"step1_pruned", "step1_report.txt", "step2.onnx", "recipe.log"} <= files
    assert "fewer MACs, outputs equal the masked original" in res.log[0]
    # the folder holds the pruned model: it loads and computes what the run's result does
    pruned = fxprune.load(tmp_path / "out" / "step1_pruned", model=model)
    with torch.no_grad():
        assert torch.equal(pruned(x), res.module(x))
    assert fxprune.count_macs(res.module, x) < fxprune.count_macs(model, x)


def test_fxprune_run_on_the_mask_and_compile_example(tmp_path):
    example = next(p for p in EXAMPLES if p.stem == "mask_compile")
    out = tmp_path / "mask"
    proc = subprocess.run(
        [sys.executable, "-m", "fxprune.cli", "run", str(example), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert "[1/2] mask:" in proc.stdout and "[2/2] compile:" in proc.stdout
    before, after = proc.stdout.split("MACs ")[1].split(" handed")[0].split(" -> ")
    assert int(after.replace(",", "")) < int(before.replace(",", ""))
    assert (out / "recipe.log").is_file()
