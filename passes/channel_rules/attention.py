"""Channel rules for contractions: matmul / bmm / einsum, scaled_dot_product_attention
and ``nn.MultiheadAttention``.

A contraction is an element-wise relation over the joint index space of its
operands followed by a sum over the contracted indices: ``q @ k^T`` ties the last
dims of q and k (head dims) and the head dims (batch dims) of both; ``attn @ v``
ties attention heads to value heads. GQA's repeated key/value heads arrive through
expand/reshape or ``repeat_interleave`` and are tied to every query head that reads
them. Summing over pruned channels is exact only if they read as zero.
"""

from __future__ import annotations

import logging

import numpy as np

from fxprune.channels import NO_ATOM, Layout
from fxprune.ops import CanonicalOp, OpKind
from fxprune.passes.channel_rules.base import ChannelEnv, default_rule, register

logger = logging.getLogger(__name__)


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


@register(OpKind.MATMUL)
def matmul(op: CanonicalOp, env: ChannelEnv):
    out_shape = env.shape(op.node)
    if out_shape is None or len(op.inputs) != 2:
        return default_rule(op, env)
    (a, b) = op.inputs
    la, sa, lb, sb = env.layout(a), env.shape(a), env.layout(b), env.shape(b)
    if la is None or lb is None or sa is None or sb is None:
        return default_rule(op, env)
    if op.name == "einsum":
        eq = op.attrs.get("equation", "")
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


@register(OpKind.SDPA)
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
    mask = op.attrs.get("mask")
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


@register(OpKind.MHA)
def multihead_attention(op: CanonicalOp, env: ChannelEnv):
    # nn.MultiheadAttention requires embed_dim == num_heads * head_dim == its input size, and
    # computes heads internally; fxprune keeps its sizes rather than patch the module.
    reason = (
        "nn.MultiheadAttention ties embed_dim to num_heads*head_dim and to its input; "
        "fxprune keeps its sizes"
    )
    for n in op.inputs:
        env.freeze_layout(env.layout(n), reason)
    for fqn in op.params.values():
        t = env.param_tensor(fqn)
        if t is None:
            continue
        for d in range(t.dim()):
            atoms = env.param_dim(fqn, d, t.shape[d])
            env.freeze(atoms, reason)
    from fxprune.passes.channel_rules.base import untracked_like

    return untracked_like(op.node)
