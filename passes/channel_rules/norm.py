"""Normalisation layers: batch, instance, layer, group and RMS norm.

BatchNorm and InstanceNorm normalise each channel on its own: their affine
parameters and running statistics join the channel, exactly. LayerNorm, RMSNorm
and GroupNorm normalise across channels: they join too, but removing a channel
changes the statistics, so the group is marked inexact. GroupNorm also ties the
same in-group position across groups, so every group keeps the same size. After
surgery the module sizes (``num_features``, ``num_channels``, ``normalized_shape``)
and a functional norm's ``normalized_shape`` argument follow the kept channels.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fxprune.channels import Layout
from fxprune.ops import Attrs, CanonicalOp, ParamRef, module_param, param_arg
from fxprune.passes.channel_rules.base import ChannelEnv, SurgeryEnv, default_rule, op_spec

logger = logging.getLogger(__name__)

_STATS = ("weight", "bias", "running_mean", "running_var")


@dataclass(frozen=True)
class NormAttrs(Attrs):
    """``norm``: batch | instance | layer | group | rms; affine parameters and statistics."""

    norm: str
    weight: ParamRef | fx.Node | None = None
    bias: ParamRef | fx.Node | None = None
    running_mean: ParamRef | fx.Node | None = None
    running_var: ParamRef | fx.Node | None = None
    normalized_ndim: int | None = None  # layer / rms: how many trailing dims
    num_groups: int | None = None  # group
    training: bool | None = None  # batch / instance: batch statistics (and their updates)
    eps: float | None = None  # batch / instance


# -- views ------------------------------------------------------------------------------------


def _module_stats(op: CanonicalOp, norm: str, **extra) -> CanonicalOp:
    refs = {r: module_param(op, r) for r in _STATS if hasattr(op.module, r)}
    return op.with_(name=f"{norm}_norm", attrs=NormAttrs(norm, **refs, **extra))


def _batch_view(op: CanonicalOp, norm: str = "batch") -> CanonicalOp:
    if op.module is not None:
        mod = op.module
        uses_batch = mod.training or getattr(mod, "running_mean", None) is None
        return _module_stats(op, norm, training=bool(uses_batch), eps=float(mod.eps))
    if op.node.target in (F.batch_norm, F.instance_norm):
        # F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
        order = ("running_mean", "running_var", "weight", "bias")
    else:  # aten / torch.batch_norm(input, weight, bias, running_mean, running_var, ...)
        order = ("weight", "bias", "running_mean", "running_var")
    refs = {role: param_arg(op, i + 1, role) for i, role in enumerate(order)}
    if "no_training" in str(op.node.target):  # _native_batch_norm_legit_no_training(.., eps)
        training, eps = False, op.arg(6, "eps", 1e-5)
    else:  # training at 5 (use_input_stats for instance_norm), eps at 7
        training = op.arg(5, "use_input_stats" if norm == "instance" else "training", False)
        eps = op.arg(7, "eps", 1e-5)
    attrs = NormAttrs(norm, **refs, training=bool(training), eps=eps)
    return op.with_(name=f"{norm}_norm", inputs=[op.node.args[0]], attrs=attrs)


def _instance_view(op: CanonicalOp) -> CanonicalOp:
    return _batch_view(op, "instance")


def _layer_view(op: CanonicalOp, norm: str = "layer") -> CanonicalOp:
    if op.module is not None:
        return _module_stats(op, norm, normalized_ndim=len(op.module.normalized_shape))
    attrs = NormAttrs(
        norm,
        weight=param_arg(op, 2, "weight"),
        bias=param_arg(op, 3, "bias") if norm == "layer" else None,
        normalized_ndim=len(op.arg(1, "normalized_shape")),
    )
    return op.with_(name=f"{norm}_norm", inputs=[op.node.args[0]], attrs=attrs)


def _rms_view(op: CanonicalOp) -> CanonicalOp:
    return _layer_view(op, "rms")


def _group_view(op: CanonicalOp) -> CanonicalOp:
    if op.module is not None:
        return _module_stats(op, "group", num_groups=op.module.num_groups)
    attrs = NormAttrs(
        "group",
        weight=param_arg(op, 2, "weight"),
        bias=param_arg(op, 3, "bias"),
        num_groups=op.arg(1, "num_groups"),
    )
    return op.with_(name="group_norm", inputs=[op.node.args[0]], attrs=attrs)


# -- rewrites after surgery -------------------------------------------------------------------


def _new_input(op: CanonicalOp, s: SurgeryEnv):
    x = op.node.args[0] if op.node.args else None
    return s.new_shape(x)


def _batch_rewrite(op: CanonicalOp, s: SurgeryEnv) -> None:
    if op.node.op != "call_module":
        return
    mod = s.gm.get_submodule(op.node.target)
    ref = mod.weight if mod.weight is not None else mod.running_mean
    in_new = _new_input(op, s)
    if ref is not None:
        mod.num_features = ref.shape[0]
    elif in_new is not None:
        mod.num_features = in_new[1]


def _group_rewrite(op: CanonicalOp, s: SurgeryEnv) -> None:
    if op.node.op != "call_module":
        return
    mod = s.gm.get_submodule(op.node.target)
    in_new = _new_input(op, s)
    if mod.weight is not None:
        mod.num_channels = mod.weight.shape[0]
    elif in_new is not None:
        mod.num_channels = in_new[1]


def _layer_rewrite(op: CanonicalOp, s: SurgeryEnv) -> None:
    k = int(op.attrs.normalized_ndim or 1)
    if op.node.op == "call_module":
        mod = s.gm.get_submodule(op.node.target)
        in_new = _new_input(op, s)
        if mod.weight is not None:
            mod.normalized_shape = tuple(mod.weight.shape)
        elif in_new is not None:
            mod.normalized_shape = tuple(in_new[-k:])
        return
    src_new = s.new_shape(op.inputs[0])
    if src_new is not None:
        args = list(op.node.args)
        args[1] = list(src_new[-k:])
        op.node.args = tuple(args)


# -- the ops ----------------------------------------------------------------------------------

_RMS_MODULES = (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()


@op_spec("norm", modules=_RMS_MODULES, ops=("rms_norm", "_fused_rms_norm"), view=_rms_view, rewrite=_layer_rewrite)  # fmt: skip
@op_spec("norm", modules=(nn.GroupNorm,), ops=("group_norm", "native_group_norm"), view=_group_view, rewrite=_group_rewrite)  # fmt: skip
@op_spec("norm", modules=(nn.LayerNorm,), ops=("layer_norm", "native_layer_norm"), view=_layer_view, rewrite=_layer_rewrite)  # fmt: skip
@op_spec("norm", modules=(nn.modules.instancenorm._InstanceNorm,), ops=("instance_norm",), view=_instance_view, rewrite=_batch_rewrite, mode_args={"instance_norm": ("use_input_stats",)})  # fmt: skip
@op_spec(
    "norm",
    modules=(nn.modules.batchnorm._BatchNorm,),
    ops=(
        "batch_norm",
        "_native_batch_norm_legit_no_training",
        "_native_batch_norm_legit",
        "native_batch_norm",
        "cudnn_batch_norm",
    ),
    view=_batch_view,
    rewrite=_batch_rewrite,
    mode_args={"batch_norm": ("training",)},  # batch statistics, running-stat updates
)
def norm(op: CanonicalOp, env: ChannelEnv):
    x = op.inputs[0]
    lay, shape = env.layout(x), env.shape(x)
    if lay is None or shape is None:
        return default_rule(op, env)
    a = op.attrs
    kind = a.norm
    affine = isinstance(a.weight, ParamRef) or isinstance(a.bias, ParamRef)
    if kind in ("batch", "instance", "group"):
        cdim = 1 if len(shape) > 1 else 0
        xa = env.dim_atoms(lay, shape, cdim)
        if kind == "group":
            g = int(a.num_groups or 1)
            per = shape[cdim] // g
            if per > 1:
                grid = xa.reshape(g, per)
                env.table.union(grid[:1], grid)
                env.inexact(xa, f"GroupNorm({g}) normalises across channels")
        for role in _STATS:
            ref = getattr(a, role)
            if isinstance(ref, ParamRef):
                env.param_dim(ref.fqn, 0, shape[cdim], bind=xa)
        zero = _bind_computed(env, op, xa, (shape[cdim],))
        return Layout(lay.atoms, lay.zero and zero and (affine or kind == "batch"))
    # layer / rms norm over the trailing normalized_ndim dims
    k = int(a.normalized_ndim or 1)
    nd = len(shape)
    if any(lay.atoms.shape[d] > 1 for d in range(nd - k, nd)):
        env.inexact(lay.atoms, f"{op.name} normalises across channels")
    for ref in (a.weight, a.bias):
        if not isinstance(ref, ParamRef):
            continue
        for j in range(k):
            d = nd - k + j
            if lay.atoms.shape[d] > 1:
                bind = env.dim_atoms(lay, shape, d)
            else:
                bind = np.full(shape[d], -1, dtype=np.int64)
            env.param_dim(ref.fqn, j, shape[d], bind=bind)
    zero = _bind_computed(env, op, lay.atoms[(0,) * (nd - k)], shape[nd - k :])
    return Layout(lay.atoms, lay.zero and zero and affine)


def _bind_computed(env: ChannelEnv, op: CanonicalOp, atoms: np.ndarray, shape) -> bool:
    """Relate a computed weight or bias (ScaledStdConv2d's ``gain * scale``) to the channels
    it scales or shifts, position by position, as an element-wise op does.

    Returns whether pruned channels still read zero after it (a computed bias may not).
    """
    zero = True
    for role in ("weight", "bias"):
        ref = getattr(op.attrs, role)
        lay = env.layout(ref)
        if lay is None or env.shape(ref) is None:
            continue
        if lay.is_tracked() and (env.canonical(atoms) < 0).any():
            env.freeze_layout(lay, f"a computed {role} of '{op.name}' on channels not tracked")
        env.unify([(Layout(atoms), tuple(shape)), (lay, env.shape(ref))], tuple(shape))
        zero = zero and (role == "weight" or lay.zero)
    return zero
