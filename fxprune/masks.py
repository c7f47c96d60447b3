"""``fxprune.mask_channels`` / ``fxprune.apply_masks``: masks as the currency between passes.

``mask_channels`` selects channels exactly as :func:`fxprune.prune` would (same analysis,
importance and selection, on a traced copy) but cuts nothing: it zeroes every parameter
slice of the selected channels in the user's model (producer rows and biases, norm
affine parameters, the input columns of the consumers) and keeps them zero during
fine-tuning with ``torch.nn.utils.parametrize`` (``weight = original * mask``), as
``torch.nn.utils.prune`` does. ``soft=True`` zeroes them once and lets training revive
them (soft filter pruning: call it again each epoch). Buffers are left alone: a zero
batch-norm weight and bias already make the channel zero.

The cut comes later and is lossless: ``apply_masks`` (or the compile backend) finds the
zero channels with :class:`~fxprune.passes.dead_channels.DeadChannelPass` and removes them.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.nn.utils import parametrize

from fxprune import validate
from fxprune.analysis import analysis_passes, ignore_spec, ratio_overrides
from fxprune.artifacts import DEAD_CHANNELS, GROUPS, KEPT, OUTPUT_ERROR, SELECTION
from fxprune.backend import eliminate_dead_channels
from fxprune.pass_infra import PassContext, PassManager
from fxprune.passes.importance import ImportancePass
from fxprune.passes.select_channels import KEEP, SelectChannelsPass, SelectionOptions
from fxprune.passes.verify import RecordOutputsPass, SameOutputsPass
from fxprune.report import count_params, graph_macs
from fxprune.trace import trace

logger = logging.getLogger(__name__)


class ChannelMask(nn.Module):
    """The parametrization ``weight = original * mask`` (mask: 0/1, broadcast)."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask


@dataclass
class ChannelMasks:
    """What :func:`mask_channels` did: ``masks`` {parameter: 0/1 tensor of its shape},
    ``channels`` {group source: (masked, size)}, ``soft`` (no parametrization)."""

    masks: dict[str, torch.Tensor]
    channels: dict[str, tuple[int, int]]
    soft: bool = False

    def __str__(self) -> str:
        masked = sum(n for n, _ in self.channels.values())
        total = sum(s for _, s in self.channels.values())
        kind = "zeroed once (soft)" if self.soft else "kept zero by parametrizations"
        return (
            f"{masked}/{total} channels of {len(self.channels)} groups masked in "
            f"{len(self.masks)} parameters, {kind}"
        )


def mask_channels(
    model: nn.Module,
    example_inputs: Any,
    ratio: float = 0.5,
    importance: str | Callable = "l2",
    round_to: int = 1,
    ignore: Iterable[Any] | None = None,
    global_ranking: bool = False,
    *,
    soft: bool = False,
    ratios: Mapping[Any, float] | None = None,
    freeze_inputs: Iterable[Any] | None = None,
    ignored_layers: Iterable[Any] | None = None,
    exact_only: bool = False,
    max_ratio: float = 0.9,
    min_channels: int = 1,
    head_mode: str = "auto",
    frontend: str = "auto",
) -> ChannelMasks:
    """Zero the channels :func:`fxprune.prune` would remove, in ``model`` itself.

    The options mean what they mean for ``prune``. Returns the masks; the model's
    masked parameters become parametrized (``soft=False``) or are zeroed in place
    (``soft=True``). Undo with :func:`remove_masks`; cut with :func:`apply_masks`.
    """
    validate.prune_arguments(
        dict(
            model=model,
            example_inputs=example_inputs,
            importance=importance,
            ignore=ignore,
            global_ranking=global_ranking,
            exact_only=exact_only,
            max_ratio=max_ratio,
            min_channels=min_channels,
            head_mode=head_mode,
            frontend=frontend,
        )
    )
    ignored = ignore_spec(model, ignore, freeze_inputs, ignored_layers, exact_only)
    options = SelectionOptions(
        ratio=ratio,
        round_to=round_to,
        global_ranking=global_ranking,
        max_ratio=max_ratio,
        min_channels=min_channels,
        ratios=ratio_overrides(model, ratios),
    )
    gm = trace(plain_copy(model), example_inputs, frontend=frontend)
    ctx = PassContext(example_inputs)
    PassManager(
        [
            *analysis_passes(ignored, head_mode),
            ImportancePass(importance),
            SelectChannelsPass(options),
        ],
        name="mask",
    ).run(gm, ctx)
    masks, channels = _masks(ctx[GROUPS], ctx[SELECTION], model)
    _apply(model, masks, soft)
    result = ChannelMasks(masks, channels, soft)
    logger.info("mask_channels: %s", result)
    return result


def _masks(groups, selection, model: nn.Module):
    """{parameter: 0/1 mask} of the model's own parameters, from the selected channels."""
    params = dict(model.named_parameters(remove_duplicate=False))
    params = {_plain_name(n): p for n, p in params.items()}
    masks: dict[str, torch.Tensor] = {}
    channels: dict[str, tuple[int, int]] = {}
    for g in groups:
        state = selection.get(g.id)
        if state is None or bool((state == KEEP).all()):
            continue
        dropped = state != KEEP  # padding channels are zero too
        if g.source:
            channels[f"{g.source[0]}[{g.source[1]}]"] = (int(dropped.sum()), g.size)
        for m in g.members:
            p = params.get(m.param)
            if p is None:
                continue  # a buffer (statistics): the zero weight and bias zero the channel
            index_map = torch.as_tensor(m.index_map)
            gone = (index_map >= 0) & dropped[index_map.clamp(min=0)]
            keep = (~gone).to(p.dtype)
            shape = [1] * p.dim()
            shape[m.dim] = len(keep)
            mask = masks.setdefault(m.param, torch.ones_like(p, device="cpu"))
            mask.mul_(keep.view(shape))
    return masks, channels


def _plain_name(name: str) -> str:
    """A parametrized parameter's user name (``conv.parametrizations.weight.original``)."""
    return name.replace(".parametrizations.", ".").removesuffix(".original")


def _apply(model: nn.Module, masks: dict[str, torch.Tensor], soft: bool) -> None:
    for fqn, mask in masks.items():
        prefix, _, name = fqn.rpartition(".")
        owner = model.get_submodule(prefix) if prefix else model
        if parametrize.is_parametrized(owner, name):
            for p in owner.parametrizations[name]:
                if isinstance(p, ChannelMask):  # a second call tightens the mask
                    mask = mask.to(p.mask.device) * p.mask
            parametrize.remove_parametrizations(owner, name, leave_parametrized=True)
        tensor = getattr(owner, name)
        mask = mask.to(tensor.device)
        with torch.no_grad():
            tensor.mul_(mask)
        if not soft:
            parametrize.register_parametrization(owner, name, ChannelMask(mask))


def remove_masks(model: nn.Module) -> nn.Module:
    """Drop fxprune's mask parametrizations, keeping the masked (zero) values."""
    _unparametrize(model)
    return model


def plain_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every parametrized tensor a plain parameter holding
    its current value; ``model`` is untouched.

    (``remove_parametrizations`` on a deep copy would break the original: the copy shares
    its parametrized class, from which removal deletes the property.)
    """
    out = copy.deepcopy(model)
    for module in list(out.modules()):
        if not parametrize.is_parametrized(module):
            continue
        with torch.no_grad():
            values = {name: getattr(module, name) for name in module.parametrizations}
        module.__class__ = type(module).__bases__[0]
        del module._modules["parametrizations"]
        for name, value in values.items():
            module.register_parameter(name, nn.Parameter(value.detach().clone()))
    return out


def _unparametrize(model: nn.Module) -> None:
    for module in list(model.modules()):
        if not parametrize.is_parametrized(module):
            continue
        for name in list(module.parametrizations.keys()):
            if any(isinstance(p, ChannelMask) for p in module.parametrizations[name]):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)


@dataclass
class AppliedMasks:
    """The smaller module :func:`apply_masks` made; MACs and parameters before and after."""

    module: fx.GraphModule
    kept: dict[str, dict[int, torch.Tensor]]
    dead_channels: int
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    max_error: float | None = field(default=None)

    def __str__(self) -> str:
        return (
            f"{self.dead_channels} dead channels removed: MACs {self.macs_before:,} -> "
            f"{self.macs_after:,} ({self.macs_after / max(self.macs_before, 1):.1%}), params "
            f"{self.params_before:,} -> {self.params_after:,}"
            + (f", max abs error {self.max_error:.1e}" if self.max_error is not None else "")
        )


def apply_masks(
    model: nn.Module,
    example_inputs: Any,
    round_to: int = 1,
    verify: bool = True,
    frontend: str = "auto",
) -> AppliedMasks:
    """Cut the zero channels of a (masked) model: a smaller module with the same outputs.

    ``model`` is left untouched (its parametrizations too). ``round_to``: keep a multiple
    of that many channels per group (the extra ones zero). ``verify``: compare the outputs
    on ``example_inputs`` (raises ``VerificationError`` on a mismatch).
    """
    gm = trace(plain_copy(model), example_inputs, frontend=frontend)
    macs_before, params_before = graph_macs(gm), count_params(gm)
    ctx = PassContext(example_inputs)
    PassManager(
        [
            *([RecordOutputsPass()] if verify else []),
            eliminate_dead_channels(round_to),
            *([SameOutputsPass("the model with its dead channels cut")] if verify else []),
        ],
        name="apply_masks",
    ).run(gm, ctx)
    return AppliedMasks(
        gm,
        ctx.get(KEPT, {}),
        sum(ctx.get(DEAD_CHANNELS, {}).values()),
        macs_before,
        graph_macs(gm),
        params_before,
        count_params(gm),
        ctx.get(OUTPUT_ERROR),
    )
