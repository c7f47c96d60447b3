"""``fxprune.prune`` and ``fxprune.Pruner``: the structured-pruning pipeline.

trace -> propagate channels -> build groups -> importance -> select (ratio, global
ranking or MACs target; alignment) -> surgery -> verify (the correctness oracle).
The model passed in is left untouched unless ``inplace=True``, which makes that very
object become the pruned module once pruning has succeeded.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import inspect
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from fxprune import validate
from fxprune.analysis import IgnoreSpec, analysis_passes, ignore_spec, ratio_overrides
from fxprune.artifacts import (
    GROUPS,
    KEPT,
    LAYOUTS,
    PLAN,
    SELECTION,
    SELECTION_NOTES,
    VERIFICATION,
)
from fxprune.errors import PruneError, TraceError
from fxprune.masks import ChannelMasks, mask_channels
from fxprune.oracle import GraphPlan
from fxprune.parts import prune_parts
from fxprune.pass_infra import Instrument, Pass, PassContext, PassManager, PassResult
from fxprune.passes.importance import ImportancePass, taylor_grads
from fxprune.passes.plan_channels import PlanChannelsPass, TargetMacsPass
from fxprune.passes.select_channels import SelectChannelsPass, SelectionOptions
from fxprune.passes.surgery import SurgeryPass
from fxprune.passes.verify import SnapshotPass, VerifyPass
from fxprune.report import GroupRow, PruneReport, count_params, graph_macs
from fxprune.trace import ExampleInputs, trace

logger = logging.getLogger(__name__)

Kept = dict[str, dict[int, torch.Tensor]]


@dataclass
class PlanStage:
    """One pruning step as data: enough to cut a fresh trace of the original the same way.

    ``ignored``: what the user kept (module outputs, fully frozen names); it decides the
    groups. ``selection``: {group id: int8 tensor, 1 keep / 2 pad / 0 drop}; ``group_sizes``
    lets a replay check that the model it is given has the same groups as the one pruned.
    """

    head_mode: str
    ignored: IgnoreSpec
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
    freeze_inputs: Iterable[Any] | None = None,
    ignored_layers: Iterable[Any] | None = None,
    exact_only: bool = False,
    pad_outputs: bool = False,
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
    mode: str = "cut",
) -> PruneResult | ChannelMasks:
    """Prune ``model`` and return the smaller, verified module.

    ``ratio``: fraction of each group's channels to remove. ``round_to``: keep a
    multiple of this many positions (8 for fp16 tensor cores, 4 for tf32) or
    ``"heads"`` to prune attention by whole heads. ``align``: ``"round"`` rounds the
    kept count down, ``"pad"`` pads with zero channels up to the multiple.
    ``ratios``: per-module (or module/parameter name) overrides. ``target_macs``:
    prune until MACs reach this fraction of the original (replaces ``ratio``).
    ``ignore`` (alias ``ignored_layers``, as in Torch-Pruning): modules whose own output
    channels stay (``ignore=[model.fc]`` keeps the 1000 classes; the features fc reads are
    pruned with the layers producing them), or parameter names, all of whose channels stay.
    ``freeze_inputs``: modules or parameters every channel of which stays, the ones they
    read included (``freeze_inputs=[model.fc]`` also keeps fc's in_features).
    ``exact_only``: keep every group whose removal is inexact: a transformer's residual
    stream (LayerNorm normalises it) stays whole, only heads and FFN widths are pruned.
    ``pad_outputs``: outputs keep their shape, not their channels: what reaches one is
    pruned, and zeros fill the pruned positions (as in the masked original). For models
    whose output is their features (an encoder's hidden states, a backbone's maps).
    ``verify``: run the correctness oracle (raises on a mismatch).

    ``model`` is left untouched, unless ``inplace=True``: then, once pruning has succeeded,
    ``model`` itself *becomes* the pruned module (class, forward, submodules, parameters;
    state_dict keys stay), ``res.module is model``; build the optimizer after pruning.
    ``mode="mask"`` cuts nothing: it zeroes the channels a cut would remove in ``model``
    and keeps them zero in training (:func:`fxprune.mask_channels`; returns its
    :class:`ChannelMasks`); :func:`fxprune.apply_masks` or the compile backend cut later.
    """
    # locals() here is exactly the arguments: all of them are checked before any copy or trace.
    validate.prune_arguments(locals())
    if mode == "mask":
        return _mask_mode(locals())
    validate.eval_mode_for_export(model, frontend, verify)
    ignored = ignore_spec(model, ignore, freeze_inputs, ignored_layers, exact_only, pad_outputs)
    overrides = ratio_overrides(model, ratios)
    work = copy.deepcopy(model)  # inplace=True too: the model changes only once pruning succeeded
    grads = None
    if importance == "taylor":
        grads = taylor_grads(copy.deepcopy(model), calibration, loss_fn)
    options = dict(
        ratio=ratio, importance=importance, round_to=round_to, align=align,
        global_ranking=global_ranking, target_macs=target_macs, verify=verify,
        ratios=overrides, max_ratio=max_ratio, min_channels=min_channels,
        head_mode=head_mode, reduction=reduction, normalize=normalize, grads=grads,
        instruments=instruments, check=check,
    )  # fmt: skip
    try:
        gm = trace(work, example_inputs, frontend, tuple(leaf_modules), concrete_args)
    except TraceError as exc:
        if frontend != "auto" or concrete_args:
            raise  # the user chose how to trace: no fallback behind their back
        res = prune_parts(
            model, work, example_inputs, _prune_graph, why=exc, ignored=ignored,
            options=options, leaf_modules=tuple(leaf_modules),
        )  # fmt: skip
        return _finish_inplace(model, res, inplace)
    validate.eval_mode_for_export(model, gm.meta.get("fxprune.frontend", frontend), verify)
    res = _prune_graph(gm, example_inputs, ignored=ignored, **options)
    res.kept = _user_names(res.kept, model)
    res.trace_options = _trace_options(model, gm, leaf_modules, concrete_args)
    return _finish_inplace(model, res, inplace)


def _finish_inplace(model: nn.Module, res: PruneResult, inplace: bool) -> PruneResult:
    if inplace:
        res.module = become(model, res.module)
    return res


# What mask mode takes: mask_channels' options. Every other prune option must keep its
# default there (a cut, a MACs search, the oracle and surgery's options have no meaning).
_MASK_OPTIONS = frozenset(inspect.signature(mask_channels).parameters) | {"mode"}


def _mask_mode(args: dict[str, Any]) -> ChannelMasks:
    """``prune(..., mode="mask")``: :func:`fxprune.mask_channels` with the same options."""
    defaults = inspect.signature(prune).parameters
    unused = sorted(
        name
        for name, value in args.items()
        if name not in _MASK_OPTIONS
        and name != "verify"  # on by default for a cut; masking changes no output to check
        and not (value is defaults[name].default or value == defaults[name].default)
    )
    if unused:
        raise PruneError(
            f"prune(mode='mask') zeroes channels in the model and cuts nothing, so it does not "
            f"take {', '.join(f'{n}=' for n in unused)}: leave them out, or cut later with "
            "fxprune.apply_masks (or the fxprune.backend compile pipeline)."
        )
    round_to, head_mode = args["round_to"], args["head_mode"]
    if head_mode is None:  # as for a cut: round_to="heads" prunes attention by whole heads
        head_mode = "heads" if round_to == "heads" else "auto"
    args = {**args, "round_to": 1 if round_to == "heads" else round_to, "head_mode": head_mode}
    options = {k: v for k, v in args.items() if k in _MASK_OPTIONS and k != "mode"}
    return mask_channels(**options)


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
    "mode",
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


def become(model: nn.Module, module: nn.Module) -> nn.Module:
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


def _prune_graph(
    gm: fx.GraphModule,
    example_inputs: Any,
    *,
    ratio: float,
    importance: Any,
    round_to: int | str,
    align: str,
    ignored: IgnoreSpec,
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
    prior: Callable[[list], dict[str, Any]] | None = None,
    macs_before: int | None = None,
) -> PruneResult:
    """Run the prune pipeline on ``gm`` (one PassManager, so instruments see every pass).

    ``prior(groups)``: what earlier steps did to the groups (Pruner), as extra
    SelectionOptions fields (``original_sizes``, ``padding``)."""
    if head_mode is None:
        head_mode = "heads" if round_to == "heads" else "auto"
    frontend = gm.meta.get("fxprune.frontend", "fx")
    # ``macs_before``: known when the previous step of a Pruner counted this very graph.
    macs_before = graph_macs(gm) if macs_before is None else macs_before
    params_before = count_params(gm)
    opts = SelectionOptions(
        ratio=ratio,
        round_to=1 if round_to == "heads" else int(round_to),
        align=align,
        global_ranking=global_ranking,
        max_ratio=max_ratio,
        min_channels=min_channels,
        ratios=ratios,
        history=prior,
    )
    select = (
        SelectChannelsPass(opts)
        if target_macs is None
        else TargetMacsPass(opts, target_macs, macs_before)
    )
    pipeline = PassManager(
        [
            *([SnapshotPass()] if verify else []),
            *analysis_passes(ignored, head_mode),
            ImportancePass(importance, reduction, normalize, grads),
            select,
            PlanChannelsPass(),
            SurgeryPass(),
            *([VerifyPass()] if verify else []),
        ],
        check=check,
        instruments=instruments,
        name="prune",
    )
    ctx = PassContext(example_inputs)
    with _gc_paused():
        pipeline.run(gm, ctx)
    groups, selection = ctx[GROUPS], ctx[SELECTION]
    if not ignored.pad_outputs:
        _hint_pad_outputs(groups)
    verification = ctx.get(VERIFICATION)
    report = PruneReport(
        macs_before=macs_before,
        macs_after=graph_macs(gm),
        params_before=params_before,
        params_after=count_params(gm),
        groups=_group_rows(groups, selection, ctx[SELECTION_NOTES]),
        frozen=sum(not g.prunable for g in groups),
        verified=verification.summary if verification else "not run (verify=False)",
        max_error=verification.max_error if verification and verification.exact else None,
        frontend=frontend,
    )
    stage = PlanStage(
        head_mode,
        ignored,
        {gid: sel.clone() for gid, sel in selection.items()},
        {g.id: g.size for g in groups},
    )
    return PruneResult(
        gm,
        ctx[KEPT],
        report,
        groups,
        [stage],
        ExampleInputs.of(example_inputs),
        graph_plan=GraphPlan(ctx[PLAN], ctx[LAYOUTS]),
    )


def _hint_pad_outputs(groups: list) -> None:
    """Say so when the model's output is its residual stream: channels many layers read,
    kept only because they reach the output (a classifier's classes are read by one)."""
    for g in groups:
        if g.prunable or not str(g.reason).startswith("reaches the model output ("):
            continue
        readers = {m.param.rsplit(".", 1)[0] for m in g.members}
        if len(readers) >= 4:
            logger.warning(
                "%d channels read by %d layers (%s, ...) stay because they reach the model "
                "output. pad_outputs=True prunes them and pads the output back with zeros "
                "(its shape stays); ignore= the layer that produces them keeps them.",
                g.size * g.units,
                len(readers),
                ", ".join(sorted(readers)[:3]),
            )
            return


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Python's cycle collector off for one pipeline run, as it was after.

    A traced graph is hundreds of thousands of objects; the collector's full passes over
    them while a pipeline allocates cost a tenth of an iterative step. What the run
    leaves behind is collected as usual afterwards.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class ReplaySelectionPass(Pass):
    """The selection a saved plan stage holds, once the groups are checked to be the same."""

    requires = (GROUPS,)
    provides = (SELECTION,)

    def __init__(self, stage: PlanStage, step: int) -> None:
        self.stage = stage
        self.step = step

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        stage = self.stage
        sizes = {g.id: g.size for g in ctx[GROUPS]}
        wrong = {
            gid: (n, sizes.get(gid)) for gid, n in stage.group_sizes.items() if sizes.get(gid) != n
        }
        if wrong or len(sizes) != len(stage.group_sizes):
            gid, (want, got) = next(iter(wrong.items()), (None, (None, None)))
            raise PruneError(
                f"the model given does not match the one that was pruned (step {self.step}: "
                f"{len(sizes)} channel groups vs {len(stage.group_sizes)} saved"
                + (f"; group {gid} has {got} channels, saved {want}" if gid is not None else "")
                + "). Pass the same original model class and configuration, with the "
                "example inputs saved beside the plan."
            )
        ctx[SELECTION] = {gid: sel.clone() for gid, sel in stage.selection.items()}
        return PassResult(gm, False)


def replay_stages(gm: fx.GraphModule, example_inputs: Any, stages: list[PlanStage]) -> None:
    """Cut ``gm`` (a fresh trace of the original) exactly as ``stages`` say; no scoring.

    Raises PruneError when the graph's groups differ from the ones the stages were made on
    (another model, another version of it, or other example input shapes).
    """
    for i, stage in enumerate(stages):
        PassManager(
            [
                *analysis_passes(stage.ignored, stage.head_mode),
                ReplaySelectionPass(stage, i + 1),
                PlanChannelsPass(),
                SurgeryPass(),
            ],
            name="replay",
        ).run(gm, PassContext(example_inputs))


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


def schedule_ratio(schedule: str | Callable, ratio: float, k: int, steps: int) -> float:
    """The cumulative ratio after step ``k`` of ``steps`` (0 before the first step).

    ``linear``: ``ratio * k / steps``. ``cubic`` (Zhu & Gupta 2017, "To prune, or not to
    prune"): ``ratio * (1 - (1 - k/steps)**3)``, large steps first. ``exponential``: the
    kept fraction decays geometrically, ``(1 - ratio) ** (k/steps)``, so every step removes
    the same share of what is left. A callable ``fn(k, steps)`` returns the cumulative
    ratio itself. Every named schedule ends exactly at ``ratio``.
    """
    if k <= 0:
        return 0.0
    if callable(schedule):
        return float(schedule(k, steps))
    if k >= steps:
        return ratio
    if schedule == "linear":
        return ratio * k / steps
    if schedule == "cubic":
        return ratio * (1.0 - (1.0 - k / steps) ** 3)
    if schedule == "exponential":
        return 1.0 - (1.0 - ratio) ** (k / steps)
    validate.schedule(schedule, ratio, steps)  # raises, naming the valid schedules
    raise AssertionError(schedule)


class Pruner:
    """Iterative pruning: ``steps`` prune / fine-tune rounds reaching ``ratio`` at the end.

    After step ``k`` every group keeps exactly what one-shot ``prune(ratio=r_k)`` would
    keep of its *original* channels (same rounding, ``round_to`` and ``align``), where
    ``r_k`` is the schedule's cumulative ratio (see :func:`schedule_ratio`): rounding never
    compounds across steps. Per-module ``ratios=`` follow the same schedule. ``ratio=1.0``
    is allowed here (not in one-shot ``prune``): the last step leaves ``min_channels``
    (at least one ``round_to`` multiple) of every group, never none.

    The graph is traced once; later steps re-run the channel analysis on the pruned graph,
    and the channels kept at step k are a subset of those kept at step k-1. With
    ``align="pad"`` the zero channels an earlier step added rank below every real
    channel, so the next step drops them first. ``importance="taylor"`` scores the
    current (fine-tuned) module at each step: with ``calibration`` batches (a list or a
    DataLoader; a one-shot iterator is read into a list once) and ``loss_fn``, or, with
    ``calibration=None``, from the ``.grad`` the user's own backward passes left on
    ``pruner.module``'s parameters.

    Fine-tune ``pruner.module`` between steps. ``inplace=True``: ``model`` itself becomes
    ``pruner.module`` (see :func:`prune`) and shrinks with every step. ``history`` holds
    each step's PruneReport, :meth:`summary` a table of the steps.
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Any,
        ratio: float = 0.5,
        steps: int = 1,
        inplace: bool = False,
        *,
        schedule: str | Callable[[int, int], float] = "linear",
        **kwargs: Any,
    ) -> None:
        validate.integer_at_least("steps", steps, 1, "prune / fine-tune rounds")
        if "target_macs" in kwargs:
            raise PruneError(
                "Pruner does not take target_macs: it reaches ratio= over steps= rounds. "
                "For a MACs target use fxprune.prune(model, x, target_macs=...)."
            )
        validate.known_options("Pruner(...)", kwargs, PRUNER_OPTIONS)
        validate.number_in(
            "ratio", ratio, 0.0, 1.0, "the fraction of each group's channels removed at the end"
        )
        validate.schedule(schedule, ratio, steps)
        validate.prune_arguments(
            dict(model=model, example_inputs=example_inputs, inplace=inplace, **kwargs),
            gradients_given=True,
        )
        # Unset options take prune()'s defaults, read from its signature so they never drift.
        self.options = {
            name: p.default for name, p in _PRUNE_PARAMS.items() if name in PRUNER_OPTIONS
        }
        self.options.update(kwargs)
        if isinstance(self.options["calibration"], Iterator):  # read again at every step
            self.options["calibration"] = list(self.options["calibration"])
        self.example_inputs = example_inputs
        self.ratio, self.steps, self.schedule = ratio, steps, schedule
        self.step_index = 0
        self.kept: Kept = {}
        self.history: list[PruneReport] = []
        self.stages: list[PlanStage] = []
        self.ignored = ignore_spec(
            model,
            self.options.pop("ignore"),
            self.options.pop("freeze_inputs", None),
            self.options.pop("ignored_layers", None),
            self.options.pop("exact_only", False),
            self.options.pop("pad_outputs", False),
        )
        self.ratios = ratio_overrides(model, self.options.pop("ratios"))
        leaf_modules = tuple(self.options.pop("leaf_modules"))
        concrete_args = self.options.pop("concrete_args")
        self.module: nn.Module = trace(
            copy.deepcopy(model),
            example_inputs,
            frontend=self.options.pop("frontend"),
            leaf_modules=leaf_modules,
            concrete_args=concrete_args,
        )
        self.trace_options = _trace_options(model, self.module, leaf_modules, concrete_args)
        # (param, dim) -> the original size of the group each original position belongs
        # to (-1: none); filled by the first step, which analyses the unpruned graph.
        self._origin: dict[tuple[str, int], torch.Tensor] = {}
        self._original_sizes: dict[int, int] = {}  # of the groups of the step being run
        self._widths: list[dict[str, tuple[int, int]]] = []  # per step: source -> (kept, original)
        if inplace:  # model becomes the traced module, which every step prunes in place
            self.module = become(model, self.module)

    @property
    def done(self) -> bool:
        return self.step_index >= self.steps

    def cumulative_ratio(self, k: int) -> float:
        """The fraction of each group's original channels removed after step ``k``."""
        return schedule_ratio(self.schedule, self.ratio, k, self.steps)

    def step(self) -> PruneResult:
        if self.done:
            raise PruneError(f"all {self.steps} pruning steps are done.")
        k = self.step_index + 1
        ratio = self.cumulative_ratio(k)
        opts = dict(self.options)
        calibration, loss_fn = opts.pop("calibration"), opts.pop("loss_fn")
        grads = self._gradients(k, calibration, loss_fn) if opts["importance"] == "taylor" else None
        res = _prune_graph(
            self.module,
            self.example_inputs,
            ratio=ratio,
            ignored=self.ignored,
            target_macs=None,
            ratios={name: self._override(r, k) for name, r in self.ratios.items()},
            grads=grads,
            prior=self._prior,
            macs_before=self.history[-1].macs_after if self.history else None,
            **opts,
        )
        self.step_index = k
        if not self._origin:
            self._record_origin(res.groups)
        self._widths.append(self._group_widths(res))
        self.kept = _compose(self.kept, res.kept)
        self.stages.extend(res.stages)
        self.history.append(res.report)
        res.kept = self.kept
        res.stages = list(self.stages)
        res.trace_options = dict(self.trace_options)
        rep = res.report
        logger.info(
            "Pruner step %d/%d: cumulative ratio %.3f, MACs %.4g (%.2fx fewer than the "
            "original), params %d; %s",
            k,
            self.steps,
            ratio,
            rep.macs_after,
            self.history[0].macs_before / max(rep.macs_after, 1),
            rep.params_after,
            rep.verified,
        )
        return res

    def summary(self) -> str:
        """A table of the steps so far: cumulative ratio, MACs, params and the widths
        (kept/original channels) of the five largest groups."""
        if not self.history:
            return "no pruning step run yet"
        first = self._widths[0]
        largest = sorted(first, key=lambda s: -first[s][1])[:5]
        rows = [("step", "ratio", "MACs", "params", *largest)]
        rep0 = self.history[0]
        rows.append(("0", "0.000", f"{rep0.macs_before:.4g}", f"{rep0.params_before}"))
        rows[-1] += tuple(f"{first[s][1]}/{first[s][1]}" for s in largest)
        for k, rep in enumerate(self.history, 1):
            r = self.cumulative_ratio(k)
            widths = self._widths[k - 1]
            cells = (f"{widths[s][0]}/{widths[s][1]}" if s in widths else "-" for s in largest)
            rows.append(
                (str(k), f"{r:.3f}", f"{rep.macs_after:.4g}", str(rep.params_after), *cells)
            )
        sizes = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(cell.rjust(n) for cell, n in zip(row, sizes)) for row in rows)

    def _override(self, ratio: float, k: int) -> float:
        """A per-module ratio after step k: the same schedule, ending at that ratio."""
        if not callable(self.schedule):
            return schedule_ratio(self.schedule, ratio, k, self.steps)
        end = self.cumulative_ratio(self.steps)
        return ratio * (self.cumulative_ratio(k) / end if end > 0 else k / self.steps)

    def _gradients(self, k: int, calibration, loss_fn) -> dict[str, torch.Tensor]:
        if calibration is not None:
            # gradients of the module as fine-tuned so far; fx keeps the parameter names
            grads = taylor_grads(copy.deepcopy(self.module), calibration, loss_fn)
            if not grads:
                raise PruneError(
                    f"importance='taylor': the calibration batches gave no gradients at step "
                    f"{k} (no batches, or a loss that does not depend on the parameters)."
                )
            return grads
        grads = {
            name: p.grad.detach().clone()
            for name, p in self.module.named_parameters()
            if p.grad is not None
        }
        if not grads:
            raise PruneError(
                f"importance='taylor' with calibration=None scores the gradients already on "
                f"pruner.module's parameters, but none has a .grad at step {k}: run "
                f"loss.backward() on pruner.module's output before pruner.step() (pruning "
                f"replaces the parameters, so after each step too), or pass "
                f"calibration=batches and loss_fn=fn."
            )
        return grads

    def _record_origin(self, groups: list) -> None:
        for g in groups:
            for m in g.members:
                at = self._origin.setdefault(
                    (m.param, m.dim), torch.full((len(m.index_map),), -1, dtype=torch.long)
                )
                at[m.index_map >= 0] = g.size

    def _prior(self, groups: list) -> dict[str, Any]:
        """Each prunable group's original size and its padding channels, traced back through
        ``self.kept`` to the first step's groups."""
        self._original_sizes = {}
        if not self._origin:  # first step: the graph is the original
            return {}
        padding = {}
        for g in groups:
            if not g.prunable:
                continue
            found = self._trace_back(g)
            if found is None:
                logger.warning(
                    "group %d (%s) has no counterpart in the original graph; its ratio "
                    "applies to its current %d channels",
                    g.id,
                    g.source,
                    g.size,
                )
                continue
            self._original_sizes[g.id], pad = found
            if pad.any():
                padding[g.id] = pad
        return {"original_sizes": dict(self._original_sizes), "padding": padding}

    def _trace_back(self, g) -> tuple[int, torch.Tensor] | None:
        """(original size, padding mask) of group ``g`` of the current graph, from its
        source member first (any member with a known origin will do)."""
        members = sorted(g.members, key=lambda m: (m.param, m.dim) != g.source)
        for m in members:
            sizes = self._origin.get((m.param, m.dim))
            base = self.kept.get(m.param, {}).get(m.dim)
            if sizes is None or (base is not None and len(base) != len(m.index_map)):
                continue
            pos = (m.index_map >= 0).nonzero().squeeze(1)
            orig = base[pos] if base is not None else pos
            known = sizes[orig[orig >= 0]]
            known = known[known >= 0]
            if not len(known):
                continue
            pad = torch.zeros(g.size, dtype=torch.bool)
            pad[m.index_map[pos][orig < 0]] = True
            return int(known.max()), pad
        return None

    def _group_widths(self, res: PruneResult) -> dict[str, tuple[int, int]]:
        selection = res.stages[-1].selection
        return {
            f"{g.source[0]}[{g.source[1]}]": (
                int((selection[g.id] > 0).sum()),
                self._original_sizes.get(g.id, g.size),
            )
            for g in res.groups
            if g.id in selection and g.source
        }
