"""A linear whose bias is computed (BEiT / EVA-02 / Swin-V2 / DINOv3: ``cat(q_bias, zero
k_bias, v_bias)`` into ``F.linear``), and a buffer used as a divisor (DINOv3's rotary
periods): both prune, and the oracle proves the result."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_oracle
from micro_models import randomize
from torch import nn

import fxprune
from fxprune.errors import VerificationError


class CatBiasQKV(nn.Module):
    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.stem = nn.Linear(8, c)
        self.qkv = nn.Linear(c, 3 * c, bias=False)
        self.q_bias = nn.Parameter(torch.randn(c))
        self.register_buffer("k_bias", torch.zeros(c), persistent=False)
        self.v_bias = nn.Parameter(torch.randn(c))
        self.out = nn.Linear(3 * c, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
        y = F.linear(self.stem(x), weight=self.qkv.weight, bias=bias)
        return self.out(torch.relu(y))


class BufferDivisor(nn.Module):
    """A per-channel buffer divides: zeroing it for dropped channels would give 0 / 0."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.register_buffer("periods", torch.rand(16) + 0.5)
        self.b = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.sin(self.a(x) / self.periods))


def test_a_computed_qkv_bias_prunes_with_the_rows_it_is_added_to():
    torch.manual_seed(0)
    model = randomize(CatBiasQKV()).eval()
    x = torch.randn(3, 8)
    res = fxprune.prune(model, x, ratio=0.5)
    assert res.module.qkv.weight.shape == (24, 8)  # was frozen: "no rule for 'linear'"
    kept = [getattr(res.module, n).numel() for n in ("q_bias", "k_bias", "v_bias")]
    assert sum(kept) == 24 and min(kept) > 0  # each row is a channel; its bias goes with it
    assert assert_oracle(model, res, x) <= 1e-6
    with torch.no_grad():
        res.module.v_bias[2] += 1.0
    with pytest.raises(VerificationError):
        fxprune.verify(model, res, x)


def test_a_computed_weight_is_frozen_with_its_reason():
    class ScaledWeight(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(8, 8)
            self.g = nn.Parameter(torch.rand(8, 1) + 0.5)
            self.out = nn.Linear(8, 2)

        def forward(self, x):
            return self.out(F.linear(x, self.lin.weight * self.g, self.lin.bias))

    res = fxprune.prune(ScaledWeight().eval(), torch.randn(2, 8), ratio=0.5, verify=False)
    reasons = [g.reason or "" for g in res.groups]
    assert any("computed weight" in r for r in reasons), reasons


def test_the_masked_original_keeps_buffers_a_divisor_stays_finite():
    torch.manual_seed(0)
    model = randomize(BufferDivisor()).eval()
    x = torch.randn(3, 8)
    res = fxprune.prune(model, x, ratio=0.5)
    assert res.module.periods.shape == (8,)
    assert assert_oracle(model, res, x) <= 1e-6
    with torch.no_grad():
        res.module.a.weight[0, 0] += 1.0  # a kept weight, corrupted: still caught
    with pytest.raises(VerificationError):
        fxprune.verify(model, res, x)
