"""Small models, one per channel relation, shared by the analysis and prune tests.

Each returns (model, example_input). Weights are random (including BN statistics and
layer scales) so that the correctness oracle compares non-trivial outputs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN statistics and affine params, so pruned channels matter in the oracle."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.conv1 = nn.Conv2d(16, 32, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return self.head(F.relu(x + y))


class ConcatTwo(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 16, 3, padding=1)
        self.c = nn.Conv2d(24, 4, 1)

    def forward(self, x):
        return self.c(F.relu(torch.cat([self.a(x), self.b(x)], dim=1)))


class CatSelf(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.c = nn.Conv2d(32, 4, 1)

    def forward(self, x):
        y = torch.relu(self.a(x))
        return self.c(torch.cat([y, y], dim=1))


class UnequalSplit(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 24, 3, padding=1)
        self.p = nn.Conv2d(8, 4, 1)
        self.q = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        u, v = torch.split(torch.relu(self.a(x)), [8, 16], dim=1)
        return self.p(u) + self.q(v)


class Chunk(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 32, 3, padding=1)
        self.c = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        u, v = self.a(x).chunk(2, dim=1)
        return self.c(u * torch.sigmoid(v))


class HardCodedView(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 64, 3, padding=1)
        self.c = nn.Conv2d(64, 4, 1)

    def forward(self, x):
        b, _, h, w = x.shape
        y = torch.relu(self.a(x)).view(b, 4, 16, h, w)
        y = y * 2.0
        return self.c(y.view(b, 64, h, w))


class FlattenLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1, stride=2)
        self.fc1 = nn.Linear(16 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        y = torch.relu(self.a(x)).flatten(1)
        return self.fc2(torch.relu(self.fc1(y)))


class Permute(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.fc = nn.Linear(16, 24)
        self.c = nn.Conv2d(24, 4, 1)

    def forward(self, x):
        y = self.a(x).permute(0, 2, 3, 1)
        y = torch.relu(self.fc(y))
        return self.c(y.permute(0, 3, 1, 2))


class ChannelShuffle(nn.Module):
    def __init__(self, groups: int = 2) -> None:
        super().__init__()
        self.g = groups
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 8, 3, padding=1)
        self.c = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], dim=1)
        n, c, h, w = y.shape
        y = y.view(n, self.g, c // self.g, h, w).transpose(1, 2).contiguous().view(n, c, h, w)
        return self.c(torch.relu(y))


class PixelShuffle(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 32, 3, padding=1)
        self.ps = nn.PixelShuffle(2)
        self.c = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.c(self.ps(torch.relu(self.a(x))))


class GroupedAfterResidual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 1)
        self.body = nn.Conv2d(16, 16, 3, padding=1)
        self.grouped = nn.Conv2d(16, 32, 3, padding=1, groups=4)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.head = nn.Conv2d(32, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.body(x))
        return self.head(torch.relu(self.dw(self.grouped(x))))


class SEBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 32, 3, padding=1)
        self.fc1 = nn.Conv2d(32, 8, 1)
        self.fc2 = nn.Conv2d(8, 32, 1)
        self.c = nn.Conv2d(32, 4, 1)

    def forward(self, x):
        y = torch.relu(self.a(x))
        s = torch.sigmoid(self.fc2(torch.relu(self.fc1(y.mean((2, 3), keepdim=True)))))
        return self.c(y * s)


class ShiftedWindows(nn.Module):
    """Swin's cyclic shift: torch.roll over H and W, channels untouched."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.c = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        y = torch.relu(self.a(x))
        return self.c(torch.roll(y, shifts=(-1, 1), dims=(2, 3)) + y)


class MatmulAttention(nn.Module):
    """Self-attention written by hand: q @ k^T / sqrt(d), softmax, @ v."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.h, self.d = heads, dim // heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 5)

    def forward(self, x):
        b, t, c = x.shape
        q = self.q(x).view(b, t, self.h, self.d).transpose(1, 2)
        k = self.k(x).view(b, t, self.h, self.d).transpose(1, 2)
        v = self.v(x).view(b, t, self.h, self.d).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(self.d)
        y = (att.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, t, c)
        return self.head(self.o(y))


class SDPAAttention(nn.Module):
    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.h = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.o = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 5)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.h, c // self.h).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.head(self.o(y.transpose(1, 2).reshape(b, t, c)))


class MHA(nn.Module):
    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.inp = nn.Linear(8, dim)
        self.attn = nn.MultiheadAttention(dim, 4, batch_first=True)
        self.fc1 = nn.Linear(dim, 64)
        self.fc2 = nn.Linear(64, 5)

    def forward(self, x):
        x = self.inp(x)
        y, _ = self.attn(x, x, x, need_weights=False)
        return self.fc2(torch.relu(self.fc1(y)))


class GQA(nn.Module):
    """Grouped-query attention: 4 query heads share 2 key/value heads (repeat_kv)."""

    def __init__(self, dim: int = 32, heads: int = 4, kv_heads: int = 2) -> None:
        super().__init__()
        self.h, self.kvh, self.d = heads, kv_heads, dim // heads
        self.q = nn.Linear(dim, heads * self.d, bias=False)
        self.k = nn.Linear(dim, kv_heads * self.d, bias=False)
        self.v = nn.Linear(dim, kv_heads * self.d, bias=False)
        self.o = nn.Linear(heads * self.d, dim, bias=False)
        self.head = nn.Linear(dim, 5)

    @staticmethod
    def repeat_kv(x, n):
        b, h, t, d = x.shape
        return x[:, :, None, :, :].expand(b, h, n, t, d).reshape(b, h * n, t, d)

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.h, self.d).transpose(1, 2)
        k = self.k(x).view(b, t, self.kvh, self.d).transpose(1, 2)
        v = self.v(x).view(b, t, self.kvh, self.d).transpose(1, 2)
        k, v = self.repeat_kv(k, self.h // self.kvh), self.repeat_kv(v, self.h // self.kvh)
        att = torch.softmax(q @ k.transpose(2, 3) / math.sqrt(self.d), dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, self.h * self.d)
        return self.head(self.o(y))


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


class Rotary(nn.Module):
    """q/k with rotary embeddings; cos/sin come from a frequency buffer."""

    def __init__(self, dim: int = 32, heads: int = 2) -> None:
        super().__init__()
        self.h, self.d = heads, dim // heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 5)
        inv = 1.0 / (10000 ** (torch.arange(0, self.d, 2).float() / self.d))
        self.register_buffer("inv_freq", inv)

    def forward(self, x):
        b, t, c = x.shape
        pos = torch.arange(t, dtype=torch.float32)
        freqs = pos[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        q = self.q(x).view(b, t, self.h, self.d).transpose(1, 2)
        k = self.k(x).view(b, t, self.h, self.d).transpose(1, 2)
        v = self.v(x).view(b, t, self.h, self.d).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        att = torch.softmax(q @ k.transpose(2, 3) / math.sqrt(self.d), dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, c)
        return self.head(self.o(y))


class LayerScale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16)
        self.gamma = nn.Parameter(torch.rand(16) + 0.5)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = self.inp(x)
        x = x + self.gamma * self.fc2(torch.relu(self.fc1(x)))
        return self.head(x)


class NoRule(nn.Module):
    """cumsum over channels has no channel rule: its channels must be frozen."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 16, 1)
        self.c = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        y = torch.cumsum(torch.relu(self.a(x)), dim=1)
        return self.c(torch.relu(self.b(y)))


class LayerNormMLP(nn.Module):
    """LayerNorm over the channels: a pruned channel changes its mean and variance (inexact)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 32)
        self.norm = nn.LayerNorm(32)
        self.fc = nn.Linear(32, 5)

    def forward(self, x):
        return self.fc(self.norm(torch.relu(self.inp(x))))


class SelectiveKernel(nn.Module):
    """SKNet: branches stacked along a new dim, weighted by an attention over them, summed."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.paths = nn.ModuleList(nn.Conv2d(16, 16, 3, padding=d, dilation=d) for d in (1, 2))
        self.reduce = nn.Conv2d(16, 8, 1)
        self.select = nn.Conv2d(8, 32, 1)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        y = torch.stack([torch.relu(p(x)) for p in self.paths], dim=1)  # (B, 2, C, H, W)
        s = self.reduce(y.sum(1).mean((2, 3), keepdim=True))
        a = self.select(torch.relu(s)).view(x.shape[0], 2, 16, 1, 1).softmax(1)
        return self.head((y * a).sum(1))


class Affine(nn.Module):
    """ResMLP's affine, ``addcmul(beta, alpha, x)``: a per-channel scale and shift."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.alpha = nn.Parameter(torch.rand(16) + 0.5)
        self.beta = nn.Parameter(torch.randn(16))
        self.fc = nn.Linear(16, 32)
        self.out = nn.Linear(32, 16)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = self.inp(x)
        x = x + self.out(torch.relu(self.fc(torch.addcmul(self.beta, self.alpha, x))))
        return self.head(x)


class PadChannels(nn.Module):
    """A constant channel of ones appended (LiteMLA pads v so attention also sums weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.c = nn.Conv2d(17, 4, 1)

    def forward(self, x):
        return self.c(F.pad(torch.relu(self.a(x)), (0, 0, 0, 0, 0, 1), value=1.0))


class Recurrent(nn.Module):
    """A bidirectional LSTM between two linears (speech and time-series encoders)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 32)
        self.rnn = nn.LSTM(32, 24, batch_first=True, bidirectional=True)
        self.head = nn.Linear(48, 5)

    def forward(self, x):
        y, _ = self.rnn(torch.relu(self.inp(x)))
        return self.head(y)


class TokenAggregate(nn.Module):
    """Three pooled branches stacked as class tokens and merged by a 1x1 conv1d over
    (batch, tokens, channels): CoaT's aggregate, whose positions carry the channels."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 16, 1)
        self.agg = nn.Conv1d(3, 1, 1, bias=False)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        y = torch.relu(self.a(x))
        z = self.b(y)
        tokens = torch.stack([y.mean((2, 3)), z.mean((2, 3)), y.amax((2, 3))], dim=1)
        return self.head(self.agg(tokens).squeeze(1))


IMAGE = (1, 3, 8, 8)
SEQ = (2, 6, 32)


def micro_models() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    img, seq = torch.randn(*IMAGE), torch.randn(*SEQ)
    return {
        "residual": (randomize(Residual()), img),
        "concat": (ConcatTwo().eval(), img),
        "cat_self": (CatSelf().eval(), img),
        "unequal_split": (UnequalSplit().eval(), img),
        "chunk": (Chunk().eval(), img),
        "hard_coded_view": (HardCodedView().eval(), img),
        "flatten_linear": (FlattenLinear().eval(), img),
        "permute": (Permute().eval(), img),
        "channel_shuffle": (ChannelShuffle().eval(), img),
        "pixel_shuffle": (PixelShuffle().eval(), img),
        "grouped_after_residual": (GroupedAfterResidual().eval(), img),
        "se_block": (SEBlock().eval(), img),
        "shifted_windows": (ShiftedWindows().eval(), img),
        "matmul_attention": (MatmulAttention().eval(), seq),
        "sdpa": (SDPAAttention().eval(), seq),
        "mha": (MHA().eval(), torch.randn(2, 6, 8)),
        "gqa": (GQA().eval(), seq),
        "rotary": (Rotary().eval(), seq),
        "layer_scale": (LayerScale().eval(), torch.randn(2, 6, 8)),
        "no_rule": (NoRule().eval(), img),
        "layer_norm": (LayerNormMLP().eval(), torch.randn(2, 6, 8)),
        "selective_kernel": (SelectiveKernel().eval(), img),
        "affine": (Affine().eval(), torch.randn(2, 6, 8)),
        "pad_channels": (PadChannels().eval(), img),
        "recurrent": (Recurrent().eval(), torch.randn(2, 6, 8)),
        "token_aggregate": (TokenAggregate().eval(), img),
    }


# Whether pruning each micro model (ratio 0.5) must leave the output equal to the masked
# original's, written down from the model, not read from fxprune's report: only a norm,
# softmax or mean across the pruned channels makes a group inexact.
EXPECTED_EXACT: dict[str, bool] = {
    "residual": True,  # BatchNorm is per channel
    "concat": True,
    "cat_self": True,
    "unequal_split": True,
    "chunk": True,
    "hard_coded_view": True,
    "flatten_linear": True,
    "permute": True,
    "channel_shuffle": True,
    "pixel_shuffle": True,
    "grouped_after_residual": True,
    "se_block": True,  # the mean is over H, W, not over channels
    "shifted_windows": True,  # roll moves pixels, never channels
    "matmul_attention": True,  # softmax over keys; head_dim only enters q·k and attn·v sums
    "sdpa": True,
    "mha": True,
    "gqa": True,
    "rotary": True,
    "layer_scale": True,
    "no_rule": True,  # its channels are frozen; the rest is plain conv
    "layer_norm": False,  # LayerNorm normalises over the pruned channels
    "selective_kernel": True,  # the softmax runs over the stacked branches, not channels
    "affine": True,  # beta + alpha * x per channel; a pruned channel's beta is zero too
    "pad_channels": True,  # the constant channel is no channel of a; a's channels shift
    "recurrent": True,  # a unit whose rows are zero stays zero from a zero initial state
    "token_aggregate": True,  # the 1x1 conv1d maps each channel position on its own
}
