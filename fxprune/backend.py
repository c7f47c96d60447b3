"""``fxprune.backend``: fxprune's passes as a ``torch.compile`` backend.

``torch.compile(model, backend=fxprune.backend(then="inductor"))`` runs fxprune passes on
every graph Dynamo captures and hands the result to the next backend.

How Dynamo hands a graph over (torch >= 2.5): the module's parameters and buffers are
*inputs* of the graph (placeholders, marked as static inputs), the ops are functional
(``torch.conv2d(x, weight, ...)``), and the backend gets real example inputs (and
``SymInt`` sizes once a dimension became dynamic). Nothing guards on parameter values.

- **Inference** (``torch.no_grad()`` / ``inference_mode``: Dynamo guards on grad mode,
  so the other mode recompiles): the lifted parameters and buffers are folded into the
  graph as constants (``get_attr``), as Inductor's freezing does, so passes can slice
  them. The graph handed on takes only the activation inputs. The weights are watched:
  a call with other tensors, or with one modified in place (its version counter moved),
  recompiles instead of running a stale graph.
- **Training** (grad mode on): only passes that declare ``keeps_parameter_shapes = True``
  run, on Dynamo's graph as given; the default lossless passes do not, which is said once.
- A graph the passes cannot handle (a mutated buffer: a batch norm in train mode; an
  error in a pass; outputs that changed) goes to the next backend unchanged, with one
  warning per backend; never an error.

The channels of every graph output are frozen (the model's output, or activations that
cross a graph break and feed the next graph); graph inputs are never pruned.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from fxprune.analysis import analysis_passes
from fxprune.artifacts import DEAD_CHANNELS, OUTPUT_ERROR, PADDED_CHANNELS, SEMI_STRUCTURED
from fxprune.ops import callable_name, canonicalize
from fxprune.pass_infra import Pass, PassContext, PassManager
from fxprune.passes.dead_channels import DeadChannelPass
from fxprune.passes.graph_boundary import GraphBoundaryPass
from fxprune.passes.pad_channels import PadChannelsPass
from fxprune.passes.plan_channels import PlanChannelsPass
from fxprune.passes.semi_structured import SemiStructuredPass
from fxprune.passes.surgery import SurgeryPass
from fxprune.passes.verify import RecordOutputsPass, SameOutputsPass
from fxprune.report import graph_macs
from fxprune.trace import propagate_shapes

logger = logging.getLogger(__name__)


def eliminate_dead_channels(round_to: int = 1) -> PassManager:
    """Analysis (graph outputs frozen) -> DeadChannelPass -> plan -> surgery, as one pass."""
    propagate, build_groups = analysis_passes()
    return PassManager(
        [
            propagate,
            GraphBoundaryPass(),
            build_groups,
            DeadChannelPass(round_to),
            PlanChannelsPass(),
            SurgeryPass(),
        ],
        name="dead_channels",
    )


def pad_channels(round_to: int = 8) -> PassManager:
    """Analysis (graph outputs frozen) -> PadChannelsPass: grow channel counts to a multiple
    of ``round_to`` with zero channels, where that provably keeps the output."""
    propagate, build_groups = analysis_passes()
    return PassManager(
        [propagate, GraphBoundaryPass(), build_groups, PadChannelsPass(round_to)],
        name="pad_channels",
    )


def lossless_passes(round_to: int = 1, semi_structured: bool = True) -> list[Pass]:
    """The default passes: dead-channel elimination (keeping dead channels as padding up to
    ``round_to``), alignment padding with new zero channels when ``round_to > 1``, then 2:4
    lowering of weights that already hold the pattern (GPU only)."""
    return [
        eliminate_dead_channels(round_to),
        *([pad_channels(round_to)] if round_to > 1 else []),
        *([SemiStructuredPass()] if semi_structured else []),
    ]


@dataclass
class CompiledGraph:
    """What the backend did with one graph Dynamo captured.

    ``mode``: ``"inference"`` (passes ran on frozen weights), ``"training"`` (shape
    preserving passes only) or ``"unchanged"`` (fell through: ``reason`` says why).
    ``gm`` is the graph handed to the next backend; MACs are counted on it.
    """

    mode: str
    gm: fx.GraphModule = field(repr=False)
    macs_before: int = 0
    macs_after: int = 0
    dead_channels: int = 0
    reason: str = ""
    padded_channels: int = 0
    semi_structured: dict[str, str] = field(default_factory=dict, repr=False)


class FxpruneBackend:
    """A ``torch.compile`` backend: ``backend(gm, example_inputs) -> callable``.

    ``passes``: fxprune passes run on each graph (default: :func:`lossless_passes`);
    ``then``: ``"inductor"``, ``"eager"``, any registered backend name, or a backend
    callable; ``round_to``: ``"auto"`` pads kept channel counts to a multiple of 8 for
    fp16/bf16 weights on a GPU and does not align otherwise; ``verify``: compare the
    rewritten graph's outputs with the original's on the example inputs (a mismatch falls
    through). ``compiled`` lists one :class:`CompiledGraph` per graph compiled.
    """

    def __init__(
        self,
        passes: Iterable[Pass] | None = None,
        then: str | Callable = "inductor",
        round_to: int | str = "auto",
        verify: bool = True,
    ) -> None:
        if not (isinstance(round_to, int) and round_to >= 1) and round_to != "auto":
            raise ValueError(f"round_to must be a positive int or 'auto', got {round_to!r}")
        self.passes = list(passes) if passes is not None else None
        self.then = then
        self.round_to = round_to
        self.verify = verify
        self.compiled: list[CompiledGraph] = []
        self._said: set[str] = set()

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        if torch.is_grad_enabled():
            return self._training(gm, example_inputs)
        return _WatchedGraph(self, gm, example_inputs)

    # -- inference -----------------------------------------------------------------------------
    def compile_frozen(self, gm: fx.GraphModule, example_inputs: Sequence[Any]):
        """(compiled callable, indices of the activation inputs, watched weight inputs)."""
        frozen = None
        try:
            frozen = freeze_parameters(gm, example_inputs)
            reason = mutation(frozen.gm, frozen.lifted) or frozen.unknown
            if reason is None:
                fold_constants(frozen)
                record = self._run_passes(frozen)
                handed = [example_inputs[i] for i in frozen.activations]
                compiled = _then(self.then)(frozen.gm, handed)
                self.compiled.append(record)
                return compiled, frozen.activations, frozen.watched
        except Exception as exc:
            logger.debug("fxprune backend: passes failed", exc_info=True)
            reason = f"{type(exc).__name__}: {exc}"
        self._warn_once(
            "unchanged",
            f"fxprune backend: a graph is compiled without fxprune's passes ({reason}); "
            "further graphs that fall through are not reported",
        )
        self.compiled.append(CompiledGraph("unchanged", gm, reason=reason))
        compiled = _then(self.then)(gm, list(example_inputs))
        return compiled, list(range(len(example_inputs))), []

    def _run_passes(self, frozen: FrozenGraph) -> CompiledGraph:
        gm = frozen.gm
        propagate_shapes(gm, frozen.args)
        macs_before = graph_macs(gm)
        passes = self.passes if self.passes is not None else lossless_passes(self._round_to(gm))
        pipeline = PassManager(
            [
                *([RecordOutputsPass()] if self.verify else []),
                *passes,
                *([SameOutputsPass("the graph after fxprune's passes")] if self.verify else []),
            ],
            name="backend",
        )
        ctx = PassContext(tuple(frozen.args))
        pipeline.run(gm, ctx)
        lowered = ctx.get(SEMI_STRUCTURED, {})
        for reason in set(lowered.values()) - {"converted"}:
            if "GPU" in reason or "capability" in reason:
                self._say_once("2:4", f"fxprune backend: 2:4 lowering skipped: {reason}")
        record = CompiledGraph(
            "inference",
            gm,
            macs_before=macs_before,
            macs_after=graph_macs(gm),
            dead_channels=sum(ctx.get(DEAD_CHANNELS, {}).values()),
            padded_channels=sum(ctx.get(PADDED_CHANNELS, {}).values()),
            semi_structured=dict(lowered),
        )
        if ctx.get(OUTPUT_ERROR) is not None:
            record.reason = f"outputs equal (max abs error {ctx[OUTPUT_ERROR]:.2e})"
        logger.info(
            "fxprune backend: graph %d: %d dead channels removed, MACs %d -> %d",
            len(self.compiled),
            record.dead_channels,
            record.macs_before,
            record.macs_after,
        )
        return record

    def _round_to(self, gm: fx.GraphModule) -> int:
        if self.round_to != "auto":
            return int(self.round_to)
        tensors = [*gm.parameters(), *gm.buffers()]
        half = any(t.is_cuda and t.dtype in (torch.float16, torch.bfloat16) for t in tensors)
        return 8 if half else 1

    # -- training ------------------------------------------------------------------------------
    def _training(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        passes = self.passes if self.passes is not None else lossless_passes()
        kept = [p for p in passes if getattr(p, "keeps_parameter_shapes", False)]
        if len(kept) < len(passes):
            self._say_once(
                "training",
                "fxprune backend: grad mode is on (training), so passes that change "
                "parameter shapes are skipped: "
                + ", ".join(p.name for p in passes if p not in kept)
                + ". Compile under torch.no_grad() or torch.inference_mode() to run them.",
            )
        if kept:
            try:
                PassManager(kept, name="backend-training").run(gm, PassContext(example_inputs))
            except Exception as exc:
                self._warn_once("unchanged", f"fxprune backend: training passes failed ({exc})")
        self.compiled.append(CompiledGraph("training", gm, reason="grad mode on"))
        return _then(self.then)(gm, list(example_inputs))

    def _say_once(self, key: str, message: str) -> None:
        if key not in self._said:
            self._said.add(key)
            logger.info(message)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._said:
            self._said.add(key)
            logger.warning(message)


def backend(
    passes: Iterable[Pass] | None = None,
    then: str | Callable = "inductor",
    round_to: int | str = "auto",
    verify: bool = True,
) -> FxpruneBackend:
    """A ``torch.compile`` backend running fxprune passes, then ``then`` (see
    :class:`FxpruneBackend`): ``torch.compile(model, backend=fxprune.backend())``."""
    return FxpruneBackend(passes, then, round_to, verify)


def _then(then: str | Callable) -> Callable:
    return torch._dynamo.lookup_backend(then) if isinstance(then, str) else then


# -- freezing the lifted weights ------------------------------------------------------------


@dataclass
class FrozenGraph:
    """Dynamo's graph with its parameters and buffers as constants.

    ``activations``: indices of the example inputs the frozen graph still takes;
    ``args``: their concrete values (a ``SymInt`` as its hint); ``lifted``: the get_attr
    nodes made from weights; ``watched``: (input index, tensor, version) of each weight.
    """

    gm: fx.GraphModule
    activations: list[int]
    args: list[Any]
    lifted: set[fx.Node]
    watched: list[tuple[int, torch.Tensor, int | None]]
    unknown: str | None = None


def _is_weight(value: Any) -> bool:
    """A module's parameter or buffer, as Dynamo lifts it (a static input)."""
    if isinstance(value, nn.Parameter):
        return True
    static = torch._dynamo.utils.get_static_address_type(value)
    return isinstance(value, torch.Tensor) and static is not None


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter (and cannot change)
        return None


def freeze_parameters(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> FrozenGraph:
    """A new GraphModule whose weight inputs are attributes (sharing the tensors)."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(gm.graph, env)
    graph.output(out)
    root = nn.Module()
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    activations, args, lifted, watched = [], [], set(), []
    unknown = None
    for i, (node, value) in enumerate(zip(placeholders, example_inputs)):
        if _is_weight(value):
            name = node.name
            if isinstance(value, nn.Parameter):
                root.register_parameter(name, nn.Parameter(value.detach(), requires_grad=False))
            else:
                root.register_buffer(name, value)
            with graph.inserting_before(node):
                attr = graph.get_attr(name)
            attr.meta = dict(node.meta)
            node.replace_all_uses_with(attr)
            graph.erase_node(node)
            lifted.add(attr)
            watched.append((i, value, _version(value)))
            continue
        if isinstance(value, torch.SymInt):
            hint = getattr(value.node, "hint", None)
            if hint is None:
                unknown = f"input {node.name} is a size with no known value"
            value = hint
        activations.append(i)
        args.append(value)
    remaining = [n for n in graph.nodes if n.op == "placeholder"]
    anchor = remaining[-1] if remaining else None
    for attr in [n for n in graph.nodes if n in lifted] if anchor is not None else []:
        anchor.append(attr)  # placeholders first, as compilers expect
        anchor = attr
    frozen = fx.GraphModule(root, graph)
    return FrozenGraph(frozen, activations, args, lifted, watched, unknown)


def fold_constants(frozen: FrozenGraph) -> int:
    """Evaluate every op that reads only weights (a parametrization's ``weight * mask``,
    a cast) once, and make its value a constant; returns how many were folded.

    Then the channel rules see the weights themselves, as they do in an fx trace.
    """
    gm, lifted = frozen.gm, frozen.lifted
    values = {n: _fetch(gm, n.target) for n in lifted}
    folded = 0
    for node in list(gm.graph.nodes):
        if node.op not in ("call_function", "call_method") or not node.all_input_nodes:
            continue
        if not all(a in values for a in node.all_input_nodes):
            continue
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda a: values[a])
        if node.op == "call_method":
            value = getattr(args[0], node.target)(*args[1:], **kwargs)
        else:
            value = node.target(*args, **kwargs)
        if not isinstance(value, torch.Tensor):
            continue
        name = f"_folded_{node.name}"
        if value.is_floating_point():
            gm.register_parameter(name, nn.Parameter(value.detach(), requires_grad=False))
        else:
            gm.register_buffer(name, value)
        with gm.graph.inserting_before(node):
            attr = gm.graph.get_attr(name)
        attr.meta = dict(node.meta)
        node.replace_all_uses_with(attr)
        gm.graph.erase_node(node)
        values[attr] = value
        lifted.add(attr)
        folded += 1
    if folded:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return folded


def _fetch(gm: fx.GraphModule, target: str) -> Any:
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name)


def mutation(gm: fx.GraphModule, lifted: set[fx.Node]) -> str | None:
    """Why folding the weights would be wrong (the graph writes one), or None."""
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method"):
            continue
        name = node.target if node.op == "call_method" else callable_name(node.target) or ""
        first = node.args[0] if node.args else None
        if (
            name.endswith("_") and not name.startswith("_") and first in lifted
        ) or node.target is operator.setitem:
            return f"the graph writes a weight in place ({node.format_node()})"
        op = canonicalize(node, gm, cache=False)  # the weights are about to become constants
        training = op.kind == "norm" and getattr(op.attrs, "training", False)
        if training and any(a in lifted for a in node.all_input_nodes):
            return "a batch norm in train mode updates its running statistics"
    return None


def _arg(node: fx.Node, index: int, name: str) -> Any:
    return node.args[index] if index < len(node.args) else node.kwargs.get(name)


class _WatchedGraph:
    """The compiled graph; recompiles when the weights it folded are not the ones passed."""

    def __init__(self, owner: FxpruneBackend, gm: fx.GraphModule, example_inputs) -> None:
        self.owner, self.gm = owner, gm
        self._build(example_inputs)

    def _build(self, inputs: Sequence[Any]) -> None:
        self.fn, self.activations, self.watched = self.owner.compile_frozen(self.gm, inputs)

    def __call__(self, *args: Any) -> Any:
        for i, t, version in self.watched:
            a = args[i]
            if a is not t or (version is not None and _version(a) != version):
                logger.info("fxprune backend: the weights changed; re-running the passes")
                self._build(args)
                break
        inputs = [args[i] for i in self.activations]
        # Unboxed, as Dynamo calls a backend's result for a GraphModule (aot_autograd's
        # forward takes *args even where it carries a _boxed_call attribute).
        return self.fn(*inputs)
