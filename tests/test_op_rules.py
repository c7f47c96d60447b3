"""One row per op: the channel relation its rule must produce, seen through ``fxprune.analyze``.

Adding a rule starts here: write the row (a tiny net around the op and what its channels
must do), watch it fail, then write the rule. Every net names its layers the same way: ``a``
(and ``b``) produce channels, ``op`` is the op under test when it is a module, ``c``
consumes the channels. A row states, with ``"param:dim"`` names:

- ``together``: these dims are in one prunable group (exact unless listed in ``inexact``);
- ``apart``: these dims are in pairwise different groups;
- ``frozen``: the group of this dim is not prunable, and its reason contains the text;
- ``inexact``: the group of this dim is prunable but removing channels changes the output;
- ``maps``: the index map of members of ``together[0]``'s group (``-1``: another group's);
- ``size``, ``structure``: the number of channels and the structure of that group;
- ``gap``: a relation the rule does not find yet: the row fails (strict xfail) until it does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune

IMAGE = (1, 3, 4, 4)
TOKENS = (1, 5, 6)


class Net(nn.Module):
    """Named layers, a forward function ``fn(net, x)`` and the example input's shape."""

    def __init__(
        self,
        fn: Callable[[Net, Any], Any],
        shape: tuple[int, ...] = IMAGE,
        ints: int | None = None,
        **layers: nn.Module | nn.Parameter,
    ) -> None:
        super().__init__()
        for name, layer in layers.items():
            setattr(self, name, layer)
        self.fn, self.shape, self.ints = fn, shape, ints

    def forward(self, x):
        return self.fn(self, x)

    def example(self) -> torch.Tensor:
        if self.ints is not None:  # token ids
            return torch.randint(0, self.ints, self.shape)
        return torch.randn(*self.shape)


def conv(i: int, o: int, k: int = 1, **kw: Any) -> nn.Conv2d:
    return nn.Conv2d(i, o, k, padding=k // 2, **kw)


def lin(i: int, o: int) -> nn.Linear:
    return nn.Linear(i, o)


def _around(op, a: nn.Module, c: nn.Module, shape, **layers) -> Net:
    if isinstance(op, nn.Module):
        return Net(lambda m, x: m.c(m.op(m.a(x))), shape, a=a, op=op, c=c, **layers)
    return Net(lambda m, x: m.c(op(m.a(x))), shape, a=a, c=c, **layers)


def img(op, a: nn.Module | None = None, c: nn.Module | None = None) -> Net:
    """x (1, 3, 4, 4) -> a (conv 3 -> 8) -> op (a module, or a function) -> c (conv 8 -> 4)."""
    return _around(op, a or conv(3, 8), c or conv(8, 4), IMAGE)


def tok(op, a: nn.Module | None = None, c: nn.Module | None = None) -> Net:
    """x (1, 5, 6) tokens -> a (linear 6 -> 8) -> op -> c (linear 8 -> 2)."""
    return _around(op, a or lin(6, 8), c or lin(8, 2), TOKENS)


@dataclass
class Row:
    id: str
    model: Net
    together: tuple[str, ...] = ()
    apart: tuple[str, ...] = ()
    frozen: dict[str, str] = field(default_factory=dict)
    inexact: dict[str, str] = field(default_factory=dict)
    maps: dict[str, list[int]] = field(default_factory=dict)
    size: int | None = None
    structure: str | None = None
    gap: str = ""  # a known gap of the rule: the row fails until the rule does what it states


def r(n: int, start: int = 0) -> list[int]:
    return list(range(start, start + n))


def each(n: int, k: int) -> list[int]:
    """Channel j covers k consecutive positions: [0]*k + [1]*k + ..."""
    return [j for j in range(n) for _ in range(k)]


def heads(y, n: int = 2):
    """(B, T, C) -> (B, n, T, C // n)."""
    b, t, c = y.shape
    return y.view(b, t, n, c // n).transpose(1, 2)


def merge(y):
    """(B, n, T, d) -> (B, T, n * d)."""
    b, n, t, d = y.shape
    return y.transpose(1, 2).reshape(b, t, n * d)


def sdpa(m: Net, x):
    q, k, v = heads(m.q(x)), heads(m.k(x)), heads(m.v(x))
    return m.o(merge(F.scaled_dot_product_attention(q, k, v)))


def mha(m: Net, x):
    y, _ = m.op(x, x, x, need_weights=False)
    return m.c(y)


def chunk_two(m: Net, x):
    u, v = m.a(x).chunk(2, dim=1)
    return m.p(u) + m.q(v)


def squeeze_excite(m: Net, x):
    y = m.a(x)
    return m.c(y * torch.sigmoid(m.b(y.mean((2, 3), keepdim=True))))


def cat_token(m: Net, x):
    y = m.a(x)
    return m.c(torch.cat([m.cls.expand(y.shape[0], -1, -1), y], 1))


def two(join, c: nn.Module | None = None, b: int = 8) -> Net:
    """x -> a (conv 3 -> 8), b (conv 3 -> b) -> join(a(x), b(x)) -> c."""
    return Net(
        lambda m, x: m.c(join(m.a(x), m.b(x))), a=conv(3, 8), b=conv(3, b), c=c or conv(8, 4)
    )


A_C = ("a.weight:0", "a.bias:0", "c.weight:1")  # a's output rows and the columns of c reading them
OUTPUT = "reaches the model output"
NONZERO = "non-zero when pruned"
SEQ = (1, 5, 8)

ROWS = [
    # -- weights: producers and consumers of channels ----------------------------------------------
    # conv: output rows are channels, the next conv's input columns read them
    Row("conv", img(conv(8, 6), c=conv(6, 4)), together=(*A_C[:2], "op.weight:1"), apart=("a.weight:0", "op.weight:0")),
    # what reaches the model output, and the model input's channels, are never pruned
    Row("output", img(nn.Identity()), frozen={"c.weight:0": OUTPUT}),
    Row("input", img(nn.Identity()), frozen={"a.weight:1": "untracked"}),
    Row("linear", tok(lin(8, 6), c=lin(6, 2)), together=(*A_C[:2], "op.weight:1"), apart=("a.weight:0", "op.weight:0")),
    # grouped conv: the same in-group position is kept in every group, on both sides
    Row("grouped_conv_in", img(conv(8, 8, 3, groups=2)), together=("a.weight:0", "op.weight:1"), size=4, maps={"a.weight:0": r(4) * 2, "op.weight:1": r(4)}),
    Row("grouped_conv_out", img(conv(8, 8, 3, groups=2)), together=("op.weight:0", "op.bias:0", "c.weight:1"), size=4, structure="grouped"),
    # depthwise conv: each output channel is its input channel
    Row("depthwise_conv", img(conv(8, 8, 3, groups=8)), together=(*A_C, "op.weight:0", "op.bias:0"), size=8),
    # transposed conv: weight dim 0 reads channels, dim 1 makes them
    Row("conv_transpose_in", img(nn.ConvTranspose2d(8, 6, 2, stride=2), c=conv(6, 2)), together=("a.weight:0", "op.weight:0"), apart=("a.weight:0", "op.weight:1")),
    Row("conv_transpose_out", img(nn.ConvTranspose2d(8, 6, 2, stride=2), c=conv(6, 2)), together=("op.weight:1", "op.bias:0", "c.weight:1")),
    # addmm with an [in, out] weight (transformers' Conv1D): dim 0 reads, dim 1 makes channels
    Row("addmm_conv1d", Net(lambda m, x: m.c(torch.addmm(m.b, m.a(x).view(-1, 8), m.w).view(1, 5, 6)), TOKENS, a=lin(6, 8), w=nn.Parameter(torch.randn(8, 6)), b=nn.Parameter(torch.randn(6)), c=lin(6, 2)), together=("a.weight:0", "a.bias:0", "w:0"), apart=("w:0", "w:1")),
    Row("addmm_conv1d_out", Net(lambda m, x: m.c(torch.addmm(m.b, m.a(x).view(-1, 8), m.w).view(1, 5, 6)), TOKENS, a=lin(6, 8), w=nn.Parameter(torch.randn(8, 6)), b=nn.Parameter(torch.randn(6)), c=lin(6, 2)), together=("w:1", "b:0", "c.weight:1"), size=6),
    # a linear over tokens with channels on a leading dim (gMLP's spatial gate): channels pass
    # through row by row; the weight indexes tokens and stays whole; its bias makes pruned rows non-zero
    Row("linear_over_tokens", Net(lambda m, x: m.c(m.op(m.a(x).transpose(-1, -2)).transpose(-1, -2)), TOKENS, a=lin(6, 8), op=lin(5, 5), c=lin(8, 2)), together=A_C, frozen={"op.weight:0": "untracked", "op.weight:1": "untracked"}, inexact={"a.weight:0": NONZERO}),
    Row("linear_over_tokens_gated", Net(lambda m, x: m.c(m.a(x) * m.op(m.a(x).transpose(-1, -2)).transpose(-1, -2)), TOKENS, a=lin(6, 8), op=lin(5, 5), c=lin(8, 2)), together=A_C),
    # a pointwise conv whose positions carry channels (CoaT's aggregate: a 1x1 conv1d over
    # class tokens x channels): channels pass position by position; the weight indexes the
    # conv's own channels and stays whole; a bias makes pruned positions non-zero
    Row("pointwise_conv_over_channels", Net(lambda m, x: m.c(m.op(m.a(x)).squeeze(1)), TOKENS, a=lin(6, 8), op=nn.Conv1d(5, 1, 1, bias=False), c=lin(8, 2)), together=A_C, frozen={"op.weight:0": "untracked", "op.weight:1": "untracked"}),
    Row("pointwise_conv_over_channels_bias", Net(lambda m, x: m.c(m.op(m.a(x)).squeeze(1)), TOKENS, a=lin(6, 8), op=nn.Conv1d(5, 1, 1), c=lin(8, 2)), together=A_C, inexact={"a.weight:0": NONZERO}),
    Row("conv_mixing_channel_positions", Net(lambda m, x: m.c(m.op(m.a(x)).squeeze(1)), TOKENS, a=lin(6, 8), op=nn.Conv1d(5, 1, 3, padding=1), c=lin(8, 2)), frozen={"a.weight:0": "mixes positions along a dim that carries channels"}),
    # roll: over H and W (Swin's shifted windows) channels pass; over the channel dim they stay
    Row("roll_spatial", img(lambda x: torch.roll(x, shifts=(1, 2), dims=(2, 3))), together=A_C),
    Row("roll_channels", img(lambda x: torch.roll(x, shifts=1, dims=1)), frozen={"a.weight:0": "roll along a channel dim"}),
    # embedding: the embedding dim is a source of channels
    Row("embedding", Net(lambda m, x: m.c(m.e(x)), (1, 5), 10, e=nn.Embedding(10, 8), c=lin(8, 2)), together=("e.weight:1", "c.weight:1"), size=8),
    # -- normalisation -------------------------------------------------------------------------------
    # batch / instance norm: per-channel statistics join the channel, exactly
    Row("batchnorm", img(nn.BatchNorm2d(8)), together=(*A_C, "op.weight:0", "op.bias:0", "op.running_mean:0", "op.running_var:0")),
    Row("instancenorm", img(nn.InstanceNorm2d(8, affine=True)), together=(*A_C, "op.weight:0", "op.bias:0")),
    # layer norm over channels: joins, but the statistics change when a channel goes
    Row("layernorm", tok(nn.LayerNorm(8)), together=(*A_C, "op.weight:0", "op.bias:0"), inexact={"a.weight:0": "layer_norm"}),
    # group norm: one position per group goes together, and the statistics change
    Row("groupnorm", img(nn.GroupNorm(2, 8)), together=(*A_C, "op.weight:0"), size=4, inexact={"a.weight:0": "GroupNorm"}),
    # -- elementwise -----------------------------------------------------------------------------------
    # residual add / sub: both branches hold the same channels
    Row("add", two(torch.add), together=(*A_C, "b.weight:0")),
    Row("sub", two(lambda u, v: u - v), together=(*A_C, "b.weight:0")),
    # gating: channel j of one operand multiplies channel j of the other
    Row("mul_gate", two(lambda u, v: u * torch.sigmoid(v)), together=(*A_C, "b.weight:0")),
    # squeeze-excite: a per-sample scale from the pooled channels joins them
    Row("mul_broadcast", Net(squeeze_excite, a=conv(3, 8), b=conv(8, 8), c=conv(8, 4)), together=(*A_C, "b.weight:0", "b.weight:1")),
    # layer scale: a parameter with one value per channel joins the channel
    Row("layer_scale", Net(lambda m, x: m.c(m.g * m.a(x)), TOKENS, a=lin(6, 8), g=nn.Parameter(torch.ones(8)), c=lin(8, 2)), together=(*A_C, "g:0")),
    # a (C, 1, 1) layer scale on an image (ConvNeXt): its one long dim holds the channels
    Row("layer_scale_chw", Net(lambda m, x: m.c(m.g * m.a(x)), a=conv(3, 8), g=nn.Parameter(torch.ones(8, 1, 1)), c=conv(8, 4)), together=(*A_C, "g:0")),
    # a position embedding added to tokens: its last dim joins the channels
    Row("add_param", Net(lambda m, x: m.c(m.a(x) + m.pos), TOKENS, a=lin(6, 8), pos=nn.Parameter(torch.randn(1, 5, 8)), c=lin(8, 2)), together=(*A_C, "pos:2")),
    # a (1, C, H, W) position embedding on an image (Visformer, PiT): its channel dim is the
    # one lined up with the image's, not its last
    Row("add_param_image", Net(lambda m, x: m.c(m.a(x) + m.pos), a=conv(3, 8), pos=nn.Parameter(torch.randn(1, 8, 4, 4)), c=conv(8, 4)), together=(*A_C, "pos:1"), size=8),
    # activations pass channels through; relu, gelu and dropout keep pruned (zero) channels zero
    Row("relu", img(F.relu), together=A_C),
    Row("gelu_dropout", img(nn.Sequential(nn.GELU(), nn.Dropout(0.1))), together=A_C),
    Row("prelu", img(nn.PReLU(8)), together=(*A_C, "op.weight:0")),
    Row("mul_scalar", img(lambda y: y * 2), together=A_C),
    # addcmul(input, t1, t2) = input + t1 * t2 (ConvNeXt-V2's GRN, ResMLP's affine): all join
    Row("addcmul", Net(lambda m, x: m.c(torch.addcmul(m.beta, m.alpha, m.a(x))), TOKENS, a=lin(6, 8), alpha=nn.Parameter(torch.randn(8)), beta=nn.Parameter(torch.randn(8)), c=lin(8, 2)), together=(*A_C, "alpha:0", "beta:0")),

    # a pruned channel that turns non-zero (sigmoid(0) = 0.5, 0 + 1) is still read by c: inexact
    Row("sigmoid", img(torch.sigmoid), together=A_C, inexact={"a.weight:0": NONZERO}),
    Row("add_scalar", img(lambda y: y + 1), together=A_C, inexact={"a.weight:0": NONZERO}),
    # -- joining, cutting, moving channels -------------------------------------------------------------
    # concat along channels: each producer keeps its own group, at its offset in c
    Row("cat", two(lambda u, v: torch.cat([u, v], 1), conv(12, 2), b=4), together=("a.weight:0",), apart=("a.weight:0", "b.weight:0"), maps={"c.weight:1": r(8) + [-1] * 4}),
    # concat along a spatial dim: the same channels side by side, so the two producers join
    Row("cat_spatial", two(lambda u, v: torch.cat([u, v], 2)), together=(*A_C, "b.weight:0"), structure="channels"),
    # a class token (a parameter) before the tokens: it holds the same channels, even when
    # there are more tokens than channels; a computed (untracked) token freezes them
    Row("cat_token", Net(cat_token, (1, 20, 6), a=lin(6, 8), cls=nn.Parameter(torch.randn(1, 1, 8)), c=lin(8, 2)), together=(*A_C, "cls:2"), structure="channels"),
    Row("cat_untracked", Net(lambda m, x: m.c(torch.cat([x.new_zeros(1, 1, 8), m.a(x)], 1)), TOKENS, a=lin(6, 8), c=lin(8, 2)), frozen={"a.weight:0": "untracked"}),
    # stack along a new dim (selective-kernel branches): the parts hold the same channels
    Row("stack", two(lambda u, v: torch.stack([u, v], 1).sum(1)), together=(*A_C, "b.weight:0")),
    Row("stack_last", two(lambda u, v: torch.stack([u, v], -1).amax(-1)), together=(*A_C, "b.weight:0")),
    # chunk / split / slice along channels: each piece keeps its slice of one group
    Row("chunk", Net(chunk_two, a=conv(3, 8), p=conv(4, 2), q=conv(4, 2)), together=("a.weight:0", "p.weight:1", "q.weight:1"), maps={"p.weight:1": r(4), "q.weight:1": r(4, 4)}),
    Row("split", img(lambda y: y.split([2, 6], 1)[1], c=conv(6, 4)), together=("a.weight:0", "c.weight:1"), maps={"c.weight:1": r(6, 2)}),
    Row("slice", img(lambda y: y[:, 4:], c=conv(4, 2)), together=("a.weight:0", "c.weight:1"), maps={"c.weight:1": r(4, 4)}),
    # a fixed index along channels needs that channel: frozen
    Row("select", img(lambda y: y[:, 0:1] + y[:, 0, None], c=conv(1, 2)), frozen={"a.weight:0": "fixed index"}),
    Row("select_fn", img(lambda y: torch.select(y, 1, 0)[:, None], c=conv(1, 2)), frozen={"a.weight:0": "fixed index"}),
    Row("unbind", img(lambda y: y.unbind(1)[0][:, None], c=conv(1, 2)), frozen={"a.weight:0": "unbind"}),
    # flatten C x H x W into features: each channel owns its H*W consecutive features
    Row("flatten", img(lambda y: torch.flatten(y, 1), c=lin(128, 2)), together=("a.weight:0", "c.weight:1"), maps={"c.weight:1": each(8, 16)}),
    Row("view_flatten", img(lambda y: y.view(y.shape[0], -1), c=lin(128, 2)), together=("a.weight:0", "c.weight:1"), maps={"c.weight:1": each(8, 16)}),
    Row("reshape_literal", img(lambda y: y.reshape(1, 128), c=lin(128, 2)), together=("a.weight:0", "c.weight:1"), maps={"c.weight:1": each(8, 16)}),
    Row("nn_flatten", img(nn.Flatten(), c=lin(128, 2)), together=("a.weight:0", "c.weight:1"), maps={"c.weight:1": each(8, 16)}),
    # hard-coded view into (2, 4): position j is kept in both rows
    Row("view_split_channels", img(lambda y: y.view(1, 2, 4, 4, 4).relu().view(1, 8, 4, 4)), together=A_C, size=4, maps={"a.weight:0": r(4) * 2}),
    # permute / transpose move the channel dim; the relation follows it
    Row("permute", img(lambda y: y.permute(0, 2, 3, 1), c=lin(8, 2)), together=A_C),
    Row("transpose", tok(lambda y: y.transpose(1, 2), c=nn.Conv1d(8, 2, 1)), together=A_C),
    # channel shuffle (view, transpose, view): followed position by position
    Row("channel_shuffle", img(lambda y: y.view(1, 2, 4, 4, 4).transpose(1, 2).reshape(1, 8, 4, 4)), together=A_C, size=4, maps={"c.weight:1": each(4, 2)}),
    # pixel (un)shuffle: r^2 = 4 input channels make one output channel, and back
    Row("pixel_shuffle", img(nn.PixelShuffle(2), a=conv(3, 16), c=conv(4, 2)), together=A_C, size=4, maps={"a.weight:0": each(4, 4), "c.weight:1": r(4)}),
    Row("pixel_unshuffle", img(nn.PixelUnshuffle(2), a=conv(3, 4), c=conv(16, 2)), together=A_C, size=4, maps={"c.weight:1": each(4, 4)}),
    # repeat along channels: both copies are the same channel
    Row("repeat", img(lambda y: y.repeat(1, 2, 1, 1), c=conv(16, 2)), together=A_C, maps={"c.weight:1": r(8) * 2}),
    # repeat_interleave along the batch, by a count computed from sizes (GCViT's global query)
    Row("repeat_interleave_batch", tok(lambda y: y.repeat_interleave(y.shape[0] * 2 // 2, dim=0)), together=A_C),
    # -- spatial ops and reductions --------------------------------------------------------------------
    # pooling, resizing and zero padding over spatial dims keep channels where they are
    Row("max_pool", img(nn.MaxPool2d(2)), together=A_C),
    Row("avg_pool", img(lambda y: F.avg_pool2d(y, 2)), together=A_C),
    Row("adaptive_pool", img(nn.AdaptiveAvgPool2d(1)), together=A_C),
    Row("interpolate", img(lambda y: F.interpolate(y, scale_factor=2)), together=A_C),
    Row("pad_spatial", img(lambda y: F.pad(y, (1, 1, 1, 1))), together=A_C),
    # pooling over the dim that carries channels mixes them: frozen
    Row("pool_channels", tok(lambda y: F.max_pool1d(y, 2), c=lin(4, 2)), frozen={"a.weight:0": "pools over a dim that carries channels"}),
    # padding with ones makes pruned channels non-zero where padded; padding channels freezes them
    Row("pad_ones", img(lambda y: F.pad(y, (1, 1), value=1.0)), together=A_C, inexact={"a.weight:0": NONZERO}),
    # padding channels with constants (LiteMLA's column of ones beside v) shifts them; the
    # constants are no channel; a crop along channels, or reflecting them, freezes them
    Row("pad_channels", img(lambda y: F.pad(y, (0, 0, 0, 0, 1, 1)), c=conv(10, 4)), together=("a.weight:0", "c.weight:1"), maps={"c.weight:1": [-1, *r(8), -1]}),
    Row("pad_channels_ones", tok(lambda y: F.pad(y, (0, 1), value=1.0), c=lin(9, 2)), together=("a.weight:0", "c.weight:1"), maps={"c.weight:1": [*r(8), -1]}),
    Row("crop_channels", img(lambda y: F.pad(y, (0, 0, 0, 0, -1, 0)), c=conv(7, 4)), frozen={"a.weight:0": "negative padding"}),
    # mean over spatial dims keeps the channels; over channels it mixes them
    Row("mean_spatial", img(lambda y: y.mean((2, 3)), c=lin(8, 2)), together=A_C),
    Row("mean_channels", img(lambda y: y.mean(1, keepdim=True), c=conv(1, 4)), together=("a.weight:0",), inexact={"a.weight:0": "'mean' over channels"}),
    # a sum over channels of zero channels is unchanged by removing them
    Row("sum_channels", img(lambda y: y.sum(1, keepdim=True), c=conv(1, 4)), together=("a.weight:0", "a.bias:0")),
    # softmax over channels mixes them; over another dim it keeps them, but 0 becomes 1/n
    Row("softmax_channels", img(lambda y: y.softmax(1)), together=A_C, inexact={"a.weight:0": "softmax over channels"}),
    Row("softmax_spatial", img(lambda y: y.softmax(-1)), together=A_C, inexact={"a.weight:0": NONZERO}),
    # -- attention and contractions --------------------------------------------------------------------
    # a @ b^T contracts the channel dim: the two producers must keep the same channels
    Row("matmul", Net(lambda m, x: m.a(x) @ m.b(x).transpose(1, 2), TOKENS, a=lin(6, 8), b=lin(6, 8)), together=("a.weight:0", "b.weight:0")),
    Row("einsum", Net(lambda m, x: torch.einsum("btc,bsc->bts", m.a(x), m.b(x)), TOKENS, a=lin(6, 8), b=lin(6, 8)), together=("a.weight:0", "b.weight:0")),
    # scaled_dot_product_attention: q and k share head dims, v goes to the output projection
    Row("sdpa_qk", Net(sdpa, TOKENS, q=lin(6, 8), k=lin(6, 8), v=lin(6, 8), o=lin(8, 2)), together=("q.weight:0", "k.weight:0"), apart=("q.weight:0", "v.weight:0"), size=4, structure="head_dim", maps={"q.weight:0": r(4) * 2}),
    Row("sdpa_v", Net(sdpa, TOKENS, q=lin(6, 8), k=lin(6, 8), v=lin(6, 8), o=lin(8, 2)), together=("v.weight:0", "o.weight:1"), size=4, maps={"o.weight:1": r(4) * 2}),
    # nn.MultiheadAttention: packed q | k | v rows; q and k go together, v with out_proj's columns
    Row("mha_qk", Net(mha, SEQ, op=nn.MultiheadAttention(8, 2, batch_first=True), c=lin(8, 2)), together=("op.in_proj_weight:0",), size=4, maps={"op.in_proj_weight:0": r(4) * 4 + [-1] * 8}),
    Row("mha_out", Net(mha, SEQ, op=nn.MultiheadAttention(8, 2, batch_first=True), c=lin(8, 2)), together=("op.out_proj.weight:0", "op.out_proj.bias:0", "c.weight:1")),
    # -- recurrent layers -------------------------------------------------------------------------------
    # LSTM: input features are weight_ih's columns; a hidden unit owns a row in each of the 4
    # gate blocks and the column of weight_hh that feeds it back; both directions go together
    Row("lstm_in", Net(lambda m, x: m.c(m.op(m.a(x))[0]), TOKENS, a=lin(6, 8), op=nn.LSTM(8, 4, batch_first=True), c=lin(4, 2)), together=("a.weight:0", "op.weight_ih_l0:1")),
    Row("lstm_units", Net(lambda m, x: m.c(m.op(m.a(x))[0]), TOKENS, a=lin(6, 8), op=nn.LSTM(8, 4, batch_first=True), c=lin(4, 2)), together=("op.weight_hh_l0:1", "op.weight_ih_l0:0", "op.weight_hh_l0:0", "op.bias_ih_l0:0", "c.weight:1"), size=4, maps={"op.weight_ih_l0:0": r(4) * 4}),
    Row("gru_bidirectional", Net(lambda m, x: m.c(m.op(m.a(x))[0]), TOKENS, a=lin(6, 8), op=nn.GRU(8, 4, batch_first=True, bidirectional=True), c=lin(8, 2)), together=("op.weight_hh_l0:1", "op.weight_hh_l0_reverse:1", "c.weight:1"), size=4, maps={"c.weight:1": r(4) * 2}),
    # a state passed in, or stacked layers: not pruned, and said why
    Row("lstm_initial_state", Net(lambda m, x: m.c(m.op(m.a(x), (x.new_ones(1, 1, 4), x.new_ones(1, 1, 4)))[0]), TOKENS, a=lin(6, 8), op=nn.LSTM(8, 4, batch_first=True), c=lin(4, 2)), frozen={"a.weight:0": "initial state"}),
    Row("lstm_stacked", Net(lambda m, x: m.c(m.op(m.a(x))[0]), TOKENS, a=lin(6, 8), op=nn.LSTM(8, 4, 2, batch_first=True), c=lin(4, 2)), frozen={"a.weight:0": "stacked layers"}),
    # -- the default --------------------------------------------------------------------------------------
    # an op without a rule freezes every channel it touches, and says which op
    Row("no_rule", img(lambda y: torch.cumsum(y, 1)), frozen={"a.weight:0": "cumsum"}),
]  # fmt: skip


def group(a, name: str):
    param, dim = name.rsplit(":", 1)
    g = a.group_of(param, int(dim))
    assert g is not None, f"no group holds {name}; groups:\n{a.table()}"
    return g


def index_map(g, name: str) -> list[int]:
    param, dim = name.rsplit(":", 1)
    m = g.member(param, int(dim))
    assert m is not None, f"{name} is not a member of group {g.id}: {g.members}"
    return m.index_map.tolist()


PARAMS = [
    pytest.param(
        row, id=row.id, marks=[pytest.mark.xfail(strict=True, reason=row.gap)] if row.gap else []
    )
    for row in ROWS
]


@pytest.mark.parametrize("row", PARAMS)
def test_op_rule(row: Row):
    a = fxprune.analyze(row.model.eval(), row.model.example(), frontend="fx")
    if row.together:
        first = group(a, row.together[0])
        for name in row.together:
            g = group(a, name)
            assert g.id == first.id, f"{name} is not with {row.together[0]}:\n{a.table()}"
        assert first.prunable, f"{row.together[0]} frozen: {first.reason}"
        assert first.exact == (row.together[0] not in row.inexact), first.inexact_reason
        if row.size is not None:
            assert first.size == row.size
        if row.structure is not None:
            assert first.structure == row.structure
        for name, want in row.maps.items():
            assert index_map(first, name) == want, name
    ids = [group(a, name).id for name in row.apart]
    assert len(set(ids)) == len(ids), f"{row.apart} share a group:\n{a.table()}"
    for name, reason in row.frozen.items():
        g = group(a, name)
        assert not g.prunable and reason in g.reason, f"{name}: {g.describe()}"
    for name, reason in row.inexact.items():
        g = group(a, name)
        assert g.prunable and not g.exact and reason in g.inexact_reason, g.describe()


def test_every_row_asserts_something():
    for row in ROWS:
        assert row.together or row.frozen or row.inexact, row.id
