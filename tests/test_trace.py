"""Tracing frontends: fx, export, the auto fallback, and clear errors."""

from __future__ import annotations

import logging

import pytest
import torch
import torchvision
from snapshots import make_snapshots
from torch import nn

import fxprune
from fxprune import meta


class DataDependent(nn.Module):
    """Python control flow on a tensor value: fx cannot trace it, torch.export can (torch.cond)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x):
        y = self.conv(x)
        if y.shape[-1] > 2:  # shape-dependent control flow: fine for export, not for fx
            y = y.relu()
        return y + 1


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x):
        y = self.conv(x)
        return y[: int(y.sum().item() > 0) + 1]  # data-dependent slicing: breaks both frontends


def test_fx_frontend_records_shapes():
    m = torchvision.models.resnet18().eval()
    gm = fxprune.trace(m, torch.randn(1, 3, 224, 224), frontend="fx")
    assert gm.meta["fxprune.frontend"] == "fx"
    node = next(n for n in gm.graph.nodes if n.target == "layer1.0.conv1")
    assert meta.shape_of(node) == (1, 64, 56, 56)
    assert all(meta.shape_of(n) is not None for n in gm.graph.nodes if n.op == "call_module")


def test_export_frontend_records_shapes():
    m = torchvision.models.resnet18().eval()
    gm = fxprune.trace(m, torch.randn(1, 3, 64, 64), frontend="export")
    assert gm.meta["fxprune.frontend"] == "export"
    convs = [n for n in gm.graph.nodes if n.op == "call_function" and "conv" in n.name]
    assert convs and meta.shape_of(convs[0]) == (1, 64, 32, 32)


def test_auto_falls_back_to_export_and_says_why(caplog):
    m = DataDependent().eval()
    with caplog.at_level(logging.INFO, logger="fxprune.trace"):
        gm = fxprune.trace(m, torch.randn(1, 3, 8, 8))
    assert gm.meta["fxprune.frontend"] == "export"
    assert any("falling back to torch.export" in r.getMessage() for r in caplog.records)
    x = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(gm(x), m(x))


def test_trace_error_names_the_user_line_and_the_fix():
    with pytest.raises(fxprune.TraceError) as info:
        fxprune.trace(Untraceable().eval(), torch.randn(1, 3, 8, 8))
    text = str(info.value)
    assert "fx:" in text and "export:" in text
    assert "test_trace.py" in text  # the user's source line
    assert "leaf_modules" in text and "concrete_args" in text


def test_bad_arguments_get_clear_errors():
    with pytest.raises(fxprune.TraceError, match="unknown frontend"):
        fxprune.trace(nn.Linear(2, 2), torch.randn(1, 2), frontend="jit")
    with pytest.raises(fxprune.TraceError, match=r"torch\.nn\.Module"):
        fxprune.trace(lambda x: x, torch.randn(1))
    with pytest.raises(fxprune.TraceError, match="example_inputs"):
        fxprune.trace(nn.Linear(2, 2), 3)


def test_leaf_modules_and_dict_inputs():
    class Block(nn.Module):
        def forward(self, x, scale=1.0):
            return x * scale

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.block = Block()

        def forward(self, x, y=None):
            return self.block(self.lin(x)) + (0 if y is None else y)

    m = M().eval()
    gm = fxprune.trace(m, {"x": torch.randn(2, 4)}, frontend="fx", leaf_modules=[Block])
    assert any(n.op == "call_module" and n.target == "block" for n in gm.graph.nodes)
    x = torch.randn(2, 4)
    torch.testing.assert_close(gm(x=x), m(x))


def test_the_model_is_not_modified():
    m = torchvision.models.mobilenet_v3_small().eval()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    fxprune.trace(m, torch.randn(1, 3, 64, 64))
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert not m.training


@pytest.mark.slow
def test_minilm_bert_needs_and_gets_the_export_frontend(minilm):
    model, inputs = minilm
    with pytest.raises(fxprune.TraceError):
        fxprune.trace(model, inputs, frontend="fx")
    gm = fxprune.trace(model, inputs)
    assert gm.meta["fxprune.frontend"] == "export"
    with torch.no_grad():
        want = model(**inputs).last_hidden_state
        got = gm(**inputs)
    got = got[0] if isinstance(got, (tuple, list)) else got.last_hidden_state
    torch.testing.assert_close(got, want)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(make_snapshots.MODELS))
def test_analysis_and_pruning_match_the_pinned_snapshot(name):
    """Groups, prunable and exact fractions, MACs and params on a dozen architectures.

    Every torchvision classifier is traced and analysed by bench/sweep_analysis.py; these
    pin the numbers, so a change in what the analysis finds fails here.
    """
    want = make_snapshots.load()[name]
    got = make_snapshots.snapshot(name)
    lines = make_snapshots.differences(want, got)
    assert not lines, make_snapshots.mismatch_message(name, lines)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", ["fcn_resnet50", "deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large"]
)
def test_segmentation_models_analyse_and_prune(name):
    from conftest import assert_oracle
    from micro_models import randomize

    m = randomize(torchvision.models.get_model(name, weights=None, weights_backbone=None))
    x = torch.randn(1, 3, 96, 96)
    res = fxprune.prune(m, x, ratio=0.5, round_to=8)
    assert res.report.macs_ratio > 3
    assert_oracle(m, res, x)


class BlockInFloat32(nn.Module):
    """A layer run in an ``autocast(enabled=False)`` block (as EfficientViT's LiteMLA runs
    its attention), which torch.export wraps in a higher-order op the channel rules cannot
    see into."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.mid, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 8)

    def forward(self, x):
        h = self.fc1(x)
        with torch.autocast("cpu", enabled=False):
            h = self.mid(torch.relu(h.float()))
        return self.fc2(torch.relu(h).to(x.dtype))


def test_an_autocast_block_is_inlined_and_still_disables_autocast():
    torch.manual_seed(0)
    model = BlockInFloat32().eval()
    x = torch.randn(1, 6, 16)
    gm = fxprune.trace(model, x, frontend="export")
    targets = [str(n.target) for n in gm.graph.nodes]
    assert not any("wrap_with_autocast" in t for t in targets)
    assert any("_enter_autocast" in t for t in targets)
    assert any("_exit_autocast" in t for t in targets)
    res = fxprune.prune(model, x, ratio=0.5, frontend="export")
    assert len(res.kept["fc1.weight"][0]) == 16 and len(res.kept["mid.weight"][0]) == 16
    assert fxprune.verify(model, res, x).exact
    # the block's layer still runs between entering and leaving autocast(enabled=False)
    order = [str(n.target) for n in res.module.graph.nodes]
    enter = next(i for i, t in enumerate(order) if "_enter_autocast" in t)
    leave = next(i for i, t in enumerate(order) if "_exit_autocast" in t)
    linears = [i for i, t in enumerate(order) if "linear" in t]
    assert linears[0] < enter < linears[1] < leave < linears[2]
    mode = next(n for n in res.module.graph.nodes if "_enter_autocast" in str(n.target))
    assert mode.args[2] is False  # enabled=False
