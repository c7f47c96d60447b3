"""Typed access to fxprune's entries in ``node.meta``.

Every analysis result fxprune stores on a node lives under a key starting with
``fxprune.``; passes read and write them only through the helpers here, so the
set of keys (and what each holds) is defined in one place.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.fx as fx

logger = logging.getLogger(__name__)

OP = "fxprune.op"  # CanonicalOp of the node (fxprune.ops)
LAYOUT = "fxprune.layout"  # channel layout of the node's output (passes.propagate_channels)
GROUP = "fxprune.group"  # id of the prune group the node's channels belong to, or None
KEPT = "fxprune.kept"  # (kept, total) channels along the node's channel dim after selection
SOURCE = "fxprune.source"  # "file:line" of the user's code that created the node

ALL_KEYS = (OP, LAYOUT, GROUP, KEPT, SOURCE)


def get(node: fx.Node, key: str, default: Any = None) -> Any:
    return node.meta.get(key, default)


def put(node: fx.Node, key: str, value: Any) -> None:
    node.meta[key] = value


def clear(gm: fx.GraphModule, keys: tuple[str, ...] = ALL_KEYS) -> None:
    for node in gm.graph.nodes:
        for key in keys:
            node.meta.pop(key, None)


def has_key(gm: fx.GraphModule, key: str) -> bool:
    """A graph provides ``key`` when every node that could carry it does."""
    return any(key in node.meta for node in gm.graph.nodes)


def tensor_value(node: Any) -> Any:
    """The example value of a node (a FakeTensor/Tensor, or a tuple/list of them), if known."""
    if not isinstance(node, fx.Node):
        return None
    # tensor_meta first: fxprune refreshes it after surgery, while export's "val" goes stale.
    tm = node.meta.get("tensor_meta")
    if tm is not None:
        return tm
    return node.meta.get("val")


def output_values(node: Any) -> list[Any] | None:
    """Per-output values of a node returning several tensors (split, chunk, max with dim...).

    None for single-tensor nodes (note: a TensorMetadata is itself a NamedTuple).
    """
    val = tensor_value(node)
    if isinstance(val, (tuple, list)) and not hasattr(val, "shape"):
        return list(val)
    return None


def shape_of(node: Any) -> tuple[int, ...] | None:
    """Static shape of a node's tensor output, or None when it is not a single tensor."""
    val = tensor_value(node)
    if val is None:
        return None
    shape = getattr(val, "shape", None)
    if shape is None:
        return None
    try:
        return tuple(int(s) for s in shape)
    except (TypeError, ValueError):  # symbolic sizes
        return None


def dtype_of(node: Any) -> torch.dtype | None:
    val = tensor_value(node)
    return getattr(val, "dtype", None)


def is_tensor_node(node: Any) -> bool:
    return shape_of(node) is not None


def source_line(node: fx.Node) -> str:
    """The innermost user source line that created this node, as ``file:line``."""
    cached = node.meta.get(SOURCE)
    if cached is not None:
        return cached
    trace = node.meta.get("stack_trace") or ""
    lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip().startswith("File ")]
    where = ""
    for ln in reversed(lines):
        # Skip torch's own frames: the user wants their line, not nn.Module internals.
        if "/torch/" not in ln:
            where = _short_frame(ln)
            break
    if not where and lines:
        where = _short_frame(lines[-1])
    node.meta[SOURCE] = where
    return where


def _short_frame(frame: str) -> str:
    # 'File "/a/b/model.py", line 12, in forward' -> 'model.py:12 (forward)'
    try:
        path = frame.split('"')[1]
        rest = frame.split('"')[2]
        line = rest.split("line")[1].split(",")[0].strip()
        func = rest.split(" in ")[-1].strip() if " in " in rest else ""
    except IndexError:
        return frame
    short = "/".join(path.split("/")[-2:])
    return f"{short}:{line}" + (f" ({func})" if func else "")


def describe(node: fx.Node) -> str:
    """Node name plus the user source line, for error messages and warnings."""
    where = source_line(node)
    return f"node '{node.name}'" + (f" at {where}" if where else "")


def module_path(node: fx.Node | None) -> str | None:
    """Dotted path of the module whose forward made ``node`` (a ``call_module`` target, the
    holder of a ``get_attr`` tensor, or the innermost entry of torch.export's
    ``nn_module_stack``), or None when unknown."""
    if node is None:
        return None
    if node.op == "call_module":
        return str(node.target)
    if node.op == "get_attr":  # a parameter read as a tensor: the module that holds it
        return str(node.target).rpartition(".")[0]
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return path if isinstance(path, str) else None
