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
from fxprune.channels import PruneGroup
from fxprune.errors import PruneError
from fxprune.pass_infra import PassContext, PassManager
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


def ignored_prefixes(model: nn.Module, ignore: Any, argument: str = "ignore") -> tuple[str, ...]:
    """Turn modules, module names and parameter names into name prefixes; reject unknown ones.

    ``ignore`` is one module or name, or a list of them: ``ignore=model.fc`` and
    ``ignore="fc"`` mean ``ignore=[model.fc]`` (a module is never iterated, although
    ``nn.Sequential`` is iterable, and a name is never split into characters).
    ``argument`` is the name the user passed them as, for the messages.
    """
    if ignore is None:
        return ()
    if isinstance(ignore, (nn.Module, str)):
        ignore = [ignore]
    elif not isinstance(ignore, Iterable) or isinstance(ignore, (bytes, Mapping, torch.Tensor)):
        raise PruneError(
            f"{argument} must be a module, a module or parameter name, or a list of them "
            f"(e.g. {argument}=[model.fc] or {argument}=['fc']), got {show(ignore)}."
        )
    by_id = {id(m): name for name, m in model.named_modules()}
    names = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
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


def run_analysis(
    gm: fx.GraphModule,
    ignore: tuple[str, ...] = (),
    head_mode: str = "auto",
    ctx: PassContext | None = None,
) -> tuple[list[PruneGroup], Any, PassContext]:
    from fxprune.passes import BuildGroupsPass, PropagateChannelsPass

    if head_mode not in HEAD_MODES:
        raise PruneError(f"head_mode must be one of {HEAD_MODES}, got {head_mode!r}.")
    ctx = ctx or PassContext()
    PassManager([PropagateChannelsPass(head_mode=head_mode, ignore=ignore), BuildGroupsPass()]).run(
        gm, ctx
    )
    return ctx.results["groups"], ctx.results["channels"], ctx


def analyze(
    model: nn.Module,
    example_inputs: Any,
    ignore: Iterable[Any] | None = None,
    frontend: str = "auto",
    head_mode: str = "auto",
    **trace_kwargs: Any,
) -> ChannelAnalysis:
    """Trace ``model`` and return its prune groups (the model is not modified).

    ``ignore``: modules, module names or parameter names whose channels must stay.
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
            **trace_kwargs,
        )
    )
    prefixes = ignored_prefixes(model, ignore)
    gm = trace(model, example_inputs, frontend=frontend, **trace_kwargs)
    groups, env, _ = run_analysis(gm, prefixes, head_mode)
    return ChannelAnalysis(gm, groups, env, gm.meta.get("fxprune.frontend", frontend))
