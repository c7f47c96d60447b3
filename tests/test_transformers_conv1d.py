"""GPT-2 as users call it: a KV cache on by default, transformers' Conv1D (``addmm`` with
an ``[in, out]`` weight), and an LM head tied to the token embedding."""

from __future__ import annotations

import pytest
import torch

import fxprune

transformers = pytest.importorskip("transformers")


def tiny_gpt2() -> tuple[torch.nn.Module, dict]:
    cfg = transformers.GPT2Config(
        n_embd=64,
        n_layer=2,
        n_head=4,
        vocab_size=1000,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # no zero-initialised branch can hide a wrong slice
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model, {"input_ids": torch.randint(0, 1000, (1, 16))}


@pytest.fixture(scope="module")
def gpt2():
    return tiny_gpt2()


def test_gpt2_with_its_kv_cache_on_prunes_the_conv1d_layers_exactly(gpt2):
    model, x = gpt2
    assert model.config.use_cache
    res = fxprune.prune(model, x, ratio=0.5, exact_only=True)
    assert model.config.use_cache  # switched off only while tracing
    assert res.report.verified == "outputs equal the masked original"
    w = dict(res.module.named_parameters())["transformer.h.0.mlp.c_fc.weight"]
    assert w.shape == (64, 128)  # Conv1D keeps its [in, out] layout: dim 1 pruned
    assert res.report.macs_after < 0.75 * res.report.macs_before


def test_ignoring_a_tied_lm_head_keeps_the_vocabulary_and_prunes_the_stream(gpt2):
    model, x = gpt2
    res = fxprune.prune(model, x, ratio=0.5, ignore=[model.lm_head])
    kept = res.kept["transformer.wte.weight"]
    assert 0 not in kept and len(kept[1]) == 32  # vocab whole, embedding dim halved
    out = res.module(**x)
    logits = out["logits"] if isinstance(out, dict) else out.logits
    assert logits.shape == (1, 16, 1000)


def test_the_oracle_catches_a_wrong_conv1d_slice(gpt2):
    model, x = gpt2
    res = fxprune.prune(model, x, ratio=0.5, exact_only=True)
    with torch.no_grad():
        dict(res.module.named_parameters())["transformer.h.1.mlp.c_proj.weight"][3] += 1.0
    with pytest.raises(fxprune.VerificationError, match=r"c_proj\.weight"):
        fxprune.verify(model, res, x)
