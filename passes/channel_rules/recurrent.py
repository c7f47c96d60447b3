"""Recurrent layers (LSTM, GRU, RNN): hidden units and input features, pruned exactly.

An ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` of one layer, without a projection, called on
its input alone (zero initial state): each hidden unit owns one row in every gate's block
of ``weight_ih`` / ``weight_hh`` and the biases, and one column of ``weight_hh`` (the state
fed back); the input features are ``weight_ih``'s columns. Removing a unit is exact: with
its rows and biases zero its gates sit at sigmoid(0) = 0.5 and its candidate at
tanh(0) = 0, so from a zero initial state its cell and hidden state stay zero at every
step, which is what the masked original computes. A bidirectional layer has one set of
units per direction, side by side in its output.

Anything else (stacked layers, ``proj_size``, an initial state passed in, the aten ops a
torch.export graph holds) is frozen with the reason. Declared here also for their
train/eval difference in torch.export graphs (dropout between layers).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch.fx as fx
from torch import nn

from fxprune import meta
from fxprune.channels import Layout
from fxprune.ops import CanonicalOp
from fxprune.passes.channel_rules.base import (
    ChannelEnv,
    SurgeryEnv,
    nested_nodes,
    op_spec,
    untracked_like,
)

logger = logging.getLogger(__name__)

_RECURRENT = ("lstm", "gru", "rnn_tanh", "rnn_relu")
_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


def _why_not(op: CanonicalOp) -> str:
    """Why this recurrent call is not pruned ('' when it is)."""
    mod = op.module
    if not isinstance(mod, nn.RNNBase):
        return "a recurrent op of a torch.export graph (gates stacked in one weight)"
    if mod.num_layers != 1:
        return f"{mod.num_layers} stacked layers"
    if getattr(mod, "proj_size", 0):
        return "an LSTM with proj_size"
    if len(op.node.args) > 1 or op.node.kwargs:
        return "called with an initial state (a pruned unit would not start at zero)"
    if mod.mode not in _GATES:
        return f"recurrent mode {mod.mode}"
    return ""


def _directions(mod: nn.RNNBase) -> tuple[str, ...]:
    return ("", "_reverse") if mod.bidirectional else ("",)


def _recurrent_rewrite(op: CanonicalOp, s: SurgeryEnv) -> None:
    mod = op.module
    if _why_not(op):
        return
    mod.input_size = mod.weight_ih_l0.shape[1]
    mod.hidden_size = mod.weight_hh_l0.shape[1]
    mod._init_flat_weights()  # the fused kernel reads this list, not the attributes


def _recurrent_macs(op: CanonicalOp, gm: fx.GraphModule, shape) -> int:
    mod, x = op.module, shape(op.inputs[0]) if op.inputs else None
    if not isinstance(mod, nn.RNNBase) or not x or mod.mode not in _GATES:
        return 0
    steps = int(np.prod(x)) // x[-1]  # batch x time
    gates, hidden, d = _GATES[mod.mode], mod.hidden_size, 2 if mod.bidirectional else 1
    total, width = 0, mod.input_size
    for _ in range(mod.num_layers):
        total += steps * d * gates * hidden * (width + hidden)
        width = d * hidden
    return total


@op_spec(
    "recurrent",
    module_types=(nn.RNNBase,),
    ops=_RECURRENT,
    mode_args={name: ("train",) for name in _RECURRENT},
    rewrite=_recurrent_rewrite,
    macs=_recurrent_macs,
)
def recurrent(op: CanonicalOp, env: ChannelEnv) -> Any:
    why = _why_not(op)
    x = op.inputs[0] if op.inputs else None
    lay, shape = env.layout(x), env.shape(x)
    if why or lay is None or shape is None:
        reason = (
            f"'{op.name}' is a recurrent layer fxprune does not prune here "
            f"({why or 'input of unknown shape'}) ({meta.describe(op.node)})"
        )
        for inp in nested_nodes(op.node.args) + nested_nodes(op.node.kwargs):
            one_or_many = env.layouts.get(inp)
            for one in one_or_many if isinstance(one_or_many, list) else [one_or_many]:
                env.freeze_layout(one, reason)
        return untracked_like(op.node)
    mod, prefix = op.module, f"{op.node.target}."
    gates, size = _GATES[mod.mode], mod.hidden_size
    features = env.dim_atoms(lay, shape, len(shape) - 1)
    if not lay.zero:
        env.inexact(features, "a recurrent layer reads channels that are non-zero when pruned")
    # Unit j of both directions goes together: the final states stack the directions along
    # the dim their units do not run along.
    hidden = env.param_dim(f"{prefix}weight_hh_l0", 1, size)  # the state fed back
    rows = np.tile(hidden, gates)  # one row per unit in each gate's block
    directions = _directions(mod)
    for suffix in directions:
        env.param_dim(f"{prefix}weight_ih_l0{suffix}", 1, mod.input_size, bind=features)
        env.param_dim(f"{prefix}weight_hh_l0{suffix}", 1, size, bind=hidden)
        for name in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"):
            if getattr(mod, name + suffix, None) is not None:
                env.param_dim(prefix + name + suffix, 0, gates * size, bind=rows)
    units = np.tile(hidden, len(directions))
    output = Layout.along(units, len(shape) - 1, len(shape))
    state = Layout.along(hidden, 2, 3)  # (directions, batch, units)
    return [output, [state, state] if mod.mode == "LSTM" else state]
