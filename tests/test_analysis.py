"""Channel analysis: exact groups on one micro model per relation, and the model zoos."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import members
from micro_models import micro_models

import fxprune

MODELS = micro_models()


def r(n: int) -> list[int]:
    return list(range(n))


def tile(xs: list[int], k: int) -> list[int]:
    return xs * k


def analyze(name: str, **kw):
    model, x = MODELS[name]
    return fxprune.analyze(model, x, **kw)


def by_source(a) -> dict[str, object]:
    return {f"{g.source[0]}:{g.source[1]}": g for g in a.groups}


def test_residual_add_unions_both_branches():
    a = analyze("residual")
    g = by_source(a)["stem.weight:0"]
    assert g.prunable and g.exact and g.size == 16
    want = {
        k: r(16)
        for k in [
            "stem.weight:0",
            "stem.bias:0",
            "conv1.weight:1",
            "conv2.weight:0",
            "conv2.bias:0",
            "bn2.weight:0",
            "bn2.bias:0",
            "bn2.running_mean:0",
            "bn2.running_var:0",
            "head.weight:1",
        ]
    }
    assert members(g) == want
    inner = by_source(a)["conv1.weight:0"]
    assert inner.size == 32 and set(members(inner)) == {
        "conv1.weight:0",
        "conv1.bias:0",
        "bn1.weight:0",
        "bn1.bias:0",
        "bn1.running_mean:0",
        "bn1.running_var:0",
        "conv2.weight:1",
    }
    out = by_source(a)["head.weight:0"]
    assert not out.prunable and "model output" in out.reason


def test_concat_of_two_producers_keeps_separate_groups_with_offsets():
    a = analyze("concat")
    ga, gb = by_source(a)["a.weight:0"], by_source(a)["b.weight:0"]
    assert (ga.size, gb.size) == (8, 16)
    assert members(ga)["c.weight:1"] == r(8) + [-1] * 16
    assert members(gb)["c.weight:1"] == [-1] * 8 + r(16)


def test_cat_of_the_same_tensor_maps_both_copies_to_one_channel():
    g = by_source(analyze("cat_self"))["a.weight:0"]
    assert g.size == 16 and members(g)["c.weight:1"] == r(16) + r(16)


def test_unequal_split_slices_one_group():
    g = by_source(analyze("unequal_split"))["a.weight:0"]
    assert g.size == 24
    assert members(g)["p.weight:1"] == r(8)
    assert members(g)["q.weight:1"] == list(range(8, 24))


def test_chunk_then_gating_pairs_the_halves():
    g = by_source(analyze("chunk"))["a.weight:0"]
    # u * sigmoid(v): channel j of u is multiplied by channel j of v, they go together
    assert g.size == 16 and g.units == 1  # alignment follows c's 16 input columns
    assert members(g)["a.weight:0"] == r(16) + r(16)
    assert members(g)["c.weight:1"] == r(16)


def test_hard_coded_view_splits_channels_into_a_dense_grid():
    g = by_source(analyze("hard_coded_view"))["a.weight:0"]
    # view(B, 4, 16, H, W): the same one of 16 positions is kept in each of the 4 rows
    assert g.size == 16 and g.units == 4 and g.heads == (4, 16)
    assert members(g)["a.weight:0"] == tile(r(16), 4)
    assert members(g)["c.weight:1"] == tile(r(16), 4)


def test_flatten_then_linear_maps_hw_features_to_their_channel():
    g = by_source(analyze("flatten_linear"))["a.weight:0"]
    assert g.size == 16
    assert members(g)["fc1.weight:1"] == [c for c in range(16) for _ in range(16)]


def test_permute_moves_the_channel_dim():
    a = analyze("permute")
    assert members(by_source(a)["a.weight:0"])["fc.weight:1"] == r(16)
    assert members(by_source(a)["fc.weight:0"])["c.weight:1"] == r(24)


def test_channel_shuffle_is_followed_position_by_position():
    a = analyze("channel_shuffle")
    g = by_source(a)["a.weight:0"]
    # cat(a, b) -> view(2, 8) -> transpose -> view(16): output 2j is a_j, 2j+1 is b_j; the
    # view into (2, 8) needs the same j kept in both halves, so a_j and b_j form one channel.
    assert g.size == 8 and set(members(g)) == {
        "a.weight:0",
        "a.bias:0",
        "b.weight:0",
        "b.bias:0",
        "c.weight:1",
    }
    assert members(g)["c.weight:1"] == [j for j in range(8) for _ in range(2)]


def test_pixel_shuffle_ties_r_squared_input_channels_to_each_output():
    g = by_source(analyze("pixel_shuffle"))["a.weight:0"]
    assert g.size == 8 and g.units == 1
    assert members(g)["a.weight:0"] == [c for c in range(8) for _ in range(4)]
    assert members(g)["c.weight:1"] == r(8)


def test_grouped_conv_after_residual_keeps_groups_equal():
    a = analyze("grouped_after_residual")
    res = by_source(a)["stem.weight:0"]
    # groups=4 with 4 input channels each: the same in-group position across groups
    assert res.size == 4 and members(res)["stem.weight:0"] == tile(r(4), 4)
    assert members(res)["body.weight:1"] == tile(r(4), 4)
    assert members(res)["grouped.weight:1"] == r(4)
    out = by_source(a)["grouped.weight:0"]
    assert out.size == 8 and out.structure == "grouped"
    assert members(out)["dw.weight:0"] == tile(r(8), 4)  # depthwise follows its input channel
    assert members(out)["head.weight:1"] == tile(r(8), 4)


def test_se_block_scales_channels_and_keeps_the_squeeze_group():
    a = analyze("se_block")
    g = by_source(a)["a.weight:0"]
    assert set(members(g)) == {
        "a.weight:0",
        "a.bias:0",
        "fc1.weight:1",
        "fc2.weight:0",
        "fc2.bias:0",
        "c.weight:1",
    }
    assert g.exact  # sigmoid(0) = 0.5, but it multiplies a zero channel
    squeeze = by_source(a)["fc1.weight:0"]
    assert squeeze.size == 8 and set(members(squeeze)) == {
        "fc1.weight:0",
        "fc1.bias:0",
        "fc2.weight:1",
    }


def test_matmul_attention_ties_q_k_head_dims_and_v_to_out_proj():
    a = analyze("matmul_attention")
    qk, v = by_source(a)["q.weight:0"], by_source(a)["v.weight:0"]
    assert qk.size == 8 and qk.heads == (4, 8) and qk.structure == "head_dim"
    assert set(members(qk)) == {"q.weight:0", "q.bias:0", "k.weight:0", "k.bias:0"}
    assert members(qk)["k.weight:0"] == tile(r(8), 4)
    assert members(v)["o.weight:1"] == tile(r(8), 4)
    heads = by_source(analyze("matmul_attention", head_mode="heads"))["q.weight:0"]
    assert heads.size == 4 and heads.structure == "heads" and heads.units == 8
    assert members(heads)["q.weight:0"] == [h for h in range(4) for _ in range(8)]


def test_sdpa_on_fused_qkv_ties_q_k_v_positions():
    a = analyze("sdpa")
    g = by_source(a)["qkv.weight:0"]
    assert g.size == 8 and members(g)["qkv.weight:0"] == tile(r(8), 12)
    assert members(g)["o.weight:1"] == tile(r(8), 4)


def test_multihead_attention_module_heads_and_widths():
    a = analyze("mha")
    qk = a.group_of("attn.in_proj_weight", 0)
    # packed rows: q (32) | k (32) | v (32); q.k^T ties q and k, head_dim 8 of 4 heads
    assert qk.prunable and qk.size == 8 and qk.heads == (4, 8)
    assert members(qk)["attn.in_proj_weight:0"] == tile(r(8), 8) + [-1] * 32
    # v's rows come from the same packed parameter as q and k, but form a group of their own
    v = a.group_of("attn.out_proj.weight", 1)
    assert v.id != qk.id and v.source == qk.source == ("attn.in_proj_weight", 0)
    assert v.prunable and v.size == 8 and v.heads == (4, 8) and v.structure == "head_dim"
    assert set(members(v)) == {
        "attn.in_proj_weight:0",
        "attn.in_proj_bias:0",
        "attn.out_proj.weight:1",
    }
    assert members(v)["attn.out_proj.weight:1"] == tile(r(8), 4)
    assert members(v)["attn.in_proj_weight:0"] == [-1] * 64 + tile(r(8), 4)
    inp = by_source(a)["inp.weight:0"]
    assert members(inp)["attn.in_proj_weight:1"] == r(32)  # the input width is prunable too
    out = by_source(a)["attn.out_proj.weight:0"]
    assert members(out)["fc1.weight:1"] == r(32)


def test_gqa_repeat_kv_ties_query_heads_to_their_kv_head():
    a = analyze("gqa", head_mode="heads")
    qk = by_source(a)["q.weight:0"]
    # 4 query heads share 2 kv heads: query heads 0,1 go with kv head 0, 2,3 with kv head 1
    assert qk.size == 2 and members(qk)["q.weight:0"] == [
        h // 2 for h in range(4) for _ in range(8)
    ]
    assert members(qk)["k.weight:0"] == [h for h in range(2) for _ in range(8)]
    # whole heads: a kv group's query, key and value heads and its out-proj columns go together
    assert members(qk)["v.weight:0"] == [h for h in range(2) for _ in range(8)]
    assert members(qk)["o.weight:1"] == [h // 2 for h in range(4) for _ in range(8)]


def test_rotary_embedding_pairs_the_two_halves_of_the_head_dim():
    g = analyze("rotary").group_of("q.weight", 0)
    assert g.size == 8 and g.prunable
    # rotate_half pairs dim j with j + 8 (head_dim 16), in both heads
    assert members(g)["q.weight:0"] == tile(r(8), 4)
    assert members(g)["k.weight:0"] == tile(r(8), 4)
    assert any(m.param not in ("q.weight", "q.bias", "k.weight", "k.bias") for m in g.members)


def test_layer_scale_parameter_joins_the_residual_group():
    g = by_source(analyze("layer_scale"))["inp.weight:0"]
    assert g.size == 16 and members(g)["gamma:0"] == r(16)
    assert members(g)["fc2.weight:0"] == r(16) and members(g)["head.weight:1"] == r(16)


def test_op_without_rule_freezes_and_warns_once(caplog):
    with caplog.at_level(logging.WARNING):
        a = analyze("no_rule")
    g = by_source(a)["a.weight:0"]
    assert not g.prunable and "cumsum" in g.reason and "micro_models.py" in g.reason
    warnings = [r for r in caplog.records if "cumsum" in r.getMessage()]
    assert len(warnings) == 1
    assert by_source(a)["b.weight:0"].prunable


def test_ignore_freezes_a_module_and_rejects_unknown_ones():
    model, x = MODELS["residual"]
    a = fxprune.analyze(model, x, ignore=[model.conv1])
    assert not by_source(a)["conv1.weight:0"].prunable
    with pytest.raises(fxprune.PruneError, match="not part of the model"):
        fxprune.analyze(model, x, ignore=[torch.nn.Linear(2, 2)])
    with pytest.raises(fxprune.PruneError, match="neither a module nor a parameter"):
        fxprune.analyze(model, x, ignore=["conv9"])


def test_analysis_table_is_readable():
    text = str(analyze("concat"))
    assert "group" in text and "prunable" in text and "c.weight[dim 1: 8/24]" in text


def test_debug_printer_shows_groups():
    from fxprune.debug import format_graph

    a = analyze("residual")
    text = format_graph(a.gm)
    row = next(line for line in text.splitlines() if line.startswith("conv1 "))
    assert "conv" in row and "[1, 32, 8, 8]" in row and "g" in row


def test_leaf_subclass_with_its_own_forward_is_not_taken_for_its_base():
    class StdConv(torch.nn.Conv2d):  # weight standardisation: not a plain conv
        def forward(self, x):
            w = (self.weight - self.weight.mean((1, 2, 3), keepdim=True)) / 2
            return torch.nn.functional.conv2d(x, w, self.bias, padding=1)

    class M(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Conv2d(3, 8, 1)
            self.std = StdConv(8, 8, 3, padding=1)
            self.c = torch.nn.Conv2d(8, 2, 1)

        def forward(self, x):
            return self.c(self.std(self.a(x)))

    a = fxprune.analyze(M().eval(), torch.randn(1, 3, 8, 8), leaf_modules=[StdConv])
    g = by_source(a)["a.weight:0"]
    assert not g.prunable and "StdConv" in g.reason
