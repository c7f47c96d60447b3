"""``fxprune.save_pretrained``: a pruned transformers model that ``from_pretrained`` loads."""

from __future__ import annotations

import pytest
import torch

import fxprune

transformers = pytest.importorskip("transformers")


def tiny_llama():
    cfg = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model, {"input_ids": torch.randint(0, 1000, (1, 16))}


def _field(out, name):
    return out[name] if isinstance(out, dict) else getattr(out, name)


def test_a_pruned_llama_round_trips_through_from_pretrained(tmp_path):
    model, x = tiny_llama()
    res = fxprune.prune(model, x, ratio=0.5, round_to="heads", ignore=[model.lm_head])
    saved = fxprune.save_pretrained(res, model, tmp_path / "llama")
    assert saved.changed == {
        "hidden_size": (64, 32),
        "intermediate_size": (128, 64),
        "num_attention_heads": (4, 2),
        "num_key_value_heads": (2, 1),
    }
    loaded = transformers.AutoModelForCausalLM.from_pretrained(saved.path).eval()
    assert type(loaded) is type(model) and loaded.config.head_dim == 16
    with torch.no_grad():
        want = _field(res.module(**x), "logits")
        got = loaded(**x, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert model.config.hidden_size == 64  # the original is untouched


def test_a_non_uniform_pruning_is_refused_with_the_reason(tmp_path):
    model, x = tiny_llama()
    res = fxprune.prune(
        model, x, ratio=0.5, ignore=[model.lm_head], ratios={model.model.layers[0].mlp: 0.25}
    )
    with pytest.raises(fxprune.PretrainedError, match="not uniform"):
        fxprune.save_pretrained(res, model, tmp_path / "llama")
    assert not (tmp_path / "llama").exists()  # nothing written


@pytest.fixture(scope="module")
def minilm():
    from fxprune.models import load_model

    return load_model("hf:minilm")


def test_minilm_with_its_ffn_pruned_round_trips(tmp_path, minilm):
    model, x = minilm
    res = fxprune.prune(
        model, x, ratio=0.5, round_to=8, ignore=[layer.attention for layer in model.encoder.layer]
    )
    saved = fxprune.save_pretrained(res, model, tmp_path / "minilm")
    assert saved.changed == {"intermediate_size": (1536, 768)}
    loaded = transformers.AutoModel.from_pretrained(saved.path).eval()
    with torch.no_grad():
        want = _field(res.module(**x), "last_hidden_state")
        got = loaded(**x).last_hidden_state
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_bert_heads_that_its_config_cannot_express_are_refused(tmp_path, minilm):
    model, x = minilm
    res = fxprune.prune(model, x, ratio=0.5, round_to="heads")
    with pytest.raises(fxprune.PretrainedError, match=r"query\.weight would be \[384, 384\]"):
        fxprune.save_pretrained(res, model, tmp_path / "minilm")
    with pytest.raises(fxprune.PretrainedError, match="needs the original transformers model"):
        fxprune.save_pretrained(res, torch.nn.Linear(2, 2), tmp_path / "minilm")
