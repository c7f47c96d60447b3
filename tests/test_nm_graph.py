"""Graph-level 2:4 sparsity: legal channel permutations and masks on whole models."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from micro_models import randomize
from torch import nn

import fxprune
from fxprune.cli import main
from fxprune.nm_checks import check_nm


class ResidualNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(32)
        self.c1 = nn.Conv2d(32, 64, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(64)
        self.c2 = nn.Conv2d(64, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        x = F.relu(x + self.bn2(self.c2(F.relu(self.bn1(self.c1(x))))))
        return self.fc(x.mean((2, 3)))


class ConcatNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.a = nn.Conv2d(32, 32, 3, padding=1)
        self.b = nn.Conv2d(32, 32, 1)
        self.c = nn.Conv2d(64, 32, 3, padding=1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = F.relu(self.stem(x))
        y = torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], dim=1)
        return self.fc(F.relu(self.c(y)).mean((2, 3)))


class AttentionNet(nn.Module):
    def __init__(self, dim: int = 64, heads: int = 4) -> None:
        super().__init__()
        self.h, self.d = heads, dim // heads
        self.inp = nn.Linear(16, dim)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(dim, 128), nn.Linear(128, dim)
        self.head = nn.Linear(dim, 8)

    def forward(self, x):
        x = self.inp(x)
        b, t, c = x.shape
        q = self.q(x).view(b, t, self.h, self.d).transpose(1, 2)
        k = self.k(x).view(b, t, self.h, self.d).transpose(1, 2)
        v = self.v(x).view(b, t, self.h, self.d).transpose(1, 2)
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(self.d), -1)
        x = x + self.o((att @ v).transpose(1, 2).reshape(b, t, c))
        x = x + self.fc2(F.gelu(self.fc1(x)))
        return self.head(x)


class MHANet(nn.Module):
    """nn.MultiheadAttention between two Linears: its in- and out-projections are GEMMs too."""

    def __init__(self, dim: int = 64, heads: int = 4) -> None:
        super().__init__()
        self.inp = nn.Linear(16, dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.fc = nn.Linear(dim, 8)

    def forward(self, x):
        h = self.inp(x)
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.fc(h + a)


CASES = {
    "residual": (lambda: randomize(ResidualNet()), (2, 3, 8, 8)),
    "concat": (lambda: ConcatNet().eval(), (2, 3, 8, 8)),
    "attention": (lambda: AttentionNet().eval(), (2, 6, 16)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_permuted_model_computes_the_original_function(name):
    build, shape = CASES[name]
    model, x = build(), torch.randn(*shape)
    res = fxprune.sparsify(model, x, permute=True, mask=False, time_budget=0.3, min_size=0)
    assert res.permutations, res.report.skipped_groups
    assert any(not torch.equal(p, torch.arange(len(p))) for p in res.permutations.values())
    with torch.no_grad():
        torch.testing.assert_close(res.module(x), model(x), rtol=1e-5, atol=1e-5)
        y = torch.randn(*shape)  # and on inputs it has not seen
        torch.testing.assert_close(res.module(y), model(y), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_eligible_weight_is_2_4_and_others_have_reasons(name):
    build, shape = CASES[name]
    model, x = build(), torch.randn(*shape)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = fxprune.sparsify(model, x, pattern="2:4", time_budget=0.2, min_size=0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    report = check_nm(res.module, "2:4", names=list(res.masks), min_size=0)
    assert res.masks and not report.failed, str(report)
    eligible = {x.param for x in res.report.layers if x.eligible}
    assert eligible == set(res.masks)
    for layer in res.report.layers:
        if not layer.eligible:
            assert layer.reason and layer.reason != "eligible"
    # permuting first never keeps less magnitude than masking the original order
    plain = fxprune.sparsify(model, x, permute=False, min_size=0)
    assert res.report.overall(True) >= plain.report.overall(True) - 1e-9


def test_4_8_pattern_and_the_stem_is_skipped_with_a_reason():
    model, x = randomize(ResidualNet()), torch.randn(2, 3, 8, 8)
    res = fxprune.sparsify(model, x, pattern="4:8", time_budget=0.2, min_size=0)
    stem = next(x for x in res.report.layers if x.param == "stem.weight")
    assert not stem.eligible and "multiple of M=8" in stem.reason
    assert not check_nm(res.module, "4:8", names=list(res.masks), min_size=0).failed
    assert "4:8" in str(res.report)


def test_cli_sparsify(tmp_path, capsys):
    factory = tmp_path / "net.py"
    factory.write_text(
        "import torch\nfrom test_nm_graph import ResidualNet\n"
        "def build():\n    return ResidualNet().eval(), torch.randn(1, 3, 8, 8)\n"
    )
    out = tmp_path / "sparse"
    assert main(["sparsify", f"{factory}:build", "--out", str(out), "--time-budget", "0.1"]) == 0
    assert "2:4" in capsys.readouterr().out
    from fxprune.models import load_model

    original, _ = load_model(f"{factory}:build")
    loaded = fxprune.load(out, model=original)  # safetensors + plan, rebuilt without pickle
    assert check_nm(loaded).passed
    assert main(["sparsify", f"{factory}:build", "--out", str(out)]) == 2  # refuses to overwrite


def test_sparsify_and_check_nm_judge_the_same_weights_with_multihead_attention():
    torch.manual_seed(0)
    model, x = MHANet().eval(), torch.randn(2, 6, 16)
    res = fxprune.sparsify(model, x, time_budget=0.2, min_size=0)
    masked = {layer.name for layer in res.report.layers}
    assert {"attn.in_proj_weight", "attn.out_proj.weight"} <= set(res.masks)
    for checked in (check_nm(res.module, min_size=0), check_nm(model, min_size=0)):
        assert {layer.name for layer in checked.layers} == masked
        assert {layer.name for layer in checked.eligible} == set(res.masks)
    report = check_nm(res.module, min_size=0)
    assert report.passed, str(report)
    # The attention projections now read permuted channels: still the same function.
    permuted = fxprune.sparsify(model, x, mask=False, time_budget=0.2, min_size=0)
    with torch.no_grad():
        torch.testing.assert_close(permuted.module(x), model(x), rtol=1e-5, atol=1e-5)


def test_tied_weights_are_masked_once_and_checked_once():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(64, 64)
            self.b = nn.Linear(64, 64)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    model, x = Tied().eval(), torch.randn(3, 64)
    res = fxprune.sparsify(model, x, permute=False, min_size=0)
    b = next(layer for layer in res.report.layers if layer.name == "b.weight")
    assert not b.eligible and "a.weight" in b.reason
    assert set(res.masks) == {"a.weight"}
    assert res.module.a.weight is res.module.b.weight
    assert [layer.name for layer in check_nm(model, min_size=0).eligible] == ["a.weight"]
