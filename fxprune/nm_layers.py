"""The N:M layers of a model: which weights, whether each can be sparse, and the report.

:func:`nm_weights` is the one list of the weights N:M sparsity is about — those a
sparse GEMM kernel reads: conv (not transposed) and linear weights, and the input and
output projections of ``nn.MultiheadAttention`` (as NVIDIA apex ASP's whitelist has
them). ``fxprune.sparsify`` masks them and :func:`fxprune.nm_checks.check_nm` verifies
them, both through :func:`nm_layers`, so a model sparsified with the default
eligibility checks clean.

In a traced graph the list comes from the ops that read the weights (functional calls
and ``torch.export`` graphs included; a module whose forward fxprune does not know is
left out, since its weight may not be what its kernel reads); in a plain module, from
its ``Linear``, ``Conv`` and ``MultiheadAttention`` submodules. A tensor registered
under several names (tied weights) counts once, under its first name.

:class:`NMLayer` is the record of one weight and :class:`NMReport` the report of a
model, the same for ``sparsify`` (with the permutation's numbers) and the checks.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn

from fxprune.modules import PrunedMultiheadAttention
from fxprune.nm_patterns import NMPattern, nm_eligibility, parse_pattern
from fxprune.ops import canonicalize
from fxprune.tensors import get_tensor

logger = logging.getLogger(__name__)

__all__ = ["NMLayer", "NMReport", "NMWeight", "layer_records", "nm_layers", "nm_weights"]

# Spec kinds whose ops read a GEMM weight (passes/channel_rules: conv_linear.py's "conv"
# and "linear", attention.py's "mha" for nn.MultiheadAttention).
_GEMM_KINDS = frozenset({"conv", "linear", "mha"})
_MHA_PROJECTIONS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


@dataclass(frozen=True)
class NMWeight:
    """One weight N:M sparsity is about: its name, the tensor, and its conv ``groups``.

    ``shared_with`` names the first parameter holding the same tensor (tied weights).
    """

    name: str
    tensor: torch.Tensor
    groups: int = 1
    shared_with: str | None = None


@dataclass
class NMLayer:
    """The N:M record of one weight: whether it is eligible, and what its mask keeps.

    ``eligible``/``reason``: the verdict of :func:`~fxprune.nm_patterns.nm_eligibility`
    (or "ignored by the user"). For an eligible weight, ``passed``: every M-group along
    the reduction axis has at most N nonzeros (None: not checked, e.g. not masked);
    ``sparsity``: fraction of exact zeros; ``retained``: fraction of ``sum |w|`` that
    the N:M mask keeps of the weight it was measured on (the dense, permuted weight
    in ``sparsify``; the weight as found in the checks: 1.0 when it already follows
    the pattern); ``retained_unpermuted``: the same mask on the original channel
    order (``sparsify`` only); ``violations``: groups with more than N nonzeros, out
    of ``groups``; ``axis``: the reduction axis (1 for torch weights).
    """

    name: str
    shape: tuple[int, ...]
    eligible: bool = True
    reason: str = "eligible"
    passed: bool | None = None
    sparsity: float = 0.0
    retained: float = 1.0
    retained_unpermuted: float | None = None
    violations: int = 0
    groups: int = 0
    axis: int = 1

    @property
    def param(self) -> str:
        """The parameter's name (``name``; the name ``sparsify`` reports used)."""
        return self.name


@dataclass
class NMReport:
    """Per-weight N:M records of a model, and what the channel permutation did.

    ``layers``: every weight considered, eligible or not (``skipped`` lists the
    others with their reasons). ``permuted_groups``, ``skipped_groups`` and
    ``permutation_error`` come from ``sparsify``'s permutation step.
    """

    pattern: NMPattern
    layers: list[NMLayer] = field(default_factory=list)
    permuted_groups: int = 0
    skipped_groups: dict[int, str] = field(default_factory=dict)
    permutation_error: float | None = None

    @property
    def eligible(self) -> list[NMLayer]:
        return [layer for layer in self.layers if layer.eligible]

    @property
    def skipped(self) -> list[tuple[str, str]]:
        """(name, reason) of every weight left dense."""
        return [(layer.name, layer.reason) for layer in self.layers if not layer.eligible]

    @property
    def failed(self) -> list[NMLayer]:
        """Eligible weights that do not follow the pattern (or were not checked)."""
        return [layer for layer in self.eligible if not layer.passed]

    @property
    def passed(self) -> bool:
        """True when at least one weight is eligible and every eligible weight follows the pattern."""
        return bool(self.eligible) and not self.failed

    def overall(self, permuted: bool = True) -> float:
        """Fraction of the eligible layers' total |w| the masks keep."""
        layers = self.eligible
        # Each layer weighs by its number of weights: a fair "fraction of total magnitude" proxy.
        sizes = [math.prod(layer.shape) for layer in layers]
        if not sum(sizes):
            return 1.0
        kept = [
            layer.retained
            if permuted or layer.retained_unpermuted is None
            else layer.retained_unpermuted
            for layer in layers
        ]
        return sum(k * s for k, s in zip(kept, sizes)) / sum(sizes)

    def __str__(self) -> str:
        permuted = any(layer.retained_unpermuted is not None for layer in self.layers)
        width = max([len(layer.name) for layer in self.layers] + [5])
        lines = [
            f"{'layer':<{width}}  {'shape':<20} {'ok':<4} {'sparsity':>8} {'kept |w|':>8}"
            + (f" {'no perm':>8}" if permuted else "")
            + f" {'bad groups':>10}"
        ]
        for la in self.eligible:
            ok = {True: "yes", False: "NO", None: "-"}[la.passed]
            unpermuted = la.retained if la.retained_unpermuted is None else la.retained_unpermuted
            lines.append(
                f"{la.name:<{width}}  {'x'.join(map(str, la.shape)):<20} {ok:<4} "
                f"{la.sparsity:>8.1%} {la.retained:>8.1%}"
                + (f" {unpermuted:>8.1%}" if permuted else "")
                + f" {la.violations:>6}/{la.groups}"
            )
        lines += [f"skipped {name}: {reason}" for name, reason in self.skipped]
        passing = len(self.eligible) - len(self.failed)
        summary = (
            f"N:M {self.pattern}: {passing}/{len(self.eligible)} weights pass, "
            f"{len(self.skipped)} skipped; magnitude kept {self.overall(True):.2%}"
        )
        if permuted:
            summary += (
                f" with permutation, {self.overall(False):.2%} without; "
                f"{self.permuted_groups} channel groups permuted"
            )
        if self.permutation_error is not None:
            summary += f" (permuted model matches the original to {self.permutation_error:.1e})"
        return "\n".join([*lines, summary])


def nm_weights(module: nn.Module) -> list[NMWeight]:
    """Every weight N:M sparsity is about, in graph order (or module order), each once."""
    if isinstance(module, fx.GraphModule):
        found = _graph_weights(module)
    else:
        found = (
            (f"{prefix}.{attr}" if prefix else attr, tensor, groups)
            for prefix, mod in module.named_modules()
            for attr, tensor, groups in _gemm_weights_of(mod)
        )
    first_name = {id(t): name for name, t in module.named_parameters()}
    first_name.update({id(t): name for name, t in module.named_buffers()})
    seen: set[str] = set()
    out = []
    for name, tensor, groups in found:
        if name in seen or not isinstance(tensor, torch.Tensor):
            continue
        seen.add(name)
        owner = first_name.get(id(tensor), name)
        out.append(NMWeight(name, tensor, groups, owner if owner != name else None))
    return out


def nm_layers(
    module: nn.Module,
    pattern: str | tuple[int, int] | NMPattern = "2:4",
    ignore: Iterable[str] = (),
    min_size: int | None = None,
    align: bool = True,
) -> list[NMLayer]:
    """The :func:`nm_weights` of ``module``, each with its eligibility for ``pattern``.

    ``ignore``: parameter or module names (prefixes) left dense by the user.
    ``min_size``/``align`` as in :func:`~fxprune.nm_patterns.nm_eligibility`.
    """
    return layer_records(nm_weights(module), pattern, ignore, min_size, align)


def layer_records(
    weights: Iterable[NMWeight],
    pattern: str | tuple[int, int] | NMPattern = "2:4",
    ignore: Iterable[str] = (),
    min_size: int | None = None,
    align: bool = True,
) -> list[NMLayer]:
    """One :class:`NMLayer` per weight with its eligibility verdict (nothing measured yet)."""
    pat = parse_pattern(pattern)
    prefixes = tuple(ignore)
    kwargs = {} if min_size is None else {"min_size": min_size}
    out = []
    for w in weights:
        shape = tuple(w.tensor.shape)
        if any(w.name == p or w.name.startswith(p + ".") for p in prefixes):
            out.append(NMLayer(w.name, shape, False, "ignored by the user"))
        elif w.shared_with is not None:
            reason = f"same tensor as {w.shared_with} (tied weights): masked or checked there"
            out.append(NMLayer(w.name, shape, False, reason))
        else:
            ok, why = nm_eligibility(w.tensor, pat, groups=w.groups, align=align, **kwargs)
            out.append(NMLayer(w.name, shape, ok, why))
    return out


def _graph_weights(gm: fx.GraphModule) -> Iterator[tuple[str, object, int]]:
    """(name, tensor, groups) of the GEMM weights read by the ops of ``gm``, in graph order."""
    for node in gm.graph.nodes:
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        op = canonicalize(node, gm)
        if op.kind not in _GEMM_KINDS:
            continue
        if node.op == "call_module":
            for attr, tensor, groups in _gemm_weights_of(gm.get_submodule(node.target)):
                yield f"{node.target}.{attr}", tensor, groups
            continue
        fqn = op.params.get("weight")
        if fqn:  # a stored weight (a computed one is not a parameter)
            yield fqn, get_tensor(gm, fqn), int(getattr(op.attrs, "groups", 1) or 1)


def _gemm_weights_of(mod: nn.Module) -> list[tuple[str, object, int]]:
    """(attribute, tensor, groups) of the GEMM weights a module holds itself."""
    if isinstance(mod, nn.modules.conv._ConvNd) and not mod.transposed:
        return [("weight", mod.weight, mod.groups)]
    if isinstance(mod, nn.Linear):
        return [("weight", mod.weight, 1)]
    if isinstance(mod, (nn.MultiheadAttention, PrunedMultiheadAttention)):
        found = [(attr, getattr(mod, attr, None), 1) for attr in _MHA_PROJECTIONS]
        found.append(("out_proj.weight", mod.out_proj.weight, 1))
        return [(attr, t, groups) for attr, t, groups in found if t is not None]
    return []
