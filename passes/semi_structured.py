"""SemiStructuredPass: lower Linear weights that already hold the 2:4 pattern to PyTorch's
semi-structured sparse tensors (``torch.sparse.to_sparse_semi_structured``: cuSPARSELt or
CUTLASS kernels).

Lossless: only weights that already are 2:4 along their input features are converted, so
the product is the same. Needs a CUDA GPU of compute capability 8.0 or newer and fp16,
bf16 or int8 weights whose shape the kernels take; otherwise each weight is left dense
and the reason is in the ``semi_structured`` artifact (the compile backend says it once).
"""

from __future__ import annotations

import logging

import torch
import torch.fx as fx
from torch import nn

from fxprune import meta
from fxprune.artifacts import SEMI_STRUCTURED
from fxprune.ops import CanonicalOp, ParamRef, canonicalize
from fxprune.oracle import tensor_at
from fxprune.pass_infra import Pass, PassContext, PassResult

logger = logging.getLogger(__name__)

_DTYPES = (torch.float16, torch.bfloat16, torch.int8)


def _gpu_reason(weight: torch.Tensor) -> str | None:
    """Why ``weight`` cannot use the semi-structured kernels on this machine, or None."""
    if not weight.is_cuda:
        return "the weight is not on a CUDA GPU (2:4 kernels need one)"
    major, _ = torch.cuda.get_device_capability(weight.device)
    if major < 8:
        return "2:4 kernels need compute capability 8.0 or newer"
    if weight.dtype not in _DTYPES:
        return f"2:4 kernels take fp16, bf16 or int8 weights, not {weight.dtype}"
    rows, cols = weight.shape
    if rows % 64 or cols % 64:
        return f"shape {tuple(weight.shape)}: 2:4 kernels need multiples of 64"
    return None


def is_two_four(weight: torch.Tensor) -> bool:
    """At most 2 nonzeros in every 4 consecutive input features of every row."""
    if weight.shape[-1] % 4:
        return False
    return bool((weight.detach().reshape(-1, 4) != 0).sum(-1).le(2).all())


class SemiStructuredPass(Pass):
    """Convert every 2:4 Linear weight to a semi-structured sparse tensor, where it can run."""

    provides = (SEMI_STRUCTURED,)

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        outcome: dict[str, str] = {}
        for node in gm.graph.nodes:
            op = meta.get(node, meta.OP)
            op = op if isinstance(op, CanonicalOp) else canonicalize(node, gm)
            ref = getattr(op.attrs, "weight", None) if op.kind == "linear" else None
            if not isinstance(ref, ParamRef) or ref.fqn in outcome:
                continue
            weight = tensor_at(gm, ref.fqn)
            if weight is None or weight.dim() != 2:
                continue
            reason = _gpu_reason(weight)
            if reason is None and not is_two_four(weight):
                reason = "not 2:4 already (lossless lowering only converts 2:4 weights)"
            if reason is None:
                sparse = torch.sparse.to_sparse_semi_structured(weight.detach())
                _set(gm, ref.fqn, nn.Parameter(sparse, requires_grad=False))
                reason = "converted"
            outcome[ref.fqn] = reason
        ctx[SEMI_STRUCTURED] = outcome
        converted = any(r == "converted" for r in outcome.values())
        if converted:
            gm.recompile()
        return PassResult(gm, converted)


def _set(gm: fx.GraphModule, fqn: str, value: nn.Parameter) -> None:
    prefix, _, name = fqn.rpartition(".")
    owner = gm.get_submodule(prefix) if prefix else gm
    setattr(owner, name, value)
