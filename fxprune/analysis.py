"""``fxprune.analyze``: trace a model and find every group of channels that must be pruned together."""

from __future__ import annotations

import difflib
import inspect
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from fxprune import validate
from fxprune.artifacts import CHANNELS, GROUPS
from fxprune.channels import PruneGroup
from fxprune.errors import PruneError
from fxprune.pass_infra import Pass, PassContext, PassManager
from fxprune.passes import BuildGroupsPass, PropagateChannelsPass
from fxprune.trace import trace
from fxprune.validate import HEAD_MODES, show

logger = logging.getLogger(__name__)


@dataclass
class ChannelAnalysis:
    """Result of :func:`analyze`: the traced graph and its prune groups."""

    gm: fx.GraphModule
    groups: list[PruneGroup]
    env: Any = field(repr=False, default=None)
    frontend: str = "fx"

    @property
    def prunable_groups(self) -> list[PruneGroup]:
        return [g for g in self.groups if g.prunable]

    def group_of(self, param: str, dim: int = 0) -> PruneGroup | None:
        """The group holding dim ``dim`` of parameter ``param`` (the first, for concat consumers)."""
        for g in self.groups:
            if g.member(param, dim) is not None:
                return g
        return None

    def table(self, max_members: int = 4, only_prunable: bool = False) -> str:
        rows = [
            f"{'group':>5}  {'size':>5}  {'structure':<9}  {'status':<9}  {'exact':<5}  members"
        ]
        for g in self.groups:
            if only_prunable and not g.prunable:
                continue
            names = [repr(m) for m in g.members[:max_members]]
            if len(g.members) > max_members:
                names.append(f"... +{len(g.members) - max_members}")
            status = "prunable" if g.prunable else "frozen"
            rows.append(
                f"{g.id:>5}  {g.size:>5}  {g.structure:<9}  {status:<9}  "
                f"{'yes' if g.exact else 'no':<5}  {', '.join(names)}"
            )
            if not g.prunable:
                rows.append(f"{'':>36}why frozen: {g.reason}")
            if not g.exact:
                rows.append(f"{'':>36}inexact: {g.inexact_reason}")
        n_p = len(self.prunable_groups)
        rows.append(f"{len(self.groups)} groups, {n_p} prunable ({self.frontend} frontend)")
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.table()


@dataclass(frozen=True)
class IgnoreSpec:
    """What the user asked to keep, resolved to name prefixes of the model's parameters.

    ``outputs``: modules whose *own output channels* stay (``ignore=`` / ``ignored_layers=``,
    as Torch-Pruning's ``ignored_layers``): the channels their parameters produce
    (conv/linear out channels, a transposed conv's dim 1, an embedding's dim) or, for a
    module that passes its input's channels through (norms, depthwise conv, PReLU), those
    channels. What the module reads is pruned with its producer.
    ``frozen``: modules and parameters *every* channel of which stays, read or produced
    (``freeze_inputs=``, and parameter names given to ``ignore=``).
    ``exact_only``: every channel whose removal is inexact stays (``exact_only=True``): a
    transformer's residual stream, which LayerNorm / RMSNorm normalise, so that only heads
    and FFN widths are pruned and the oracle proves the result.
    ``pad_outputs``: the model's outputs keep their shape, not their channels
    (``pad_outputs=True``): channels reaching an output are pruned and the output padded
    back with zeros where they were.
    """

    outputs: tuple[str, ...] = ()
    frozen: tuple[str, ...] = ()
    exact_only: bool = False
    pad_outputs: bool = False


def ignored_prefixes(model: nn.Module, ignore: Any, argument: str = "ignore") -> tuple[str, ...]:
    """Turn modules, parameters, module names and parameter names into name prefixes.

    ``ignore`` is one module, parameter or name, or a list of them: ``ignore=model.fc`` and
    ``ignore="fc"`` mean ``ignore=[model.fc]`` (a module is never iterated, although
    ``nn.Sequential`` is iterable, and a name is never split into characters). Unknown
    ones are rejected. ``argument`` is the name the user passed them as, for the messages.
    """
    if ignore is None:
        return ()
    if isinstance(ignore, (nn.Module, str, nn.Parameter)):
        ignore = [ignore]
    elif not isinstance(ignore, Iterable) or isinstance(ignore, (bytes, Mapping, torch.Tensor)):
        raise PruneError(
            f"{argument} must be a module, a module or parameter name, or a list of them "
            f"(e.g. {argument}=[model.fc] or {argument}=['fc']), got {show(ignore)}."
        )
    by_id = {id(m): name for name, m in model.named_modules()}
    tensors = list(model.named_parameters(remove_duplicate=False))
    tensors += list(model.named_buffers(remove_duplicate=False))
    tensor_ids = {}
    for name, t in tensors:
        tensor_ids.setdefault(id(t), name)
    names = {n for n, _ in tensors}
    modules = {n for n, _ in model.named_modules()}
    out = []
    for item in ignore:
        if isinstance(item, nn.Module):
            if id(item) not in by_id:
                raise PruneError(
                    f"{argument}: module {type(item).__name__} is not part of the model. Pass the "
                    f"model's own submodule (e.g. model.fc), or its name as a string."
                )
            out.append(by_id[id(item)])
        elif isinstance(item, torch.Tensor):
            if id(item) not in tensor_ids:
                raise PruneError(
                    f"{argument}: {show(item)} is not a parameter or buffer of the model. Pass "
                    f"the model's own parameter (e.g. model.fc.weight), or its name as a string."
                )
            out.append(tensor_ids[id(item)])
        elif isinstance(item, str):
            if item not in names and item not in modules:
                close = sorted(n for n in modules | names if item.split(".")[-1] in n)[:5]
                close = close or difflib.get_close_matches(item, sorted(modules | names), n=3)
                raise PruneError(
                    f"{argument}: '{item}' is neither a module nor a parameter of the model."
                    + (f" Did you mean one of {close}?" if close else "")
                )
            out.append(item)
        else:
            raise PruneError(
                f"{argument}: expected modules or module/parameter names, got {show(item)}."
            )
    return tuple(out)


def ignore_alias(ignore: Any, ignored_layers: Any) -> tuple[Any, str]:
    """``ignore=`` or its Torch-Pruning spelling ``ignored_layers=``: the value and its name.

    Passing both is an error, raised before anything is traced.
    """
    if ignore is not None and ignored_layers is not None:
        raise PruneError(
            "ignored_layers= is another name for ignore=; pass one of them, not both "
            "(e.g. ignore=[model.fc])."
        )
    if ignored_layers is not None:
        return ignored_layers, "ignored_layers"
    return ignore, "ignore"


def ratio_overrides(model: nn.Module, ratios: Mapping[Any, float] | None) -> dict[str, float]:
    """``ratios=`` keys resolved to module / parameter names, exactly as ``ignore=``'s."""
    if not ratios:
        return {}
    # The keys name modules exactly as ignore= does: same resolution, same messages.
    names = ignored_prefixes(model, list(ratios), argument="ratios")
    return dict(zip(names, ratios.values()))


def ignore_spec(
    model: nn.Module,
    ignore: Any = None,
    freeze_inputs: Any = None,
    ignored_layers: Any = None,
    exact_only: bool = False,
    pad_outputs: bool = False,
) -> IgnoreSpec:
    """Resolve ``ignore=`` (or ``ignored_layers=``) and ``freeze_inputs=`` against ``model``.

    Modules given to ``ignore=`` keep their output channels; parameters given to it, and
    everything given to ``freeze_inputs=``, keep all their channels; ``exact_only`` keeps
    every channel whose removal is inexact (see :class:`IgnoreSpec`).
    """
    value, argument = ignore_alias(ignore, ignored_layers)
    given = ignored_prefixes(model, value, argument)
    tensors = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    tensors |= {n for n, _ in model.named_buffers(remove_duplicate=False)}
    for name in given:
        if name not in tensors and not _owns_tensors(model.get_submodule(name)):
            logger.warning(
                "%s: '%s' has no parameters, so no channels of its own: nothing is kept for it. "
                "Name the layer that produces the channels to keep.",
                argument,
                name,
            )
    frozen = ignored_prefixes(model, freeze_inputs, "freeze_inputs")
    return IgnoreSpec(
        outputs=tuple(n for n in given if n not in tensors),
        frozen=tuple(n for n in given if n in tensors) + frozen,
        exact_only=bool(exact_only),
        pad_outputs=bool(pad_outputs),
    )


def _owns_tensors(module: nn.Module) -> bool:
    return any(True for _ in module.parameters()) or any(True for _ in module.buffers())


def analysis_passes(ignored: IgnoreSpec | None = None, head_mode: str = "auto") -> list[Pass]:
    """The channel analysis: relate every node's channels, then group them."""
    if head_mode not in HEAD_MODES:
        raise PruneError(f"head_mode must be one of {HEAD_MODES}, got {head_mode!r}.")
    ignored = ignored or IgnoreSpec()
    propagate = PropagateChannelsPass(
        head_mode=head_mode,
        keep_outputs=ignored.outputs,
        freeze=ignored.frozen,
        exact_only=ignored.exact_only,
        pad_outputs=ignored.pad_outputs,
    )
    return [propagate, BuildGroupsPass()]


def run_analysis(
    gm: fx.GraphModule, ignored: IgnoreSpec | None = None, head_mode: str = "auto"
) -> tuple[list[PruneGroup], Any]:
    """(groups, channel env) of ``gm``, whose node.meta gets the analysis."""
    ctx = PassContext()
    PassManager(analysis_passes(ignored, head_mode), name="analysis").run(gm, ctx)
    return ctx[GROUPS], ctx[CHANNELS]


def analyze(
    model: nn.Module,
    example_inputs: Any,
    ignore: Iterable[Any] | None = None,
    frontend: str = "auto",
    head_mode: str = "auto",
    *,
    freeze_inputs: Iterable[Any] | None = None,
    ignored_layers: Iterable[Any] | None = None,
    exact_only: bool = False,
    pad_outputs: bool = False,
    **trace_kwargs: Any,
) -> ChannelAnalysis:
    """Trace ``model`` and return its prune groups (the model is not modified).

    ``ignore`` (alias ``ignored_layers``): modules whose output channels must stay (what
    they read stays prunable), or parameters all of whose channels must stay.
    ``freeze_inputs``: modules or parameters every channel of which must stay, the ones
    they read included.
    ``exact_only``: keep every channel whose removal is inexact (the residual stream of a
    transformer, normalised by LayerNorm): only exact groups (heads, FFN widths) are prunable.
    ``pad_outputs``: channels reaching the model's outputs are prunable (see :func:`prune`).
    ``head_mode``: how a split of channels into (heads, head_dim) is kept dense —
    ``"heads"`` prunes whole heads, ``"head_dim"`` the same dims in every head,
    ``"auto"`` keeps the finer of the two.
    """
    # Options of fxprune.trace pass through; anything else is a typo, caught before tracing.
    trace_options = set(inspect.signature(trace).parameters) - {"model", "example_inputs"}
    validate.known_options("analyze(...)", trace_kwargs, trace_options)
    validate.prune_arguments(
        dict(
            model=model,
            example_inputs=example_inputs,
            frontend=frontend,
            head_mode=head_mode,
            exact_only=exact_only,
            pad_outputs=pad_outputs,
            **trace_kwargs,
        )
    )
    ignored = ignore_spec(model, ignore, freeze_inputs, ignored_layers, exact_only, pad_outputs)
    gm = trace(model, example_inputs, frontend=frontend, **trace_kwargs)
    groups, env = run_analysis(gm, ignored, head_mode)
    return ChannelAnalysis(gm, groups, env, gm.meta.get("fxprune.frontend", frontend))
