"""Checks of the public API's arguments, shared by prune, Pruner, analyze, sparsify, export and bench.

Every check runs before any tracing or analysis starts, so a typo costs
milliseconds, not a trace of the whole model. Every failure is a subclass of
:class:`~fxprune.errors.FxpruneError` (the caller picks which: ``PruneError`` for
pruning options, ``SparsityError``, ``ExportError``...) and every message has one
shape: ``"<argument> must be <what it is for>, got <the value>."`` plus how to fix
it when that is not obvious. One module so that the same mistake reads the same
in every entry point.

Foundation layer: imports nothing from ``passes/`` or ``export/``; the option
tables the passes need (``IMPORTANCE_CRITERIA``...) live here and they import them.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import math
import numbers
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from fxprune.errors import FxpruneError, PruneError, TraceError
from fxprune.trace import FRONTENDS, ExampleInputs

logger = logging.getLogger(__name__)

ErrorType = type[FxpruneError]

IMPORTANCE_CRITERIA = ("l1", "l2", "bn_scale", "taylor", "fpgm", "random")
HEAD_MODES = ("auto", "heads", "head_dim")
ALIGNS = ("round", "pad")
REDUCTIONS = ("mean", "sum", "max")
NORMALIZATIONS = ("mean", "max", "sum", "standardization", "none")
SCHEDULES = ("linear", "cubic", "exponential")  # Pruner: cumulative ratio after step k of N

TENSOR_HINT = "pass a tensor, e.g. torch.randn(1, 3, 224, 224)"


def show(value: Any) -> str:
    """A short, recognisable rendering of a bad value (no 10 000-element tensor dumps)."""
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    if isinstance(value, nn.Module):
        return f"a {type(value).__name__} module"
    if isinstance(value, type):
        return f"the class {value.__name__}"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def fail(error: ErrorType, name: str, requirement: str, value: Any, hint: str = "") -> None:
    raise error(f"{name} must be {requirement}, got {show(value)}." + (f" {hint}" if hint else ""))


def is_number(value: Any) -> bool:
    # bool is an int subclass, but verify=True passed as ratio= is a mistake, not 1.0
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def number_in(
    name: str,
    value: Any,
    low: float,
    high: float,
    meaning: str = "",
    *,
    low_open: bool = False,
    high_open: bool = False,
    error: ErrorType = PruneError,
) -> None:
    """``value`` is a real number within the interval (open or closed at each end)."""
    lo = "(" if low_open else "["
    hi = ")" if high_open or math.isinf(high) else "]"
    top = "inf" if math.isinf(high) else f"{high:g}"
    requirement = f"in {lo}{low:g}, {top}{hi}" + (f" ({meaning})" if meaning else "")
    if isinstance(value, str):
        fail(error, name, requirement, value, "Pass a number, not a string.")
    if not is_number(value) or math.isnan(value):
        fail(error, name, requirement, value)
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if below or above:
        fail(error, name, requirement, value)


def integer_at_least(
    name: str, value: Any, minimum: int, meaning: str = "", error: ErrorType = PruneError
) -> None:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        fail(error, name, what + (f" ({meaning})" if meaning else ""), value)


def finite_non_negative(
    name: str, value: Any, meaning: str = "", error: ErrorType = PruneError
) -> None:
    if not is_number(value) or not math.isfinite(value) or value < 0:
        fail(error, name, "a finite number >= 0" + (f" ({meaning})" if meaning else ""), value)


def boolean(name: str, value: Any, error: ErrorType = PruneError) -> None:
    # numpy bools and 0/1 are common from configs, but "yes"/"no" strings are always a mistake
    if not isinstance(value, bool) and type(value).__name__ != "bool_":
        fail(error, name, "True or False", value)


def one_of(
    name: str,
    value: Any,
    choices: Sequence[str],
    meaning: str = "",
    error: ErrorType = PruneError,
) -> None:
    if isinstance(value, str) and value in choices:
        return
    listed = ", ".join(repr(c) for c in choices)
    hint = ""
    if isinstance(value, str):
        close = difflib.get_close_matches(value, choices, n=1)
        hint = f"Did you mean {close[0]!r}?" if close else ""
    fail(error, name, f"one of {listed}" + (f" ({meaning})" if meaning else ""), value, hint)


def module(name: str, value: Any, error: ErrorType = PruneError) -> None:
    if not isinstance(value, nn.Module):
        fail(error, name, "a torch.nn.Module", value)


def example_inputs(value: Any, error: ErrorType = TraceError) -> None:
    """A tensor, a tuple/list of positional inputs or a dict of keyword inputs.

    The rule (and its message, e.g. for a shape tuple passed instead of a tensor) is
    ``ExampleInputs.of``'s, which every frontend uses too; ``error`` is the type raised.
    """
    try:
        ExampleInputs.of(value)
    except TraceError as exc:
        if error is TraceError:
            raise
        raise error(str(exc)) from None


def importance(value: Any, error: ErrorType = PruneError) -> None:
    if callable(value) and not isinstance(value, str):
        return
    listed = ", ".join(repr(c) for c in IMPORTANCE_CRITERIA)
    requirement = f"one of {listed} or a callable fn(group, params) -> scores"
    hint = ""
    if isinstance(value, str):
        if value in IMPORTANCE_CRITERIA:
            return
        close = difflib.get_close_matches(value.lower(), IMPORTANCE_CRITERIA, n=1)
        hint = f"Did you mean {close[0]!r}?" if close else ""
    fail(error, "importance", requirement, value, hint)


def known_options(
    where: str, given: Iterable[str], valid: Iterable[str], error: ErrorType = PruneError
) -> None:
    """Every name in ``given`` is one of ``valid``; otherwise name the nearest valid one."""
    valid = sorted(valid)
    for name in given:
        if name in valid:
            continue
        close = difflib.get_close_matches(name, valid, n=1)
        hint = f"Did you mean {close[0]}=?" if close else f"Valid options: {', '.join(valid)}."
        raise error(f"{where} got an unknown option {name}=. {hint}")


def leaf_modules(value: Any, error: ErrorType = PruneError) -> None:
    requirement = "a list of module classes, module names or modules, e.g. leaf_modules=[MyBlock]"
    if isinstance(value, (str, type, nn.Module)) or not isinstance(value, Iterable):
        fail(error, "leaf_modules", requirement, value)
    for item in value:
        if not isinstance(item, (str, type, nn.Module)):
            fail(error, "leaf_modules", requirement, item)


def instance_of(
    name: str, value: Any, types: Any, requirement: str, error: ErrorType = PruneError
) -> None:
    if not isinstance(value, types):
        fail(error, name, requirement, value)


def path_like(name: str, value: Any, error: ErrorType = PruneError) -> None:
    if not isinstance(value, (str, os.PathLike)):
        fail(error, name, "a file path (str or pathlib.Path)", value)


def _check_optional(
    check: Callable[..., None], name: str, value: Any, *args: Any, **kw: Any
) -> None:
    if value is not None:
        check(name, value, *args, **kw)


def prune_arguments(args: Mapping[str, Any], *, gradients_given: bool = False) -> None:
    """Check the arguments of ``fxprune.prune`` (also ``Pruner`` and ``analyze``) present in ``args``.

    ``ignore=`` (or ``ignored_layers=``), ``freeze_inputs=`` and the keys of ``ratios=``
    need the model and are checked by :func:`fxprune.analysis.ignore_spec`. ``gradients_given``: importance='taylor'
    may take the gradients already on the parameters instead of calibration batches
    (``Pruner``, whose user runs backward passes between steps).
    """
    checks: dict[str, Callable[[Any], None]] = {
        "model": lambda v: module("model", v),
        "example_inputs": example_inputs,
        "ratio": lambda v: number_in(
            "ratio", v, 0.0, 1.0, "the fraction of channels to remove", high_open=True
        ),
        "importance": importance,
        "round_to": _round_to,
        "align": lambda v: one_of(
            "align",
            v,
            ALIGNS,
            "'round' rounds kept channels down, 'pad' pads with zero channels up to the multiple",
        ),
        "global_ranking": lambda v: boolean("global_ranking", v),
        "exact_only": lambda v: boolean("exact_only", v),
        "pad_outputs": lambda v: boolean("pad_outputs", v),
        "target_macs": lambda v: _check_optional(
            number_in,
            "target_macs",
            v,
            0.0,
            1.0,
            "the fraction of the original MACs to keep",
            low_open=True,
        ),
        "verify": lambda v: boolean("verify", v),
        "inplace": lambda v: boolean("inplace", v),
        "check": lambda v: boolean("check", v),
        "mode": lambda v: one_of(
            "mode",
            v,
            ("cut", "mask"),
            "'cut' removes channels, 'mask' zeroes them in the model for a later lossless cut",
        ),
        "ratios": _ratios,
        "max_ratio": lambda v: number_in(
            "max_ratio",
            v,
            0.0,
            1.0,
            "the largest fraction of any group's channels to remove",
            low_open=True,
            high_open=True,
        ),
        "min_channels": lambda v: integer_at_least(
            "min_channels", v, 1, "the fewest channels a group keeps"
        ),
        "head_mode": lambda v: _check_optional(one_of, "head_mode", v, HEAD_MODES),
        "frontend": lambda v: one_of("frontend", v, FRONTENDS),
        "reduction": lambda v: one_of(
            "reduction", v, REDUCTIONS, "how a channel's scores over its parameters combine"
        ),
        "normalize": lambda v: _check_optional(one_of, "normalize", v, NORMALIZATIONS),
        "leaf_modules": leaf_modules,
        "concrete_args": lambda v: _check_optional(
            instance_of, "concrete_args", v, Mapping, "a dict {argument name: value}"
        ),
        "instruments": lambda v: instance_of(
            "instruments", v, Iterable, "a list of pass instruments"
        ),
        "loss_fn": lambda v: _check_optional(
            instance_of, "loss_fn", v, Callable, "a callable loss_fn(output, batch) -> loss"
        ),
    }
    for name, check in checks.items():
        if name in args:
            check(args[name])
    if "model" in args and "example_inputs" in args:
        concrete = args.get("concrete_args")
        inputs_match_forward(
            args["model"],
            args["example_inputs"],
            concrete if isinstance(concrete, Mapping) else None,
        )
    calibration, loss_fn = args.get("calibration"), args.get("loss_fn")
    if (
        args.get("importance") == "taylor"
        and (calibration is None or loss_fn is None)
        and not (gradients_given and calibration is None)
    ):
        raise PruneError(
            "importance='taylor' needs calibration batches and a loss function: "
            "prune(..., calibration=batches, loss_fn=lambda out, batch: ...)."
        )
    if calibration is not None and loss_fn is None:
        raise PruneError(
            "calibration batches need a loss function to turn outputs into gradients: "
            "pass loss_fn=lambda out, batch: ... as well."
        )
    if calibration is not None and not isinstance(calibration, Iterable):
        fail(PruneError, "calibration", "an iterable of input batches", calibration)


def schedule(value: Any, ratio: Any, steps: int) -> None:
    """A Pruner schedule: a name from SCHEDULES or ``fn(k, steps) -> cumulative ratio``.

    A callable is called for every step here, so a bad value fails before tracing: each
    must be in [0, 1] and none may be below the one before (pruned channels cannot
    come back).
    """
    if callable(value) and not isinstance(value, str):
        last = 0.0
        for k in range(1, steps + 1):
            try:
                r = value(k, steps)
            except Exception as exc:
                raise PruneError(
                    f"schedule({k}, {steps}) raised {type(exc).__name__}: {exc}. A schedule "
                    f"is fn(step, steps) -> the cumulative ratio after that step."
                ) from exc
            number_in(f"schedule({k}, {steps})", r, 0.0, 1.0, "the cumulative ratio")
            if r < last:
                fail(
                    PruneError,
                    f"schedule({k}, {steps})",
                    f">= schedule({k - 1}, {steps}) = {last:g} (a cumulative ratio: "
                    f"channels pruned at an earlier step cannot come back)",
                    r,
                )
            last = r
        return
    requirement = f"one of {', '.join(repr(c) for c in SCHEDULES)} or fn(step, steps) -> ratio"
    if not isinstance(value, str) or value not in SCHEDULES:
        close = difflib.get_close_matches(value, SCHEDULES, n=1) if isinstance(value, str) else []
        hint = f"Did you mean {close[0]!r}?" if close else ""
        fail(PruneError, "schedule", requirement, value, hint)
    if value == "exponential" and is_number(ratio) and ratio >= 1:
        raise PruneError(
            "schedule='exponential' shrinks the kept fraction geometrically towards "
            "1 - ratio, which never reaches 0: use ratio < 1 (e.g. 0.99), or "
            "schedule='linear' / 'cubic' to end at ratio=1.0 (min_channels per group)."
        )


def _round_to(value: Any) -> None:
    if value == "heads" and isinstance(value, str):
        return
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        fail(
            PruneError,
            "round_to",
            "a positive integer (8 for fp16 tensor cores, 4 for tf32) or 'heads'",
            value,
        )


def _ratios(value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, Mapping):
        fail(PruneError, "ratios", "a dict {module or module name: ratio}", value)
    for key, r in value.items():
        label = f"ratios[{key!r}]" if isinstance(key, str) else f"ratios[{show(key)}]"
        number_in(label, r, 0.0, 1.0, "the fraction of channels to remove", high_open=True)


def inputs_match_forward(
    model: nn.Module,
    value: Any,
    concrete_args: Mapping[str, Any] | None = None,
    error: ErrorType = TraceError,
) -> None:
    """The example inputs (plus ``concrete_args``) bind to ``model.forward``: none missing or extra."""
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):  # builtins and some C++ modules have no signature
        return
    inputs = ExampleInputs.of(value)
    positional = set(list(sig.parameters)[: len(inputs.args)])
    fixed = {k: v for k, v in (concrete_args or {}).items() if k not in positional}
    try:
        sig.bind(*inputs.args, **{**fixed, **inputs.kwargs})
    except TypeError as exc:
        given = [show(a) for a in inputs.args] + [
            f"{k}={show(v)}" for k, v in inputs.kwargs.items()
        ]
        raise error(
            f"example_inputs must match {type(model).__name__}.forward{plain_signature(sig)}, got "
            f"({', '.join(given)}): {exc}. Pass one input per required argument: a tuple in "
            f"order, or a dict by name."
        ) from None


def plain_signature(sig: inspect.Signature) -> str:
    """``(x, mask=None)``: parameter names and defaults, without the (often string) annotations."""
    params = [p.replace(annotation=p.empty) for p in sig.parameters.values()]
    return str(sig.replace(parameters=params, return_annotation=sig.empty))


_MODE_DEPENDENT = (
    nn.modules.dropout._DropoutNd,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
)


def eval_mode_for_export(
    model: nn.Module, frontend: str, verify: bool, error: ErrorType = PruneError
) -> None:
    """A train-mode model cannot be verified through the export frontend.

    torch.export records dropout and batch-statistics normalization into the graph
    itself, so no flag can switch the traced copy to eval mode for the comparison
    (the fx frontend keeps modules, whose flags fxprune flips for verification).
    """
    # Only modules whose output depends on the mode: an export-made GraphModule reports
    # training=True but already holds the eval-mode ops it was exported with.
    training = [
        name or type(model).__name__
        for name, m in model.named_modules()
        if m.training and isinstance(m, _MODE_DEPENDENT)
    ]
    if verify and frontend == "export" and training:
        raise error(
            f"the model is in training mode (e.g. {training[0]!r}) and the export frontend "
            f"records dropout and batch statistics into the graph, so its outputs cannot be "
            f"verified: call model.eval() first (then model.train() on the result to "
            f"fine-tune), use frontend='fx', or pass verify=False."
        )
