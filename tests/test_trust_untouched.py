"""The caller's model is never modified by fxprune's public calls (unless ``inplace=True``).

A fingerprint of the model (every state_dict value, every buffer, every module's
``training`` flag, every parameter's ``requires_grad``, each module's attributes, the
identity of every submodule and parameter) and of the global RNG is taken before and
after each public call, on a ``train()`` and an ``eval()`` model, and must not change.
The models are real: torchvision's resnet18, and a small net whose fake-tensor shape run
fails (``torch.nonzero``), so that shapes come from a real run of the caller's modules.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
from torch import nn

import fxprune
from fxprune.export.latency import compare_latency

logger = logging.getLogger(__name__)


class DataDependentGate(nn.Module):
    """conv-bn-relu-dropout, then a count of positive activations feeding the output.

    ``torch.nonzero`` has a data-dependent output size, so shape propagation on fake tensors
    fails and falls back to a real run: in ``train()`` mode that run would update BatchNorm's
    running statistics and draw dropout masks from the global RNG.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.drop(torch.relu(self.bn(self.conv(x))))
        active = torch.nonzero(y[:, 0] > 0).shape[0]
        return self.head(y) + 0.0 * active


def _attrs(module: nn.Module) -> dict[str, Any]:
    """A module's own attributes: containers by their keys, plain values by value, others by id."""
    out: dict[str, Any] = {}
    for key, value in module.__dict__.items():
        if isinstance(value, dict):
            out[key] = (type(value).__name__, tuple(value.keys()))
        elif value is None or isinstance(value, (bool, int, float, str, tuple, torch.Size)):
            out[key] = value
        elif isinstance(value, torch.Tensor):
            out[key] = ("tensor", id(value), value.detach().clone())
        else:
            out[key] = (type(value).__name__, id(value))
    return out


def fingerprint(model: nn.Module) -> dict[str, Any]:
    modules = dict(model.named_modules(remove_duplicate=False))
    params = dict(model.named_parameters(remove_duplicate=False))
    return {
        "class": {n: type(m) for n, m in modules.items()},
        "submodules": {n: id(m) for n, m in modules.items()},
        "training": {n: m.training for n, m in modules.items()},
        "attrs": {n: _attrs(m) for n, m in modules.items()},
        "parameters": {n: id(p) for n, p in params.items()},
        "requires_grad": {n: p.requires_grad for n, p in params.items()},
        "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "buffers": {n: b.clone() for n, b in model.named_buffers(remove_duplicate=False)},
        "rng": torch.get_rng_state(),
    }


def assert_same(before: Any, after: Any, where: str = "") -> None:
    if isinstance(before, torch.Tensor):
        assert isinstance(after, torch.Tensor), where
        assert before.dtype == after.dtype and before.shape == after.shape, where
        assert torch.equal(before, after), f"{where} changed"
    elif isinstance(before, dict):
        assert before.keys() == after.keys(), f"{where}: keys {before.keys() ^ after.keys()}"
        for k in before:
            assert_same(before[k], after[k], f"{where}.{k}" if where else str(k))
    elif isinstance(before, (tuple, list)):
        assert len(before) == len(after), where
        for i, (b, a) in enumerate(zip(before, after)):
            assert_same(b, a, f"{where}[{i}]")
    else:
        assert before == after, f"{where}: {before!r} -> {after!r}"


def resnet18(train: bool) -> tuple[nn.Module, torch.Tensor]:
    from torchvision.models import resnet18 as build

    model = build(num_classes=10)
    return model.train(train), torch.randn(2, 3, 64, 64)


def gate(train: bool) -> tuple[nn.Module, torch.Tensor]:
    return DataDependentGate().train(train), torch.randn(2, 3, 16, 16)


MODELS = {"resnet18": resnet18, "gate": gate}


def _to_onnx(model: nn.Module, x: torch.Tensor, tmp_path) -> Any:
    return fxprune.export.to_onnx(model, x, tmp_path / "m.onnx")


def _bench(model: nn.Module, x: torch.Tensor, tmp_path) -> Any:
    return compare_latency(
        {"m": model},
        {2: x},
        backends=("torch",),
        batch_sizes=None,
        rounds=1,
        warmup=0,
        min_time=1e-3,
        progress=False,
    )


def _pruner(model: nn.Module, x: torch.Tensor, tmp_path) -> Any:
    pruner = fxprune.Pruner(model, x, ratio=0.5, steps=1)
    while not pruner.done:
        pruner.step()


def _verify(model: nn.Module, x: torch.Tensor, tmp_path) -> Any:
    return fxprune.verify(model, fxprune.prune(model, x, ratio=0.5, verify=False), x)


CALLS = {
    "trace": lambda m, x, tmp: fxprune.trace(m, x),
    "trace_export": lambda m, x, tmp: fxprune.trace(m, x, frontend="export"),
    "count_macs": lambda m, x, tmp: fxprune.count_macs(m, x),
    "analyze": lambda m, x, tmp: fxprune.analyze(m, x),
    "prune": lambda m, x, tmp: fxprune.prune(m, x, ratio=0.5),
    "pruner": _pruner,
    "verify": _verify,
    "sparsify": lambda m, x, tmp: fxprune.sparsify(m, x, time_budget=0.01, progress=False),
    "to_onnx": _to_onnx,
    "compare_latency": _bench,
}


# Whole pipelines on resnet18 take seconds each: run those on the train() model only, the
# mode in which a forward changes state (BatchNorm statistics, the RNG).
_SLOW = {"pruner", "verify", "sparsify"}
CASES = [
    pytest.param(call, name, train, id=f"{call}-{name}-{'train' if train else 'eval'}")
    for call in CALLS
    for name in MODELS
    for train in (True, False)
    if train or call not in _SLOW or name != "resnet18"
]


@pytest.mark.parametrize(("call", "model_name", "train"), CASES)
def test_public_call_leaves_the_model_untouched(call, model_name, train, tmp_path):
    model, x = MODELS[model_name](train)
    before = fingerprint(model)
    CALLS[call](model, x, tmp_path)
    assert_same(before, fingerprint(model))


def test_real_shape_run_happens_and_leaves_batchnorm_statistics(caplog):
    model, x = gate(train=True)
    before = fingerprint(model)
    with caplog.at_level(logging.DEBUG, logger="fxprune.trace"):
        gm = fxprune.trace(model, x, frontend="fx")
    assert any("running for real" in r.getMessage() for r in caplog.records)
    assert gm.meta["fxprune.frontend"] == "fx"
    assert_same(before, fingerprint(model))


def test_sparsify_inplace_makes_the_model_the_sparse_module():
    """inplace=True means the same for sparsify as for prune: the caller's object becomes it."""
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64)).eval()
    x = torch.randn(2, 64)
    # permute=False: the permutation search stops by the clock, so two runs may differ
    expected = fxprune.sparsify(model, x, pattern="2:4", permute=False).module(x)
    res = fxprune.sparsify(model, x, pattern="2:4", permute=False, inplace=True)
    assert res.module is model
    torch.testing.assert_close(model(x), expected)
    assert fxprune.nm_checks.check_nm(model).passed
