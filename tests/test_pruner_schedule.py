"""Iterative pruning (``fxprune.Pruner``): after every step each group keeps exactly what a
one-shot ``fxprune.prune`` at the schedule's cumulative ratio keeps (rounding never
compounds), schedules, ``ratio=1.0``, Taylor importance per step, save / load of the steps.
"""

from __future__ import annotations

import copy
import importlib
import logging
import math
import sys

import pytest
import torch
import torchvision
from micro_models import micro_models

import fxprune
from fxprune.prune import schedule_ratio

MODELS = micro_models()
prune_module = importlib.import_module("fxprune.prune")


def widths(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {n: tuple(p.shape) for n, p in module.state_dict().items()}


def padding(kept) -> dict[tuple[str, int], int]:
    return {(p, d): int((idx < 0).sum()) for p, dims in kept.items() for d, idx in dims.items()}


def assert_matches_one_shot(model, x, res, ratio: float, **options) -> None:
    one_shot = fxprune.prune(model, x, ratio=ratio, verify=False, **options)
    assert widths(res.module) == widths(one_shot.module), f"cumulative ratio {ratio}"
    assert padding(res.kept) == padding(one_shot.kept)


@pytest.mark.parametrize(
    "name, round_to, align",
    [("residual", r, a) for r in (1, 2, 8) for a in ("round", "pad")]
    + [("concat", 8, "round"), ("concat", 2, "pad"), ("grouped_after_residual", 8, "pad")],
)
def test_every_step_keeps_what_one_shot_keeps_at_the_cumulative_ratio(name, round_to, align):
    model, x = MODELS[name]
    options = dict(round_to=round_to, align=align)
    pruner = fxprune.Pruner(model, x, ratio=0.85, steps=3, verify=False, **options)
    previous = None
    while not pruner.done:
        res = pruner.step()
        assert_matches_one_shot(
            model, x, res, pruner.cumulative_ratio(pruner.step_index), **options
        )
        # kept maps to the original, -1 for padding: the oracle checks every parameter by it
        fxprune.verify(model, res, x)
        if previous is not None:  # a step only ever removes channels kept by the one before
            for param, dims in res.kept.items():
                for dim, idx in dims.items():
                    before = previous.get(param, {}).get(dim)
                    if before is not None:
                        real = set(idx[idx >= 0].tolist())
                        assert real <= set(before[before >= 0].tolist()), (param, dim)
        previous = {p: dict(d) for p, d in res.kept.items()}


# kept = floor(32 * (1 - r_k)), then rounded down to the multiple: 24, 8 and floor(1.6) = 1
@pytest.mark.parametrize("round_to, steps_done, expected", [(8, 5, 24), (2, 15, 8), (1, 19, 1)])
def test_rounding_does_not_compound_over_many_small_steps(round_to, steps_done, expected):
    model, x = MODELS["residual"]  # conv1 has 32 channels
    pruner = fxprune.Pruner(model, x, ratio=0.95, steps=19, round_to=round_to, verify=False)
    for _ in range(steps_done):
        pruner.step()
    assert pruner.module.conv1.out_channels == expected


def test_resnet18_steps_match_one_shot_with_padding():
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 32, 32)
    options = dict(round_to=8, align="pad", ignore=[model.fc])
    pruner = fxprune.Pruner(model, x, ratio=0.9, steps=2, verify=False, **options)
    for k in (1, 2):
        res = pruner.step()
        assert_matches_one_shot(model, x, res, pruner.cumulative_ratio(k), **options)
    assert (
        pruner.module.get_submodule("layer4.0.conv1").out_channels == 56
    )  # floor(512 * 0.1) = 51, padded to the multiple of 8
    fxprune.verify(model, res, x)


@pytest.mark.parametrize("round_to, floor", [(1, 1), (8, 8)])
def test_ratio_one_over_twenty_steps_ends_at_min_channels_without_removing_a_group(round_to, floor):
    model, x = MODELS["residual"]
    pruner = fxprune.Pruner(model, x, ratio=1.0, steps=20, round_to=round_to, verify=False)
    for _ in range(20):
        res = pruner.step()
    assert pruner.done
    assert pruner.module.conv1.out_channels == floor
    assert pruner.module.stem.out_channels == floor
    assert pruner.module.head.out_channels == 4  # the output is never pruned
    assert pruner.module(x).shape == model(x).shape
    fxprune.verify(model, res, x)


def test_ratio_one_keeps_min_channels():
    model, x = MODELS["residual"]
    pruner = fxprune.Pruner(model, x, ratio=1.0, steps=2, min_channels=3, verify=False)
    pruner.step()
    pruner.step()
    assert pruner.module.conv1.out_channels == 3
    with pytest.raises(fxprune.PruneError, match=r"ratio must be in \[0, 1\)"):
        fxprune.prune(model, x, ratio=1.0)  # one-shot keeps rejecting it


def test_schedules_reach_the_final_ratio():
    model, x = MODELS["residual"]
    assert schedule_ratio("linear", 0.8, 1, 4) == pytest.approx(0.2)
    assert schedule_ratio("cubic", 0.8, 1, 4) == pytest.approx(0.8 * (1 - 0.75**3))
    assert 1 - schedule_ratio("exponential", 0.75, 1, 2) == pytest.approx(0.5)
    assert schedule_ratio("cubic", 0.8, 4, 4) == schedule_ratio("exponential", 0.8, 4, 4) == 0.8
    for schedule in ("cubic", "exponential", lambda k, n: 0.8 * (k / n) ** 2):
        pruner = fxprune.Pruner(model, x, ratio=0.8, steps=4, schedule=schedule, verify=False)
        ratios = []
        while not pruner.done:
            res = pruner.step()
            ratios.append(pruner.cumulative_ratio(pruner.step_index))
        assert ratios == sorted(ratios) and ratios[-1] == pytest.approx(0.8)
        assert_matches_one_shot(model, x, res, 0.8)
        assert pruner.module.conv1.out_channels == math.floor(32 * (1 - 0.8) + 1e-9)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"schedule": "cubc"}, "schedule must be one of.*Did you mean 'cubic'"),
        ({"schedule": 3}, "schedule must be one of"),
        ({"schedule": lambda k, n: 2.0}, r"schedule\(1, 4\) must be in \[0, 1\]"),
        ({"schedule": lambda k, n: 0.5 - k / 10}, r"schedule\(2, 4\) must be >="),
        ({"schedule": lambda k: k}, r"schedule\(1, 4\) raised TypeError"),
        ({"schedule": "exponential", "ratio": 1.0}, "never reaches 0"),
        ({"ratio": 1.5}, r"ratio must be in \[0, 1\]"),
    ],
)
def test_bad_schedules_are_rejected_before_tracing(monkeypatch, kwargs, match):
    def no_trace(*args, **kw):
        raise AssertionError("traced before the arguments were checked")

    monkeypatch.setattr(prune_module, "trace", no_trace)
    model, x = MODELS["residual"]
    with pytest.raises(fxprune.PruneError, match=match):
        fxprune.Pruner(model, x, **{"ratio": 0.5, "steps": 4, **kwargs})


def test_taylor_scores_the_current_module_at_every_step(monkeypatch):
    from fxprune.passes import importance

    model, x = MODELS["residual"]
    seen = []
    real = importance.taylor_grads

    def spy(module, batches, loss_fn):
        seen.append(module.conv1.out_channels)
        return real(module, batches, loss_fn)

    # the name prune's pipeline calls (fxprune.prune imports it from the importance pass)
    monkeypatch.setattr(sys.modules["fxprune.prune"], "taylor_grads", spy)
    batches = (torch.randn(2, 3, 8, 8) for _ in range(2))  # a one-shot iterator
    pruner = fxprune.Pruner(
        model,
        x,
        ratio=0.5,
        steps=2,
        importance="taylor",
        calibration=batches,
        loss_fn=lambda out, batch: out.square().mean(),
    )
    pruner.step()
    res = pruner.step()
    assert seen == [32, 24] and pruner.module.conv1.out_channels == 16
    fxprune.verify(model, res, x)


def test_taylor_without_calibration_uses_the_users_gradients():
    model, x = MODELS["residual"]
    pruner = fxprune.Pruner(model, x, ratio=0.5, steps=2, importance="taylor")
    with pytest.raises(fxprune.PruneError, match=r"none has a \.grad.*loss\.backward\(\)"):
        pruner.step()
    pruner.module(x).square().mean().backward()  # a fine-tuning step's backward pass
    before = pruner.step().kept["conv1.weight"][0].clone()  # 24 of 32 left
    # Only the gradients decide: channels whose gradients are all zero score zero and go.
    keep = [1, 4, 5, 7, 10, 12, 13, 14, 15, 17, 18, 19, 20, 21, 22, 23]
    for p in pruner.module.parameters():
        p.grad = torch.zeros_like(p)
    pruner.module.conv1.weight.grad[keep] = 1.0
    res = pruner.step()
    assert sorted(res.kept["conv1.weight"][0].tolist()) == sorted(before[keep].tolist())


@pytest.mark.parametrize("align", ["round", "pad"])
def test_saved_steps_load_onto_the_original(tmp_path, align):
    model, x = MODELS["residual"]
    pruner = fxprune.Pruner(model, x, ratio=0.8, steps=3, round_to=8, align=align)
    for _ in range(3):
        res = pruner.step()
    assert len(res.stages) == 3
    loaded = fxprune.load(fxprune.save(res, tmp_path / "three-steps"), model=copy.deepcopy(model))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), res.module(x), rtol=0, atol=0)
    assert widths(loaded) == widths(res.module)


def test_global_ranking_budget_counts_on_the_original_channels():
    model, x = MODELS["residual"]
    pruner = fxprune.Pruner(model, x, ratio=0.5, steps=2, global_ranking=True, verify=False)
    pruner.step()
    pruner.step()
    one_shot = fxprune.prune(model, x, ratio=0.5, global_ranking=True, verify=False)
    channels = lambda m: m.conv1.out_channels + m.stem.out_channels  # noqa: E731
    assert channels(pruner.module) == channels(one_shot.module)


def test_history_summary_and_one_log_line_per_step(caplog):
    model, x = MODELS["residual"]
    pruner = fxprune.Pruner(model, x, ratio=0.5, steps=2, round_to=8)
    with caplog.at_level(logging.INFO, logger="fxprune.prune"):
        pruner.step()
        pruner.step()
    lines = [r.getMessage() for r in caplog.records if r.name == "fxprune.prune"]
    assert [line.split(":")[0] for line in lines] == ["Pruner step 1/2", "Pruner step 2/2"]
    assert len(pruner.history) == 2
    table = pruner.summary().splitlines()
    assert table[0].split()[:4] == ["step", "ratio", "MACs", "params"]
    assert "conv1.weight[0]" in table[0]
    assert table[1].split()[:2] == ["0", "0.000"] and "32/32" in table[1]
    assert table[2].split()[:2] == ["1", "0.250"] and "24/32" in table[2]
    assert table[3].split()[:2] == ["2", "0.500"] and "16/32" in table[3]


def test_a_deep_copied_pruner_steps_on_its_own():
    """Trying two fine-tuning branches from one pruning state: copy.deepcopy(pruner)."""
    model, x = micro_models()["residual"]
    pruner = fxprune.Pruner(model, x, ratio=0.5, steps=3)
    pruner.step()
    branch = copy.deepcopy(pruner)
    res = branch.step()
    assert branch.module.conv1.out_channels < pruner.module.conv1.out_channels
    fxprune.verify(model, res, x)
    pruner.step()
    assert pruner.module.conv1.out_channels == branch.module.conv1.out_channels
