"""``ignore=`` keeps a module's own output channels (Torch-Pruning's ``ignored_layers``);
``freeze_inputs=`` keeps what it reads too; parameter names keep all their channels."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
import torchvision
from conftest import assert_oracle
from micro_models import randomize
from torch import nn

import fxprune
from fxprune.errors import PruneError


class ConvBnHead(nn.Module):
    """conv -> bn -> relu -> conv2 -> pool -> fc -> head: one producer per consumer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(torch.relu(self.bn(self.conv(x)))).mean((2, 3))
        return self.head(torch.relu(self.fc(x)))


class Untraceable(ConvBnHead):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise AssertionError("traced: the argument check came too late")


def small() -> tuple[nn.Module, torch.Tensor]:
    return randomize(ConvBnHead()).eval(), torch.randn(1, 3, 8, 8)


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    return torchvision.models.resnet18().eval(), torch.randn(1, 3, 64, 64)


def layer_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    kinds = (nn.Conv2d, nn.Linear, nn.BatchNorm2d)
    return {
        f"{name}.{p}": tuple(t.shape)
        for name, m in model.named_modules()
        if isinstance(m, kinds)
        for p, t in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False))
        if t.dim()
    }


def out_in(module: nn.Module, weight: str) -> tuple[int, int]:
    """(out, in) channels of a conv or linear weight, whichever frontend built the module."""
    return tuple(module.get_parameter(weight).shape[:2])


def kept_equal(a, b) -> bool:
    return a.keys() == b.keys() and all(
        a[k].keys() == b[k].keys() and all(torch.equal(a[k][d], b[k][d]) for d in a[k]) for k in a
    )


def test_ignore_fc_on_resnet18_gives_torch_prunings_architecture(resnet18):
    import torch_pruning as tp

    model, x = resnet18
    peer = copy.deepcopy(model)
    pruner = tp.pruner.MagnitudePruner(
        peer,
        x,
        importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=0.5,
        round_to=8,
        ignored_layers=[peer.fc],
    )
    pruner.step()
    res = fxprune.prune(model, x, ratio=0.5, round_to=8, ignore=[model.fc], verify=False)
    assert layer_shapes(res.module) == layer_shapes(peer)
    fc = res.module.get_submodule("fc")
    assert fc.out_features == 1000 and fc.in_features == 256  # what fc reads is pruned
    assert_oracle(model, res, x)


def test_freeze_inputs_also_keeps_what_the_module_reads(resnet18):
    model, x = resnet18
    res = fxprune.prune(model, x, ratio=0.5, round_to=8, freeze_inputs=[model.fc], verify=False)
    fc = res.module.get_submodule("fc")
    assert (fc.in_features, fc.out_features) == (512, 1000)
    # fc's inputs are the last stage's residual stream: it stays whole, its inner convs shrink
    assert res.module.get_submodule("layer4.1.conv2").out_channels == 512
    assert res.module.get_submodule("layer4.1.conv1").out_channels == 256
    assert_oracle(model, res, x)


def test_ignored_layers_is_an_alias_of_ignore(resnet18):
    model, x = resnet18
    ours = fxprune.prune(model, x, ratio=0.5, round_to=8, ignore=[model.fc], verify=False)
    peers = fxprune.prune(model, x, ratio=0.5, round_to=8, ignored_layers=[model.fc], verify=False)
    assert kept_equal(ours.kept, peers.kept)


def test_ignored_layers_alias_in_analyze_pruner_and_sparsify():
    model, x = small()
    a = fxprune.analyze(model, x, ignored_layers=[model.conv2])
    b = fxprune.analyze(model, x, ignore=[model.conv2])
    assert [(g.size, g.prunable) for g in a.groups] == [(g.size, g.prunable) for g in b.groups]
    assert not a.group_of("conv2.weight", 0).prunable
    pruner = fxprune.Pruner(model, x, ratio=0.5, steps=2, ignored_layers=["fc"])
    pruner.step()
    assert pruner.step().module.fc.out_features == 16
    sp = fxprune.sparsify(model, x, time_budget=0.05, ignored_layers=[model.fc])
    fc = next(layer for layer in sp.report.layers if layer.param == "fc.weight")
    assert not fc.eligible and fc.reason == "ignored by the user"


@pytest.mark.parametrize(
    "call",
    [
        lambda m, x: fxprune.prune(m, x, ignore=[m.fc], ignored_layers=[m.fc]),
        lambda m, x: fxprune.analyze(m, x, ignore=[], ignored_layers=[m.fc]),
        lambda m, x: fxprune.Pruner(m, x, ignore="fc", ignored_layers="fc"),
        lambda m, x: fxprune.sparsify(m, x, ignore=[m.fc], ignored_layers=[m.fc]),
    ],
    ids=["prune", "analyze", "Pruner", "sparsify"],
)
def test_ignore_and_ignored_layers_together_is_an_error_before_tracing(call):
    model = Untraceable().eval()
    with pytest.raises(PruneError, match="ignored_layers= is another name for ignore="):
        call(model, torch.randn(1, 3, 8, 8))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_an_ignored_layer_keeps_its_outputs_and_lets_its_inputs_go(frontend):
    model, x = small()
    res = fxprune.prune(model, x, ratio=0.5, ignore=[model.conv2], frontend=frontend)
    assert out_in(res.module, "conv2.weight") == (16, 8)
    assert out_in(res.module, "fc.weight") == (8, 16)
    assert_oracle(model, res, x)
    frozen = fxprune.prune(model, x, ratio=0.5, freeze_inputs=[model.conv2], frontend=frontend)
    assert out_in(frozen.module, "conv2.weight") == (16, 16)
    assert_oracle(model, frozen, x)


def test_an_ignored_norm_keeps_the_channels_it_carries():
    # A norm's output channels are its input's (Torch-Pruning: its in and out are one).
    model, x = small()
    res = fxprune.prune(model, x, ratio=0.5, ignore=[model.bn])
    assert res.module.conv.out_channels == res.module.bn.num_features == 16
    assert res.module.conv2.out_channels == 8
    assert_oracle(model, res, x)


def test_a_parameter_name_keeps_all_of_its_channels():
    model, x = small()
    by_name = fxprune.prune(model, x, ratio=0.5, ignore=["fc.weight"])
    assert (by_name.module.fc.in_features, by_name.module.fc.out_features) == (16, 16)
    by_object = fxprune.prune(model, x, ratio=0.5, ignored_layers=[model.fc.weight])
    assert kept_equal(by_name.kept, by_object.kept)
    a = fxprune.analyze(model, x, ignore=["fc.weight"])
    assert "frozen by the user (fc.weight)" in a.group_of("fc.weight", 1).reason
    with pytest.raises(PruneError, match="not a parameter or buffer of the model"):
        fxprune.prune(model, x, ignore=[nn.Parameter(torch.ones(2))])


def test_the_reason_says_which_module_kept_its_outputs():
    model, x = small()
    a = fxprune.analyze(model, x, ignore=[model.conv2])
    assert (
        "ignored by the user (conv2: its output channels)" in a.group_of("conv2.weight", 0).reason
    )
    assert a.group_of("conv2.weight", 1).prunable


def test_ignoring_a_module_without_parameters_warns_that_nothing_is_kept(caplog):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    with caplog.at_level(logging.WARNING, logger="fxprune.analysis"):
        a = fxprune.analyze(model, torch.randn(1, 3, 8, 8), ignore=[model[1]])
    assert "'1' has no parameters" in caplog.text
    assert a.group_of("0.weight", 0).prunable


def test_saved_plans_replay_ignore_and_old_plans_keep_their_meaning(tmp_path):
    model, x = small()
    res = fxprune.prune(model, x, ratio=0.5, ignore=[model.conv2], freeze_inputs=["fc"])
    folder = fxprune.save(res, tmp_path / "v2")
    plan = json.loads((folder / "plan.json").read_text())
    assert plan["format_version"] == 2
    assert (plan["stages"][0]["ignore"], plan["stages"][0]["freeze"]) == (["conv2"], ["fc"])
    loaded = fxprune.load(folder, model=model)
    assert layer_shapes(loaded) == layer_shapes(res.module)
    # A v1 plan's ignore froze every channel the module touched, and still does on load.
    old = fxprune.prune(model, x, ratio=0.5, freeze_inputs=[model.conv2])
    folder = fxprune.save(old, tmp_path / "v1")
    plan = json.loads((folder / "plan.json").read_text())
    plan["format_version"] = 1
    for stage in plan["stages"]:
        stage["ignore"] = stage.pop("freeze")
    (folder / "plan.json").write_text(json.dumps(plan))
    loaded = fxprune.load(folder, model=model)
    assert layer_shapes(loaded) == layer_shapes(old.module)
    assert loaded.conv2.in_channels == 16
