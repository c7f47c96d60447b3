"""Channel rules for contractions: matmul / bmm / einsum, scaled_dot_product_attention
and ``nn.MultiheadAttention``.

A contraction is an element-wise relation over the joint index space of its
operands followed by a sum over the contracted indices: ``q @ k^T`` ties the last
dims of q and k (head dims) and the head dims (batch dims) of both; ``attn @ v``
ties attention heads to value heads. GQA's repeated key/value heads arrive through
expand/reshape or ``repeat_interleave`` and are tied to every query head that reads
them. Summing over pruned channels is exact only if they read as zero.

After surgery an SDPA whose head_dim shrank gets its original default scale pinned,
and a pruned ``nn.MultiheadAttention`` becomes ``fxprune.modules.PrunedMultiheadAttention``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn
from torchvision.models import swin_transformer

from fxprune import meta
from fxprune.channels import NO_ATOM, Layout
from fxprune.modules import PrunedMultiheadAttention
from fxprune.ops import Attrs, CanonicalOp, ParamRef, module_param, param_arg
from fxprune.passes.channel_rules.base import (
    ChannelEnv,
    SurgeryEnv,
    default_rule,
    op_spec,
    untracked_like,
)
from fxprune.passes.select_channels import DROP

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EinsumAttrs(Attrs):
    equation: str


@dataclass(frozen=True)
class SdpaAttrs(Attrs):
    mask: Any  # the attn_mask node, or None
    scale: float | None
    enable_gqa: bool = False


@dataclass(frozen=True)
class MHAAttrs(Attrs):
    """``nn.MultiheadAttention``'s sizes and parameters (packed or separate q/k/v)."""

    num_heads: int
    embed_dim: int
    head_dim: int
    v_head_dim: int
    batch_first: bool
    in_proj_weight: ParamRef | None
    in_proj_bias: ParamRef | None
    q_proj_weight: ParamRef | None
    k_proj_weight: ParamRef | None
    v_proj_weight: ParamRef | None
    bias_k: ParamRef | None
    bias_v: ParamRef | None
    out_proj_weight: ParamRef | None
    out_proj_bias: ParamRef | None


def contract(
    env: ChannelEnv,
    operands: list[tuple[Layout, tuple[int, ...], str]],
    out_letters: str,
    out_shape: tuple[int, ...],
    what: str,
) -> Layout:
    """Channels of ``einsum(operands -> out_letters)``."""
    letters = []
    for _, _, lt in operands:
        for c in lt:
            if c not in letters:
                letters.append(c)
    size = {}
    for _, shape, lt in operands:
        for c, s in zip(lt, shape):
            size[c] = max(size.get(c, 1), s)
    joint_shape = [size[c] for c in letters]
    items, reals = [], []
    for lay, shape, lt in operands:
        a = env.table.find(lay.atoms)
        a = (
            a.reshape(a.shape[-len(lt) :])
            if a.ndim >= len(lt)
            else a.reshape((1,) * (len(lt) - a.ndim) + a.shape)
        )
        perm = [lt.index(c) for c in letters if c in lt]
        a = np.transpose(a, perm)
        placed = [a.shape[perm.index(lt.index(c))] if c in lt else 1 for c in letters]
        full = a.reshape(placed)
        items.append((Layout(full, lay.zero), tuple(placed)))
        reals.append([c in lt and shape[lt.index(c)] == size[c] for c in letters])
    joint = env.unify(items, joint_shape, real=reals)
    contracted = [i for i, c in enumerate(letters) if c not in out_letters]
    if any(joint.shape[i] > 1 for i in contracted) and not any(lay.zero for lay, _, _ in operands):
        env.inexact(joint, f"{what} sums over pruned channels that are not zero")
    # Each operand's channels survive in the output where they do not vary along a
    # contracted index; the survivors of all operands are unified in the output.
    rest = [c for i, c in enumerate(letters) if i not in contracted]
    order = [rest.index(c) for c in out_letters]
    out_items, out_reals = [], []
    for (lay, _), real in zip(items, reals):
        a = env.canonical(lay.atoms)
        if any(a.shape[i] > 1 for i in contracted):
            a = np.full((1,) * a.ndim, NO_ATOM, dtype=np.int64)
        a = np.transpose(
            a[tuple(0 if i in contracted else slice(None) for i in range(a.ndim))], order
        )
        out_items.append(
            (
                Layout(a, lay.zero),
                tuple(size[c] if a.shape[j] > 1 else 1 for j, c in enumerate(out_letters)),
            )
        )
        out_reals.append([real[letters.index(c)] for c in out_letters])
    atoms = env.unify(out_items, out_shape, real=out_reals)
    atoms = env.rectify(atoms, out_shape, how="freeze")
    zero = any(lay.zero and lay.is_tracked() for lay, _, _ in operands) or all(
        lay.zero for lay, _, _ in operands
    )
    return Layout(atoms, zero)


def _matmul_letters(na: int, nb: int) -> tuple[str, str, str]:
    """Einsum letters of ``a @ b`` for operand ranks ``na`` and ``nb`` (broadcast batch dims)."""
    batch = "ABCDEFGH"[: max(max(na, nb) - 2, 0)]
    la = "k" if na == 1 else batch[len(batch) - (na - 2) :] + "nk"
    lb = "k" if nb == 1 else batch[len(batch) - (nb - 2) :] + "km"
    return la, lb, batch + ("n" if na > 1 else "") + ("m" if nb > 1 else "")


def _matmul_view(op: CanonicalOp) -> CanonicalOp:
    return op.with_(name="matmul", inputs=[op.node.args[0], op.node.args[1]])


def _einsum_view(op: CanonicalOp) -> CanonicalOp:
    return op.with_(name="einsum", attrs=EinsumAttrs(op.node.args[0]))


def _matmul_macs(op: CanonicalOp, gm: fx.GraphModule, shape) -> int:
    out, a = shape(op.node), shape(op.inputs[0])
    if not out or not a:
        return 0
    if op.name == "einsum":
        b = shape(op.inputs[1])
        lhs, _ = op.attrs.equation.replace(" ", "").split("->")
        la, lb = lhs.split(",")
        sizes = dict(zip(la, a)) | dict(zip(lb, b))
        return math.prod(sizes[c] for c in sizes)
    return math.prod(out) * a[-1]


@op_spec("matmul", ops=("einsum",), view=_einsum_view, macs=_matmul_macs)
@op_spec("matmul", ops=("matmul", "bmm", "mm", "__matmul__"), view=_matmul_view, macs=_matmul_macs)
def matmul(op: CanonicalOp, env: ChannelEnv):
    out_shape = env.shape(op.node)
    if out_shape is None or len(op.inputs) != 2:
        return default_rule(op, env)
    (a, b) = op.inputs
    la, sa, lb, sb = env.layout(a), env.shape(a), env.layout(b), env.shape(b)
    if la is None or lb is None or sa is None or sb is None:
        return default_rule(op, env)
    if op.name == "einsum":
        eq = op.attrs.equation
        if "..." in eq or "->" not in eq:
            return default_rule(op, env)
        lhs, out_l = eq.replace(" ", "").split("->")
        lts = lhs.split(",")
        if len(lts) != 2:
            return default_rule(op, env)
        return contract(env, [(la, sa, lts[0]), (lb, sb, lts[1])], out_l, out_shape, "einsum")
    ta, tb, to = _matmul_letters(len(sa), len(sb))
    return contract(env, [(la, sa, ta), (lb, sb, tb)], to, out_shape, "matmul")


def _repeat_heads(
    lay: Layout, shape: tuple[int, ...], heads: int
) -> tuple[Layout, tuple[int, ...]]:
    """GQA: key/value heads repeated to the query's head count (repeat_interleave on dim -3)."""
    if len(shape) < 3 or shape[-3] == heads:
        return lay, shape
    rep = heads // shape[-3]
    a = lay.atoms
    if a.shape[-3] > 1:
        a = np.repeat(a, rep, axis=a.ndim - 3)
    new_shape = (*shape[:-3], heads, *shape[-2:])
    return Layout(a, lay.zero), new_shape


def _sdpa_view(op: CanonicalOp) -> CanonicalOp:
    kw = op.node.kwargs
    attrs = SdpaAttrs(op.arg(3, "attn_mask"), kw.get("scale", None), kw.get("enable_gqa", False))
    return op.with_(name="sdpa", inputs=list(op.node.args[:3]), attrs=attrs)


def _sdpa_rewrite(op: CanonicalOp, s: SurgeryEnv) -> None:
    q_old, q_new = s.old_shape(op.inputs[0]), s.new_shape(op.inputs[0])
    if q_old and q_new and q_old[-1] != q_new[-1] and op.attrs.scale is None:
        # the default scale is 1/sqrt(head_dim): pin the original so outputs stay exact
        op.node.kwargs = {**op.node.kwargs, "scale": 1.0 / math.sqrt(q_old[-1])}


def _sdpa_macs(op: CanonicalOp, gm: fx.GraphModule, shape) -> int:
    q, k, v = (shape(n) for n in op.inputs[:3])
    if not q or not k or not v:
        return 0
    return math.prod(q[:-2]) * q[-2] * k[-2] * (q[-1] + v[-1])


@op_spec(
    "sdpa",
    ops=("scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu"),
    view=_sdpa_view,
    rewrite=_sdpa_rewrite,
    macs=_sdpa_macs,
    mode_args={"scaled_dot_product_attention": ("dropout_p",)},  # attention dropout
)
def sdpa(op: CanonicalOp, env: ChannelEnv):
    q, k, v = op.inputs[:3]
    out_shape = env.shape(op.node)
    lq, lk, lv = env.layout(q), env.layout(k), env.layout(v)
    sq, sk, sv = env.shape(q), env.shape(k), env.shape(v)
    if None in (lq, lk, lv, sq, sk, sv, out_shape) or len(sq) < 2:
        return default_rule(op, env)
    if len(sq) >= 3 and sk[-3] != sq[-3]:
        lk, sk = _repeat_heads(lk, sk, sq[-3])
        lv, sv = _repeat_heads(lv, sv, sq[-3])
    nb = len(sq) - 2
    bl = "ABCDEFGH"[:nb]
    attn_shape = (*sq[:-1], sk[-2])
    attn = contract(
        env, [(lq, sq, bl + "le"), (lk, sk, bl + "se")], bl + "ls", attn_shape, "q @ k^T"
    )
    mask = op.attrs.mask
    ml, ms = env.layout(mask), env.shape(mask)
    if ml is not None and ms is not None:
        atoms = env.unify([(attn, attn_shape), (ml, ms)], attn_shape)
        attn = Layout(atoms, False)
    if attn.atoms.shape[-1] > 1:
        env.inexact(attn.atoms, "softmax over channels")
    attn = Layout(attn.atoms, False)
    return contract(
        env, [(attn, attn_shape, bl + "ls"), (lv, sv, bl + "sv")], bl + "lv", out_shape, "attn @ v"
    )


def _mha_frozen(op: CanonicalOp, env: ChannelEnv, reason: str):
    for n in op.inputs:
        env.freeze_layout(env.layout(n), reason)
    for fqn in op.params.values():
        t = env.param_tensor(fqn)
        if t is None:
            continue
        for d in range(t.dim()):
            env.freeze(env.param_dim(fqn, d, t.shape[d]), reason)
    return untracked_like(op.node)


def _call_arg(node, index: int, name: str):
    return node.args[index] if index < len(node.args) else node.kwargs.get(name)


def _mha_view(op: CanonicalOp) -> CanonicalOp:
    mod = op.module
    ref = {
        r: module_param(op, r)
        for r in (
            "in_proj_weight",
            "in_proj_bias",
            "q_proj_weight",
            "k_proj_weight",
            "v_proj_weight",
            "bias_k",
            "bias_v",
        )
    }
    attrs = MHAAttrs(
        num_heads=mod.num_heads,
        embed_dim=mod.embed_dim,
        head_dim=getattr(mod, "head_dim", mod.embed_dim // mod.num_heads),
        v_head_dim=getattr(mod, "v_head_dim", mod.embed_dim // mod.num_heads),
        batch_first=mod.batch_first,
        out_proj_weight=ParamRef(f"{op.node.target}.out_proj.weight"),
        out_proj_bias=module_param(op, "out_proj.bias"),
        **ref,
    )
    return op.with_(name="multihead_attention", attrs=attrs)


def _mha_rewrite(op: CanonicalOp, s: SurgeryEnv) -> None:
    """Swap a pruned ``nn.MultiheadAttention`` for ``PrunedMultiheadAttention``."""
    env, node = s.plan.env, op.node
    mod = s.gm.get_submodule(node.target)
    atoms = env.param_atoms.get((env.canonical_param(f"{node.target}.in_proj_weight"), 0))
    if not isinstance(mod, (nn.MultiheadAttention, PrunedMultiheadAttention)) or atoms is None:
        return
    h = mod.num_heads
    d = getattr(mod, "head_dim", mod.embed_dim // h)
    dv = getattr(mod, "v_head_dim", d)
    keep = torch.from_numpy(s.plan.positions(atoms) != DROP)
    q, v = keep[: h * d].view(h, d), keep[2 * h * d :].view(h, dv)
    heads = q.any(1) | v.any(1)
    new_d, new_dv = int(q[heads].sum(1).max()), int(v[heads].sum(1).max())
    scale = getattr(mod, "scale", d**-0.5)  # the original scale, whatever head_dim becomes
    parent_name, _, attr = node.target.rpartition(".")
    parent = s.gm.get_submodule(parent_name) if parent_name else s.gm
    new = PrunedMultiheadAttention.from_module(mod, int(heads.sum()), new_d, new_dv, scale)
    setattr(parent, attr, new)


def _mha_macs(op: CanonicalOp, gm: fx.GraphModule, shape) -> int:
    x = shape(op.inputs[0])
    if not x or op.module is None:
        return 0
    w = op.module.in_proj_weight.shape  # (2 * h * d + h * dv, E), already sliced
    out = op.module.out_proj.weight.shape  # (E_out, h * dv)
    tokens = math.prod(x[:-1])
    seq = x[1] if op.module.batch_first and len(x) == 3 else x[0]
    h, d, dv = op.attrs.num_heads, op.attrs.head_dim, op.attrs.v_head_dim
    return tokens * w[0] * w[1] + tokens * seq * h * (d + dv) + tokens * out[0] * out[1]


@op_spec(
    "mha",
    modules=(nn.MultiheadAttention, PrunedMultiheadAttention),
    view=_mha_view,
    rewrite=_mha_rewrite,
    macs=_mha_macs,
)
def multihead_attention(op: CanonicalOp, env: ChannelEnv):
    """``nn.MultiheadAttention``: packed q/k/v projections, heads, output projection.

    Surgery replaces a pruned module with ``fxprune.modules.PrunedMultiheadAttention``,
    which lets input width, heads x head_dim and output width differ.
    """
    mod = op.module
    if (
        mod is None
        or not getattr(mod, "_qkv_same_embed_dim", True)
        or getattr(mod, "bias_k", None) is not None
        or getattr(mod, "add_zero_attn", False)
        or op.node.op != "call_module"
    ):
        return _mha_frozen(
            op, env, "nn.MultiheadAttention with kdim/vdim, bias_kv or zero attention"
        )
    h, d, dv = op.attrs.num_heads, op.attrs.head_dim, op.attrs.v_head_dim
    e = mod.in_proj_weight.shape[1]
    prefix = op.node.target
    w = f"{prefix}.in_proj_weight"
    nodes = [_call_arg(op.node, i, n) for i, n in enumerate(("query", "key", "value"))]
    for n in nodes:
        lay, shape = env.layout(n), env.shape(n)
        if lay is None or shape is None:
            return _mha_frozen(op, env, "nn.MultiheadAttention input without a known shape")
        env.param_dim(w, 1, e, bind=env.dim_atoms(lay, shape, len(shape) - 1))
    qk = h * d
    rows = env.param_dim(w, 0, 2 * qk + h * dv)
    env.source_segments[(env.canonical_param(w), 0)] = [(0, 2 * qk), (2 * qk, len(rows))]
    if mod.in_proj_bias is not None:
        env.param_dim(f"{prefix}.in_proj_bias", 0, len(rows), bind=rows)
    q, k = rows[:qk].reshape(h, d), rows[qk : 2 * qk].reshape(h, d)
    v = rows[2 * qk :].reshape(h, dv)
    env.table.union(q, k)  # q . k^T pairs the same head and dim
    qk_grid = env.rectify(q, (h, d))
    v_grid = env.rectify(v, (h, dv))
    if qk_grid.shape == (h, 1) and v_grid.shape == (h, 1):  # whole heads: q, k and v go together
        env.table.union(q[:, :1], v[:, :1])
    env.param_dim(f"{prefix}.out_proj.weight", 1, h * dv, bind=v.reshape(-1))
    out = env.param_dim(f"{prefix}.out_proj.weight", 0, mod.out_proj.weight.shape[0])
    if mod.out_proj.bias is not None:
        env.param_dim(f"{prefix}.out_proj.bias", 0, len(out), bind=out)
    result = untracked_like(op.node)
    out_shape = meta.shape_of(nodes[0])
    if isinstance(result, list) and out_shape is not None:
        result[0] = Layout.along(out, len(out_shape) - 1, len(out_shape))
    return result


# -- torchvision's Swin window attention -----------------------------------------------------


@dataclass(frozen=True)
class WindowAttrs(Attrs):
    """``shifted_window_attention``'s weights (parameters or computed) and head count."""

    qkv_weight: ParamRef | fx.Node | None
    proj_weight: ParamRef | fx.Node | None
    qkv_bias: ParamRef | fx.Node | None
    proj_bias: ParamRef | fx.Node | None
    num_heads: Any


def _window_view(op: CanonicalOp) -> CanonicalOp:
    attrs = WindowAttrs(
        qkv_weight=param_arg(op, 1, "qkv_weight"),
        proj_weight=param_arg(op, 2, "proj_weight"),
        qkv_bias=param_arg(op, 9, "qkv_bias"),
        proj_bias=param_arg(op, 10, "proj_bias"),
        num_heads=_call_arg(op.node, 5, "num_heads"),
    )
    return op.with_(name="shifted_window_attention", inputs=[op.node.args[0]], attrs=attrs)


@op_spec(
    "window_attention", functions=(swin_transformer.shifted_window_attention,), view=_window_view
)
def shifted_window_attention(op: CanonicalOp, env: ChannelEnv):
    """torchvision's Swin (V1 and V2) attention, one traced call with the weights as
    arguments. The function splits its input width C into ``num_heads`` heads of
    ``C // num_heads`` dims, so the input channels *are* the q, k and v dims: input
    channel j of head h is tied to row h * d + j of q, k and v, to the projection's
    column, and the same dims go in every head (the head count is an argument, kept).
    Swin V1 scales q by ``(C // num_heads) ** -0.5``, which the pruned width changes:
    inexact (V2's cosine attention is not). The relative position bias and V2's logit
    scale are per head: frozen."""
    at = op.attrs
    x = op.node.args[0]
    lay, shape = env.layout(x), env.shape(x)
    weights = (at.qkv_weight, at.proj_weight)
    biases = (at.qkv_bias, at.proj_bias)
    per_head = [_call_arg(op.node, 3, "relative_position_bias")]
    per_head.append(_call_arg(op.node, 11, "logit_scale"))
    for n in per_head:
        if isinstance(n, fx.Node):
            env.freeze_layout(env.layout(n), "a per-head value of Swin's window attention")
    h = at.num_heads
    if (
        not all(isinstance(w, ParamRef) for w in weights)
        or not all(b is None or isinstance(b, ParamRef) for b in biases)
        or lay is None
        or shape is None
        or not isinstance(h, int)
        or shape[-1] % h
    ):
        reason = "Swin window attention with computed weights or an unknown width"
        for ref in (*weights, *biases):
            if isinstance(ref, fx.Node):
                env.freeze_layout(env.layout(ref), reason)
        return _mha_frozen(op, env, reason)  # its input and every parameter it reads
    c = shape[-1]
    d = c // h
    xa = env.dim_atoms(lay, shape, len(shape) - 1)
    if not lay.zero:
        env.inexact(xa, "Swin window attention reads channels that are non-zero when pruned")
    env.rectify(xa.reshape(h, d), (h, d), keep=1)  # the same dims in every head
    if _call_arg(op.node, 11, "logit_scale") is None:
        env.inexact(xa, "Swin V1 scales q by its head dim, which pruning changes")
    qkv, proj = at.qkv_weight.fqn, at.proj_weight.fqn
    env.param_dim(qkv, 1, c, bind=xa)
    rows = np.concatenate([xa, xa, xa])
    env.param_dim(qkv, 0, 3 * c, bind=rows)
    if at.qkv_bias is not None:
        env.param_dim(at.qkv_bias.fqn, 0, 3 * c, bind=rows)
    env.param_dim(proj, 1, c, bind=xa)
    out = env.param_dim(proj, 0, env.param_tensor(proj).shape[0])
    if at.proj_bias is not None:
        env.param_dim(at.proj_bias.fqn, 0, len(out), bind=out)
    return Layout.along(out, len(shape) - 1, len(shape))


@op_spec("patch_merging_pad", functions=(swin_transformer._patch_merging_pad,))
def patch_merging_pad(op: CanonicalOp, env: ChannelEnv):
    """Swin's patch merging gathers the four pixels of each 2x2 patch along channels:
    ``cat([x0, x1, x2, x3], -1)``, so output channel ``i * C + j`` is input channel j."""
    x = op.node.args[0]
    lay, shape, out_shape = env.layout(x), env.shape(x), env.shape(op.node)
    if lay is None or shape is None or out_shape is None or out_shape[-1] != 4 * shape[-1]:
        return default_rule(op, env)
    xa = env.dim_atoms(lay, shape, len(shape) - 1)
    return Layout.along(np.tile(xa, 4), len(out_shape) - 1, len(out_shape), zero=lay.zero)
