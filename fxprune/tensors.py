"""A module's tensors by fully qualified name: find the owner, read, replace.

``set_tensor(module, "layer1.0.conv1.weight", value)`` is the one way fxprune puts a
new tensor in place of a parameter, a buffer or a plain tensor attribute. A parameter
stays an ``nn.Parameter`` (with its ``requires_grad``) and a buffer stays a buffer, so
``state_dict()`` keys and ``parameters()`` come out as before. Tensors that several
names share (tied weights) stay shared when the caller passes the same ``cache`` for
every name: the first name makes the new tensor, the others reuse it.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["get_tensor", "owner_of", "set_tensor"]


def owner_of(module: nn.Module, fqn: str) -> tuple[nn.Module, str]:
    """``(submodule, attribute)`` holding ``fqn``: ``"fc.weight"`` -> ``(module.fc, "weight")``."""
    path, _, attr = fqn.rpartition(".")
    return (module.get_submodule(path) if path else module), attr


def get_tensor(module: nn.Module, fqn: str) -> Any:
    """What ``fqn`` names: a parameter, a buffer, a parametrized (computed) weight, or None."""
    try:
        owner, attr = owner_of(module, fqn)
    except AttributeError:
        return None
    return getattr(owner, attr, None)


def set_tensor(
    module: nn.Module, fqn: str, value: torch.Tensor, cache: dict[int, Any] | None = None
) -> None:
    """Put ``value`` at ``fqn``, keeping its kind (parameter, buffer or attribute).

    ``cache`` maps ``id`` of a replaced tensor to its replacement: pass one dict for a
    whole rewrite so that a tensor registered under several names is replaced once.
    """
    owner, name = owner_of(module, fqn)
    old = getattr(owner, name, None)
    # An empty slot (bias=None) is shared by nothing: it gets its own new tensor.
    cache = {} if cache is None or old is None else cache
    if name in owner._parameters:
        new = cache.get(id(old))
        if new is None:
            requires_grad = old.requires_grad if old is not None else value.is_floating_point()
            new = cache[id(old)] = nn.Parameter(value, requires_grad=requires_grad)
        owner._parameters[name] = new
    elif name in owner._buffers:
        owner._buffers[name] = cache.setdefault(id(old), value)
    else:
        setattr(owner, name, value)
