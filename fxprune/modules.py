"""Modules that fxprune puts in place of library modules whose sizes cannot change.

``nn.MultiheadAttention`` requires ``embed_dim == num_heads * head_dim`` and an output as
wide as its input. :class:`PrunedMultiheadAttention` computes the same attention with
those three sizes free, and keeps the parameter names (``in_proj_weight``,
``in_proj_bias``, ``out_proj.weight``, ``out_proj.bias``) so state_dict keys stay.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)


class PrunedMultiheadAttention(nn.Module):
    """Multi-head attention with independent input, head and output sizes.

    Same call signature and results as ``nn.MultiheadAttention`` (self- or cross-attention
    with a packed ``in_proj_weight``; ``key_padding_mask``, ``attn_mask``, ``need_weights``,
    ``average_attn_weights``, ``is_causal``, ``batch_first``).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        head_dim: int,
        out_dim: int,
        *,
        v_head_dim: int | None = None,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        scale: float | None = None,
    ) -> None:
        super().__init__()
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.v_head_dim = v_head_dim if v_head_dim is not None else head_dim
        self.out_dim, self.batch_first, self.dropout = out_dim, batch_first, dropout
        self.scale = scale if scale is not None else head_dim**-0.5
        qk, vd = num_heads * head_dim, num_heads * self.v_head_dim
        self.in_proj_weight = nn.Parameter(torch.empty(2 * qk + vd, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(2 * qk + vd)) if bias else None
        self.out_proj = nn.Linear(vd, out_dim, bias=bias)

    @classmethod
    def from_module(
        cls,
        mha: nn.MultiheadAttention,
        num_heads: int,
        head_dim: int,
        v_head_dim: int,
        scale: float,
    ) -> PrunedMultiheadAttention:
        """Wrap the (already sliced) parameters of ``mha``; keeps its original scale."""
        dropout = mha.dropout if isinstance(mha.dropout, float) else 0.0
        new = cls(
            mha.in_proj_weight.shape[1],
            num_heads,
            head_dim,
            mha.out_proj.weight.shape[0],
            v_head_dim=v_head_dim,
            bias=mha.in_proj_bias is not None,
            batch_first=mha.batch_first,
            dropout=dropout,
            scale=scale,
        )
        new.in_proj_weight = mha.in_proj_weight
        new.in_proj_bias = mha.in_proj_bias
        new.out_proj = mha.out_proj
        new.out_proj.in_features = num_heads * v_head_dim
        new.out_proj.out_features = mha.out_proj.weight.shape[0]
        new.train(mha.training)
        return new

    def forward(
        self,
        query,
        key,
        value,
        key_padding_mask=None,
        need_weights: bool = True,
        attn_mask=None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ):
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        tgt, bsz, _ = query.shape
        src = key.shape[0]
        h, d, dv = self.num_heads, self.head_dim, self.v_head_dim
        qk = h * d
        w, b = self.in_proj_weight, self.in_proj_bias
        bq, bk, bv = (None, None, None) if b is None else (b[:qk], b[qk : 2 * qk], b[2 * qk :])
        q = F.linear(query, w[:qk], bq)
        k = F.linear(key, w[qk : 2 * qk], bk)
        v = F.linear(value, w[2 * qk :], bv)
        q = q.reshape(tgt, bsz * h, d).transpose(0, 1).reshape(bsz, h, tgt, d)
        k = k.reshape(src, bsz * h, d).transpose(0, 1).reshape(bsz, h, src, d)
        v = v.reshape(src, bsz * h, dv).transpose(0, 1).reshape(bsz, h, src, dv)
        scores = (q @ k.transpose(-2, -1)) * self.scale
        if attn_mask is not None:
            m = attn_mask if attn_mask.dim() == 2 else attn_mask.view(bsz, h, tgt, src)
            scores = scores.masked_fill(m, float("-inf")) if m.dtype == torch.bool else scores + m
        elif is_causal:
            causal = torch.ones(tgt, src, dtype=torch.bool, device=q.device).triu(1)
            scores = scores.masked_fill(causal, float("-inf"))
        if key_padding_mask is not None:
            kpm = key_padding_mask.view(bsz, 1, 1, src)
            scores = (
                scores.masked_fill(kpm, float("-inf")) if kpm.dtype == torch.bool else scores + kpm
            )
        attn = scores.softmax(-1)
        if self.training and self.dropout > 0:
            attn = F.dropout(attn, self.dropout)
        out = (attn @ v).permute(2, 0, 1, 3).reshape(tgt, bsz, h * dv)
        out = self.out_proj(out)
        if unbatched:
            out = out.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        weights = attn.mean(1) if average_attn_weights else attn
        return out, weights.squeeze(0) if unbatched else weights
