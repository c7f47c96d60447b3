"""Declarative pipelines: a TOML recipe of steps, checked whole before any work, then run.

```toml
model = "torchvision:resnet50"
input_shape = [1, 3, 224, 224]

[[steps]]
pass = "prune"
ratio = 0.5
round_to = 8

[[steps]]
pass = "export.onnx"
fp16 = false
```

``fxprune run recipe.toml --out DIR`` (or :func:`run_recipe`) loads the model, runs the
steps in order on the current module (each step starts from what the previous one left)
and writes every step's files into one result folder, whole or not at all (the same rule
as ``fxprune prune --out``). Before anything is loaded, every key, pass name, option name
and option value is checked, and a mistake is reported with the file, the line and the
nearest valid names.

Steps: ``prune`` and ``sparsify`` (the options of :func:`fxprune.prune` /
:func:`fxprune.sparsify`), ``mask`` (:func:`fxprune.mask_channels`), ``compile``
(``torch.compile`` with :func:`fxprune.backend` under ``no_grad``: the dead channels of a
masked model are cut), ``export.onnx`` (:func:`fxprune.export.to_onnx`), ``export.engine``
(:func:`fxprune.export.build_engine`, from the last ONNX file) and ``bench``
(:func:`fxprune.export.compare_latency`, the loaded model against the current one).
"""

from __future__ import annotations

import copy
import difflib
import inspect
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib
import torch
from torch import nn

from fxprune import validate
from fxprune.backend import backend
from fxprune.errors import FxpruneError
from fxprune.export import build_engine, compare_latency, to_onnx
from fxprune.export.latency import inputs_by_batch
from fxprune.files import ResultFolder, check_output_folder, write_bytes_atomic, write_text_atomic
from fxprune.masks import mask_channels
from fxprune.models import load_model
from fxprune.prune import prune
from fxprune.saving import result_files
from fxprune.sparsify import sparsify

logger = logging.getLogger(__name__)

TOP_LEVEL = {
    "model": "the model spec: torchvision:NAME, timm:NAME, hf:minilm, or a result folder",
    "input_shape": "the example input's shape, e.g. [1, 3, 224, 224]",
    "seed": "seed of random-init models (default 0)",
    "steps": "the [[steps]] tables, run in order",
}


class RecipeError(FxpruneError, ValueError):
    """A recipe that cannot run: the message names the file, the line and the fix."""


def _options(fn: Callable, drop: set[str]) -> dict[str, inspect.Parameter]:
    params = inspect.signature(fn).parameters
    return {
        n: p
        for n, p in params.items()
        if n not in drop and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }


_NOT_IN_RECIPES = {"model", "example_inputs", "inputs", "inplace", "instruments", "progress"}
# pass name -> the function whose keyword options the step accepts
STEPS: dict[str, dict[str, inspect.Parameter]] = {
    "prune": _options(prune, _NOT_IN_RECIPES | {"calibration", "loss_fn", "mode"}),  # "mask" step
    "sparsify": _options(sparsify, _NOT_IN_RECIPES),
    "mask": _options(mask_channels, _NOT_IN_RECIPES | {"calibration", "loss_fn"}),
    "compile": _options(backend, {"passes"}),
    "export.onnx": _options(to_onnx, _NOT_IN_RECIPES | {"module", "path"}),
    "export.engine": _options(build_engine, {"onnx_path", "engine_path", "timing_cache"}),
    "bench": _options(compare_latency, {"models", "inputs", "workdir", "progress", "macs"}),
}


@dataclass
class Recipe:
    """A parsed, checked recipe. ``lines``: where each step and key is in the file."""

    model: str
    input_shape: tuple[int, ...] | None
    seed: int
    steps: list[dict[str, Any]]
    source: str = "<dict>"
    lines: list[dict[str, int]] = field(default_factory=list)


@dataclass
class RecipeResult:
    """What :func:`run_recipe` did: the final module, one line per step, the folder."""

    module: nn.Module
    log: list[str]
    out: Path | None


def load_recipe(recipe: str | os.PathLike | Mapping[str, Any]) -> Recipe:
    """Parse and check a recipe (a TOML file or a dict); raises RecipeError on any mistake."""
    if isinstance(recipe, Mapping):
        data, source, text = dict(recipe), "<dict>", ""
    else:
        path = Path(recipe)
        if not path.is_file():
            raise RecipeError(f"recipe {path} does not exist.")
        source, text = str(path), path.read_text()
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise RecipeError(f"{source}: not valid TOML: {exc}") from None
    lines = _key_lines(text)
    where = _Where(source, lines)
    for key in data:
        if key not in TOP_LEVEL:
            raise RecipeError(where.top(key, f"unknown key {key!r}{_nearest(key, TOP_LEVEL)}"))
    if not isinstance(data.get("model"), str):
        raise RecipeError(where.top("model", f"'model' must be a string: {TOP_LEVEL['model']}"))
    shape = data.get("input_shape")
    if shape is not None and not (
        isinstance(shape, list) and shape and all(isinstance(d, int) and d > 0 for d in shape)
    ):
        raise RecipeError(where.top("input_shape", "'input_shape' must be a list of sizes"))
    steps = data.get("steps")
    if not isinstance(steps, list) or not steps or not all(isinstance(s, dict) for s in steps):
        raise RecipeError(where.top("steps", "a recipe needs at least one [[steps]] table"))
    for i, step in enumerate(steps):
        _check_step(step, i, where)
    seed = data.get("seed", 0)
    if not isinstance(seed, int):
        raise RecipeError(where.top("seed", "'seed' must be an integer"))
    return Recipe(data["model"], tuple(shape) if shape else None, seed, steps, source, lines)


class _Where:
    """file:line of a top-level key or of a step's key, for messages."""

    def __init__(self, source: str, lines: list[dict[str, int]]) -> None:
        self.source, self.lines = source, lines

    def top(self, key: str, message: str) -> str:
        line = self.lines[0].get(key) if self.lines else None
        return f"{self.source}{f':{line}' if line else ''}: {message}"

    def step(self, index: int, key: str | None, message: str) -> str:
        table = self.lines[index + 1] if index + 1 < len(self.lines) else {}
        line = table.get(key or "[[steps]]", table.get("[[steps]]"))
        return f"{self.source}{f':{line}' if line else ''}: step {index + 1}: {message}"


def _key_lines(text: str) -> list[dict[str, int]]:
    """Line of each key: [top-level keys, then one dict per [[steps]] table]."""
    tables: list[dict[str, int]] = [{}]
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if line == "[[steps]]":
            tables.append({"[[steps]]": number})
        elif "=" in line and not line.startswith("["):
            key = line.split("=", 1)[0].strip().strip('"')
            tables[-1].setdefault(key, number)
    return tables


def _nearest(name: str, choices: Any) -> str:
    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.5)
    if close:
        return "; did you mean " + " or ".join(repr(c) for c in close) + "?"
    return "; valid: " + ", ".join(sorted(choices))


def _check_step(step: dict[str, Any], index: int, where: _Where) -> None:
    name = step.get("pass")
    if not isinstance(name, str):
        raise RecipeError(where.step(index, None, 'every step needs pass = "<name>"'))
    if name not in STEPS:
        raise RecipeError(
            where.step(index, "pass", f"unknown pass {name!r}{_nearest(name, STEPS)}")
        )
    options = STEPS[name]
    for key, value in step.items():
        if key == "pass":
            continue
        if key not in options:
            raise RecipeError(
                where.step(index, key, f"{name} has no option {key!r}{_nearest(key, options)}")
            )
        problem = _value_problem(options[key], value)
        if problem:
            raise RecipeError(where.step(index, key, f"{name}: {key} {problem}"))
    if name in ("prune", "mask"):
        args = {k: v for k, v in step.items() if k != "pass" and k in STEPS["prune"]}
        try:  # prune's own checks and messages, before anything runs
            validate.prune_arguments(args)
        except FxpruneError as exc:
            raise RecipeError(where.step(index, next(iter(args), None), str(exc))) from None


def _value_problem(param: inspect.Parameter, value: Any) -> str | None:
    """Why ``value`` cannot be this option's value (checked on the default's type)."""
    default = param.default
    if default is inspect.Parameter.empty or default is None:
        return None
    if isinstance(default, bool):
        return None if isinstance(value, bool) else f"must be true or false, got {value!r}"
    if isinstance(default, int) and not isinstance(value, (int, str)):
        return f"must be a whole number, got {value!r}"
    if isinstance(default, float) and (
        isinstance(value, bool) or not isinstance(value, (int, float))
    ):
        return f"must be a number, got {value!r}"
    if isinstance(default, str) and not isinstance(value, str):
        return f"must be a string, got {value!r}"
    if isinstance(default, tuple) and not isinstance(value, list):
        return f"must be a list, got {value!r}"
    return None


def run_recipe(
    recipe: str | os.PathLike | Mapping[str, Any],
    out: str | os.PathLike | None = None,
    *,
    model: nn.Module | None = None,
    example_inputs: Any = None,
    force: bool = False,
    echo: Callable[[str], None] = logger.info,
) -> RecipeResult:
    """Check ``recipe``, then run its steps; files go to ``out`` whole (None: no files).

    ``model`` / ``example_inputs`` replace the recipe's ``model`` and ``input_shape``.
    """
    spec = load_recipe(recipe)
    if out is not None:
        check_output_folder(out, force)
    if model is None:
        model, example_inputs = load_model(spec.model, spec.input_shape, spec.seed)
    elif example_inputs is None:
        raise RecipeError("run_recipe(model=...) needs example_inputs= too.")
    if out is None:
        state = _State(model, example_inputs, None)
        _run_steps(spec, state, echo)
        return RecipeResult(state.module, state.log, None)
    with ResultFolder(out, force=force) as rf:
        state = _State(model, example_inputs, rf.path)
        _run_steps(spec, state, echo)
        write_text_atomic(rf.path / "recipe.log", "\n".join(state.log) + "\n")
        written = rf.commit()
    return RecipeResult(state.module, state.log, written)


@dataclass
class _State:
    original: nn.Module
    inputs: Any
    folder: Path | None
    module: nn.Module = None  # type: ignore[assignment]
    onnx: Path | None = None
    log: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.module = self.original

    def file(self, name: str) -> Path | None:
        return None if self.folder is None else self.folder / name


def _run_steps(spec: Recipe, state: _State, echo: Callable[[str], None]) -> None:
    for i, step in enumerate(spec.steps):
        options = {k: v for k, v in step.items() if k != "pass"}
        name = step["pass"]
        line = f"[{i + 1}/{len(spec.steps)}] {name}: " + _RUNNERS[name](state, options, i + 1)
        state.log.append(line)
        echo(line)


def _prune(state: _State, options: dict[str, Any], n: int) -> str:
    res = prune(state.module, state.inputs, **options)
    state.module = res.module
    _write_files(state, f"step{n}_pruned", result_files(res))
    if state.folder is not None:
        write_text_atomic(state.file(f"step{n}_report.txt"), str(res.report) + "\n")
    return f"{res.report.macs_ratio:.2f}x fewer MACs, {res.report.verified}"


def _sparsify(state: _State, options: dict[str, Any], n: int) -> str:
    res = sparsify(state.module, state.inputs, **options)
    state.module = res.module
    _write_files(state, f"step{n}_sparse", result_files(res, example_inputs=state.inputs))
    return f"{len(res.masks)} weights masked"


def _mask(state: _State, options: dict[str, Any], n: int) -> str:
    masked = copy.deepcopy(state.module)  # the loaded model stays the bench's baseline
    masks = mask_channels(masked, state.inputs, **options)
    state.module = masked
    return str(masks)


def _compile(state: _State, options: dict[str, Any], n: int) -> str:
    be = backend(**options)
    compiled = torch.compile(state.module, backend=be)
    with torch.no_grad():
        args = state.inputs if isinstance(state.inputs, tuple) else (state.inputs,)
        if isinstance(state.inputs, dict):
            compiled(**state.inputs)
        else:
            compiled(*args)
    before = sum(g.macs_before for g in be.compiled)
    after = sum(g.macs_after for g in be.compiled)
    state.module = compiled
    return f"{len(be.compiled)} graph(s), MACs {before:,} -> {after:,} handed to the next backend"


def _export_onnx(state: _State, options: dict[str, Any], n: int) -> str:
    path = state.file(f"step{n}.onnx")
    if path is None:
        return "skipped (no output folder)"
    res = to_onnx(state.module, state.inputs, path, **options)
    state.onnx = Path(res.path)
    return f"{path.name}, ONNX Runtime vs PyTorch max abs error {res.max_abs_err:.2e}"


def _export_engine(state: _State, options: dict[str, Any], n: int) -> str:
    if state.onnx is None:
        raise RecipeError(f"step {n}: export.engine needs an earlier export.onnx step.")
    path = state.file(f"step{n}.engine")
    eng = build_engine(state.onnx, path, **options)
    return f"{path.name}: {eng.runtime} engine, built in {eng.build_seconds:.1f} s"


def _bench(state: _State, options: dict[str, Any], n: int) -> str:
    options = {"backends": ("ort",), "batch_sizes": (1,), "rounds": 7, **options}
    report = compare_latency(
        {"original": state.original, "current": state.module},
        inputs_by_batch(state.inputs),
        **options,
    )
    if state.folder is not None:
        report.save_json(state.file(f"step{n}_bench.json"))
        write_text_atomic(state.file(f"step{n}_bench.txt"), report.table() + "\n")
    m = report.find(report.backends[0], report.batch_sizes[0], "current")
    return f"{m.speedup:.2f}x faster ({report.backends[0]}, batch {report.batch_sizes[0]})"


def _write_files(state: _State, prefix: str, files: dict[str, bytes]) -> None:
    if state.folder is None:
        return
    folder = state.folder / prefix
    folder.mkdir()
    for name, data in files.items():
        write_bytes_atomic(folder / name, data)


_RUNNERS: dict[str, Callable[[_State, dict[str, Any], int], str]] = {
    "prune": _prune,
    "sparsify": _sparsify,
    "mask": _mask,
    "compile": _compile,
    "export.onnx": _export_onnx,
    "export.engine": _export_engine,
    "bench": _bench,
}
assert set(_RUNNERS) == set(STEPS)


def recipe_source(recipe: Recipe) -> str | dict[str, Any]:
    """What :func:`run_recipe` takes to run an already checked recipe again."""
    if recipe.source != "<dict>":
        return recipe.source
    return {
        "model": recipe.model,
        "input_shape": list(recipe.input_shape or ()),
        "steps": recipe.steps,
    }
