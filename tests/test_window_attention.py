"""torchvision's Swin: the traced ``shifted_window_attention`` and ``_patch_merging_pad``
calls prune the residual stream through them (before: the stream was frozen there)."""

from __future__ import annotations

import pytest
import torch
import torchvision
from conftest import assert_oracle
from micro_models import randomize
from torch import nn
from torchvision.models.swin_transformer import shifted_window_attention

import fxprune
from fxprune.errors import VerificationError

torch.fx.wrap("shifted_window_attention")  # as torchvision wraps it for its own module


class WindowBlock(nn.Module):
    """A linear stem, window attention with its own weights (V2's cosine attention when
    ``logit_scale``), and a linear reader: no LayerNorm, so the oracle compares outputs."""

    def __init__(self, c: int = 32, heads: int = 4, cosine: bool = True) -> None:
        super().__init__()
        self.stem = nn.Linear(8, c)
        self.qkv = nn.Linear(c, 3 * c)
        self.proj = nn.Linear(c, c)
        self.register_buffer("bias", torch.randn(heads, 16, 16))
        self.logit_scale = nn.Parameter(torch.rand(heads, 1, 1)) if cosine else None
        self.head = nn.Linear(c, 5)
        self.heads = heads

    def qkv_weight(self) -> torch.Tensor:
        return self.qkv.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        y = shifted_window_attention(
            y,
            self.qkv_weight(),
            self.proj.weight,
            self.bias,
            [4, 4],
            self.heads,
            shift_size=[2, 2],
            qkv_bias=self.qkv.bias,
            proj_bias=self.proj.bias,
            logit_scale=self.logit_scale,
            training=False,
        )
        return self.head(y)


def test_window_attention_prunes_the_same_dims_in_every_head_exactly():
    torch.manual_seed(0)
    model = randomize(WindowBlock()).eval()
    x = torch.randn(2, 8, 8, 8)
    res = fxprune.prune(model, x, ratio=0.5, round_to=1)
    # 32 channels = 4 heads x 8 dims: 4 dims kept in each head, q, k, v and proj alike.
    assert res.module.qkv.weight.shape == (48, 16)
    assert res.module.proj.weight.shape == (16, 16)
    assert res.module.stem.out_features == 16
    assert assert_oracle(model, res, x) <= 1e-5
    with torch.no_grad():
        res.module.qkv.weight[20, 3] += 0.5  # a kept k weight, corrupted
    with pytest.raises(VerificationError):
        fxprune.verify(model, res, x)


def test_swin_v1_window_attention_is_inexact_its_scale_follows_the_head_dim():
    model = randomize(WindowBlock(cosine=False)).eval()
    res = fxprune.prune(model, torch.randn(2, 8, 8, 8), ratio=0.5)
    assert "scales q by its head dim" in res.report.verified


def test_torchvision_swin_prunes_its_residual_stream_through_patch_merging():
    torch.manual_seed(0)
    model = randomize(torchvision.models.swin_t()).eval()
    x = torch.randn(1, 3, 112, 112)
    res = fxprune.prune(model, x, ratio=0.5, round_to=8, ignore=[model.head])
    assert res.report.macs_ratio > 3.5  # 1.9x while the stream was frozen
    assert res.module.get_submodule("features.1.0.attn.qkv").weight.shape == (144, 48)
    assert res.module(x).shape == (1, 1000)
    assert_oracle(model, res, x, exact=False)  # LayerNorm: parameters checked


def test_window_attention_with_a_computed_weight_is_frozen_with_its_reason():
    class Scaled(WindowBlock):
        def qkv_weight(self) -> torch.Tensor:
            return self.qkv.weight * 1.0

    model = randomize(Scaled()).eval()
    res = fxprune.prune(model, torch.randn(2, 8, 8, 8), ratio=0.5)
    assert res.module.qkv.weight.shape == (96, 32) and res.module.stem.out_features == 32
    assert any("computed weights" in (g.reason or "") for g in res.groups)
