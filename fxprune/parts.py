"""Pruning a model that cannot be traced whole: each traceable part on its own.

A detector's forward loops over a list of images, decodes boxes and runs NMS with
data-dependent shapes: neither fx nor torch.export traces it. Its backbone, FPN and heads
trace fine. When ``fxprune.prune`` cannot trace the model, it prunes it by parts:

1. one real forward of a private copy on the example inputs records what every submodule
   is first called with (forward pre-hooks);
2. from the top down, every submodule that holds parameters and was called is traced by
   itself with fx on those inputs; one that traces is a *part*, one that does not is
   searched for parts among its children (and, holding no child that traces, stays as it
   is: an opaque leaf);
3. every part is pruned by the ordinary pipeline, its inputs and outputs kept whole (they
   are graph inputs and outputs: the channels at the boundary of the untraceable code
   around it are frozen), and put in place of the submodule;
4. the oracle then checks the whole model: every pruned parameter against the original's
   kept indices, and the pruned model's outputs against the masked original's on the
   example inputs (when every pruned group is exact).

Options that need the whole graph (``target_macs=``, ``global_ranking=True``) are refused.
MACs are counted on a real forward (``torch.utils.flop_counter``), since there is no graph;
the original's on the masked original, which keeps the same detections as the pruned model.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fxprune.analysis import IgnoreSpec
from fxprune.errors import PruneError, TraceError
from fxprune.oracle import check, inexact_reason, masked_original
from fxprune.report import PruneReport, count_macs_by_running
from fxprune.trace import ExampleInputs, trace

logger = logging.getLogger(__name__)

Calls = dict[str, ExampleInputs]


@dataclass
class Part:
    """A submodule traced by itself: its path, its graph and the inputs it was traced on."""

    path: str
    gm: Any
    inputs: ExampleInputs


def record_calls(model: nn.Module, example_inputs: Any) -> Calls:
    """What every submodule is first called with, in one forward (no grad, eval flags as
    they are) of ``model``."""
    calls: Calls = {}
    handles = []
    for name, module in model.named_modules():
        if not name:
            continue

        def first_call(_m, args, kwargs, name=name):
            calls.setdefault(name, ExampleInputs(tuple(args), dict(kwargs)))

        handles.append(module.register_forward_pre_hook(first_call, with_kwargs=True))
    try:
        with torch.no_grad():
            ExampleInputs.of(example_inputs).call(model)
    finally:
        for h in handles:
            h.remove()
    return calls


def find_parts(
    model: nn.Module, calls: Calls, leaf_modules: tuple = ()
) -> tuple[list[Part], list[tuple[str, str]]]:
    """(parts, [(path, why it stays whole)]) of ``model``, searched from the top down."""
    parts: list[Part] = []
    whole: list[tuple[str, str]] = []

    def visit(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            path = f"{prefix}.{name}" if prefix else name
            if not _has_params(child):
                continue
            inputs = calls.get(path)
            if inputs is None:
                whole.append((path, "not called by the forward on the example inputs"))
                continue
            try:
                gm = trace(child, inputs, frontend="fx", leaf_modules=leaf_modules)
            except TraceError as exc:
                if any(_has_params(c) for c in child.children()):
                    visit(path, child)
                else:
                    whole.append((path, _first_line(exc)))
                continue
            parts.append(Part(path, gm, inputs))

    visit("", model)
    return parts, whole


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[1] if len(lines) > 1 and lines[0].endswith(":") else (lines or ["?"])[0]


def part_ignore(ignored: IgnoreSpec, path: str) -> IgnoreSpec:
    """``ignored`` (names in the whole model) as seen from inside the part at ``path``."""

    def inside(names: tuple[str, ...]) -> tuple[str, ...]:
        out = []
        for n in names:
            if n == path or not n or path.startswith(n + "."):
                out.append("")  # the part itself, or a module holding it
            elif n.startswith(path + "."):
                out.append(n[len(path) + 1 :])
        return tuple(out)

    return dataclasses.replace(
        ignored, outputs=inside(ignored.outputs), frozen=inside(ignored.frozen)
    )


def _names_inside(options: dict[str, Any], path: str) -> dict[str, Any]:
    """The options keyed by names (``ratios``, Taylor ``grads``) as seen inside ``path``."""
    out = {}
    for key in ("ratios", "grads"):
        named = options.get(key)
        if named:
            cut = len(path) + 1
            out[key] = {n[cut:]: v for n, v in named.items() if n.startswith(path + ".")}
    return out


def prune_parts(
    model: nn.Module,
    work: nn.Module,
    example_inputs: Any,
    prune_graph: Callable[..., Any],
    *,
    why: TraceError,
    ignored: IgnoreSpec,
    options: dict[str, Any],
    leaf_modules: tuple = (),
) -> Any:
    """Prune ``work`` (a private copy of ``model``) part by part; returns the PruneResult
    ``prune_graph(gm, inputs, ignored=..., **options)`` makes, for the whole model."""
    if options.get("target_macs") is not None or options.get("global_ranking"):
        raise PruneError(
            f"{type(model).__name__} cannot be traced whole ({_first_line(why)}), so it is "
            "pruned part by part, where target_macs= and global_ranking=True (which rank "
            "the whole model) cannot apply: use ratio= (and ratios=) instead."
        ) from why
    try:
        calls = record_calls(work, example_inputs)
    except Exception:  # it does not even run on these inputs: the trace error says why
        raise why from None
    parts, whole = find_parts(work, calls, leaf_modules)
    if not parts:
        raise PruneError(
            f"{type(model).__name__} cannot be traced whole ({_first_line(why)}), and none of "
            "its submodules traces by itself either. Mark the untraceable code as "
            "leaf_modules=[...] or pass inputs it can trace."
        ) from why
    logger.warning(
        "%s cannot be traced whole (%s); pruning its %d traceable parts, each with its inputs "
        "and outputs kept: %s",
        type(model).__name__,
        _first_line(why),
        len(parts),
        ", ".join(p.path for p in parts),
    )
    results = []
    for part in parts:
        try:
            res = prune_graph(
                part.gm,
                part.inputs,
                ignored=part_ignore(ignored, part.path),
                **{**options, **_names_inside(options, part.path)},
            )
        except PruneError as exc:  # this part's channels cannot go as asked: it stays whole
            logger.warning("%s: part %s left as it is: %s", type(model).__name__, part.path, exc)
            continue
        parent, _, name = part.path.rpartition(".")
        setattr(work.get_submodule(parent) if parent else work, name, res.module)
        results.append((part.path, res))
    if not any(res.kept for _, res in results):
        raise why  # no part had channels of its own to prune: the trace error says what to fix
    return _whole_result(model, work, example_inputs, results, whole, options)


def _whole_result(model, work, example_inputs, results, whole, options) -> Any:
    """One PruneResult for the whole model: kept and groups under full names, the oracle
    run on the whole model, MACs counted on a real forward."""
    kept, groups, rows, frozen = {}, [], [], 0
    for path, res in results:
        for fqn, dims in res.kept.items():
            kept[f"{path}.{fqn}"] = dims
        for g in res.groups:
            members = [dataclasses.replace(m, param=f"{path}.{m.param}") for m in g.members]
            groups.append(dataclasses.replace(g, members=members))
        rows += [dataclasses.replace(r, source=f"{path}.{r.source}") for r in res.report.groups]
        frozen += res.report.frozen
    verified, max_error = "not run (verify=False)", None
    if options.get("verify", True):
        report = check(
            model,
            work,
            kept,
            example_inputs,
            inexact=inexact_reason(groups, kept, model),
        )
        verified = report.summary
        max_error = report.max_error if report.exact else None
    report = PruneReport(
        # Counted on the masked original: the work a detector's heads do depends on how many
        # boxes survive NMS, and the masked original finds the boxes the pruned model finds.
        macs_before=count_macs_by_running(masked_original(model, kept), example_inputs),
        macs_after=count_macs_by_running(work, example_inputs),
        params_before=sum(p.numel() for p in model.parameters()),
        params_after=sum(p.numel() for p in work.parameters()),
        groups=rows,
        frozen=frozen,
        verified=verified,
        max_error=max_error,
        frontend=f"fx, by parts: {len(results)} traced, {len(whole)} kept whole",
    )
    result_type = type(results[0][1])
    return result_type(
        module=work,
        kept=kept,
        report=report,
        groups=groups,
        example_inputs=example_inputs,
        trace_options={"parts": [p for p, _ in results], "whole": whole},
    )
