"""``pad_outputs=True``: what reaches a model output is pruned, the output keeps its shape.

A feature extractor's output (an encoder's hidden states, a backbone's feature maps) is
its residual stream; by default it keeps every channel, so the stream cannot shrink. With
``pad_outputs``, surgery puts the kept channels back among zeros, which is what the
masked original outputs: the oracle still proves exact results.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_oracle
from micro_models import randomize
from torch import nn

import fxprune
from fxprune.errors import VerificationError
from fxprune.export import to_onnx
from fxprune.passes.channel_rules.boundary import unprune_channels


class Backbone(nn.Module):
    """Two feature maps out, as a detector's backbone hands them to its heads."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.b = nn.Conv2d(16, 32, 3, padding=1)

    def forward(self, x):
        y = F.relu(self.bn(self.a(x)))
        return {"p3": self.b(y), "p2": y}


class Encoder(nn.Module):
    """A pre-norm block whose output is the normalised residual stream (BERT, ViT features)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 32)
        self.norm = nn.LayerNorm(32)
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 32)
        self.out = nn.LayerNorm(32)

    def forward(self, x):
        h = self.inp(x)
        return self.out(h + self.fc2(F.gelu(self.fc1(self.norm(h)))))


class Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 8, 1)

    def forward(self, x):
        return torch.sigmoid(self.b(F.relu(self.a(x))))


@pytest.fixture
def backbone():
    torch.manual_seed(0)
    return randomize(Backbone()), torch.randn(1, 3, 8, 8)


def unprune_nodes(gm) -> list:
    return [n for n in gm.graph.nodes if n.target is unprune_channels]


def test_feature_outputs_are_pruned_and_keep_their_shape(backbone):
    model, x = backbone
    kept = fxprune.prune(model, x, ratio=0.5)
    res = fxprune.prune(model, x, ratio=0.5, pad_outputs=True)
    assert kept.report.macs_after == kept.report.macs_before  # every channel reaches an output
    assert res.report.macs_after < res.report.macs_before / 3
    assert res.module.b.out_channels == 16 and res.module.a.out_channels == 8
    assert len(unprune_nodes(res.module)) == 2
    got, want = res.module(x), model(x)
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in want.items()}
    assert_oracle(model, res, x, exact=True)
    # the pruned positions of each output are zero, the kept ones the original's
    p2 = res.kept["a.weight"][0]
    assert torch.count_nonzero(got["p2"][:, [i for i in range(16) if i not in p2]]) == 0
    assert torch.allclose(got["p2"][:, p2], want["p2"][:, p2], atol=1e-5)


def test_the_oracle_fails_when_the_padding_puts_a_channel_in_the_wrong_place(backbone):
    model, x = backbone
    res = fxprune.prune(model, x, ratio=0.5, pad_outputs=True)
    node = next(n for n in unprune_nodes(res.module) if n.args[0].name == "b")
    index = list(node.args[1])
    live = [i for i, j in enumerate(index) if j < 16]
    index[live[0]], index[live[1]] = index[live[1]], index[live[0]]  # two channels swapped
    node.update_arg(1, index)
    res.module.recompile()
    with pytest.raises(VerificationError):
        fxprune.verify(model, res, x)


def test_an_output_not_zero_when_pruned_keeps_its_channels():
    torch.manual_seed(0)
    model, x = Gated().eval(), torch.randn(1, 3, 8, 8)
    res = fxprune.prune(model, x, ratio=0.5, pad_outputs=True)
    frozen = [g for g in res.groups if not g.prunable]
    assert any("not zero in the masked original" in g.reason for g in frozen)
    assert res.module.b.out_channels == 8 and res.module.a.out_channels == 8
    assert not unprune_nodes(res.module)
    assert_oracle(model, res, x, exact=True)


def test_an_encoder_prunes_its_residual_stream_inexactly():
    torch.manual_seed(0)
    model, x = Encoder().eval(), torch.randn(2, 5, 8)
    res = fxprune.prune(model, x, ratio=0.5, pad_outputs=True)
    assert res.module.inp.out_features == 16 and res.module.out.normalized_shape == (16,)
    out = res.module(x)
    assert out.shape == model(x).shape
    dropped = [i for i in range(32) if i not in res.kept["inp.weight"][0]]
    assert torch.count_nonzero(out[..., dropped]) == 0
    assert "inexact" in res.report.verified
    assert_oracle(model, res, x, exact=False)


def test_pruner_steps_rewrite_the_padding(backbone):
    model, x = backbone
    pruner = fxprune.Pruner(model, x, ratio=0.75, steps=3, pad_outputs=True)
    for _ in range(3):
        step = pruner.step()  # verify=True: the oracle holds after every step
        assert "masked original" in step.report.verified
    assert pruner.module.b.out_channels == 8
    assert len(unprune_nodes(pruner.module)) == 2  # rewritten in place, never stacked
    assert {k: v.shape for k, v in pruner.module(x).items()} == {
        k: v.shape for k, v in model(x).items()
    }


def test_save_load_and_onnx_keep_the_padding(backbone, tmp_path):
    model, x = backbone
    res = fxprune.prune(model, x, ratio=0.5, pad_outputs=True)
    fxprune.save(res, tmp_path / "pruned")
    loaded = fxprune.load(tmp_path / "pruned", model=model)
    for k, v in res.module(x).items():
        assert torch.equal(loaded(x)[k], v)
    out = to_onnx(res.module, x, tmp_path / "pruned.onnx")
    sess = ort.InferenceSession(str(out.path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    want = sorted((v.detach().numpy() for v in res.module(x).values()), key=lambda a: a.shape)
    for g, w in zip(sorted(got, key=lambda a: a.shape), want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_a_model_whose_output_is_its_stream_hints_at_pad_outputs(caplog):
    torch.manual_seed(0)
    model, x = Encoder().eval(), torch.randn(2, 5, 8)
    with caplog.at_level("WARNING", logger="fxprune.prune"):
        fxprune.prune(model, x, ratio=0.5)
    assert "pad_outputs=True" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="fxprune.prune"):
        fxprune.prune(model, x, ratio=0.5, pad_outputs=True)
        fxprune.prune(Gated().eval(), torch.randn(1, 3, 8, 8), ratio=0.5)  # one reader: no hint
    assert "pad_outputs=True" not in caplog.text
