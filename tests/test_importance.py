"""Magnitude importance scores weights: running statistics and biases do not keep a channel."""

from __future__ import annotations

import torch
from torch import nn

import fxprune


class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))))


def _weak_channel_with_loud_statistics() -> ConvBN:
    torch.manual_seed(0)
    model = ConvBN().eval()
    with torch.no_grad():
        model.conv.weight[5].mul_(1e-3)  # channel 5 contributes almost nothing ...
        model.bn.running_var[5] = 1e6  # ... but its statistics are huge
        model.bn.running_mean[5] = 1e3
        model.conv.bias[5] = 1e3
    return model


def test_l2_cuts_the_weak_channel_whatever_its_statistics_and_bias():
    model, x = _weak_channel_with_loud_statistics(), torch.randn(1, 3, 8, 8)
    res = fxprune.prune(model, x, ratio=0.5, importance="l2")
    assert 5 not in res.kept["conv.weight"][0].tolist()
    fxprune.verify(model, res, x)


def test_l1_and_taylor_follow_the_same_rule():
    model, x = _weak_channel_with_loud_statistics(), torch.randn(1, 3, 8, 8)
    res = fxprune.prune(model, x, ratio=0.5, importance="l1")
    assert 5 not in res.kept["conv.weight"][0].tolist()
    batches = [torch.randn(2, 3, 8, 8) for _ in range(2)]
    res = fxprune.prune(
        model,
        x,
        ratio=0.5,
        importance="taylor",
        calibration=batches,
        loss_fn=lambda out, batch: out.pow(2).mean(),
    )
    assert 5 not in res.kept["conv.weight"][0].tolist()
