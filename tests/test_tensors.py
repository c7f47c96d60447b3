"""set_tensor: a parameter stays a parameter, a buffer a buffer, tied names stay tied."""

from __future__ import annotations

import logging

import torch
from torch import nn

from fxprune.tensors import get_tensor, owner_of, set_tensor

logger = logging.getLogger(__name__)


def test_set_tensor_keeps_the_kind_and_requires_grad() -> None:
    net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    net[0].bias.requires_grad_(False)
    keys = list(net.state_dict())
    set_tensor(net, "0.weight", torch.ones(2, 4))
    set_tensor(net, "0.bias", torch.zeros(2))
    set_tensor(net, "1.running_mean", torch.full((3,), 5.0))
    assert isinstance(net[0].weight, nn.Parameter) and net[0].weight.requires_grad
    assert isinstance(net[0].bias, nn.Parameter) and not net[0].bias.requires_grad
    assert "running_mean" in net[1]._buffers and float(net[1].running_mean[0]) == 5.0
    assert list(net.state_dict()) == keys
    assert owner_of(net, "1.running_mean") == (net[1], "running_mean")
    assert get_tensor(net, "0.weight").shape == (2, 4) and get_tensor(net, "2.weight") is None


def test_one_cache_keeps_tied_names_tied() -> None:
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    net[1].weight = net[0].weight
    cache: dict = {}
    set_tensor(net, "0.weight", torch.eye(4), cache)
    set_tensor(net, "1.weight", torch.eye(4), cache)
    assert net[0].weight is net[1].weight and torch.equal(net[1].weight, torch.eye(4))
