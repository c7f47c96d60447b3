"""Recurrent layers (LSTM, GRU, RNN): not pruned, frozen with the reason.

Their weights hold every gate's rows stacked in one matrix and feed the hidden state
back into itself, so a channel is tied across gates and time steps; fxprune has no rule
that cuts that consistently, and says so instead of guessing. Declared here also for
their train/eval difference in torch.export graphs (dropout between layers).
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from fxprune import meta
from fxprune.ops import CanonicalOp
from fxprune.passes.channel_rules.base import ChannelEnv, nested_nodes, op_spec, untracked_like

logger = logging.getLogger(__name__)

_RECURRENT = ("lstm", "gru", "rnn_tanh", "rnn_relu")


@op_spec(
    "recurrent",
    module_types=(nn.RNNBase,),
    ops=_RECURRENT,
    mode_args={name: ("train",) for name in _RECURRENT},
)
def recurrent(op: CanonicalOp, env: ChannelEnv) -> Any:
    reason = (
        f"'{op.name}' is a recurrent layer (gates stacked in one weight, hidden state fed "
        f"back), which fxprune does not prune ({meta.describe(op.node)})"
    )
    for inp in nested_nodes(op.node.args) + nested_nodes(op.node.kwargs):
        lay = env.layouts.get(inp)
        for one in lay if isinstance(lay, list) else [lay]:
            env.freeze_layout(one, reason)
    return untracked_like(op.node)
