"""Masked fine-tuning for N:M sparsity: the zeros stay zero while a model trains.

:func:`apply_nm_masks` makes each named parameter read as ``param * mask``
(``torch.nn.utils.parametrize``), so the mask is part of the forward computation and
any optimizer keeps the pattern; :func:`bake_masks` removes the parametrizations and
leaves plain masked tensors under the original parameter names, in the original order.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize

from fxprune import validate
from fxprune.nm_patterns import SparsityError, require_tensor
from fxprune.tensors import owner_of

logger = logging.getLogger(__name__)

__all__ = ["NMMask", "apply_nm_masks", "bake_masks"]


class NMMask(nn.Module):
    """Parametrization ``w -> w * mask``; the mask is a buffer saved with the module."""

    def __init__(self, mask: torch.Tensor, owner_order: list[str] | None = None) -> None:
        super().__init__()
        self.register_buffer("mask", mask.detach().to(torch.bool).clone())
        # The owner's parameter order before parametrization, restored by bake_masks so
        # that state_dict() and parameters() come out in the original order.
        self.owner_order = list(owner_order or [])

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask


def apply_nm_masks(module: nn.Module, masks: Mapping[str, torch.Tensor]) -> nn.Module:
    """Make each named parameter read as ``param * mask`` so zeros stay zero in training.

    ``masks`` maps parameter names (``"layer1.0.conv1.weight"``) to boolean masks of
    the same shape. Gradients of masked entries are zero because the mask is in
    the forward computation, so any optimizer keeps the pattern. Applied twice, the
    masks combine (logical and). Returns ``module`` (changed in place).
    """
    validate.module("module", module, SparsityError)
    if not isinstance(masks, Mapping):
        validate.fail(SparsityError, "masks", "a dict {parameter name: boolean mask}", masks)
    params = dict(module.named_parameters())
    for name, mask in masks.items():
        if name not in params and not _is_masked(module, name):
            close = difflib.get_close_matches(str(name), list(params), n=1)
            raise SparsityError(
                f"masks: {name!r} is not a parameter of the module."
                + (f" Did you mean {close[0]!r}?" if close else "")
            )
        require_tensor(f"masks[{name!r}]", mask)
        owner, attr = owner_of(module, name)
        if parametrize.is_parametrized(owner, attr):
            for p in owner.parametrizations[attr]:
                if isinstance(p, NMMask):
                    p.mask &= mask.to(p.mask.device, torch.bool)
                    break
            else:
                raise SparsityError(f"{name} already has parametrizations that are not N:M masks")
            continue
        param = getattr(owner, attr)
        if tuple(mask.shape) != tuple(param.shape):
            raise SparsityError(
                f"mask for {name} has shape {tuple(mask.shape)}, parameter has {tuple(param.shape)}"
            )
        order = list(owner._parameters.keys())
        parametrize.register_parametrization(owner, attr, NMMask(mask.to(param.device), order))
    return module


def _is_masked(module: nn.Module, name: str) -> bool:
    """``name`` is a parametrized parameter (``apply_nm_masks`` applied a second time)."""
    try:
        owner, attr = owner_of(module, name)
    except AttributeError:
        return False
    return parametrize.is_parametrized(owner, attr)


def bake_masks(module: nn.Module) -> nn.Module:
    """Remove the :class:`NMMask` parametrizations, leaving plain masked parameters.

    After baking, ``state_dict()`` keys are the original parameter names again.
    Returns ``module`` (changed in place).
    """
    for sub in list(module.modules()):
        if not parametrize.is_parametrized(sub):
            continue
        for attr in list(sub.parametrizations.keys()):
            masks = [p for p in sub.parametrizations[attr] if isinstance(p, NMMask)]
            if not masks:
                continue
            parametrize.remove_parametrizations(sub, attr, leave_parametrized=True)
            rank = {name: i for i, name in enumerate(masks[0].owner_order)}
            params = sorted(sub._parameters.items(), key=lambda kv: rank.get(kv[0], len(rank)))
            sub._parameters.clear()
            sub._parameters.update(params)
    return module
