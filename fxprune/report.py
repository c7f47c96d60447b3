"""MACs and parameter counts on the graph, and the before/after report of a pruning run.

MACs are counted from node shapes (conv, transposed conv, linear, matmul/bmm/einsum,
SDPA, ``nn.MultiheadAttention``), not by module hooks, so functional and aten-level
graphs count the same as module-level ones.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch.fx as fx
from torch import nn

from fxprune import meta
from fxprune.ops import OpKind, canonicalize

logger = logging.getLogger(__name__)

ShapeFn = Callable[[fx.Node], Any]


def count_macs(module: nn.Module, example_inputs: Any = None) -> int:
    """Multiply-accumulates of one forward pass of ``module`` on ``example_inputs``.

    A GraphModule traced by fxprune is counted from its recorded shapes; any other
    module is traced first (which needs ``example_inputs``).
    """
    if isinstance(module, fx.GraphModule) and example_inputs is None:
        return graph_macs(module)
    if example_inputs is None:
        raise ValueError("count_macs needs example_inputs to trace a plain nn.Module.")
    from fxprune.trace import trace

    return graph_macs(trace(module, example_inputs))


def graph_macs(gm: fx.GraphModule, shape: ShapeFn | None = None) -> int:
    """Multiply-accumulates of one forward pass, from the graph's (or given) shapes."""
    shape = shape or meta.shape_of
    total = 0
    for node in gm.graph.nodes:
        op = canonicalize(node, gm)
        try:
            total += _node_macs(gm, op, shape)
        except (TypeError, ValueError, IndexError, AttributeError):
            logger.debug("no MACs for %s", node.name)
    return int(total)


def _param_shape(gm: nn.Module, fqn: str | None):
    if not fqn or fqn.startswith("<"):
        return None
    obj: Any = gm
    for part in fqn.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return tuple(obj.shape)


def _node_macs(gm: fx.GraphModule, op, shape: ShapeFn) -> int:
    node = op.node
    out = shape(node)
    if op.kind in (OpKind.CONV, OpKind.CONV_TRANSPOSE):
        w = _param_shape(gm, op.params.get("weight"))
        x = shape(op.inputs[0])
        if w is None or out is None or x is None:
            return 0
        k = math.prod(w[2:])
        cdim = len(x) - (len(w) - 1)
        groups = int(op.attrs.get("groups") or 1)
        old_x = meta.shape_of(op.inputs[0])
        if groups > 1 and old_x is not None and old_x[cdim] == groups:
            groups = x[cdim]  # depthwise stays depthwise after pruning
        if op.kind == OpKind.CONV:
            return math.prod(out) * (x[cdim] // groups) * k
        return math.prod(x) * (out[cdim] // groups) * k
    if op.kind == OpKind.LINEAR:
        x = shape(op.inputs[0])
        return math.prod(out) * x[-1] if out and x else 0
    if op.kind == OpKind.MATMUL:
        a = shape(op.inputs[0])
        if not out or not a:
            return 0
        if op.name == "einsum":
            b = shape(op.inputs[1])
            eq = op.attrs.get("equation", "")
            lhs, _ = eq.replace(" ", "").split("->")
            la, lb = lhs.split(",")
            sizes = dict(zip(la, a)) | dict(zip(lb, b))
            return math.prod(sizes[c] for c in sizes)
        return math.prod(out) * a[-1]
    if op.kind == OpKind.SDPA:
        q, k, v = (shape(n) for n in op.inputs[:3])
        if not q or not k or not v:
            return 0
        lead = math.prod(q[:-2])
        return lead * q[-2] * k[-2] * (q[-1] + v[-1])
    if op.kind == OpKind.MHA and op.module is not None:
        x = shape(op.inputs[0])
        if not x:
            return 0
        w = op.module.in_proj_weight.shape  # (2 * h * d + h * dv, E), already sliced
        out = op.module.out_proj.weight.shape  # (E_out, h * dv)
        tokens = math.prod(x[:-1])
        seq = x[1] if op.module.batch_first and len(x) == 3 else x[0]
        h, d, dv = op.attrs["num_heads"], op.attrs["head_dim"], op.attrs["v_head_dim"]
        return tokens * w[0] * w[1] + tokens * seq * h * (d + dv) + tokens * out[0] * out[1]
    return 0


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
