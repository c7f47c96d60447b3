"""PropagateChannelsPass: run the channel rules over every node, in graph order.

Writes each tensor node's :class:`~fxprune.channels.Layout` to ``fxprune.layout``
and leaves the atom table (with freeze / inexact reasons) in
the ``channels`` artifact. A rule that fails is reported once and its op is
treated as unknown (frozen): analysis never crashes and never guesses.
"""

from __future__ import annotations

import logging

import torch.fx as fx
from torch import nn

from fxprune import meta
from fxprune.artifacts import CHANNELS
from fxprune.ops import canonicalize
from fxprune.pass_infra import Pass, PassContext, PassResult
from fxprune.passes.channel_rules import ChannelEnv, default_rule, rule_of

logger = logging.getLogger(__name__)


def param_aliases(gm: nn.Module) -> dict[str, str]:
    """Map every name of a shared (tied) parameter to its first name."""
    first: dict[int, str] = {}
    alias: dict[str, str] = {}
    for name, t in list(gm.named_parameters(remove_duplicate=False)) + list(
        gm.named_buffers(remove_duplicate=False)
    ):
        key = id(t)
        if key in first:
            alias[name] = first[key]
        else:
            first[key] = name
    return alias


class PropagateChannelsPass(Pass):
    """Relate the channel atoms of every node (analysis only; the graph is unchanged)."""

    provides = (meta.OP, meta.LAYOUT, CHANNELS)

    def __init__(
        self,
        head_mode: str = "auto",
        keep_outputs: tuple[str, ...] = (),
        freeze: tuple[str, ...] = (),
        exact_only: bool = False,
        pad_outputs: bool = False,
    ) -> None:
        self.head_mode = head_mode
        self.pad_outputs = pad_outputs  # outputs pruned, padded back to their shape
        self.keep_outputs = tuple(keep_outputs)  # module prefixes: their output channels stay
        self.freeze = tuple(freeze)  # module or parameter prefixes: every channel stays
        self.exact_only = exact_only  # channels whose removal is inexact stay

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        env = ChannelEnv(
            gm,
            head_mode=self.head_mode,
            param_alias=param_aliases(gm),
            pad_outputs=self.pad_outputs,
        )
        for node in gm.graph.nodes:
            env.node = node
            op = canonicalize(node, gm)
            rule = rule_of(op)
            try:
                result = rule(op, env)
            except Exception as exc:
                env.warn_once(
                    f"error:{op.name}",
                    f"channel rule for '{op.name}' failed at "
                    f"{meta.describe(node)} ({type(exc).__name__}: {exc}); frozen.",
                )
                logger.debug("rule failure", exc_info=True)
                result = default_rule(op, env)
            env.layouts[node] = result
            meta.put(node, meta.LAYOUT, result)
        env.node = None
        self._freeze_ignored(env)
        ctx[CHANNELS] = env
        return PassResult(gm, False)

    def _freeze_ignored(self, env: ChannelEnv) -> None:
        """Freeze what the user keeps, once every relation is known.

        A kept module's output channels are the dims its parameters are the *source* of
        (conv/linear rows, a transposed conv's dim 1, embedding dims); a parameter that is
        the source of no dim carries channels it reads and passes on (norm affine and
        statistics, biases, depthwise rows tied to their input, PReLU), all of them kept.
        Dims that only read (a linear's input columns) stay prunable with their producer.
        With ``exact_only``, every channel whose removal is inexact stays too (a
        transformer's residual stream, normalised by LayerNorm), with the reason.
        """
        if self.exact_only:
            for cls, why in list(env.table.inexact.items()):
                env.table.freeze([cls], f"kept by exact_only=True: {why}")
        names: dict[str, list[str]] = {}  # canonical parameter -> every name it has
        for alias, first in env.param_alias.items():
            names.setdefault(first, [first]).append(alias)
        sources = {fqn for (fqn, _), src in env.param_source.items() if src}
        for (fqn, dim), atoms in env.param_atoms.items():
            known = names.get(fqn, [fqn])
            prefix = _first_under(known, self.freeze)
            if prefix is not None:
                env.table.freeze(atoms, f"frozen by the user ({prefix})")
                continue
            prefix = _first_under(known, self.keep_outputs)
            if prefix is None or not (env.param_source.get((fqn, dim)) or fqn not in sources):
                continue
            owner = env.source_modules.get((fqn, dim))
            if len(known) > 1 and owner is not None and _first_under([owner], (prefix,)) is None:
                continue  # a tied tensor (lm_head = wte): this dim is another module's output
            env.table.freeze(atoms, f"ignored by the user ({prefix}: its output channels)")


def _first_under(names: list[str], prefixes: tuple[str, ...]) -> str | None:
    """The first prefix that names one of ``names`` or a module holding it ("" is the model)."""
    for prefix in prefixes:
        for name in names:
            if not prefix or name == prefix or name.startswith(prefix + "."):
                return prefix
    return None
