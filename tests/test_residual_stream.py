"""The residual stream of a ViT-style model: one prunable, inexact group, or kept whole on request.

The stream (the embedding dim) is what the patch embedding produces and every block adds
to; the class token, the position embedding, the layer scales and every LayerNorm's
affine parameters hold its channels, so surgery must slice all of them. LayerNorm
normalises over those channels, so removing one changes the output: the group is inexact
and the oracle checks the parameters, not the outputs. ``exact_only=True`` keeps it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune

DIM, HEADS, TOKENS = 32, 2, 16  # a 16x16 image in 4x4 patches: 16 tokens and a class token


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(DIM)
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.proj = nn.Linear(DIM, DIM)
        self.gamma1 = nn.Parameter(torch.rand(DIM) + 0.5)
        self.norm2 = nn.LayerNorm(DIM)
        self.fc1 = nn.Linear(DIM, 4 * DIM)
        self.fc2 = nn.Linear(4 * DIM, DIM)
        self.gamma2 = nn.Parameter(torch.rand(DIM) + 0.5)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(b, n, 3, HEADS, c // HEADS).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        x = x + self.gamma1 * self.proj(y)
        return x + self.gamma2 * self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TinyViT(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, DIM, 4, stride=4)
        self.cls_token = nn.Parameter(torch.randn(1, 1, DIM))
        self.pos_embed = nn.Parameter(torch.randn(1, TOKENS + 1, DIM))
        self.blocks = nn.Sequential(Block(), Block())
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


STREAM = [
    "patch_embed.weight:0",
    "patch_embed.bias:0",
    "cls_token:2",
    "pos_embed:2",
    "blocks.0.norm1.weight:0",
    "blocks.0.norm1.bias:0",
    "blocks.0.qkv.weight:1",
    "blocks.0.proj.weight:0",
    "blocks.0.gamma1:0",
    "blocks.1.gamma2:0",
    "blocks.1.fc2.bias:0",
    "norm.weight:0",
    "norm.bias:0",
    "head.weight:1",
]


@pytest.fixture
def vit():
    torch.manual_seed(0)
    model = TinyViT().eval()
    with torch.no_grad():  # no zero-initialised branch may hide a surgery error from the oracle
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model, torch.randn(2, 3, 16, 16)


def stream_group(a):
    return a.group_of("patch_embed.weight", 0)


def test_the_residual_stream_is_one_prunable_inexact_group_with_tokens_and_norms(vit):
    model, x = vit
    a = fxprune.analyze(model, x)
    g = stream_group(a)
    for name in STREAM:
        param, dim = name.rsplit(":", 1)
        m = g.member(param, int(dim))
        assert m is not None and m.size == DIM, f"{name} not in the stream group:\n{a.table()}"
    assert g.size == DIM and g.structure == "channels"
    assert g.prunable, g.reason
    assert not g.exact and "layer_norm normalises across channels" in g.inexact_reason


def test_prune_slices_every_member_of_the_stream_and_the_oracle_checks_parameters(vit):
    model, x = vit
    res = fxprune.prune(model, x, ratio=0.5, round_to=8)
    kept = DIM // 2
    pruned = dict(res.module.named_parameters())
    assert pruned["patch_embed.weight"].shape[0] == kept
    assert pruned["cls_token"].shape == (1, 1, kept)
    assert pruned["pos_embed"].shape == (1, TOKENS + 1, kept)
    assert pruned["blocks.0.gamma1"].shape == (kept,)
    assert pruned["norm.weight"].shape == (kept,)
    assert pruned["head.weight"].shape == (10, kept)
    assert res.module(x).shape == (2, 10)
    assert "parameters only" in res.report.verified and "layer_norm" in res.report.verified
    report = fxprune.verify(model, res, x, exact=False)
    assert not report.exact and report.parameters_checked > 0
    assert res.report.macs_before / res.report.macs_after > 3


def test_exact_only_keeps_the_stream_whole_and_prunes_heads_and_ffn(vit):
    model, x = vit
    a = fxprune.analyze(model, x, exact_only=True)
    g = stream_group(a)
    assert not g.prunable and "exact_only=True" in g.reason and "layer_norm" in g.reason
    assert a.group_of("blocks.0.fc1.weight", 0).prunable
    res = fxprune.prune(model, x, ratio=0.5, exact_only=True)
    pruned = dict(res.module.named_parameters())
    assert pruned["cls_token"].shape == (1, 1, DIM)
    assert pruned["norm.weight"].shape == (DIM,)
    assert pruned["blocks.0.fc1.weight"].shape == (2 * DIM, DIM)
    # Every pruned group is exact, so the oracle compares the outputs.
    assert "outputs equal the masked original" in res.report.verified


def test_exact_only_must_be_a_bool(vit):
    model, x = vit
    with pytest.raises(fxprune.PruneError, match="exact_only"):
        fxprune.prune(model, x, exact_only="yes")


def test_a_layer_scale_of_shape_c11_joins_the_stream_of_a_conv_net():
    torch.manual_seed(0)

    class Stage(nn.Module):  # ConvNeXt: depthwise conv, LayerNorm over permuted channels
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 16, 2, stride=2)
            self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
            self.norm = nn.LayerNorm(16)
            self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)
            self.layer_scale = nn.Parameter(torch.rand(16, 1, 1) + 0.5)
            self.head = nn.Conv2d(16, 4, 1)

        def forward(self, x):
            x = self.stem(x)
            y = self.fc2(F.gelu(self.fc1(self.norm(self.dw(x).permute(0, 2, 3, 1)))))
            return self.head(x + self.layer_scale * y.permute(0, 3, 1, 2))

    model, x = Stage().eval(), torch.randn(1, 3, 8, 8)
    a = fxprune.analyze(model, x)
    g = a.group_of("stem.weight", 0)
    assert g.member("layer_scale", 0) is not None and g.member("norm.weight", 0) is not None
    assert g.prunable and not g.exact
    res = fxprune.prune(model, x, ratio=0.5)
    assert res.module.layer_scale.shape == (8, 1, 1)
