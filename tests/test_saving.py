"""Saved results: safetensors + a JSON plan, rebuilt from the original; never pickle by default."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
from micro_models import micro_models, randomize
from torch import nn

import fxprune
from fxprune.saving import SaveError, read_kept

MODELS = micro_models()


def _outputs_equal(a: nn.Module, b: nn.Module, x) -> None:
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_micro_model_round_trips_with_the_original_keys(tmp_path, name):
    model, x = MODELS[name]
    res = fxprune.prune(model, x, ratio=0.5, round_to=2, align="pad", verify=False)
    folder = fxprune.save(res, tmp_path / "out")
    loaded = fxprune.load(folder, model=model)
    _outputs_equal(loaded, res.module, x)
    assert set(loaded.state_dict()) == set(model.state_dict())
    assert set(res.module.state_dict()) == set(model.state_dict())
    kept = read_kept(folder)
    assert kept.keys() == res.kept.keys()
    assert all(torch.equal(kept[p][d], res.kept[p][d]) for p in kept for d in kept[p])


def test_fine_tuned_weights_are_what_loads(tmp_path):
    model = randomize(torchvision.models.resnet18())
    x = torch.randn(1, 3, 64, 64)
    res = fxprune.prune(model, x, ratio=0.5, round_to=8)
    with torch.no_grad():
        res.module.conv1.weight.mul_(1.5)  # any fine-tuning step
    loaded = fxprune.load(fxprune.save(res, tmp_path / "r18"), model=model)
    _outputs_equal(loaded, res.module, x)
    assert set(loaded.state_dict()) == set(model.state_dict())


def test_export_frontend_round_trips(tmp_path):
    from test_trace import DataDependent

    model, x = DataDependent().eval(), torch.randn(1, 3, 8, 8)
    res = fxprune.prune(model, x, ratio=0.5, frontend="export")
    loaded = fxprune.load(fxprune.save(res, tmp_path / "m"), model=model)
    _outputs_equal(loaded, res.module, x)


def test_iterative_pruner_result_round_trips(tmp_path):
    model, x = MODELS["residual"]
    pruner = fxprune.Pruner(model, x, ratio=0.5, steps=2)
    pruner.step()
    res = pruner.step()
    assert len(res.stages) == 2
    loaded = fxprune.load(fxprune.save(res, tmp_path / "two-steps"), model=model)
    _outputs_equal(loaded, res.module, x)


class BuffersThroughMethods(nn.Module):
    """Buffers read through helper methods and ops (fx used to capture them as constants)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.register_buffer("shift", torch.rand(8))
        self.fc = nn.Conv2d(8, 4, 1)

    def centred(self, x):
        return x - self.shift.view(1, -1, 1, 1)

    def forward(self, x):
        return self.fc(torch.relu(self.centred(self.conv(x))))


def test_buffers_used_through_methods_keep_their_names(tmp_path):
    model, x = BuffersThroughMethods().eval(), torch.randn(1, 3, 10, 10)
    res = fxprune.prune(model, x, ratio=0.5)
    assert res.module.get_buffer("shift").shape == (4,)  # pruned with its channels
    assert set(res.module.state_dict()) == set(model.state_dict())
    loaded = fxprune.load(fxprune.save(res, tmp_path / "b"), model=model)
    assert set(loaded.state_dict()) == set(model.state_dict())
    _outputs_equal(loaded, res.module, x)


def test_load_refuses_another_model_with_a_clear_error(tmp_path):
    model, x = MODELS["residual"]
    folder = fxprune.save(fxprune.prune(model, x, ratio=0.5), tmp_path / "r")
    other, _ = MODELS["concat"]
    with pytest.raises(fxprune.FxpruneError, match="does not match the one that was pruned"):
        fxprune.load(folder, model=other)
    with pytest.raises(SaveError, match="needs the original model"):
        fxprune.load(folder)


def test_load_leaves_the_original_untouched(tmp_path):
    model, x = MODELS["residual"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folder = fxprune.save(fxprune.prune(model, x, ratio=0.5), tmp_path / "r")
    fxprune.load(folder, model=model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_plans_from_a_newer_format_and_bare_modules_get_clear_errors(tmp_path):
    model, x = MODELS["residual"]
    res = fxprune.prune(model, x, ratio=0.5)
    folder = fxprune.save(res, tmp_path / "r")
    plan = json.loads((folder / "plan.json").read_text())
    plan["format_version"] = 99
    (folder / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(SaveError, match="newer format"):
        fxprune.load(folder, model=model)
    with pytest.raises(SaveError, match=r"expects the result of fxprune\.prune"):
        fxprune.save(res.module, tmp_path / "bare")
    with pytest.raises(SaveError, match="no such file or folder"):
        fxprune.load(tmp_path / "nope")


def test_sparsify_result_round_trips(tmp_path):
    model, x = MODELS["residual"]
    sp = fxprune.sparsify(model, x, pattern="2:4", time_budget=0.05)
    loaded = fxprune.load(fxprune.save(sp, tmp_path / "s", example_inputs=x), model=model)
    _outputs_equal(loaded, sp.module, x)
