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


class Repeated(nn.Module):
    """Channels 0-3 of ``a`` are read twice by ``c`` (a concat of ``y`` and its first half),
    so they cover two positions of ``c``'s input where channels 4-7 cover one."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1, bias=False)
        self.c = nn.Conv2d(12, 4, 1, bias=False)
        with torch.no_grad():
            self.a.weight.fill_(1.0)
            self.c.weight.fill_(1.0)
            self.a.weight[4:] *= 1.1  # channels 4-7: slightly larger per position

    def forward(self, x):
        y = self.a(x)
        return self.c(torch.cat([y, y[:, :4]], 1))


def test_a_channel_covering_more_positions_does_not_outscore_the_others():
    """Magnitude is averaged over a channel's positions: summed, channels 0-3 would score
    about twice the others for being read twice, and would always be kept."""
    model, x = Repeated().eval(), torch.randn(1, 3, 4, 4)
    res = fxprune.prune(model, x, ratio=0.5)
    kept = set(res.kept["a.weight"][0].tolist())
    assert {4, 5, 6, 7} <= kept and len(kept & {0, 1, 2, 3}) <= 1  # 6 of the 12 positions
    assert "masked original" in res.report.verified


def test_shufflenet_stage_outputs_are_pruned_to_half():
    """ShuffleNet's channel shuffle makes later units hold the low-index channels of a
    stage at many positions; scored by their sum those were all kept (2.3-2.5x fewer MACs)."""
    import torchvision
    from micro_models import randomize

    model = randomize(torchvision.models.shufflenet_v2_x0_5())
    x = torch.randn(1, 3, 96, 96)
    res = fxprune.prune(model, x, ratio=0.5, round_to=8, ignore=[model.fc])
    assert res.report.macs_before / res.report.macs_after >= 2.6
    assert "masked original" in res.report.verified
