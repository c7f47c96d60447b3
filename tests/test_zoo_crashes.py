"""One small model per crash class the timm sweep found (issue 11): a crash is never an answer.

Each class was a ``PassError`` from surgery's own shape check on a real model. The nets
here keep only the pattern that crashed, so the test is fast and needs no timm. Each test
asserts that the prune succeeds, that the oracle holds, and what became of the channels
involved: pruned (the rule or rewrite was wrong) or frozen with a reason naming the op.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from conftest import assert_oracle
from torch import nn

import fxprune


def group_of(res, param: str, dim: int):
    (group,) = [g for g in res.groups if g.member(param, dim) is not None and g.size > 1]
    return group


class BlurDownsample(nn.Module):
    """timm's ``BlurPool2d`` (tresnet, anti-aliased nets): a depthwise conv whose filter
    is a buffer, not an ``nn.Parameter``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.register_buffer("filt", torch.rand(channels, 1, 3, 3), persistent=False)

    def forward(self, x):
        x = F.pad(x, [1, 1, 1, 1], mode="reflect")
        return F.conv2d(x, self.filt, stride=2, groups=self.channels)


class BlurNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.blur = BlurDownsample(16)
        self.c = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.c(self.blur(torch.relu(self.a(x))))


def test_a_depthwise_conv_whose_filter_is_a_buffer_is_pruned_with_its_input():
    """tresnet_m: surgery read the filter with ``get_parameter`` and raised
    "`filt` is not an nn.Parameter"."""
    model, x = BlurNet().eval(), torch.randn(2, 3, 8, 8)
    res = fxprune.prune(model, x, ratio=0.5, ignore=[model.c])
    assert_oracle(model, res, x)
    group = group_of(res, "a.weight", 0)
    assert group.prunable and group.member("blur.filt", 0) is not None
    assert res.module.blur.filt.shape[0] == res.module.a.weight.shape[0] == 8
    assert "groups = 8" in res.module.code


class SizesFromTheInput(nn.Module):
    """coat / edgenext attention: ``qkv(x)`` is reshaped with ``C // heads`` where ``C`` is
    read from ``x``'s shape, and the output back to ``(B, N, C)``. The sizes read one
    tensor's channel count and shape another, whose channels are pruned apart from it."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.a = nn.Linear(6, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.c = nn.Linear(dim, 2)

    def forward(self, x):
        x = torch.relu(self.a(x))
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.c(x.transpose(1, 2).reshape(B, N, C))


def test_a_view_size_read_from_another_tensors_channels_follows_the_plan():
    """coat_lite_tiny (reshape [2, 197, 3, 8, 16]) and edgenext_xx_small (reshape
    [2, 1024, 24]): ``x``'s channels were pruned, ``qkv``'s rows were not, and the size
    ``C // heads`` computed from ``x`` no longer matched ``qkv(x)``."""
    model, x = SizesFromTheInput().eval(), torch.randn(2, 5, 6)
    res = fxprune.prune(model, x, ratio=0.5, ignore=[model.c, model.qkv])
    assert_oracle(model, res, x)
    assert res.module.a.weight.shape[0] == 16 and res.module.qkv.weight.shape == (96, 16)
    # The batch and token sizes, which nothing pruned reads, stay computed in the graph.
    assert "reshape(getitem, getitem_1, 3, 4, 8)" in res.module.code
    assert "reshape(getitem, getitem_1, 32)" in res.module.code

    both = fxprune.prune(model, x, ratio=0.5, ignore=[model.c])  # and pruned together
    assert_oracle(model, both, x)


class GainStdConv(nn.Conv2d):
    """timm's ``ScaledStdConv2d`` (nf_resnet, nfnet): the weight is standardised by a
    functional ``batch_norm`` whose affine weight is computed, ``(gain * scale).view(-1)``."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(cin, cout, 3, padding=1)
        self.gain = nn.Parameter(torch.rand(cout, 1, 1, 1) + 0.5)
        self.scale = self.weight[0].numel() ** -0.5

    def forward(self, x):
        weight = F.batch_norm(
            self.weight.reshape(1, self.out_channels, -1),
            None,
            None,
            weight=(self.gain * self.scale).view(-1),
            training=True,
            momentum=0.0,
            eps=1e-6,
        ).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding)


class StdConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.std = GainStdConv(8, 16)
        self.b = nn.Conv2d(16, 16, 1)
        self.c = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = torch.relu(self.std(torch.relu(self.a(x))))
        return self.c(torch.relu(self.b(x)))


def test_a_computed_norm_weight_joins_the_channels_it_scales():
    """nf_resnet26 ("weight should contain 64 elements not 32"): the norm rule ignored a
    computed affine weight, so ``gain`` became a group of its own and was pruned alone.
    The standardised weight's rows are not channels fxprune follows: ``gain`` is frozen
    with them, and the rest of the net still prunes."""
    model, x = StdConvNet().eval(), torch.randn(2, 3, 6, 6)
    res = fxprune.prune(model, x, ratio=0.5, ignore=[model.c])
    assert_oracle(model, res, x)
    gain = group_of(res, "std.gain", 0)
    assert not gain.prunable
    assert "a computed weight of 'batch_norm'" in gain.reason and "(forward)" in gain.reason
    assert res.module.std.gain.shape[0] == 16
    assert group_of(res, "b.weight", 0).prunable and res.module.b.weight.shape[0] == 8


class OnePlusLayerNorm(nn.Module):
    """A LayerNorm whose weight is computed, ``1 + w`` (zero-centred gamma)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(dim) * 0.1)

    def forward(self, x):
        return F.layer_norm(x, (x.shape[-1],), weight=1 + self.w)


def test_a_computed_layer_norm_weight_is_pruned_with_its_channels():
    a, c = nn.Linear(6, 8), nn.Linear(8, 2)
    model = nn.Sequential(a, OnePlusLayerNorm(8), c).eval()
    x = torch.randn(2, 5, 6)
    res = fxprune.prune(model, x, ratio=0.5, ignore=[c])
    group = group_of(res, "0.weight", 0)
    assert group.prunable and not group.exact and group.member("1.w", 0) is not None
    assert_oracle(model, res, x, exact=False)
    assert res.module.get_parameter("1.w").shape == (4,)


class UnreadParameter(nn.Module):
    """A parameter the eval forward never reads (timm's EfficientViT reads a cached copy of
    its attention biases in eval mode); torch.export still keeps a get_attr for it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 8, 3, padding=1)
        self.unread = nn.Parameter(torch.randn(4, 16))

    def forward(self, x):
        return self.conv2(torch.relu(self.conv1(x)))


def test_a_parameter_the_graph_never_reads_is_no_channel_and_stays_whole():
    model = UnreadParameter().eval()
    x = torch.randn(1, 3, 8, 8)
    res = fxprune.prune(model, x, ratio=0.5, frontend="export")
    assert "unread" not in res.kept and res.module.unread.shape == (4, 16)
    assert res.module.conv1.weight.shape[0] == 8
    assert_oracle(model, res, x)


class CachedScoreBias(nn.Module):
    """Attention whose score bias the eval forward caches in a plain dict on first use (as
    timm's EfficientViT does): traced after one forward, the bias is a constant captured by
    value, shaped (heads, tokens, tokens)."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.out = (nn.Linear(16, 16) for _ in range(4))
        self.table = nn.Parameter(torch.randn(4, 7))
        self.register_buffer("idx", torch.randint(0, 7, (8, 8)), persistent=False)
        self.cache: dict[str, torch.Tensor] = {}

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, 4, 4).transpose(1, 2) for p in (self.q, self.k, self.v))
        if "bias" not in self.cache:
            self.cache["bias"] = self.table[:, self.idx].detach()
        scores = q @ k.transpose(-1, -2) + self.cache["bias"]
        return self.out((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, 16))


def test_a_captured_constant_with_several_long_dims_carries_no_guessed_channels():
    model = CachedScoreBias().eval()
    x = torch.randn(2, 8, 16)
    with torch.no_grad():
        model(x)  # fills the cache, as a user's first forward does
    analysis = fxprune.analyze(model, x, frontend="export")
    owned = set(model.state_dict()) | {n for n, _ in model.named_parameters()}
    for g in analysis.groups:
        assert all(m.param in owned for m in g.members), [m.param for m in g.members]
    res = fxprune.prune(model, x, ratio=0.5, frontend="export", ignore=[model.out])
    assert_oracle(model, res, x, exact=False)
