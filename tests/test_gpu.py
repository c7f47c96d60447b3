"""On an NVIDIA GPU (``pytest -m gpu``): pruning and the oracle on CUDA tensors, pruned models
in fp16 channels_last, and the TensorRT-free 2:4 path end to end (sparsify, the compile
backend's semi-structured lowering, sparse tensor cores). Every test here skips without CUDA.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from micro_models import randomize

import fxprune
from fxprune import VerificationError
from fxprune.passes.semi_structured import SemiStructuredPass, is_two_four

pytestmark = pytest.mark.gpu


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm())


def test_prune_on_cuda_tensors_is_verified_by_the_oracle_and_the_oracle_catches_a_bad_slice():
    model = randomize(torchvision.models.resnet18()).cuda()
    x = torch.randn(2, 3, 64, 64, device="cuda")
    res = fxprune.prune(model, x, ratio=0.5, round_to=8, ignore=[model.fc])  # verify=True
    assert next(res.module.parameters()).is_cuda
    assert res.module.get_submodule("layer1.0.conv1").weight.shape[0] == 32
    report = fxprune.verify(model, res, x)
    assert report.exact and report.max_error <= 1e-4 * max(report.scale, 1.0)
    with torch.no_grad():
        res.module.get_submodule("layer1.0.conv1").weight[3, 1, 0, 0] += 0.25
    with pytest.raises(VerificationError, match=r"layer1\.0\.conv1\.weight"):
        fxprune.verify(model, res, x)


@pytest.mark.parametrize("align", ["round", "pad"])
def test_pruned_model_runs_in_fp16_channels_last_close_to_fp32(align):
    model = randomize(torchvision.models.resnet50())
    x = torch.randn(1, 3, 96, 96)
    res = fxprune.prune(model, x, ratio=0.5, round_to=8, align=align, ignore=[model.fc])
    widths = [m.out_channels for m in res.module.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(w % 8 == 0 for w in widths)
    fast = copy.deepcopy(res.module).cuda().half().to(memory_format=torch.channels_last)
    xs = torch.randn(8, 3, 96, 96)
    with torch.inference_mode():
        want = res.module(xs)
        got = fast(xs.cuda().half().to(memory_format=torch.channels_last)).float().cpu()
    assert rel_error(got, want) < 1e-2


def test_sparsified_transformer_runs_on_sparse_tensor_cores_end_to_end():
    """sparsify (2:4) → its weights in the model, fp16 on the GPU → torch.compile with
    fxprune.backend's semi-structured lowering: every 2:4 Linear is converted to a
    cuSPARSELt tensor and the outputs match the dense run of the same masked weights."""
    from transformers import BertConfig, BertModel

    config = BertConfig(
        hidden_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=512,
        vocab_size=512,
    )
    model = BertModel(config, add_pooling_layer=False).eval()

    class LastHidden(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = model

        def forward(self, input_ids):
            return self.bert(input_ids=input_ids).last_hidden_state

    wrapped = LastHidden()
    sp = fxprune.sparsify(wrapped, torch.randint(0, 512, (1, 32)), pattern="2:4", permute=False)
    dense = copy.deepcopy(wrapped)
    dense.load_state_dict(sp.module.state_dict())  # the original keys
    dense = dense.cuda().half().eval()
    linears = [m for m in dense.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 12 and all(is_two_four(m.weight) for m in linears)
    be = fxprune.backend(passes=[SemiStructuredPass()], then="eager", round_to=1)
    lowered = torch.compile(copy.deepcopy(dense), backend=be)
    x = torch.randint(0, 512, (4, 128), device="cuda")
    with torch.inference_mode():
        want, got = dense(x), lowered(x)
    reasons = [r for g in be.compiled for r in g.semi_structured.values()]
    assert reasons.count("converted") == len(linears), reasons
    assert rel_error(got.float(), want.float()) < 1e-2
