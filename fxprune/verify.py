"""The correctness oracle.

For a pruning result, the *masked original* is a copy of the original model with
every pruned coordinate (everything not in ``kept``) set to zero in every
parameter. When every pruned group is exact, the pruned model's output equals the
masked original's (float32: max error under 1e-4 of the output's scale), and every
pruned parameter equals the original indexed by the kept indices (zeros at -1).
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_flatten

from fxprune import meta
from fxprune.channels import Layout
from fxprune.errors import VerificationError
from fxprune.trace import flat_inputs

logger = logging.getLogger(__name__)

Kept = dict[str, dict[int, torch.Tensor]]
TOLERANCE = 1e-4


def masked_original(original: nn.Module, kept: Kept) -> nn.Module:
    """A copy of ``original`` with every coordinate not in ``kept`` set to zero."""
    m = copy.deepcopy(original)
    tensors = dict(m.named_parameters(remove_duplicate=False))
    tensors.update(dict(m.named_buffers(remove_duplicate=False)))
    with torch.no_grad():
        for fqn, dims in kept.items():
            t = tensors.get(fqn)
            if t is None:
                continue
            mask = torch.ones(t.shape, dtype=torch.bool)
            for d, idx in dims.items():
                keep = torch.zeros(t.shape[d], dtype=torch.bool)
                keep[idx[idx >= 0]] = True
                shape = [1] * t.dim()
                shape[d] = -1
                mask &= keep.view(shape)
            t.mul_(mask.to(t.dtype))
    return m


def check_params(original: nn.Module, pruned: nn.Module, kept: Kept) -> None:
    """Every pruned parameter equals the original indexed by ``kept`` (zeros at -1)."""
    from fxprune.passes.surgery import slice_tensor

    orig = dict(original.named_parameters(remove_duplicate=False))
    orig.update(dict(original.named_buffers(remove_duplicate=False)))
    new = dict(pruned.named_parameters(remove_duplicate=False))
    new.update(dict(pruned.named_buffers(remove_duplicate=False)))
    for fqn, dims in kept.items():
        if fqn not in orig or fqn not in new:
            continue
        want = slice_tensor(orig[fqn], dims)
        got = new[fqn].detach()
        if want.shape != got.shape or not torch.equal(want, got):
            raise VerificationError(
                f"parameter {fqn} is not the original indexed by the kept indices "
                f"(shape {list(got.shape)} vs {list(want.shape)})."
            )


def _outputs(module: nn.Module, inputs: Any) -> list[torch.Tensor]:
    from fxprune.trace import ExampleInputs

    ex = ExampleInputs.of(inputs)
    with torch.no_grad():
        out = module(*ex.args, **ex.kwargs)
    leaves, _ = tree_flatten(out)
    return [t for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()]


def max_error(reference: list[torch.Tensor], got: list[torch.Tensor]) -> tuple[float, float]:
    """(max abs error, the reference output's scale) over all float outputs."""
    err, scale = 0.0, 0.0
    for a, b in zip(reference, got):
        if a.shape != b.shape:
            return float("inf"), 1.0
        err = max(err, float((a.float() - b.float()).abs().max()) if a.numel() else 0.0)
        scale = max(scale, float(a.abs().max()) if a.numel() else 0.0)
    return err, scale


def compare_outputs(masked: nn.Module, pruned: nn.Module, inputs: Any) -> float:
    """Max error between the masked original and the pruned model; raises past tolerance."""
    ref, got = _outputs(masked, inputs), _outputs(pruned, inputs)
    if len(ref) != len(got):
        raise VerificationError(
            f"the pruned model returns {len(got)} tensors, the original {len(ref)}."
        )
    err, scale = max_error(ref, got)
    if err > TOLERANCE * max(scale, 1.0):
        raise VerificationError(
            f"pruned output differs from the masked original by {err:.3e} "
            f"(output scale {scale:.3e}, tolerance {TOLERANCE:g} of the scale)."
        )
    return err


class _Recorder(torch.fx.Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.values: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            self.values[n.name] = out.detach()
        return out


def first_divergence(
    masked_gm: fx.GraphModule,
    pruned_gm: fx.GraphModule,
    inputs: Any,
    plan: Any,
    layouts: dict[str, Layout],
) -> str | None:
    """Name and source line of the first node whose pruned output differs from the masked one."""
    from fxprune.passes.select_channels import DROP

    rec_a, rec_b = _Recorder(masked_gm), _Recorder(pruned_gm)
    with torch.no_grad():
        rec_a.run(*flat_inputs(masked_gm, inputs))
        rec_b.run(*flat_inputs(pruned_gm, inputs))
    for node in pruned_gm.graph.nodes:
        a, b = rec_a.values.get(node.name), rec_b.values.get(node.name)
        lay = layouts.get(node.name)
        if a is None or b is None or not isinstance(lay, Layout) or not a.is_floating_point():
            continue
        ref = a
        for d in lay.varying_dims():
            if d < ref.dim():
                line = plan.line(lay, d, ref.shape[d])
                ref = ref.index_select(d, torch.from_numpy((line != DROP).nonzero()[0]))
        if ref.shape != b.shape:
            return f"{meta.describe(node)}: shape {list(b.shape)} but expected {list(ref.shape)}"
        err = float((ref.float() - b.float()).abs().max()) if ref.numel() else 0.0
        if err > TOLERANCE * max(float(ref.abs().max()) if ref.numel() else 0.0, 1.0):
            return f"{meta.describe(node)}: differs by {err:.3e}"
    return None
