"""``fxprune.save_pretrained``: a pruned transformers model saved as a genuine one.

A transformers model's shapes come from its config (``hidden_size``, ``intermediate_size``,
``num_attention_heads``, ``num_key_value_heads``, ``head_dim``). When a pruning is uniform
across layers, the pruned weights fit the same architecture with smaller values of those
fields, and ``AutoModel.from_pretrained`` can load it with no fxprune installed.

How the config is found, never guessed: candidate values are read off the pruned weights
(the embedding's width, the new sizes of every dim that had the original FFN width, the
query and key projections' rows over the head size or the head count), then each candidate
config is *checked*: a model of the original class is built from it, the pruned state_dict
must load into it with every key present and every shape equal, and its outputs on the
example inputs must equal the pruned module's (the oracle's tolerance). The first candidate
that passes is saved with ``save_pretrained`` (safetensors), into a folder written whole or
not at all (:class:`fxprune.files.ResultFolder`). When none passes, the error says what each
one failed on: a non-uniform pruning (layer 0 keeps 96 FFN channels, layer 1 keeps 64), or
an architecture whose config cannot express the result (BERT derives the head size from
``hidden_size / num_attention_heads``, so pruned heads of a kept hidden size cannot be
written; prune its FFN only, or keep the fxprune result format, :func:`fxprune.save`).
"""

from __future__ import annotations

import copy
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fxprune.errors import FxpruneError
from fxprune.files import ResultFolder
from fxprune.oracle import TOLERANCE, float_outputs

logger = logging.getLogger(__name__)

FIELDS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")
_QUERY = re.compile(r"(^|\.)(q_proj|query|q)\.weight$")
_KEY = re.compile(r"(^|\.)(k_proj|key|k)\.weight$")


class PretrainedError(FxpruneError):
    """A pruned model cannot be written as a transformers model of its original class."""


@dataclass
class SavedPretrained:
    """What :func:`save_pretrained` wrote: the folder, the config fields it changed
    ({field: (original, pruned)}) and the outputs' max abs error against the pruned module."""

    path: Path
    changed: dict[str, tuple[int, int]]
    max_error: float

    def __str__(self) -> str:
        fields = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in self.changed.items())
        return (
            f"saved {self.path} ({fields or 'no config change'}; outputs equal the pruned "
            f"module's, max abs error {self.max_error:.1e})"
        )


def save_pretrained(
    result: Any,
    original: nn.Module,
    path: str | os.PathLike,
    *,
    example_inputs: Any = None,
    force: bool = False,
) -> SavedPretrained:
    """Save ``result`` (from :func:`fxprune.prune`) as a transformers model of
    ``original``'s class with an updated config, loadable by ``from_pretrained``.

    ``original``: the unpruned transformers model (its class and config are the starting
    point; it is not modified). ``example_inputs``: inputs for the output check (default:
    the ones the result was pruned with). An existing folder is replaced only with
    ``force=True`` and only when it holds an earlier fxprune result.
    """
    config = getattr(original, "config", None)
    if config is None or not hasattr(original, "save_pretrained"):
        raise PretrainedError(
            f"save_pretrained needs the original transformers model (a PreTrainedModel with a "
            f"config), got {type(original).__name__}; use fxprune.save for other models."
        )
    inputs = (
        example_inputs if example_inputs is not None else getattr(result, "example_inputs", None)
    )
    if inputs is None:
        raise PretrainedError("save_pretrained needs example_inputs= for the output check.")
    state = {k: v.detach() for k, v in result.module.state_dict().items()}
    reference = _outputs(result.module, inputs)
    failures: list[str] = []
    for fields in candidates(original, state):
        model, why = _build(original, fields, state)
        if model is None:
            failures.append(f"{_describe(fields)}: {why}")
            continue
        err = _max_error(reference, _outputs(model, inputs))
        if err is None or err[0] > TOLERANCE * max(err[1], 1.0):
            failures.append(f"{_describe(fields)}: outputs differ from the pruned module's")
            continue
        changed = {k: (getattr(config, k), v) for k, v in fields.items() if getattr(config, k) != v}
        with ResultFolder(path, force=force, option="path") as rf:
            model.save_pretrained(rf.path)
            target = rf.commit()
        saved = SavedPretrained(target, changed, err[0])
        logger.info("%s", saved)
        return saved
    raise PretrainedError(
        f"the pruned {type(original).__name__} cannot be written as a "
        f"{getattr(config, 'model_type', '?')} config:\n  - "
        + "\n  - ".join(failures or ["no candidate config (no embedding or FFN found)"])
        + "\nPrune uniformly across layers (one ratio, no per-layer overrides); for BERT-style "
        "models, whose head size is hidden_size / num_attention_heads, prune the FFN only "
        "(ignore=[each layer's attention]). fxprune.save keeps any pruned model."
    )


def candidates(original: nn.Module, state: dict[str, torch.Tensor]) -> Iterator[dict[str, int]]:
    """Config values the pruned weights suggest, most likely first (see the module doc)."""
    config = original.config
    before = {k: v.shape for k, v in original.state_dict().items()}
    fields: dict[str, int] = {}
    emb = original.get_input_embeddings() if hasattr(original, "get_input_embeddings") else None
    emb_name = _name_of(original, getattr(emb, "weight", None))
    if emb_name in state:
        fields["hidden_size"] = int(state[emb_name].shape[1])
    ffn = getattr(config, "intermediate_size", None)
    if isinstance(ffn, int):
        sizes = _new_sizes(before, state, ffn, exclude=fields.get("hidden_size"))
        if len(sizes) == 1:
            fields["intermediate_size"] = sizes.pop()
        elif len(sizes) > 1:
            fields["intermediate_size"] = -1  # not uniform: no config can hold it
    heads = getattr(config, "num_attention_heads", None)
    kv = getattr(config, "num_key_value_heads", None) or heads
    hidden = getattr(config, "hidden_size", None)
    head_dim = getattr(config, "head_dim", None) or (hidden // heads if hidden and heads else None)
    q = _rows_of(state, _QUERY)
    k = _rows_of(state, _KEY)
    if not (heads and head_dim and q):
        yield fields
        return
    k = k or q * kv // heads
    explicit = getattr(config, "head_dim", None) is not None
    if q % head_dim == 0 and k % head_dim == 0:  # whole heads pruned, head size kept
        yield {**fields, **_heads(q // head_dim, k // head_dim, head_dim, explicit, kv != heads)}
    if q % heads == 0 and k % kv == 0 and q // heads == k // kv:  # head size pruned
        yield {**fields, **_heads(heads, kv, q // heads, explicit, kv != heads)}


def _heads(heads: int, kv: int, head_dim: int, explicit: bool, grouped: bool) -> dict[str, int]:
    out = {"num_attention_heads": heads}
    if grouped:
        out["num_key_value_heads"] = kv
    if explicit:
        out["head_dim"] = head_dim
    return out


def _rows_of(state: dict[str, torch.Tensor], pattern: re.Pattern) -> int | None:
    """Output rows of the first matching projection; every layer must agree (else None)."""
    rows = {int(t.shape[0]) for name, t in state.items() if pattern.search(name) and t.dim() == 2}
    return rows.pop() if len(rows) == 1 else None


def _new_sizes(before: dict, state: dict, size: int, exclude: int | None) -> set[int]:
    """New sizes of every dim of a 2-D weight that had ``size``, where it changed."""
    found = set()
    for name, shape in before.items():
        got = state.get(name)
        if got is None or len(shape) != 2:
            continue
        for d in (0, 1):
            if shape[d] == size and got.shape[d] != size and got.shape[d] != exclude:
                found.add(int(got.shape[d]))
    return found


def _name_of(module: nn.Module, tensor: torch.Tensor | None) -> str | None:
    if tensor is None:
        return None
    for name, p in module.named_parameters(remove_duplicate=False):
        if p is tensor:
            return name
    return None


def _build(
    original: nn.Module, fields: dict[str, int], state: dict[str, torch.Tensor]
) -> tuple[nn.Module | None, str]:
    """A model of ``original``'s class from its config with ``fields``, holding ``state``."""
    if any(v <= 0 for v in fields.values()):
        bad = [k for k, v in fields.items() if v <= 0]
        return None, f"{', '.join(bad)} differ between layers (the pruning is not uniform)"
    config = copy.deepcopy(original.config)
    for k, v in fields.items():
        setattr(config, k, v)
    try:
        model = type(original)(config)
    except Exception as exc:  # the class rejects the config (heads not dividing hidden, ...)
        return None, f"{type(original).__name__} rejects it ({_first_line(exc)})"
    want = model.state_dict()
    for name, t in state.items():
        if name in want and tuple(want[name].shape) != tuple(t.shape):
            return None, (
                f"{name} would be {list(want[name].shape)} but the pruned weight is {list(t.shape)}"
            )
    missing = [n for n in want if n not in state and not _tied(model, n)]
    if missing:
        return (
            None,
            f"{len(missing)} weights of the class are not in the pruned model ({missing[0]})",
        )
    model.load_state_dict(state, strict=False)
    return model.eval(), ""


def _tied(model: nn.Module, name: str) -> bool:
    """``name`` is a second name of a tensor (a tied LM head) that loads with the first."""
    tensors = dict(model.named_parameters(remove_duplicate=False))
    first = dict(model.named_parameters())
    return name in tensors and name not in first


def _outputs(module: nn.Module, inputs: Any) -> list[torch.Tensor]:
    config = getattr(module, "config", None)
    cache = getattr(config, "use_cache", None)
    if cache:
        config.use_cache = False  # the traced module returns no key/value cache either
    try:
        return float_outputs(module, inputs)
    finally:
        if cache:
            config.use_cache = cache


def _max_error(a: list[torch.Tensor], b: list[torch.Tensor]) -> tuple[float, float] | None:
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return None
    err = max((float((x - y).abs().max()) for x, y in zip(a, b) if x.numel()), default=0.0)
    scale = max((float(x.abs().max()) for x in a if x.numel()), default=0.0)
    return err, scale


def _describe(fields: dict[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in fields.items()) or "the original config"


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
