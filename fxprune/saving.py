"""``fxprune.save`` / ``fxprune.load``: pruned models on disk without pickle.

A saved result is a folder, written whole or not at all (:class:`fxprune.files.ResultFolder`):

``model.safetensors``   the pruned module's state_dict, under the original parameter names
``plan.json``           how to rebuild the module from the original: the frontend, the trace
                        options and, per pruning step, the keep / pad / drop state of every
                        channel group; fxprune and torch versions; the model spec when known
``inputs.safetensors``  the example inputs the plan was traced with
``kept.safetensors``    ``res.kept`` as int64 tensors named ``"<param>:<dim>"``

:func:`load` traces a fresh copy of the original model, replays the plan (no scoring, no
randomness) and loads the weights: nothing in the folder is ever executed, only JSON and
safetensors are read. Pickled modules (``torch.save`` of a module, ``torch.export`` ``.pt2``
archives, whose loader falls back to pickle) load only with ``trust_pickle=True``.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import pickletools
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from fxprune._version import __version__
from fxprune.analysis import IgnoreSpec
from fxprune.errors import FxpruneError
from fxprune.files import MANIFEST, write_result
from fxprune.prune import PlanStage, PruneResult, replay_stages
from fxprune.trace import ExampleInputs, trace

logger = logging.getLogger(__name__)

FORMAT = "fxprune-result"
# v2: a step stores ``ignore`` (modules whose output channels stay) and ``freeze`` (names
# every channel of which stays); a v1 step's ``ignore`` froze every channel, and still does.
FORMAT_VERSION = 2
PLAN, WEIGHTS, INPUTS, KEPT = (
    "plan.json",
    "model.safetensors",
    "inputs.safetensors",
    "kept.safetensors",
)
_JSON_SCALARS = (bool, int, float, str, type(None))


class SaveError(FxpruneError):
    """A result cannot be saved, or a saved result cannot be loaded."""


def save(
    result: Any,
    path: str | os.PathLike,
    *,
    force: bool = False,
    model_spec: str | None = None,
    example_inputs: Any = None,
    extra_files: dict[str, bytes] | None = None,
) -> Path:
    """Write ``result`` to the folder ``path`` (see the module docstring); returns the folder.

    ``result``: a PruneResult (``fxprune.prune``, ``Pruner.step``) or a SparsifyResult
    (``fxprune.sparsify``; pass its ``example_inputs``). An existing folder is replaced only
    with ``force=True`` and only when it holds nothing but an earlier fxprune result.
    ``model_spec`` (e.g. ``"torchvision:resnet50"``) is recorded so that the command line can
    rebuild the original. ``extra_files``: more files (reports) written into the same folder
    in the same all-or-nothing step.
    """
    files = result_files(result, model_spec=model_spec, example_inputs=example_inputs)
    for name, data in (extra_files or {}).items():
        if name in files or name == MANIFEST or "/" in name or name.startswith("."):
            raise SaveError(f"extra file name {name!r} is reserved or not a plain file name.")
        files[name] = data
    return write_result(path, files, force=force, option="path")


def result_files(
    result: Any, *, model_spec: str | None = None, example_inputs: Any = None
) -> dict[str, bytes]:
    """The files of a saved result, by name (for writers that add their own to the folder)."""
    if not isinstance(result, PruneResult):
        result = _as_prune_result(result, example_inputs)
    if result.example_inputs is None:
        raise SaveError("this PruneResult has no example inputs recorded; prune it again.")
    if result.trace_options.get("parts"):
        raise SaveError(
            "this model was pruned part by part (it cannot be traced whole), and a plan "
            "replays one traced graph: it cannot be saved as an fxprune result yet. Save "
            "res.module.state_dict() with safetensors and rebuild the module by pruning the "
            "original again with the same options (it is deterministic)."
        )
    tensors, aliases = _dedup_state(result.module)
    return {
        WEIGHTS: st_save(tensors),
        INPUTS: _inputs_bytes(result.example_inputs),
        KEPT: kept_bytes(result.kept),
        PLAN: _plan_json(result, model_spec, aliases).encode(),
    }


def kept_bytes(kept: dict[str, dict[int, torch.Tensor]]) -> bytes:
    """``res.kept`` as safetensors: int64 tensors named ``"<param>:<dim>"``."""
    return st_save(
        {f"{p}:{d}": i.contiguous() for p, dims in kept.items() for d, i in dims.items()}
    )


def read_kept(path: str | os.PathLike) -> dict[str, dict[int, torch.Tensor]]:
    """``res.kept`` of a saved result (from ``kept.safetensors``)."""
    out: dict[str, dict[int, torch.Tensor]] = {}
    for key, idx in _read_tensors(Path(path) / KEPT).items():
        name, _, dim = key.rpartition(":")
        out.setdefault(name, {})[int(dim)] = idx
    return out


def _as_prune_result(result: Any, example_inputs: Any) -> PruneResult:
    """A result that kept the architecture (2:4 sparsify: permuted, masked weights)."""
    module = getattr(result, "module", None)
    if not isinstance(module, nn.Module) or not hasattr(result, "masks"):
        raise SaveError(
            f"fxprune.save expects the result of fxprune.prune, Pruner.step or fxprune.sparsify, "
            f"got {type(result).__name__}: the result carries what rebuilds the module without "
            f"pickle, a bare module does not."
        )
    if example_inputs is None:
        raise SaveError(
            "saving a sparsify result needs example_inputs= (the ones it was made with)."
        )
    return PruneResult(module, {}, result.report, example_inputs=ExampleInputs.of(example_inputs))


def load(
    path: str | os.PathLike, model: nn.Module | None = None, *, trust_pickle: bool = False
) -> nn.Module:
    """Rebuild a pruned module saved by :func:`save`; ``model`` is the original, freshly built.

    ``model`` is not modified (a copy is cut). Pickled files (an old ``model.pt``, a ``.pt2``
    archive) load only with ``trust_pickle=True``: unpickling can run any code the file holds.
    """
    path = Path(path)
    if path.is_dir() and (path / PLAN).exists():
        return _load_folder(path, model)
    if not path.exists():
        raise SaveError(f"no such file or folder: {path}")
    if path.is_dir():
        raise SaveError(f"{path} is a folder but holds no {PLAN}: it is not an fxprune result.")
    return load_pickle(path, trust_pickle)


def load_pickle(path: Path, trust_pickle: bool) -> nn.Module:
    """A pickled module (``torch.save`` / ``torch.export.save``), only when the user trusts it."""
    if not trust_pickle:
        imports = pickle_imports(path)
        if imports is None:
            raise SaveError(
                f"{path} is not a readable model file (truncated or corrupt, or not a PyTorch "
                f"file); fxprune reads result folders written by fxprune.save."
            )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                obj = torch.load(path, weights_only=True, map_location="cpu")
            except Exception:
                shown = ", ".join(imports[:4]) + (" ..." if len(imports) > 4 else "")
                raise SaveError(
                    f"{path} is a pickle that imports Python objects ({shown or 'code'}); "
                    f"loading it can run any code it contains, so fxprune refuses. If you made "
                    f"this file yourself, pass trust_pickle=True (command line: --trust-pickle); "
                    f"better, re-save the result with fxprune.save, which writes safetensors."
                ) from None
        raise SaveError(
            f"{path} holds a {type(obj).__name__} (weights only), not a model; build the model "
            f"in code (file.py:factory) and load the weights with load_state_dict."
        )
    warnings.warn(
        f"loading the pickle {path} with trust_pickle=True: it can run any code it contains; "
        f"do this only for files you made yourself.",
        stacklevel=3,
    )
    if path.suffix == ".pt2":
        try:
            return torch.export.load(path).module()
        except Exception as exc:
            raise SaveError(f"{path} is not a readable torch.export archive: {exc}") from None
    try:
        obj = torch.load(path, weights_only=False, map_location="cpu")
    except Exception as exc:
        raise SaveError(
            f"{path} is not a readable model file: {type(exc).__name__}: {exc}"
        ) from None
    if not isinstance(obj, nn.Module):
        raise SaveError(f"{path} holds a {type(obj).__name__}, not a module.")
    return obj


def pickle_imports(path: Path) -> list[str] | None:
    """The globals a pickle (or a torch zip archive's pickles) imports; None if unreadable.

    Reads opcodes with ``pickletools.genops``, which never executes anything.
    """
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                blobs = [z.read(n) for n in z.namelist() if n.endswith(".pkl")]
        else:
            blobs = [path.read_bytes()]
        found: list[str] = []
        for blob in blobs:
            strings: list[str] = []
            for op, arg, _ in pickletools.genops(blob):
                if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
                    strings.append(arg)
                elif op.name == "GLOBAL":
                    found.append(arg.replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(f"{strings[-2]}.{strings[-1]}")
        return [g for g in dict.fromkeys(found) if not g.startswith(("torch.", "collections."))]
    except Exception:
        return None


def read_plan(path: str | os.PathLike) -> dict[str, Any]:
    """The plan.json of a saved result, checked for format and version."""
    file = Path(path) / PLAN
    if not file.exists():
        raise SaveError(
            f"{path} is not an fxprune result (no {PLAN}); give a folder written by "
            f"fxprune.save or `fxprune prune --out`."
        )
    try:
        plan = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise SaveError(f"{file} is not a readable fxprune plan: {exc}") from None
    if not isinstance(plan, dict) or plan.get("format") != FORMAT:
        raise SaveError(f"{file} is not an fxprune plan (no 'format': '{FORMAT}').")
    if plan.get("format_version", 0) > FORMAT_VERSION:
        raise SaveError(
            f"{file} was written by fxprune {plan.get('fxprune')} in a newer format "
            f"(v{plan['format_version']}); upgrade fxprune to load it."
        )
    return plan


def read_inputs(path: str | os.PathLike) -> ExampleInputs:
    """The example inputs saved beside a plan."""
    plan = read_plan(path)
    tensors = _read_tensors(Path(path) / INPUTS)
    return _inputs_from(plan["inputs"], tensors)


def _load_folder(folder: Path, model: nn.Module | None) -> nn.Module:
    plan = read_plan(folder)
    if model is None:
        spec = plan.get("model") or plan.get("model_class")
        raise SaveError(
            f"fxprune.load({str(folder)!r}) needs the original model to rebuild the pruned one: "
            f"pass model=<a freshly built {spec}>."
        )
    if not isinstance(model, nn.Module):
        raise SaveError(f"model must be the original torch.nn.Module, got {type(model).__name__}.")
    inputs = _inputs_from(plan["inputs"], _read_tensors(folder / INPUTS))
    opts = plan["trace"]
    work = copy.deepcopy(model)
    gm = trace(
        work,
        inputs,
        frontend=opts["frontend"],
        leaf_modules=tuple(opts.get("leaf_modules", ())),
        concrete_args=opts.get("concrete_args") or None,
    )
    stages = [_stage_from(s, plan.get("format_version", 1)) for s in plan["stages"]]
    replay_stages(gm, inputs, stages)
    state = _read_tensors(folder / WEIGHTS)
    for alias, name in plan.get("aliases", {}).items():
        state[alias] = state[name]
    try:
        gm.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise SaveError(
            f"{folder / WEIGHTS} does not fit the rebuilt module: {str(exc).splitlines()[0]}"
        ) from None
    gm.train(plan.get("training", False))  # export graphs switch too (fxprune.graph_modes)
    return gm


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return st_load(file.read_bytes())
    except (OSError, SafetensorError) as exc:
        raise SaveError(f"{file} is not a readable safetensors file: {exc}") from None


def _dedup_state(module: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state_dict with tied tensors stored once, and {alias: stored name} for the plan."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in module.state_dict(keep_vars=False).items():
        t = t.detach()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.contiguous().clone()
    return tensors, aliases


def _inputs_bytes(inputs: Any) -> bytes:
    ex = ExampleInputs.of(inputs)
    tensors = {f"args.{i}": a for i, a in enumerate(ex.args) if isinstance(a, torch.Tensor)}
    tensors |= {f"kwargs.{k}": v for k, v in ex.kwargs.items() if isinstance(v, torch.Tensor)}
    return st_save({k: v.detach().contiguous().clone() for k, v in tensors.items()})


def _inputs_spec(inputs: Any) -> dict[str, Any]:
    """Where each example input goes; non-tensor inputs must be JSON values."""
    ex = ExampleInputs.of(inputs)

    def entry(where: str, v: Any) -> dict[str, Any]:
        if isinstance(v, torch.Tensor):
            return {"tensor": where}
        if isinstance(v, _JSON_SCALARS):
            return {"value": v}
        raise SaveError(
            f"example input {where} is a {type(v).__name__}; saved results support tensors and "
            f"plain values (bool, int, float, str, None) as example inputs."
        )

    return {
        "args": [entry(f"args.{i}", a) for i, a in enumerate(ex.args)],
        "kwargs": {k: entry(f"kwargs.{k}", v) for k, v in ex.kwargs.items()},
    }


def _inputs_from(spec: dict[str, Any], tensors: dict[str, torch.Tensor]) -> ExampleInputs:
    def value(e: dict[str, Any]) -> Any:
        return tensors[e["tensor"]] if "tensor" in e else e.get("value")

    return ExampleInputs(
        tuple(value(e) for e in spec["args"]), {k: value(e) for k, e in spec["kwargs"].items()}
    )


def _plan_json(result: PruneResult, model_spec: str | None, aliases: dict[str, str]) -> str:
    module = result.module
    gm_meta = getattr(module, "meta", {})
    opts = dict(result.trace_options)
    opts.setdefault("frontend", gm_meta.get("fxprune.frontend", "fx"))
    concrete = opts.get("concrete_args") or {}
    if any(not isinstance(v, _JSON_SCALARS) for v in concrete.values()):
        raise SaveError("concrete_args with non-JSON values (tensors, objects) cannot be saved.")
    plan = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "fxprune": __version__,
        "torch": torch.__version__,
        "model": model_spec,
        "model_class": opts.pop("model_class", None),
        "training": bool(module.training),
        "trace": opts,
        "inputs": _inputs_spec(result.example_inputs),
        "aliases": aliases,
        "stages": [_stage_json(s) for s in result.stages],
    }
    return json.dumps(plan, indent=1) + "\n"


def _stage_json(stage: PlanStage) -> dict[str, Any]:
    extra = {"pad_outputs": True} if stage.ignored.pad_outputs else {}
    return {
        "head_mode": stage.head_mode,
        "ignore": list(stage.ignored.outputs),
        "freeze": list(stage.ignored.frozen),
        **extra,
        "group_sizes": {str(g): n for g, n in stage.group_sizes.items()},
        # keep / pad / drop per channel, as a compact string of digits 1 / 2 / 0
        "selection": {str(g): "".join(map(str, s.tolist())) for g, s in stage.selection.items()},
    }


def _stage_from(data: dict[str, Any], version: int = FORMAT_VERSION) -> PlanStage:
    try:
        if version < 2:  # v1's ignore froze every channel the names touch
            ignored = IgnoreSpec(frozen=tuple(data["ignore"]))
        else:
            ignored = IgnoreSpec(
                tuple(data["ignore"]),
                tuple(data["freeze"]),
                pad_outputs=data.get("pad_outputs", False) is True,
            )
        selection = {
            int(g): torch.tensor([int(c) for c in s], dtype=torch.int8)
            for g, s in data["selection"].items()
        }
        return PlanStage(
            data["head_mode"],
            ignored,
            selection,
            {int(g): int(n) for g, n in data["group_sizes"].items()},
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise SaveError(f"a step of the saved plan is malformed: {exc!r}") from None
