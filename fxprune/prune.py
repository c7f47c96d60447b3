"""``fxprune.prune`` and ``fxprune.Pruner``: the structured-pruning pipeline.

trace -> propagate channels -> build groups -> importance -> select (ratio, global
ranking or MACs target; alignment) -> surgery -> verify (the correctness oracle).
The model passed in is left untouched unless ``inplace=True``, which makes that very
object become the pruned module once pruning has succeeded.
"""

from __future__ import annotations

import copy
import inspect
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from fxprune import meta, validate
from fxprune.analysis import ignored_prefixes, run_analysis
from fxprune.channels import Layout
from fxprune.errors import PruneError
from fxprune.oracle import GraphPlan
from fxprune.pass_infra import Instrument, PassContext, PassManager
from fxprune.report import GroupRow, PruneReport, count_params, graph_macs
from fxprune.trace import ExampleInputs, trace

logger = logging.getLogger(__name__)

Kept = dict[str, dict[int, torch.Tensor]]


@dataclass
class PlanStage:
    """One pruning step as data: enough to cut a fresh trace of the original the same way.

    ``selection``: {group id: int8 tensor, 1 keep / 2 pad / 0 drop}; ``group_sizes`` lets a
    replay check that the model it is given has the same groups as the one pruned.
    """

    head_mode: str
    ignore: tuple[str, ...]
    selection: dict[int, torch.Tensor]
    group_sizes: dict[int, int]


@dataclass
class PruneResult:
    """``module``: the pruned model; ``kept``: {param: {dim: original indices, -1 = padding}}.

    ``stages`` and ``example_inputs`` are what :func:`fxprune.save` writes so that
    :func:`fxprune.load` can rebuild the module from the original without pickle.
    """

    module: nn.Module
    kept: Kept
    report: PruneReport
    groups: list = field(default_factory=list, repr=False)
    stages: list[PlanStage] = field(default_factory=list, repr=False)
    example_inputs: Any = field(default=None, repr=False)
    trace_options: dict[str, Any] = field(default_factory=dict, repr=False)
    graph_plan: GraphPlan | None = field(default=None, repr=False)  # lets verify() name nodes

    def __str__(self) -> str:
        return str(self.report)


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

    ``model`` is left untouched, unless ``inplace=True``: then, once pruning has
    succeeded, ``model`` itself *becomes* the pruned module (its class, forward,
    submodules and parameters are replaced by the pruned GraphModule's; state_dict keys
    stay) and ``res.module is model``. Its parameters are new tensors, so build the
    optimizer after pruning. A failure leaves ``model`` as it was.
    """
    # locals() here is exactly the arguments: all of them are checked before any copy or trace.
    validate.prune_arguments(locals())
    validate.eval_mode_for_export(model, frontend, verify)
    prefixes = ignored_prefixes(model, ignore)
    overrides = _override_names(model, ratios)
    work = copy.deepcopy(model)  # inplace=True too: the model changes only once pruning succeeded
    gm = trace(
        work,
        example_inputs,
        frontend=frontend,
        leaf_modules=tuple(leaf_modules),
        concrete_args=concrete_args,
    )
    validate.eval_mode_for_export(model, gm.meta.get("fxprune.frontend", frontend), verify)
    grads = None
    if importance == "taylor":
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
    res.trace_options = _trace_options(model, gm, leaf_modules, concrete_args)
    if inplace:
        res.module = _become(model, res.module)
    return res


_PRUNE_PARAMS = inspect.signature(prune).parameters
# Pruner's options are prune()'s, read from its signature rather than restated: Pruner
# takes model, example_inputs, ratio and inplace itself, and target_macs has no meaning
# for a fixed schedule of steps.
PRUNER_OPTIONS = frozenset(_PRUNE_PARAMS) - {
    "model",
    "example_inputs",
    "ratio",
    "inplace",
    "target_macs",
}


def _trace_options(model: nn.Module, gm: fx.GraphModule, leaf_modules, concrete_args) -> dict:
    """How ``gm`` was traced, as plain data (leaf modules by name) for saving the plan."""
    leaves = tuple(leaf_modules)
    types = tuple(m for m in leaves if isinstance(m, type))
    ids = {id(m) for m in leaves if isinstance(m, nn.Module)}
    names = [
        n
        for n, m in model.named_modules()
        if n and (n in leaves or id(m) in ids or (types and isinstance(m, types)))
    ]
    cls = type(model)
    return {
        "frontend": gm.meta.get("fxprune.frontend", "fx"),
        "leaf_modules": names,
        "concrete_args": dict(concrete_args or {}),
        "model_class": f"{cls.__module__}.{cls.__qualname__}",
    }


def _user_names(kept: Kept, model: nn.Module) -> Kept:
    """Only the model's own parameters and buffers (fx also slices constants it made from them)."""
    names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    names |= {n for n, _ in model.named_buffers(remove_duplicate=False)}
    return {k: v for k, v in kept.items() if k in names}


def _become(model: nn.Module, module: nn.Module) -> nn.Module:
    """Turn the caller's object ``model`` into ``module`` (which is consumed); returns ``model``.

    What ``inplace=True`` means: pruning works on a copy, so a failure leaves ``model``
    untouched; on success ``model`` takes the pruned module's class and attributes. Its
    forward, submodules, parameters (new, smaller tensors: rebuild optimizers) and state_dict
    keys are then those of the pruned module, and so are its attributes: the original
    class's other attributes are gone.
    """
    try:
        # First, because it is the step that can fail (an incompatible object layout, e.g.
        # __slots__), and it changes nothing when it does.
        model.__class__ = type(module)
    except TypeError as exc:
        raise PruneError(
            f"inplace=True cannot make this {type(model).__name__} object the pruned "
            f"module ({exc}). Prune without inplace and rebind: "
            f"model = fxprune.prune(model, ...).module"
        ) from exc
    model.__dict__.clear()
    model.__dict__.update(module.__dict__)
    if isinstance(model, fx.GraphModule):
        model.graph = model.graph  # the graph's owning module becomes ``model``; recompiles
    return model


def _override_names(model: nn.Module, ratios: Mapping[Any, float] | None) -> dict[str, float]:
    if not ratios:
        return {}
    # The keys name modules exactly as ignore= does: same resolution, same messages.
    names = ignored_prefixes(model, list(ratios), argument="ratios")
    return dict(zip(names, ratios.values()))


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
    stage = PlanStage(
        head_mode,
        tuple(prefixes),
        {gid: sel.clone() for gid, sel in ctx.results["selection"].items()},
        {g.id: g.size for g in groups},
    )
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
    return PruneResult(
        gm,
        ctx.results.get("kept", {}),
        report,
        groups,
        [stage],
        ExampleInputs.of(example_inputs),
        graph_plan=GraphPlan(plan, layouts),
    )


def replay_stages(gm: fx.GraphModule, example_inputs: Any, stages: list[PlanStage]) -> None:
    """Cut ``gm`` (a fresh trace of the original) exactly as ``stages`` say; no scoring.

    Raises PruneError when the graph's groups differ from the ones the stages were made on
    (another model, another version of it, or other example input shapes).
    """
    from fxprune.passes.surgery import SurgeryPass

    for i, stage in enumerate(stages):
        ctx = PassContext(example_inputs=example_inputs)
        groups, _, ctx = run_analysis(gm, stage.ignore, stage.head_mode, ctx)
        sizes = {g.id: g.size for g in groups}
        wrong = {
            gid: (n, sizes.get(gid)) for gid, n in stage.group_sizes.items() if sizes.get(gid) != n
        }
        if wrong or len(sizes) != len(stage.group_sizes):
            gid, (want, got) = next(iter(wrong.items()), (None, (None, None)))
            raise PruneError(
                f"the model given does not match the one that was pruned (step {i + 1}: "
                f"{len(sizes)} channel groups vs {len(stage.group_sizes)} saved"
                + (f"; group {gid} has {got} channels, saved {want}" if gid is not None else "")
                + "). Pass the same original model class and configuration, with the "
                "example inputs saved beside the plan."
            )
        ctx.results["selection"] = {gid: sel.clone() for gid, sel in stage.selection.items()}
        PassManager([SurgeryPass()]).run(gm, ctx)


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
    Fine-tune ``pruner.module`` between steps. ``inplace=True``: ``model`` itself becomes
    ``pruner.module`` (see :func:`prune`) and shrinks with every step.
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
        validate.integer_at_least("steps", steps, 1, "prune / fine-tune rounds")
        if "target_macs" in kwargs:
            raise PruneError(
                "Pruner does not take target_macs: it reaches ratio= over steps= rounds. "
                "For a MACs target use fxprune.prune(model, x, target_macs=...)."
            )
        validate.known_options("Pruner(...)", kwargs, PRUNER_OPTIONS)
        validate.prune_arguments(
            dict(model=model, example_inputs=example_inputs, ratio=ratio, inplace=inplace, **kwargs)
        )
        # Unset options take prune()'s defaults, read from its signature so they never drift.
        self.options = {
            name: p.default for name, p in _PRUNE_PARAMS.items() if name in PRUNER_OPTIONS
        }
        self.options.update(kwargs)
        self.example_inputs = example_inputs
        self.ratio, self.steps = ratio, steps
        self.step_index = 0
        self.kept: Kept = {}
        self.history: list[PruneReport] = []
        self.stages: list[PlanStage] = []
        self.prefixes = ignored_prefixes(model, self.options.pop("ignore"))
        self.ratios = _override_names(model, self.options.pop("ratios"))
        self.module: nn.Module = trace(
            copy.deepcopy(model),
            example_inputs,
            frontend=self.options.pop("frontend"),
            leaf_modules=tuple(self.options.pop("leaf_modules")),
            concrete_args=self.options.pop("concrete_args"),
        )
        if inplace:  # model becomes the traced module, which every step prunes in place
            self.module = _become(model, self.module)

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
        opts = dict(self.options)
        calibration, loss_fn = opts.pop("calibration"), opts.pop("loss_fn")
        grads = None
        if opts["importance"] == "taylor":
            from fxprune.passes.importance import taylor_grads

            # gradients of the module as fine-tuned so far; fx keeps the parameter names
            grads = taylor_grads(copy.deepcopy(self.module), calibration, loss_fn)
        res = _prune_graph(
            self.module,
            self.example_inputs,
            ratio=step_ratio,
            prefixes=self.prefixes,
            target_macs=None,
            ratios=self.ratios,
            grads=grads,
            **opts,
        )
        self.kept = _compose(self.kept, res.kept)
        self.stages.extend(res.stages)
        self.history.append(res.report)
        res.kept = self.kept
        res.stages = list(self.stages)
        return res
