"""``fxprune.prune`` and ``fxprune.Pruner``: the structured-pruning pipeline.

trace -> propagate channels -> build groups -> importance -> select (ratio, global
ranking or MACs target; alignment) -> surgery -> verify (the correctness oracle).
The model passed in is left untouched unless ``inplace=True``.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from fxprune import meta
from fxprune.analysis import ignored_prefixes, run_analysis
from fxprune.channels import Layout
from fxprune.errors import PruneError
from fxprune.pass_infra import Instrument, PassContext, PassManager
from fxprune.report import GroupRow, PruneReport, count_params, graph_macs
from fxprune.trace import trace

logger = logging.getLogger(__name__)

Kept = dict[str, dict[int, torch.Tensor]]


@dataclass
class PruneResult:
    """``module``: the pruned model; ``kept``: {param: {dim: original indices, -1 = padding}}."""

    module: nn.Module
    kept: Kept
    report: PruneReport
    groups: list = field(default_factory=list, repr=False)

    def __str__(self) -> str:
        return str(self.report)


def _validate(ratio: float, round_to: Any, align: str, target_macs: float | None) -> None:
    if target_macs is None and (not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0):
        raise PruneError(
            f"ratio must be in [0, 1) (the fraction of channels to remove), got {ratio!r}."
        )
    if target_macs is not None and not (
        isinstance(target_macs, (int, float)) and 0.0 < target_macs <= 1.0
    ):
        raise PruneError(
            f"target_macs must be in (0, 1] (the fraction of the original MACs to keep), "
            f"got {target_macs!r}."
        )
    if round_to != "heads" and (
        not isinstance(round_to, int) or isinstance(round_to, bool) or round_to < 1
    ):
        raise PruneError(
            f"round_to must be a positive integer (8 for fp16 tensor cores, 4 for tf32) "
            f"or 'heads', got {round_to!r}."
        )
    if align not in ("round", "pad"):
        raise PruneError(
            f"align must be 'round' (round kept channels down) or 'pad' (pad with zero "
            f"channels up to the multiple), got {align!r}."
        )


def prune(
    model: nn.Module,
    example_inputs: Any,
    ratio: float = 0.5,
    importance: str | Callable = "l2",
    round_to: int | str = 1,
    align: str = "round",
    ignore: Iterable[Any] | None = None,
    global_ranking: bool = False,
    target_macs: float | None = None,
    verify: bool = True,
    inplace: bool = False,
    *,
    ratios: Mapping[Any, float] | None = None,
    max_ratio: float = 0.9,
    min_channels: int = 1,
    head_mode: str | None = None,
    frontend: str = "auto",
    reduction: str = "mean",
    normalize: str | None = "mean",
    calibration: Iterable[Any] | None = None,
    loss_fn: Callable | None = None,
    leaf_modules: Iterable[Any] = (),
    concrete_args: dict[str, Any] | None = None,
    instruments: Iterable[Instrument] = (),
    check: bool = False,
) -> PruneResult:
    """Prune ``model`` and return the smaller, verified module.

    ``ratio``: fraction of each group's channels to remove. ``round_to``: keep a
    multiple of this many positions (8 for fp16 tensor cores, 4 for tf32) or
    ``"heads"`` to prune attention by whole heads. ``align``: ``"round"`` rounds the
    kept count down, ``"pad"`` pads with zero channels up to the multiple.
    ``ratios``: per-module (or module/parameter name) overrides. ``target_macs``:
    prune until MACs reach this fraction of the original (replaces ``ratio``).
    ``verify``: run the correctness oracle (raises on a mismatch).
    """
    _validate(ratio, round_to, align, target_macs)
    if not isinstance(model, nn.Module):
        raise PruneError(f"expected a torch.nn.Module, got {type(model).__name__}.")
    prefixes = ignored_prefixes(model, ignore)
    overrides = _override_names(model, ratios)
    work = model if inplace else copy.deepcopy(model)
    gm = trace(
        work,
        example_inputs,
        frontend=frontend,
        leaf_modules=tuple(leaf_modules),
        concrete_args=concrete_args,
    )
    grads = None
    if importance == "taylor":
        if calibration is None or loss_fn is None:
            raise PruneError(
                "importance='taylor' needs calibration batches and a loss function: "
                "prune(..., calibration=batches, loss_fn=lambda out, batch: ...)."
            )
        from fxprune.passes.importance import taylor_grads

        grads = taylor_grads(copy.deepcopy(model), calibration, loss_fn)
    res = _prune_graph(
        gm,
        example_inputs,
        ratio=ratio,
        importance=importance,
        round_to=round_to,
        align=align,
        prefixes=prefixes,
        global_ranking=global_ranking,
        target_macs=target_macs,
        verify=verify,
        ratios=overrides,
        max_ratio=max_ratio,
        min_channels=min_channels,
        head_mode=head_mode,
        reduction=reduction,
        normalize=normalize,
        grads=grads,
        instruments=instruments,
        check=check,
    )
    res.kept = _user_names(res.kept, model)
    return res


def _user_names(kept: Kept, model: nn.Module) -> Kept:
    """Only the model's own parameters and buffers (fx also slices constants it made from them)."""
    names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    names |= {n for n, _ in model.named_buffers(remove_duplicate=False)}
    return {k: v for k, v in kept.items() if k in names}


def _override_names(model: nn.Module, ratios: Mapping[Any, float] | None) -> dict[str, float]:
    if not ratios:
        return {}
    names = {id(m): n for n, m in model.named_modules()}
    out = {}
    for key, r in ratios.items():
        if isinstance(key, nn.Module):
            if id(key) not in names:
                raise PruneError(f"ratios: module {type(key).__name__} is not part of the model.")
            key = names[id(key)]
        out[str(key)] = r
    ignored_prefixes(model, [k for k in out if k])  # same validation as ignore
    return out


def _prune_graph(
    gm: fx.GraphModule,
    example_inputs: Any,
    *,
    ratio: float,
    importance: Any,
    round_to: int | str,
    align: str,
    prefixes: tuple[str, ...],
    global_ranking: bool,
    target_macs: float | None,
    verify: bool,
    ratios: dict[str, float],
    max_ratio: float,
    min_channels: int,
    head_mode: str | None,
    reduction: str,
    normalize: str | None,
    grads: dict | None,
    instruments: Iterable[Instrument] = (),
    check: bool = False,
) -> PruneResult:
    from fxprune.passes.importance import ImportancePass
    from fxprune.passes.select_channels import SelectChannelsPass, SelectionOptions
    from fxprune.passes.surgery import ChannelPlan, SurgeryPass
    from fxprune.passes.verify import VerifyPass

    if head_mode is None:
        head_mode = "heads" if round_to == "heads" else "auto"
    align_to = 1 if round_to == "heads" else int(round_to)
    frontend = gm.meta.get("fxprune.frontend", "fx")
    ctx = PassContext(example_inputs=example_inputs)
    groups, env, ctx = run_analysis(gm, prefixes, head_mode, ctx)
    macs_before, params_before = graph_macs(gm), count_params(gm)
    original = copy.deepcopy(gm) if verify else None
    layouts = {n.name: meta.get(n, meta.LAYOUT) for n in gm.graph.nodes}
    PassManager(
        [ImportancePass(importance, reduction, normalize, grads)],
        check=check,
        instruments=instruments,
    ).run(gm, ctx)

    def select(r: float) -> None:
        opts = SelectionOptions(
            ratio=r,
            round_to=align_to,
            align=align,
            global_ranking=global_ranking,
            max_ratio=max_ratio,
            min_channels=min_channels,
            ratios=ratios,
        )
        SelectChannelsPass(opts).call(gm, ctx)

    if target_macs is not None:
        _search_ratio(gm, ctx, select, macs_before, target_macs, max_ratio)
    else:
        select(ratio)
    plan = ChannelPlan(env, groups, ctx.results["selection"])
    ctx.results.update(plan=plan, layouts=layouts, original=original)
    rows = _group_rows(groups, ctx.results["selection"], ctx.results.get("selection_notes", {}))
    passes = [SurgeryPass()] + ([VerifyPass()] if verify else [])
    PassManager(passes, check=check, instruments=instruments).run(gm, ctx)
    report = PruneReport(
        macs_before=macs_before,
        macs_after=graph_macs(gm),
        params_before=params_before,
        params_after=count_params(gm),
        groups=rows,
        frozen=sum(not g.prunable for g in groups),
        verified=ctx.results.get("verified", "not run (verify=False)"),
        max_error=ctx.results.get("max_error"),
        frontend=frontend,
    )
    return PruneResult(gm, ctx.results.get("kept", {}), report, groups)


def _search_ratio(gm, ctx, select, macs_before: int, target: float, max_ratio: float) -> None:
    """Bisect the uniform ratio until the planned MACs reach ``target`` of the original."""
    from fxprune.passes.surgery import ChannelPlan

    env, groups = ctx.results["channels"], ctx.results["groups"]

    def planned_macs() -> int:
        plan = ChannelPlan(env, groups, ctx.results["selection"])
        cache: dict[fx.Node, Any] = {}

        def shape(node: fx.Node):
            if node not in cache:
                lay, s = meta.get(node, meta.LAYOUT), meta.shape_of(node)
                cache[node] = plan.new_shape(lay, s) if isinstance(lay, Layout) and s else s
            return cache[node]

        return graph_macs(gm, shape)

    lo, hi = 0.0, max_ratio
    select(hi)
    if planned_macs() > target * macs_before:
        logger.warning(
            "target_macs=%.3f cannot be reached within max_ratio=%.2f; pruning at max_ratio",
            target,
            max_ratio,
        )
        return
    for _ in range(14):
        mid = (lo + hi) / 2
        select(mid)
        if planned_macs() <= target * macs_before:
            hi = mid
        else:
            lo = mid
    select(hi)


def _group_rows(groups, selection, notes) -> list[GroupRow]:
    rows = []
    for g in groups:
        if g.id not in selection:
            continue
        st = selection[g.id]
        kept, pad = int((st == 1).sum()), int((st == 2).sum())
        if kept + pad == g.size and not notes.get(g.id):
            continue
        rows.append(
            GroupRow(
                g.id,
                f"{g.source[0]}[{g.source[1]}]" if g.source else "?",
                g.structure,
                kept + pad,
                pad,
                g.size,
                g.units,
                notes.get(g.id, ""),
            )
        )
    return rows


def _compose(prev: Kept, new: Kept) -> Kept:
    """Indices into the original after two successive prunings."""
    out: Kept = {k: dict(v) for k, v in prev.items()}
    for fqn, dims in new.items():
        for d, idx in dims.items():
            base = prev.get(fqn, {}).get(d)
            if base is None:
                out.setdefault(fqn, {})[d] = idx
            else:
                out[fqn][d] = torch.where(
                    idx >= 0, base[idx.clamp(min=0)], torch.full_like(idx, -1)
                )
    return out


class Pruner:
    """Iterative pruning: ``steps`` prune / fine-tune rounds reaching ``ratio`` at the end.

    Step ``i`` leaves ``1 - ratio * i / steps`` of each group's original channels. The
    graph is traced once; later steps re-run the channel analysis on the pruned graph.
    Fine-tune ``pruner.module`` between steps.
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Any,
        ratio: float = 0.5,
        steps: int = 1,
        inplace: bool = False,
        **kwargs: Any,
    ) -> None:
        if not isinstance(steps, int) or steps < 1:
            raise PruneError(f"steps must be a positive integer, got {steps!r}.")
        _validate(ratio, kwargs.get("round_to", 1), kwargs.get("align", "round"), None)
        self.example_inputs = example_inputs
        self.ratio, self.steps, self.kwargs = ratio, steps, kwargs
        self.step_index = 0
        self.kept: Kept = {}
        self.history: list[PruneReport] = []
        prefixes = ignored_prefixes(model, kwargs.pop("ignore", None))
        self.prefixes = prefixes
        work = model if inplace else copy.deepcopy(model)
        self.module: nn.Module = trace(
            work, example_inputs, frontend=kwargs.pop("frontend", "auto")
        )

    @property
    def done(self) -> bool:
        return self.step_index >= self.steps

    def step(self) -> PruneResult:
        if self.done:
            raise PruneError(f"all {self.steps} pruning steps are done.")
        prev_keep = 1.0 - self.ratio * self.step_index / self.steps
        self.step_index += 1
        keep = 1.0 - self.ratio * self.step_index / self.steps
        step_ratio = 1.0 - keep / prev_keep
        kw = dict(self.kwargs)
        res = _prune_graph(
            self.module,
            self.example_inputs,
            ratio=step_ratio,
            importance=kw.pop("importance", "l2"),
            round_to=kw.pop("round_to", 1),
            align=kw.pop("align", "round"),
            prefixes=self.prefixes,
            global_ranking=kw.pop("global_ranking", False),
            target_macs=None,
            verify=kw.pop("verify", True),
            ratios=kw.pop("ratios", {}) or {},
            max_ratio=kw.pop("max_ratio", 0.9),
            min_channels=kw.pop("min_channels", 1),
            head_mode=kw.pop("head_mode", None),
            reduction=kw.pop("reduction", "mean"),
            normalize=kw.pop("normalize", "mean"),
            grads=None,
        )
        self.kept = _compose(self.kept, res.kept)
        self.history.append(res.report)
        res.kept = self.kept
        return res


def save(module: nn.Module, path: str | os.PathLike) -> Path:
    """Save a pruned module whole, written to a temp file first and then renamed.

    fx-frontend modules are pickled with ``torch.save``; export-frontend modules are
    re-exported and written with ``torch.export.save``. Load either with :func:`load`.
    """
    path = Path(path)
    if not path.parent.exists():
        raise PruneError(f"cannot save to {path}: folder {path.parent} does not exist.")
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        meta_ = getattr(module, "meta", {})
        if isinstance(module, fx.GraphModule) and meta_.get("fxprune.frontend") == "export":
            ex = meta_["fxprune.example_inputs"]
            ep = torch.export.export(module, ex.args, ex.kwargs or None, strict=False)
            torch.export.save(ep, tmp)
        else:
            torch.save(module, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load(path: str | os.PathLike) -> nn.Module:
    """Load a module saved by :func:`save` (pickled modules: only load files you trust)."""
    path = Path(path)
    if not path.exists():
        raise PruneError(f"no such file: {path}")
    try:
        return torch.export.load(path).module()
    except Exception:
        return torch.load(path, weights_only=False)
