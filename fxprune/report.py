"""MACs and parameter counts on the graph, and the before/after report of a pruning run.

MACs are counted from node shapes by each op's ``macs`` hook (declared with the op
under ``passes/channel_rules/``: convolutions, linear layers, matrix products,
attention), not by module hooks, so functional and aten-level graphs count the same as
module-level ones.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fxprune import meta
from fxprune.errors import TraceError
from fxprune.ops import canonicalize
from fxprune.trace import ExampleInputs, trace

logger = logging.getLogger(__name__)

ShapeFn = Callable[[fx.Node], Any]


def count_macs(module: nn.Module, example_inputs: Any = None) -> int:
    """Multiply-accumulates of one forward pass of ``module`` on ``example_inputs``.

    A GraphModule traced by fxprune is counted from its recorded shapes; any other
    module is traced first (which needs ``example_inputs``). A module that cannot be
    traced whole (a detector) is counted on one real forward instead
    (:func:`count_macs_by_running`), which says so in the log.
    """
    if isinstance(module, fx.GraphModule) and example_inputs is None:
        return graph_macs(module)
    if example_inputs is None:
        raise ValueError("count_macs needs example_inputs to trace a plain nn.Module.")
    try:
        gm = trace(module, example_inputs)
    except TraceError as exc:
        logger.info(
            "count_macs: %s cannot be traced (%s); counting one real forward",
            type(module).__name__,
            str(exc).splitlines()[0],
        )
        return count_macs_by_running(module, example_inputs)
    return graph_macs(gm)


def count_macs_by_running(module: nn.Module, example_inputs: Any) -> int:
    """Multiply-accumulates of one real forward (flops / 2, ``torch.utils.flop_counter``):
    what a model that cannot be traced costs on these inputs (a detector's heads do work
    per box kept, so the count depends on the image)."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        ExampleInputs.of(example_inputs).call(module)
    return counter.get_total_flops() // 2


def graph_macs(gm: fx.GraphModule, shape: ShapeFn | None = None) -> int:
    """Multiply-accumulates of one forward pass, from the graph's (or given) shapes.

    Each op's count is its spec's ``macs`` hook (declared with the op, under
    ``passes/channel_rules/``); ops without one count zero.
    """
    shape = shape or meta.shape_of
    total = 0
    for node in gm.graph.nodes:
        op = canonicalize(node, gm)
        if op.spec.macs is None:
            continue
        try:
            total += op.spec.macs(op, gm, shape)
        except (TypeError, ValueError, IndexError, AttributeError):
            logger.debug("no MACs for %s", node.name)
    return int(total)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@dataclass
class GroupRow:
    group: int
    source: str
    structure: str
    kept: int
    padded: int
    total: int
    units: int
    note: str = ""


@dataclass
class PruneReport:
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    groups: list[GroupRow] = field(default_factory=list)
    frozen: int = 0
    verified: str = "not run"
    max_error: float | None = None
    frontend: str = "fx"

    @property
    def macs_ratio(self) -> float:
        return self.macs_before / max(self.macs_after, 1)

    @property
    def params_ratio(self) -> float:
        return self.params_before / max(self.params_after, 1)

    def summary_rows(self) -> list[tuple[str, str, str, str]]:
        return [
            (
                "MACs",
                _human(self.macs_before),
                _human(self.macs_after),
                f"{self.macs_ratio:.2f}x fewer",
            ),
            (
                "params",
                _human(self.params_before),
                _human(self.params_after),
                f"{self.params_ratio:.2f}x fewer",
            ),
        ]

    def __str__(self) -> str:
        lines = [f"{'':<8}{'before':>12}{'after':>12}  change"]
        lines += [f"{a:<8}{b:>12}{c:>12}  {d}" for a, b, c, d in self.summary_rows()]
        lines.append(
            f"verified: {self.verified}"
            + (f" (max error {self.max_error:.2e})" if self.max_error is not None else "")
        )
        lines.append("")
        lines.append(f"{'group':>5}  {'kept/total':>11}  {'pad':>4}  {'structure':<9}  source")
        for r in self.groups:
            lines.append(
                f"{r.group:>5}  {f'{r.kept}/{r.total}':>11}  {r.padded:>4}  {r.structure:<9}  "
                f"{r.source}" + (f"  ({r.note})" if r.note else "")
            )
        lines.append(
            f"{len(self.groups)} groups pruned, {self.frozen} frozen ({self.frontend} frontend)"
        )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["macs_ratio"] = self.macs_ratio
        d["params_ratio"] = self.params_ratio
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _human(n: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)
