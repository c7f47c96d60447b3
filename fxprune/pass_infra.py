"""Pass infrastructure: passes over FX graphs, a pass manager, and debug instruments.

A pass is a class with ``call(gm, ctx) -> PassResult(gm, modified)`` that declares
the ``node.meta`` keys it ``requires``, ``provides`` and ``invalidates``. The
:class:`PassManager` checks preconditions before each pass, runs ``graph.lint()``
and fxprune's invariants after it when asked (``check=True``), and drives
instruments from outside the passes: :class:`PrintAfterEach`, :class:`DumpGraphs`
and :class:`TimePasses`. Setting ``FXPRUNE_DEBUG=1`` switches printing on without
code changes (``FXPRUNE_DEBUG=dump:DIR`` dumps each pass's graph to ``DIR``).

Errors name the failing pass and the passes that ran before it: a ``PassError`` in its
message, fxprune's other errors (``VerificationError``, ...) in a note, keeping their type;
any other exception is wrapped in a ``PassError``.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch.fx as fx

from fxprune import meta
from fxprune.errors import FxpruneError, PassError, PostconditionError, PreconditionError
from fxprune.files import write_text_atomic

logger = logging.getLogger(__name__)


@dataclass
class PassResult:
    gm: fx.GraphModule
    modified: bool


@dataclass
class PassContext:
    """State shared by the passes of one pipeline run (example inputs, options, results)."""

    example_inputs: Any = None
    options: dict[str, Any] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)

    def option(self, name: str, default: Any = None) -> Any:
        return self.options.get(name, default)


class Pass:
    """Base class of every fxprune pass.

    Subclasses implement :meth:`call`. ``requires``: meta keys that must be present
    before the pass runs; ``provides``: keys present after it; ``invalidates``: keys
    it makes stale (the manager removes them).
    """

    requires: ClassVar[tuple[str, ...]] = ()
    provides: ClassVar[tuple[str, ...]] = ()
    invalidates: ClassVar[tuple[str, ...]] = ()

    @property
    def name(self) -> str:
        return type(self).__name__

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:  # pragma: no cover
        raise NotImplementedError

    def requires_check(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        missing = [k for k in self.requires if not meta.has_key(gm, k)]
        if missing:
            raise PreconditionError(
                f"{self.name} requires node.meta keys {missing}, which no earlier pass provided."
            )

    def ensures_check(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        missing = [k for k in self.provides if not meta.has_key(gm, k)]
        if missing:
            raise PostconditionError(
                f"{self.name} promised node.meta keys {missing} but did not set them."
            )

    def __call__(self, gm: fx.GraphModule, ctx: PassContext | None = None) -> PassResult:
        ctx = ctx if ctx is not None else PassContext()
        self.requires_check(gm, ctx)
        result = self.call(gm, ctx)
        self.ensures_check(result.gm, ctx)
        return result


class Instrument:
    """Observer of a pass pipeline; override the hooks you need."""

    def before_pass(self, p: Pass, gm: fx.GraphModule, index: int) -> None:
        pass

    def after_pass(self, p: Pass, result: PassResult, index: int) -> None:
        pass

    def after_pipeline(self) -> None:
        pass


class PrintAfterEach(Instrument):
    """Print the debug table of the graph after each pass (only what changed, if diff=True)."""

    def __init__(self, stream: Any = None, diff: bool = True) -> None:
        self.stream = stream
        self.diff = diff
        self._before = ""

    def before_pass(self, p: Pass, gm: fx.GraphModule, index: int) -> None:
        from fxprune.debug import format_graph

        self._before = format_graph(gm, rich_table=False) if self.diff else ""

    def after_pass(self, p: Pass, result: PassResult, index: int) -> None:
        from fxprune.debug import diff_text, format_graph

        stream = self.stream or sys.stderr
        after = format_graph(result.gm, rich_table=False)
        header = f"=== after {index:03d} {p.name} (modified={result.modified}) ==="
        body = diff_text(self._before, after) if self.diff and self._before else after
        print(header, body or "(no change)", sep="\n", file=stream)


class DumpGraphs(Instrument):
    """Write each pass's graph to ``folder/NNN_<pass>.txt`` (the debug table plus FX code)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.files: list[Path] = []

    def after_pass(self, p: Pass, result: PassResult, index: int) -> None:
        from fxprune.debug import format_graph

        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{index:03d}_{p.name}.txt"
        text = (
            f"# pass {p.name} (modified={result.modified})\n"
            + format_graph(result.gm, rich_table=False)
            + "\n\n# code\n"
            + result.gm.code
        )
        write_text_atomic(path, text)
        self.files.append(path)


class TimePasses(Instrument):
    """Record the wall time of each pass; ``str()`` gives a table."""

    def __init__(self) -> None:
        self.times: list[tuple[str, float]] = []
        self._t0 = 0.0

    def before_pass(self, p: Pass, gm: fx.GraphModule, index: int) -> None:
        self._t0 = time.perf_counter()

    def after_pass(self, p: Pass, result: PassResult, index: int) -> None:
        self.times.append((p.name, time.perf_counter() - self._t0))

    def __str__(self) -> str:
        total = sum(t for _, t in self.times) or 1e-12
        rows = [f"{name:<32} {t * 1e3:9.2f} ms {100 * t / total:5.1f}%" for name, t in self.times]
        return "\n".join([*rows, f"{'total':<32} {total * 1e3:9.2f} ms"])


def instruments_from_env() -> list[Instrument]:
    """``FXPRUNE_DEBUG=1`` prints after each pass; ``dump:DIR`` dumps; ``time`` times."""
    value = os.environ.get("FXPRUNE_DEBUG", "").strip()
    if not value or value == "0":
        return []
    out: list[Instrument] = []
    for part in value.split(","):
        part = part.strip()
        if part in ("1", "print", "true"):
            out.append(PrintAfterEach())
        elif part.startswith("dump:"):
            out.append(DumpGraphs(part[len("dump:") :]))
        elif part == "time":
            out.append(TimePasses())
    return out


def check_invariants(gm: fx.GraphModule) -> None:
    """fxprune's graph invariants: the FX graph lints, and analysis meta is well-formed."""
    gm.graph.lint()
    for node in gm.graph.nodes:
        layout = meta.get(node, meta.LAYOUT)
        shape = meta.shape_of(node)
        if layout is not None and shape is not None and not layout.fits(shape):
            raise PostconditionError(
                f"channel layout of {meta.describe(node)} does not fit its shape {list(shape)}"
            )


class PassManager:
    """Run passes in order, with checks and instruments.

    ``check=True`` runs ``graph.lint()`` and fxprune's invariants after every pass;
    a callable is run as an extra check ``check(gm)``.
    """

    def __init__(
        self,
        passes: Sequence[Pass],
        check: bool | Any = False,
        instruments: Iterable[Instrument] = (),
        use_env: bool = True,
    ) -> None:
        self.passes = list(passes)
        self.check = check
        self.instruments = list(instruments) + (instruments_from_env() if use_env else [])

    def __call__(self, gm: fx.GraphModule, ctx: PassContext | None = None) -> PassResult:
        return self.run(gm, ctx)

    def run(self, gm: fx.GraphModule, ctx: PassContext | None = None) -> PassResult:
        ctx = ctx if ctx is not None else PassContext()
        modified = False
        ran: list[str] = []
        for index, p in enumerate(self.passes):
            for inst in self.instruments:
                inst.before_pass(p, gm, index)
            try:
                p.requires_check(gm, ctx)
                result = p.call(gm, ctx)
                p.ensures_check(result.gm, ctx)
                if self.check:
                    check_invariants(result.gm)
                    if callable(self.check):
                        self.check(result.gm)
            except PassError as exc:
                raise type(exc)(self._where(p, ran) + str(exc)) from exc
            except FxpruneError as exc:
                # fxprune's own errors keep their type (callers catch VerificationError,
                # PruneError, ... by it); where it happened goes in a note.
                exc.add_note(self._where(p, ran).rstrip(": "))
                raise
            except Exception as exc:
                raise PassError(self._where(p, ran) + f"{type(exc).__name__}: {exc}") from exc
            for key in p.invalidates:
                for node in result.gm.graph.nodes:
                    node.meta.pop(key, None)
            for inst in self.instruments:
                inst.after_pass(p, result, index)
            gm = result.gm
            modified = modified or result.modified
            ran.append(p.name)
        for inst in self.instruments:
            inst.after_pipeline()
        return PassResult(gm, modified)

    @staticmethod
    def _where(p: Pass, ran: list[str]) -> str:
        before = ", ".join(ran) if ran else "none"
        return f"pass {p.name} failed (passes run before it: {before}): "
