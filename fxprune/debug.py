"""The pass debug printer: one row per node with its op kind, shape and channel analysis.

``format_graph(gm)`` gives plain text (``rich_table=True`` renders a rich table for a
terminal); ``diff_text(before, after)`` shows what a pass changed. Columns: node
name, op kind, target, output shape, channel group(s), kept/total channels along
the channel dim (once surgery planned them), and the user's source line.
"""

from __future__ import annotations

import difflib
import logging
from typing import Any

import torch.fx as fx

from fxprune import meta
from fxprune.channels import Layout
from fxprune.ops import canonicalize

logger = logging.getLogger(__name__)

COLUMNS = ("node", "op", "target", "shape", "group", "kept", "source")


def _target(node: fx.Node) -> str:
    t = node.target
    if isinstance(t, str):
        return t
    return getattr(t, "__name__", None) or str(t)


def _shape(node: fx.Node) -> str:
    s = meta.shape_of(node)
    if s is not None:
        return str(list(s))
    outs = meta.output_values(node)
    if outs is not None:
        return " ".join(str(list(v.shape)) for v in outs if hasattr(v, "shape"))
    return ""


def _group(node: fx.Node) -> str:
    g = meta.get(node, meta.GROUP)
    if g is None:
        lay = meta.get(node, meta.LAYOUT)
        if isinstance(lay, Layout) and not lay.is_tracked():
            return "-"
        return ""
    return ",".join(f"g{x}" for x in g)


def _kept(node: fx.Node) -> str:
    k = meta.get(node, meta.KEPT)
    return f"{k[0]}/{k[1]}" if k else ""


def graph_rows(gm: fx.GraphModule) -> list[tuple[str, ...]]:
    rows = []
    for node in gm.graph.nodes:
        op = canonicalize(node, gm)
        rows.append(
            (
                node.name,
                op.kind,
                _target(node),
                _shape(node),
                _group(node),
                _kept(node),
                meta.source_line(node),
            )
        )
    return rows


def format_graph(gm: fx.GraphModule, rich_table: bool = False, title: str | None = None) -> str:
    rows = graph_rows(gm)
    if rich_table:
        return _rich(rows, title)
    widths = [
        max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(COLUMNS)
    ]
    widths = [min(w, 60) for w in widths]
    line = "  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths)).rstrip()
    out = [title] if title else []
    out += [line, "  ".join("-" * w for w in widths)]
    for r in rows:
        out.append("  ".join(v[:w].ljust(w) for v, w in zip(r, widths)).rstrip())
    return "\n".join(out)


def _rich(rows: list[tuple[str, ...]], title: str | None) -> str:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_lines=False, header_style="bold")
    for c in COLUMNS:
        table.add_column(c, overflow="fold", no_wrap=c in ("node", "shape"))
    for r in rows:
        style = "dim" if r[1] in ("scalar", "placeholder", "output", "param") else None
        table.add_row(*r, style=style)
    console = Console(record=True, width=200)
    with console.capture() as cap:
        console.print(table)
    return cap.get()


def print_graph(gm: fx.GraphModule, file: Any = None, title: str | None = None) -> None:
    """Print the table: rich on a terminal, plain text when piped."""
    import sys

    stream = file or sys.stdout
    rich_ok = hasattr(stream, "isatty") and stream.isatty()
    stream.write(format_graph(gm, rich_table=rich_ok, title=title) + "\n")


def diff_text(before: str, after: str) -> str:
    """Rows that a pass added (+), removed (-) or changed, as a unified diff."""
    diff = difflib.unified_diff(
        before.splitlines(), after.splitlines(), "before", "after", lineterm="", n=0
    )
    return "\n".join(line for line in diff if not line.startswith("@@"))


def format_diff(before: fx.GraphModule | str, after: fx.GraphModule) -> str:
    b = before if isinstance(before, str) else format_graph(before)
    return diff_text(b, format_graph(after))
