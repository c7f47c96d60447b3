"""A pruned model trains like the original: its gradients are the masked original's.

For the same input and loss, the gradient of every pruned parameter equals the gradient
of the *masked original* (the original with every coordinate not in ``res.kept`` set to
zero) indexed by ``res.kept``. The masked original and the indexing are built here, by
the test's own code, never by fxprune's slicing. A custom ``torch.autograd.Function``
(a straight-through estimator, as in quantization-aware training) must survive tracing
as one op: inlining its forward would silently replace its backward by the derivative of
``round``, which is zero.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune

logger = logging.getLogger(__name__)


class RoundSTE(torch.autograd.Function):
    """Straight-through estimator: rounds in forward, passes the gradient through unchanged."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


class FakeQuant(nn.Module):
    """Quantize to a grid of 1/scale, with a straight-through gradient."""

    def __init__(self, scale: float = 4.0) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return RoundSTE.apply(x * self.scale) / self.scale


class QuantNet(nn.Module):
    """conv-bn-relu, conv, fake-quantized activations, conv, pooled linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.quant = FakeQuant()
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.quant(self.conv2(x)))
        x = F.relu(self.conv3(x))
        return self.fc(x.mean((2, 3)))


class ResidualNet(nn.Module):
    """stem, one residual block with BatchNorm, pooled linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.conv1 = nn.Conv2d(16, 32, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return self.fc(F.relu(x + y).mean((2, 3)))


def _randomized(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm affine parameters, so that every parameter gets a real gradient."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model


def masked_original(model: nn.Module, kept: dict) -> nn.Module:
    """A copy of ``model`` with every coordinate not in ``kept`` set to zero (own indexing)."""
    masked = copy.deepcopy(model)
    tensors = dict(masked.named_parameters())
    tensors.update(dict(masked.named_buffers()))
    with torch.no_grad():
        for name, dims in kept.items():
            t = tensors[name]
            mask = torch.ones_like(t, dtype=torch.bool)
            for d, idx in dims.items():
                keep = torch.zeros(t.shape[d], dtype=torch.bool)
                keep[idx[idx >= 0]] = True
                shape = [1] * t.dim()
                shape[d] = -1
                mask &= keep.view(shape)
            t.mul_(mask.to(t.dtype))
    return masked


def indexed(t: torch.Tensor, dims: dict) -> torch.Tensor:
    """``t`` at the kept indices of each pruned dim (zero where the index is -1, padding)."""
    for d, idx in dims.items():
        t = t.index_select(d, idx.clamp(min=0))
        shape = [1] * t.dim()
        shape[d] = -1
        t = t * (idx >= 0).view(shape).to(t.dtype)
    return t


def gradients(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> dict:
    model.train()
    model.zero_grad(set_to_none=True)
    F.mse_loss(model(x), target).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def assert_gradients_match(model: nn.Module, res, x: torch.Tensor) -> dict:
    """The pruned model's gradients equal the masked original's, indexed by ``res.kept``."""
    target = torch.randn(x.shape[0], 5)
    want = gradients(masked_original(model, res.kept), x, target)
    got = gradients(res.module, x, target)
    assert got.keys() == want.keys()
    for name, grad in got.items():
        expected = indexed(want[name], res.kept.get(name, {}))
        assert grad.shape == expected.shape, name
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6, msg=name)
    return got


def _quant_model() -> tuple[nn.Module, torch.Tensor]:
    return _randomized(QuantNet()).train(), torch.randn(4, 3, 12, 12)


def _residual_model() -> tuple[nn.Module, torch.Tensor]:
    return _randomized(ResidualNet()).train(), torch.randn(4, 3, 12, 12)


@pytest.mark.parametrize("build", [_quant_model, _residual_model], ids=["ste", "residual"])
def test_pruned_gradients_equal_the_masked_originals_at_the_kept_indices(build):
    model, x = build()
    res = fxprune.prune(model, x, ratio=0.5)
    assert res.report.macs_after < res.report.macs_before  # something was pruned
    assert any(p.grad is None for p in model.parameters())  # the original was not touched
    got = assert_gradients_match(model, res, x)
    assert all(g.abs().sum() > 0 for g in got.values())


def test_custom_autograd_function_stays_one_op_and_passes_its_gradient():
    model, x = _quant_model()
    res = fxprune.prune(model, x, ratio=0.5)
    calls = [
        n
        for n in res.module.graph.nodes
        if getattr(n.target, "autograd_function", None) is RoundSTE
    ]
    assert len(calls) == 1 and calls[0].op == "call_function"
    assert not any(n.target is torch.round for n in res.module.graph.nodes)
    # The STE passes the gradient to conv2 and, through it, to conv1: round alone gives zero.
    got = gradients(res.module, x, torch.randn(4, 5))
    for name in ("conv1.weight", "bn1.weight", "conv2.weight", "conv2.bias"):
        assert got[name].abs().sum() > 0, name
    # The graph module stays ordinary: printable code, a working deep copy.
    assert "RoundSTE_apply" in res.module.code
    with torch.no_grad():
        torch.testing.assert_close(copy.deepcopy(res.module)(x), res.module(x))


def test_gradient_check_fails_when_the_function_is_inlined():
    """Plain symbolic tracing inlines RoundSTE: the check above would catch it."""
    model, x = _quant_model()
    inlined = torch.fx.symbolic_trace(copy.deepcopy(model))
    assert any(n.target is torch.round for n in inlined.graph.nodes)
    target = torch.randn(4, 5)
    want, got = gradients(copy.deepcopy(model), x, target), gradients(inlined, x, target)
    assert got["conv2.weight"].abs().sum() == 0 < want["conv2.weight"].abs().sum()
    with pytest.raises(AssertionError):
        torch.testing.assert_close(got["conv1.weight"], want["conv1.weight"])


def test_channels_touched_by_a_custom_function_are_frozen_with_its_name():
    model, x = _quant_model()
    analysis = fxprune.analyze(model, x)
    group = analysis.group_of("conv2.weight", 0)
    assert group is not None and not group.prunable
    assert "RoundSTE.apply" in group.reason and "test_trust_training.py" in group.reason
    assert analysis.group_of("conv1.weight", 0).prunable


def test_export_frontend_refuses_a_custom_function_and_auto_uses_fx():
    model, x = _quant_model()
    with pytest.raises(fxprune.TraceError, match=r"RoundSTE\.apply.*frontend='fx'"):
        fxprune.trace(model, x, frontend="export")
    assert fxprune.trace(model, x).meta["fxprune.frontend"] == "fx"
