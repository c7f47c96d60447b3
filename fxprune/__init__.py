"""fxprune: structured pruning as torch.fx compiler passes, verified and lowered to ONNX/TensorRT.

gm = fxprune.trace(model, example_inputs)
analysis = fxprune.analyze(model, example_inputs)
res = fxprune.prune(model, example_inputs, ratio=0.5, round_to=8)
fxprune.verify(model, res, example_inputs)  # the correctness oracle
"""

from __future__ import annotations

import logging

from fxprune._version import __version__
from fxprune.analysis import ChannelAnalysis, analyze
from fxprune.backend import CompiledGraph, FxpruneBackend, backend
from fxprune.channels import Member, PruneGroup
from fxprune.errors import (
    ExportError,
    FxpruneError,
    PassError,
    PruneError,
    TraceError,
    VerificationError,
)
from fxprune.masks import AppliedMasks, ChannelMasks, apply_masks, mask_channels, remove_masks
from fxprune.oracle import VerificationReport, verify
from fxprune.pass_infra import (
    DumpGraphs,
    Pass,
    PassContext,
    PassManager,
    PassResult,
    PrintAfterEach,
    TimePasses,
)
from fxprune.pretrained import PretrainedError, SavedPretrained, save_pretrained
from fxprune.prune import Pruner, PruneResult, prune
from fxprune.recipes import RecipeError, run_recipe
from fxprune.report import PruneReport, count_macs, count_params
from fxprune.saving import load, save
from fxprune.sparsify import SparsifyResult, sparsify
from fxprune.trace import trace

logging.getLogger(__name__).addHandler(logging.NullHandler())

_SUBMODULES = ("debug", "export", "models", "passes")


def __getattr__(name: str):
    # fxprune.export.to_onnx(...) after a bare `import fxprune`, without importing
    # onnx / TensorRT / matplotlib for users who never lower or benchmark.
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f"fxprune.{name}")
    raise AttributeError(f"module 'fxprune' has no attribute {name!r}")


__all__ = [
    "AppliedMasks",
    "ChannelAnalysis",
    "ChannelMasks",
    "CompiledGraph",
    "DumpGraphs",
    "ExportError",
    "FxpruneBackend",
    "FxpruneError",
    "Member",
    "Pass",
    "PassContext",
    "PassError",
    "PassManager",
    "PassResult",
    "PretrainedError",
    "PrintAfterEach",
    "PruneError",
    "PruneGroup",
    "PruneReport",
    "PruneResult",
    "Pruner",
    "RecipeError",
    "SavedPretrained",
    "SparsifyResult",
    "TimePasses",
    "TraceError",
    "VerificationError",
    "VerificationReport",
    "__version__",
    "analyze",
    "apply_masks",
    "backend",
    "count_macs",
    "count_params",
    "load",
    "mask_channels",
    "prune",
    "remove_masks",
    "run_recipe",
    "save",
    "save_pretrained",
    "sparsify",
    "trace",
    "verify",
]
