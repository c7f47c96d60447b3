"""Pass infrastructure: passes over FX graphs, a pass manager, and debug instruments.

A pass is a class with ``call(gm, ctx) -> PassResult(gm, modified)`` that declares
what it ``requires``, ``provides`` and ``invalidates``: ``node.meta`` keys (strings,
listed in ``fxprune.meta``) and typed artifacts, the values passes hand each other
through the :class:`PassContext` (listed in ``fxprune.artifacts``). A pass may write
only the artifacts it declares. The :class:`PassManager`, itself a pass, checks the
whole pipeline's artifacts before running it, preconditions before each pass and
postconditions after it, runs ``graph.lint()``
and fxprune's invariants after it when asked (``check=True``), and drives
instruments from outside the passes: :class:`PrintAfterEach`, :class:`DumpGraphs`
and :class:`TimePasses`. Setting ``FXPRUNE_DEBUG=1`` switches printing on without
code changes (``FXPRUNE_DEBUG=dump:DIR`` dumps each pass's graph to ``DIR``).

Errors name the failing pass and the passes that ran before it: a ``PassError`` in its
message, fxprune's other errors (``VerificationError``, ...) in a note, keeping their type;
any other exception is wrapped in a ``PassError``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch.fx as fx

from fxprune import meta
from fxprune.artifacts import Artifact
from fxprune.debug import diff_text, format_graph
from fxprune.errors import FxpruneError, PassError, PostconditionError, PreconditionError
from fxprune.files import write_text_atomic

logger = logging.getLogger(__name__)


@dataclass
class PassResult:
    gm: fx.GraphModule
    modified: bool


Key = str | Artifact  # a node.meta key or a typed artifact


class PassContext:
    """What the passes of one pipeline run share: the example inputs and typed artifacts.

    ``ctx[artifact]`` reads an artifact (a clear error names the pass that provides a
    missing one); ``ctx[artifact] = value`` checks the value's type and, while a pass
    runs, that the pass declares the artifact in its ``provides``. A pipeline seeds what
    it computes itself (e.g. the unpruned copy for the oracle) through ``artifacts=``.
    """

    def __init__(self, example_inputs: Any = None, artifacts: Mapping[Artifact, Any] = ()) -> None:
        self.example_inputs = example_inputs
        self._values: dict[Artifact, Any] = {}
        self._writer: Pass | None = None
        for artifact, value in dict(artifacts).items():
            self[artifact] = value

    def __contains__(self, artifact: Artifact) -> bool:
        return artifact in self._values

    def __getitem__(self, artifact: Artifact) -> Any:
        try:
            return self._values[artifact]
        except KeyError:
            raise PreconditionError(
                f"artifact {artifact.name!r} is not available"
                + (f" to {self._writer.name}" if self._writer is not None else "")
                + f": {artifact.provided_by} provides it; run it first."
            ) from None

    def get(self, artifact: Artifact, default: Any = None) -> Any:
        return self._values.get(artifact, default)

    def __setitem__(self, artifact: Artifact, value: Any) -> None:
        writer = self._writer
        if writer is not None and artifact not in writer.provides:
            raise PostconditionError(
                f"{writer.name} wrote artifact {artifact.name!r}, which it does not declare "
                f"in provides {[k if isinstance(k, str) else k.name for k in writer.provides]}"
            )
        artifact.check(value)
        self._values[artifact] = value

    def discard(self, artifact: Artifact) -> None:
        self._values.pop(artifact, None)

    @property
    def results(self) -> Mapping[str, Any]:
        """Read-only view of the artifacts by name (for printing and debugging)."""
        return MappingProxyType({a.name: v for a, v in self._values.items()})

    @contextlib.contextmanager
    def running(self, p: Pass) -> Iterator[None]:
        """While ``p`` runs, it may write only the artifacts it declares."""
        outer, self._writer = self._writer, p
        try:
            yield
        finally:
            self._writer = outer


def _meta_keys(keys: Iterable[Key]) -> list[str]:
    return [k for k in keys if isinstance(k, str)]


def _artifacts(keys: Iterable[Key]) -> list[Artifact]:
    return [k for k in keys if isinstance(k, Artifact)]


def _names(keys: Iterable[Key]) -> list[str]:
    return [k if isinstance(k, str) else k.name for k in keys]


class Pass:
    """Base class of every fxprune pass.

    Subclasses implement :meth:`call`. ``requires``: node.meta keys and artifacts that
    must be present before the pass runs; ``provides``: those present after it (and the
    only artifacts it may write); ``invalidates``: those it makes stale (the manager
    removes them). A meta key counts as present when a pass that provides it ran on this
    graph since the key was last invalidated (recorded in ``gm.meta``).
    """

    requires: tuple[Key, ...] = ()
    provides: tuple[Key, ...] = ()
    invalidates: tuple[Key, ...] = ()

    @property
    def name(self) -> str:
        return type(self).__name__

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:  # pragma: no cover
        raise NotImplementedError

    def requires_check(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        have = provided_meta(gm)
        missing = [k for k in _meta_keys(self.requires) if k not in have]
        if missing:
            raise PreconditionError(
                f"{self.name} requires node.meta keys {missing}, which no earlier pass provided."
            )
        absent = [a for a in _artifacts(self.requires) if a not in ctx]
        if absent:
            raise PreconditionError(
                f"{self.name} requires artifacts {_names(absent)}, which no earlier pass "
                "provided (" + "; ".join(f"{a.name}: from {a.provided_by}" for a in absent) + ")."
            )

    def ensures_check(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        missing = [k for k in _meta_keys(self.provides) if not meta.has_key(gm, k)]
        missing += [a.name for a in _artifacts(self.provides) if a not in ctx]
        if missing:
            raise PostconditionError(f"{self.name} promised {missing} but did not set them.")

    def run_checked(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        """Run the pass with its contract: preconditions, then postconditions and bookkeeping."""
        self.requires_check(gm, ctx)
        with ctx.running(self):
            result = self.call(gm, ctx)
        self.ensures_check(result.gm, ctx)
        record = provided_meta(result.gm)
        record.difference_update(_meta_keys(self.invalidates))
        record.update(_meta_keys(self.provides))
        for key in _meta_keys(self.invalidates):
            for node in result.gm.graph.nodes:
                node.meta.pop(key, None)
        for artifact in _artifacts(self.invalidates):
            ctx.discard(artifact)
        return result

    def __call__(self, gm: fx.GraphModule, ctx: PassContext | None = None) -> PassResult:
        return self.run_checked(gm, ctx if ctx is not None else PassContext())


def provided_meta(gm: fx.GraphModule) -> set[str]:
    """The node.meta keys passes have provided on ``gm`` (and not invalidated since)."""
    return gm.meta.setdefault(_PROVIDED, set())


_PROVIDED = "fxprune.provided_meta"


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
        self._before = format_graph(gm, rich_table=False) if self.diff else ""

    def after_pass(self, p: Pass, result: PassResult, index: int) -> None:
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


class PassManager(Pass):
    """Run passes in order, with checks and instruments; itself a pass, so it nests.

    Before anything runs, it checks that every artifact a pass requires is provided by an
    earlier pass or already in the context (a wrong pipeline fails before expensive work).
    ``check=True`` runs ``graph.lint()`` and fxprune's invariants after every pass; a
    callable is run as an extra check ``check(gm)``.
    """

    def __init__(
        self,
        passes: Sequence[Pass],
        check: bool | Any = False,
        instruments: Iterable[Instrument] = (),
        use_env: bool = True,
        name: str = "PassManager",
    ) -> None:
        self.passes = list(passes)
        self.check = check
        self.instruments = list(instruments) + (instruments_from_env() if use_env else [])
        self._name = name
        provided: list[Key] = []
        requires: list[Key] = []
        for p in self.passes:
            requires += [k for k in p.requires if k not in provided and k not in requires]
            provided += [k for k in p.provides if k not in provided]
        self.requires = tuple(requires)
        self.provides = tuple(provided)

    @property
    def name(self) -> str:
        return self._name

    def requires_check(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        available = set(_artifacts(self.requires)) & set(ctx._values)
        for p in self.passes:
            absent = [a for a in _artifacts(p.requires) if a not in available]
            if absent:
                raise PreconditionError(
                    f"{p.name} requires artifacts {_names(absent)}, which no earlier pass of "
                    f"{self.name} provides ("
                    + "; ".join(f"{a.name}: from {a.provided_by}" for a in absent)
                    + ")."
                )
            available.update(_artifacts(p.provides))

    def ensures_check(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        pass  # each pass's own postconditions were checked as it ran

    def __call__(self, gm: fx.GraphModule, ctx: PassContext | None = None) -> PassResult:
        return self.run(gm, ctx)

    def run(self, gm: fx.GraphModule, ctx: PassContext | None = None) -> PassResult:
        ctx = ctx if ctx is not None else PassContext()
        self.requires_check(gm, ctx)
        return self.call(gm, ctx)

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        modified = False
        ran: list[str] = []
        for index, p in enumerate(self.passes):
            for inst in self.instruments:
                inst.before_pass(p, gm, index)
            try:
                result = p.run_checked(gm, ctx)
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
