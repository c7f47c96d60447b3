"""The torch.compile backend, the lossless dead-channel pass and the mask workflow."""

from __future__ import annotations

import logging
import time

import pytest
import torch
import torchvision
from micro_models import randomize
from torch import nn

import fxprune
from fxprune.artifacts import DEAD_CHANNELS, GROUPS, PADDED_CHANNELS
from fxprune.backend import eliminate_dead_channels
from fxprune.pass_infra import PassContext
from fxprune.trace import trace


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compiled(model, be, *inputs):
    with torch.no_grad():
        return torch.compile(model, backend=be)(*inputs)


class Recorder:
    """A `then` backend that keeps every graph fxprune hands over (and runs it eagerly)."""

    def __init__(self) -> None:
        self.graphs: list[torch.fx.GraphModule] = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward

    def macs(self) -> int:
        return sum(fxprune.count_macs(gm) for gm in self.graphs)


class ConvBNNet(nn.Module):
    def __init__(self, breaks: bool = False) -> None:
        super().__init__()
        self.breaks = breaks
        self.c1, self.b1 = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.c3, self.b3 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        if self.breaks:
            torch._dynamo.graph_break()
        x = torch.relu(self.b3(self.c3(x)))
        return self.fc(x.mean((2, 3)))


def _kill(conv: nn.Conv2d, bn: nn.BatchNorm2d, channels: list[int]) -> None:
    """Zero the filters and the BN affine of ``channels`` (what a mask leaves)."""
    with torch.no_grad():
        conv.weight[channels] = 0
        bn.weight[channels] = 0
        bn.bias[channels] = 0


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_backend_output_equals_eager_on_torchvision(name):
    model = randomize(getattr(torchvision.models, name)().eval())
    x = torch.randn(1, 3, 64, 64)
    be = fxprune.backend(then="eager")
    with torch.no_grad():
        ref = model(x)
    torch.testing.assert_close(_compiled(model, be, x), ref, rtol=0, atol=1e-5)
    assert [g.mode for g in be.compiled] == ["inference"]


def test_graph_break_outputs_are_frozen_and_outputs_equal():
    model = randomize(ConvBNNet(breaks=True).eval())
    _kill(model.c2, model.b2, [0, 1, 2])  # dead, but they cross the graph break
    _kill(model.c3, model.b3, [4, 5])  # dead inside the second graph
    x = torch.randn(1, 3, 16, 16)
    rec = Recorder()
    be = fxprune.backend(then=rec)
    with torch.no_grad():
        ref = model(x)
    torch.testing.assert_close(_compiled(model, be, x), ref, rtol=0, atol=1e-5)
    assert [g.mode for g in be.compiled] == ["inference", "inference"]
    assert [g.dead_channels for g in be.compiled] == [0, 2]
    first = rec.graphs[0]
    assert fxprune.count_macs(first) == be.compiled[0].macs_before  # nothing cut before the break


def test_graph_break_reason_is_recorded():
    gm = trace(ConvBNNet().eval(), torch.randn(1, 3, 8, 8))
    ctx = PassContext(torch.randn(1, 3, 8, 8))
    eliminate_dead_channels().run(gm, ctx)
    assert ctx[DEAD_CHANNELS] == {}
    reasons = {g.reason for g in ctx[GROUPS] if not g.prunable}
    assert any("graph break" in r for r in reasons)


def test_masked_model_compiles_to_fewer_macs_with_the_same_output():
    model = randomize(torchvision.models.resnet18().eval())
    x = torch.randn(1, 3, 64, 64)
    plain = Recorder()
    _compiled(model, fxprune.backend(then=plain), x)
    torch._dynamo.reset()
    masks = fxprune.mask_channels(model, x, ratio=0.5)
    assert masks.masks
    with torch.no_grad():
        ref = model(x)
    rec = Recorder()
    be = fxprune.backend(then=rec)
    torch.testing.assert_close(_compiled(model, be, x), ref, rtol=0, atol=1e-5)
    assert rec.macs() < 0.4 * plain.macs()
    assert be.compiled[0].macs_after == rec.macs()


def test_recompile_on_a_new_batch_size_reruns_the_passes():
    model = randomize(ConvBNNet().eval())
    _kill(model.c1, model.b1, [0, 3])
    be = fxprune.backend(then="eager")
    compiled = torch.compile(model, backend=be)
    with torch.no_grad():
        for batch in (1, 3, 5):
            x = torch.randn(batch, 3, 16, 16)
            torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=1e-5)
    assert len(be.compiled) >= 2
    assert all(g.mode == "inference" and g.dead_channels == 2 for g in be.compiled)


def test_weights_changed_in_place_rerun_the_passes():
    model = randomize(ConvBNNet().eval())
    be = fxprune.backend(then="eager")
    compiled = torch.compile(model, backend=be)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        compiled(x)
        _kill(model.c1, model.b1, [1])
        torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=1e-5)
    assert [g.dead_channels for g in be.compiled] == [0, 1]


def test_training_mode_keeps_shapes_and_says_so_once(caplog):
    model = randomize(ConvBNNet()).train()
    _kill(model.c1, model.b1, [0])
    shapes = {n: p.shape for n, p in model.named_parameters()}
    be = fxprune.backend(then="eager")
    compiled = torch.compile(model, backend=be)
    with caplog.at_level(logging.INFO, logger="fxprune.backend"):
        for _ in range(2):
            out = compiled(torch.randn(2, 3, 16, 16))
            out.sum().backward()
    assert out.shape == (2, 10)
    assert {n: p.shape for n, p in model.named_parameters()} == shapes
    assert model.c1.weight.grad is not None
    assert {g.mode for g in be.compiled} == {"training"}
    assert sum("grad mode is on" in r.message for r in caplog.records) == 1


def test_unhandled_graph_falls_through_with_one_warning(caplog):
    model = randomize(ConvBNNet(breaks=True)).train()  # BN updates its buffers: no folding
    be = fxprune.backend(then="eager")
    x = torch.randn(2, 3, 16, 16)
    with caplog.at_level(logging.WARNING, logger="fxprune.backend"):
        out = _compiled(model, be, x)
    assert out.shape == (2, 10)
    assert [g.mode for g in be.compiled] == ["unchanged", "unchanged"]
    assert "batch_norm" in be.compiled[0].reason or "writes" in be.compiled[0].reason
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


def test_dead_channel_needs_the_batch_norm_to_map_zero_to_zero():
    model = randomize(ConvBNNet().eval())
    with torch.no_grad():
        model.c1.weight[[0, 1]] = 0  # zero filters, no bias
        model.b1.bias[0] = 0.0
        model.b1.running_mean[0] = 0.0  # BN(0) = 0 at channel 0 ...
        model.b1.bias[1] = 0.5  # ... but 0.5 at channel 1: a constant, not dead
    x = torch.randn(2, 3, 16, 16)
    res = fxprune.apply_masks(model, x)
    assert res.dead_channels == 1
    assert res.kept["c1.weight"][0].tolist() == list(range(1, 16))
    torch.testing.assert_close(res.module(x), model(x), rtol=0, atol=1e-5)


def test_channels_nobody_reads_are_dead_whatever_their_producers_hold():
    model = randomize(ConvBNNet().eval())
    with torch.no_grad():
        model.c2.weight[:, [3, 4]] = 0  # c2 reads nothing of channels 3 and 4 of c1/b1
    x = torch.randn(2, 3, 16, 16)
    assert bool((model.c1.weight[[3, 4]] != 0).all())  # their producers are live
    res = fxprune.apply_masks(model, x)
    assert res.dead_channels == 2
    assert 3 not in res.kept["c1.weight"][0].tolist() and 4 not in res.kept["c2.weight"][1]
    torch.testing.assert_close(res.module(x), model(x), rtol=0, atol=1e-5)
    be = fxprune.backend(then=Recorder())  # the same in the graph Dynamo captures
    torch.testing.assert_close(_compiled(model, be, x), model(x), rtol=0, atol=1e-5)
    assert be.compiled[0].dead_channels == 2


class ReadElsewhere(ConvBNNet):
    """The first block's channels are read by c2 and also summed over: not unread."""

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        y = torch.relu(self.b2(self.c2(x)))
        return self.fc(y.mean((2, 3))) + x.sum(1).mean((1, 2)).unsqueeze(1)


def test_a_channel_read_by_anything_but_zero_columns_is_not_dead():
    model = randomize(ReadElsewhere().eval())
    with torch.no_grad():
        model.c2.weight[:, [3, 4]] = 0
    x = torch.randn(2, 3, 16, 16)
    res = fxprune.apply_masks(model, x)
    assert res.dead_channels == 0
    torch.testing.assert_close(res.module(x), model(x), rtol=0, atol=1e-5)


def test_mask_channels_keeps_zeros_through_training_and_apply_masks_cuts_them():
    model = randomize(ConvBNNet())
    x = torch.randn(4, 3, 16, 16)
    masks = fxprune.mask_channels(model, x, ratio=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(3):
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()
    zero = model.c1.weight.flatten(1).abs().sum(1) == 0
    assert int(zero.sum()) == 8 and bool((model.b1.weight[zero] == 0).all())
    model.eval()
    res = fxprune.apply_masks(model, x)
    assert res.dead_channels == sum(n for n, _ in masks.channels.values())
    assert res.macs_after < 0.5 * res.macs_before
    torch.testing.assert_close(res.module(x), model(x), rtol=1e-5, atol=1e-5)
    assert isinstance(model.c1, torch.nn.utils.parametrize.type_before_parametrizations(model.c1))


def test_soft_masks_may_revive():
    model = randomize(ConvBNNet())
    x = torch.randn(4, 3, 16, 16)
    fxprune.mask_channels(model, x, ratio=0.5, soft=True)
    assert not torch.nn.utils.parametrize.is_parametrized(model.c1)
    zero = model.c1.weight.flatten(1).abs().sum(1) == 0
    assert int(zero.sum()) == 8
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    (model(x).sum() + (model.c1.weight - 1).pow(2).sum()).backward()  # any gradient revives
    opt.step()
    assert bool((model.c1.weight[zero] != 0).all())


def test_inductor_compile_of_a_masked_tiny_model():
    model = randomize(ConvBNNet().eval())
    x = torch.randn(1, 3, 16, 16)
    fxprune.mask_channels(model, x, ratio=0.5)
    be = fxprune.backend(then="inductor")
    start = time.perf_counter()
    with torch.no_grad():
        out = torch.compile(model, backend=be)(x)
        ref = model(x)
    elapsed = time.perf_counter() - start
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    assert be.compiled[0].macs_after < be.compiled[0].macs_before
    assert elapsed < 120, f"inductor compile took {elapsed:.0f}s"


def test_prune_mask_mode_masks_what_a_cut_removes_and_apply_masks_cuts_it():
    model = randomize(ConvBNNet().eval())
    x = torch.randn(2, 3, 16, 16)
    cut = fxprune.prune(model, x, ratio=0.5, round_to=4, ignore=[model.fc])
    masks = fxprune.prune(model, x, ratio=0.5, round_to=4, ignore=[model.fc], mode="mask")
    assert isinstance(masks, fxprune.ChannelMasks)
    assert torch.nn.utils.parametrize.is_parametrized(model.c1)  # masked in the model itself
    res = fxprune.apply_masks(model, x)
    assert res.kept["c1.weight"][0].tolist() == cut.kept["c1.weight"][0].tolist()
    assert res.macs_after == cut.report.macs_after
    torch.testing.assert_close(res.module(x), model(x), rtol=0, atol=1e-5)


def test_prune_mask_mode_refuses_options_that_only_a_cut_has():
    model = ConvBNNet()
    with pytest.raises(fxprune.PruneError, match=r"does not take align=, target_macs="):
        fxprune.prune(model, torch.randn(1, 3, 8, 8), target_macs=0.5, align="pad", mode="mask")
    with pytest.raises(fxprune.PruneError, match="mode must be one of"):
        fxprune.prune(model, torch.randn(1, 3, 8, 8), mode="masks")
    assert not torch.nn.utils.parametrize.is_parametrized(model.c1)


class Narrow(nn.Module):
    """60 and 12 channels: not multiples of 8; a sigmoid gate on the second block."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 60, 3, padding=1), nn.BatchNorm2d(60)
        self.c2, self.b2 = nn.Conv2d(60, 12, 3, padding=1), nn.BatchNorm2d(12)
        self.c3 = nn.Conv2d(12, 20, 1)
        self.fc = nn.Linear(20, 5)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.sigmoid(
            self.b2(self.c2(x))
        )  # sigmoid(0) = 0.5: zero channels would not stay zero
        x = torch.relu(self.c3(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def test_alignment_padding_grows_groups_with_zero_channels_and_keeps_the_output():
    from fxprune.backend import pad_channels

    model = randomize(Narrow().eval())
    x = torch.randn(2, 3, 8, 8)
    gm = trace(model, x)
    with torch.no_grad():
        ref = model(x)
    ctx = PassContext(x)
    pad_channels(8).run(gm, ctx)
    shapes = {n: tuple(p.shape) for n, p in gm.named_parameters()}
    assert shapes["c1.weight"] == (64, 3, 3, 3) and shapes["b1.weight"] == (64,)
    assert shapes["c2.weight"] == (12, 64, 3, 3)  # sigmoid: the 12 stay 12
    assert shapes["c3.weight"] == (24, 12, 1, 1) and shapes["fc.weight"] == (5, 24)
    assert gm.get_submodule("c1").out_channels == 64 and gm.get_submodule("b1").num_features == 64
    with torch.no_grad():
        torch.testing.assert_close(gm(x), ref, rtol=0, atol=1e-6)
    assert sorted(ctx[PADDED_CHANNELS].values()) == [4, 4]


def test_the_backend_pads_when_asked_and_outputs_stay_equal():
    model = randomize(Narrow().eval())
    x = torch.randn(2, 3, 8, 8)
    rec = Recorder()
    be = fxprune.backend(then=rec, round_to=8)
    torch.testing.assert_close(_compiled(model, be, x), model(x), rtol=0, atol=1e-5)
    assert be.compiled[0].padded_channels == 8
    assert be.compiled[0].macs_after > be.compiled[0].macs_before  # more work, aligned


class Reshaped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 60, 1), nn.Conv2d(60, 8, 1)

    def forward(self, x):
        y = torch.relu(self.c1(x))
        y = y.reshape(y.shape[0], 60, -1).reshape(y.shape)  # a channel count in the graph
        return self.c2(y)


def test_a_group_whose_channel_count_is_written_in_the_graph_is_not_padded():
    from fxprune.backend import pad_channels

    gm = trace(Reshaped().eval(), torch.randn(1, 3, 4, 4))
    ctx = PassContext(torch.randn(1, 3, 4, 4))
    pad_channels(8).run(gm, ctx)
    assert ctx[PADDED_CHANNELS] == {}
    assert gm.get_parameter("c1.weight").shape[0] == 60


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(128, 128), nn.Linear(128, 64)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _two_four(model: MLP) -> MLP:
    """fc1's weight made 2:4 along its input features (the two largest of every four kept)."""
    with torch.no_grad():
        w = model.fc1.weight.view(-1, 4)
        drop = w.abs().argsort(-1)[:, :2]
        w.scatter_(1, drop, 0)
    return model


def test_two_four_detection():
    from fxprune.passes.semi_structured import is_two_four

    model = _two_four(MLP())
    assert is_two_four(model.fc1.weight) and not is_two_four(model.fc2.weight)


def test_two_four_lowering_is_skipped_on_cpu_with_the_reason():
    model = _two_four(MLP()).eval()
    x = torch.randn(4, 128)
    be = fxprune.backend(then=Recorder())
    torch.testing.assert_close(_compiled(model, be, x), model(x), rtol=0, atol=1e-5)
    reasons = set(be.compiled[0].semi_structured.values())
    assert reasons == {"the weight is not on a CUDA GPU (2:4 kernels need one)"}


@pytest.mark.gpu(reason="needs an NVIDIA GPU (2:4 kernels)")
def test_two_four_weights_are_lowered_to_semi_structured_tensors_on_a_gpu():
    model = _two_four(MLP()).eval().half().cuda()
    x = torch.randn(64, 128, dtype=torch.float16, device="cuda")
    be = fxprune.backend(then="eager")
    with torch.no_grad():
        ref = model(x)
        out = torch.compile(model, backend=be)(x)
    reasons = sorted(be.compiled[0].semi_structured.values())  # keyed by Dynamo's names
    assert reasons[0] == "converted" and reasons[1].startswith("not 2:4"), reasons
    torch.testing.assert_close(out, ref, rtol=1e-2, atol=1e-2)
