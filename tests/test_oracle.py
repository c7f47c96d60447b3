"""The correctness oracle can fail: corrupted results are caught, at the right node.

Each test prunes a small model, passes the oracle, then corrupts the result *after*
surgery in a way that still runs (a weight value, a view's size constants, a split's
sizes) and expects ``fxprune.verify`` to raise ``VerificationError`` naming the node
that computes the wrong value and its source line.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from micro_models import LayerNormMLP, Residual, randomize
from torch import nn

import fxprune
import fxprune.passes.surgery as surgery
from fxprune import PassError, VerificationError, VerificationReport


class ShuffledHeads(nn.Module):
    """Hard-coded view of 32 channels into 4 heads of 8, a transpose, and back."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 32, 3, padding=1)
        self.c = nn.Conv2d(32, 4, 1)

    def forward(self, x):
        b = x.shape[0]
        y = torch.relu(self.a(x)).view(b, 4, 8, -1)  # the view the corruption rewrites
        return self.c(y.transpose(1, 2).reshape(b, 32, 8, 8))


class SplitSwap(nn.Module):
    """Channels split into unequal parts [8, 16] and concatenated back in the other order."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 24, 3, padding=1)
        self.c = nn.Conv2d(24, 4, 1)

    def forward(self, x):
        u, v = torch.split(torch.relu(self.a(x)), [8, 16], dim=1)  # the split corrupted
        return self.c(torch.cat([v, u * 2.0], dim=1))


IMG = (1, 3, 8, 8)


def pruned(model: nn.Module, ratio: float = 0.5):
    x = torch.randn(*IMG)
    res = fxprune.prune(model, x, ratio=ratio)
    return res, x


def node(res, name: str) -> torch.fx.Node:
    return next(n for n in res.module.graph.nodes if n.name == name)


def source(fn, text: str) -> str:
    """``file:line`` of the line of ``fn`` that contains ``text``, as errors cite it."""
    lines, first = inspect.getsourcelines(fn)
    offset = next(i for i, line in enumerate(lines) if text in line)
    return f"{inspect.getsourcefile(fn).rpartition('/tests/')[2]}:{first + offset}"


def test_uncorrupted_result_passes_and_reports():
    model = randomize(Residual())
    res, x = pruned(model)
    report = fxprune.verify(model, res, x)
    assert isinstance(report, VerificationReport)
    assert report.exact and report.outputs == 1 and report.note == ""
    assert report.parameters_checked == len(dict(res.module.named_parameters())) + len(
        dict(res.module.named_buffers())
    )
    assert report.max_error <= 1e-4 * max(report.scale, 1.0) and report.scale > 0
    assert "outputs equal the masked original" in str(report)


def test_changed_kept_weight_value_names_parameter_and_node():
    model = randomize(Residual())
    res, x = pruned(model)
    with torch.no_grad():
        res.module.conv1.weight[1, 2, 0, 1] += 0.5
    with pytest.raises(VerificationError) as info:
        fxprune.verify(model, res, x)
    msg = str(info.value)
    assert "conv1.weight" in msg and "[1, 2, 0, 1]" in msg
    assert f"node 'conv1' at tests/{source(Residual.forward, 'self.conv1')}" in msg


def test_changed_unpruned_weight_is_caught_too():
    model = randomize(Residual())
    res, x = pruned(model)
    assert "head.bias" not in res.kept  # the model's outputs are never pruned
    with torch.no_grad():
        res.module.head.bias[0] += 0.5
    with pytest.raises(VerificationError, match=r"head\.bias is not the original \(not pruned\)"):
        fxprune.verify(model, res, x)


def test_consistent_channel_permutation_keeps_outputs_but_breaks_kept():
    # Permuting conv1's kept output channels (and bn1, conv2's input) computes the same
    # function, but res.kept no longer maps the parameters to the original: caught.
    model = randomize(Residual())
    res, x = pruned(model)
    m = res.module
    n = m.conv1.weight.shape[0]
    perm = torch.arange(n).roll(1)
    with torch.no_grad():
        before = m(x)
        for t in (m.conv1.weight, m.conv1.bias, m.bn1.weight, m.bn1.bias):
            t.copy_(t[perm])
        for t in (m.bn1.running_mean, m.bn1.running_var):
            t.copy_(t[perm])
        m.conv2.weight.copy_(m.conv2.weight[:, perm])
        torch.testing.assert_close(m(x), before)
    with pytest.raises(VerificationError, match=r"bn1\.bias is not the original"):
        fxprune.verify(model, res, x)


def test_rewritten_view_constants_name_the_view_node():
    torch.manual_seed(0)
    model = ShuffledHeads().eval()
    res, x = pruned(model, ratio=0.25)
    fxprune.verify(model, res, x)
    view = node(res, "view")
    b, heads, head_dim, rest = view.args[1:]
    assert (heads, head_dim) == (4, 6)  # 2 of each head's 8 dims pruned
    view.args = (view.args[0], b, head_dim, heads, rest)  # shapes still fit: 24 channels
    res.module.recompile()
    res.module(x)  # the corrupted model runs
    with pytest.raises(VerificationError) as info:
        fxprune.verify(model, res, x)
    msg = str(info.value)
    assert "output 0" in msg and "differs from the masked original" in msg
    where = source(ShuffledHeads.forward, ".view(")
    assert f"First diverging node: node 'view' at tests/{where}" in msg
    assert "shape [1, 6, 4, 64] but expected [1, 4, 6, 64]" in msg


def shift_the_split(res) -> int:
    """Move one channel from the split's second part to its first (the graph still runs);
    returns the first part's right size."""
    split = node(res, "split")
    a, b = split.args[1]
    split.args = (split.args[0], [a + 1, b - 1], *split.args[2:])
    res.module.recompile()
    return a


def test_changed_split_sizes_name_the_split_node():
    torch.manual_seed(0)
    model = SplitSwap().eval()
    res, x = pruned(model)
    fxprune.verify(model, res, x)
    a = shift_the_split(res)
    res.module(x)  # still 12 channels into c: runs
    with pytest.raises(VerificationError) as info:
        fxprune.verify(model, res, x)
    msg = str(info.value)
    where = source(SplitSwap.forward, "torch.split")
    assert f"First diverging node: node 'split' at tests/{where}" in msg
    assert f"(output 0): shape [1, {a + 1}, 8, 8] but expected [1, {a}, 8, 8]" in msg


def test_without_a_graph_plan_the_differing_output_is_named():
    torch.manual_seed(0)
    model = SplitSwap().eval()
    res, x = pruned(model)
    shift_the_split(res)
    res.graph_plan = None
    with pytest.raises(VerificationError, match=r"output 0 \(shape \[1, 4, 8, 8\]\).*differs"):
        fxprune.verify(model, res, x)


def test_verify_leaves_models_and_their_mode_alone():
    model = randomize(Residual()).train()  # train mode: BN would update running stats
    x = torch.randn(*IMG)
    res = fxprune.prune(model, x, ratio=0.5)
    assert res.module.training
    state = {k: v.clone() for k, v in model.state_dict().items()}
    pruned_state = {k: v.clone() for k, v in res.module.state_dict().items()}
    report = fxprune.verify(model, res, x)
    assert report.exact
    assert model.training and res.module.training
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(pruned_state[k], v) for k, v in res.module.state_dict().items())


def test_inexact_result_checks_parameters_but_does_not_prove_outputs():
    torch.manual_seed(0)
    model = LayerNormMLP().eval()
    x = torch.randn(2, 6, 8)
    res = fxprune.prune(model, x, ratio=0.5)
    report = fxprune.verify(model, res, x)
    assert not report.exact and "not a proof" in report.note and "inexact" in report.note
    assert report.max_error > 1e-4 * max(report.scale, 1.0)  # outputs really differ
    with pytest.raises(VerificationError, match="differs from the masked original"):
        fxprune.verify(model, res, x, exact=True)
    with torch.no_grad():
        res.module.inp.weight[0, 0] += 0.5
    with pytest.raises(VerificationError, match=r"inp\.weight is not the original"):
        fxprune.verify(model, res, x)


def test_prune_with_verify_raises_verification_error_when_surgery_is_wrong(monkeypatch):
    # The oracle used to check parameters with surgery's own slice_tensor: a bug there
    # would have verified itself. Now it indexes with its own code and catches it.
    right = surgery.slice_tensor

    def wrong(t, dims):
        out = right(t, dims)
        if out.dim() == 4:
            out[0, 0, 0, 0] += 1.0
        return out

    monkeypatch.setattr(surgery, "slice_tensor", wrong)
    model = randomize(Residual())
    with pytest.raises(VerificationError) as info:
        fxprune.prune(copy.deepcopy(model), torch.randn(*IMG), ratio=0.5)
    assert not isinstance(info.value, PassError)
    assert "is not the original indexed by the kept indices" in str(info.value)
    notes = "\n".join(getattr(info.value, "__notes__", []))
    # one pipeline: the note lists every pass of the prune, in order
    assert (
        "pass VerifyPass failed (passes run before it: SnapshotPass, PropagateChannelsPass, "
        "BuildGroupsPass, "
        "ImportancePass, SelectChannelsPass, PlanChannelsPass, SurgeryPass)"
    ) in notes


def test_the_oracle_refuses_a_reference_written_in_place_during_pruning(monkeypatch):
    # prune(verify=True) shares the weights between the graph and the oracle's reference:
    # a surgery that wrote into an original tensor instead of replacing it must be caught.
    real = surgery.slice_tensor

    def writes_in_place(t, dims):
        with torch.no_grad():
            t.mul_(1.0)  # same values, but a write: the reference can no longer be trusted
        return real(t, dims)

    monkeypatch.setattr(surgery, "slice_tensor", writes_in_place)
    model = randomize(Residual())
    with pytest.raises(VerificationError, match=r"was modified in place while pruning"):
        fxprune.prune(model, torch.randn(*IMG), ratio=0.5)


def test_tolerance_is_1e4_in_float32_and_a_few_ulps_in_half_precision():
    from fxprune.oracle import tolerance

    assert tolerance(torch.float32) == tolerance(torch.float64) == 1e-4
    assert tolerance(torch.float16) == 8 * torch.finfo(torch.float16).eps
    assert tolerance(torch.bfloat16) == 8 * torch.finfo(torch.bfloat16).eps


def test_the_oracle_compares_in_exact_float32_and_restores_the_tf32_flags():
    from fxprune.oracle import exact_float32

    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        with exact_float32():
            assert not torch.backends.cuda.matmul.allow_tf32
            assert not torch.backends.cudnn.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_bfloat16_result_passes_the_oracle_and_a_corrupted_one_still_fails():
    model = randomize(Residual()).to(torch.bfloat16)
    x = torch.randn(*IMG, dtype=torch.bfloat16)
    res = fxprune.prune(model, x, ratio=0.5)  # verify=True at bf16's tolerance
    report = fxprune.verify(model, res, x)
    assert report.exact
    with torch.no_grad():
        res.module.conv1.weight[0] += 1.0
    with pytest.raises(VerificationError, match=r"conv1\.weight"):
        fxprune.verify(model, res, x)


# -- the reference prune(verify=True) runs against ------------------------------------------------
# prune's oracle masks a private snapshot of the traced graph module by module, into one reused
# buffer, instead of copying every weight: these tests hold it to the fully masked copy.
class Mixed(nn.Module):
    """Every way a graph reaches a tensor: called modules (one called twice, one inside a
    Sequential), a get_attr parameter, a leaf module whose child's weight its forward reads
    directly (MultiheadAttention's out_proj), and a module also read through get_attr."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 1)
        self.scale = nn.Parameter(torch.randn(1, 8, 1, 1))
        self.block = nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8))
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        y = self.b(torch.relu(self.a(x))) * self.scale
        y = self.block(self.b(y))
        t = y.flatten(2).transpose(1, 2)
        t, _ = self.attn(t, t, t)
        return self.head(t.mean(1)) + nn.functional.linear(t[:, 0], self.head.weight)


def random_kept(model: nn.Module, seed: int = 0) -> dict:
    """Half of dim 0 (and of dim 1, for matrices and kernels) of every parameter kept."""
    g = torch.Generator().manual_seed(seed)
    kept = {}
    for name, p in model.named_parameters():
        dims = {
            d: torch.randperm(p.shape[d], generator=g)[: p.shape[d] // 2 or 1].sort()[0]
            for d in range(min(p.dim(), 2))
        }
        kept[name] = dims
    return kept


def test_the_prune_time_reference_equals_the_fully_masked_copy_and_restores_the_graph():
    from fxprune.oracle import _MaskedOnCall, _modules_only_called, masked_original, snapshot

    torch.manual_seed(0)
    model = randomize(Mixed()).eval()
    x = torch.randn(2, 3, 6, 6)
    gm = torch.fx.symbolic_trace(model)
    kept = random_kept(model)
    want = masked_original(model, kept)(x)
    private = snapshot(gm)
    assert set(_modules_only_called(private)) == {"a", "b", "block.0", "block.1", "attn"}
    before = dict(private.named_parameters(remove_duplicate=False))
    masking = _MaskedOnCall(private, kept)
    with masking as masked, torch.no_grad():
        got = masked(x)
        assert not any(m._forward_pre_hooks for m in gm.modules())  # only the copy's
    assert not masking.aliased
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    still = dict(private.named_parameters(remove_duplicate=False))
    for name in ("a.weight", "b.weight", "block.0.weight", "attn.in_proj_weight"):
        assert still[name] is before[name]  # the graph's own parameters are back
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in private.modules())
    # and the reference it computed is a real one: an unmasked graph gives other outputs
    assert not torch.allclose(gm(x), want, atol=1e-3)


class HandsOnItsWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.randn(1, 8, 1, 1))

    def forward(self, x):
        return self.p  # the caller holds a view of whatever buffer holds p


class ReadsAStaleWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pos = HandsOnItsWeight()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        p = self.pos(x)
        return self.c(torch.relu(self.a(x)) + p)  # a runs between pos and the add


class _PosLeaf(torch.fx.Tracer):
    def is_leaf_module(self, m, qualname):
        return isinstance(m, HandsOnItsWeight) or super().is_leaf_module(m, qualname)


def test_a_module_that_hands_on_its_own_weight_makes_the_reference_fall_back():
    from fxprune.oracle import _MaskedOnCall, check, masked_original, snapshot

    torch.manual_seed(0)
    model = randomize(ReadsAStaleWeight()).eval()
    x = torch.randn(*IMG)
    gm = torch.fx.GraphModule(model, _PosLeaf().trace(model))
    idx = torch.tensor([0, 2, 4, 6])
    kept = {"pos.p": {1: idx}, "a.weight": {0: idx}, "a.bias": {0: idx}, "c.weight": {1: idx}}
    masking = _MaskedOnCall(snapshot(gm), kept)
    with masking as masked, torch.no_grad():
        fast = masked(x)
    assert masking.aliased  # pos's output is a view of the scratch buffer a then overwrites
    assert not torch.allclose(fast, masked_original(model, kept)(x))  # the hazard is real
    # a correct pruned model, cut by hand: the verdict comes from a fully masked copy
    pruned = copy.deepcopy(model)
    with torch.no_grad():
        pruned.a = nn.Conv2d(3, 4, 3, padding=1)
        pruned.a.weight.copy_(model.a.weight[idx])
        pruned.a.bias.copy_(model.a.bias[idx])
        pruned.pos.p = nn.Parameter(model.pos.p[:, idx].clone())
        pruned.c.weight = nn.Parameter(model.c.weight[:, idx].clone())
    assert check(snapshot(gm), pruned, kept, x, original_is_private=True).exact
    with torch.no_grad():
        pruned.a.bias[1] += 1.0  # and a wrong one still fails
    with pytest.raises(VerificationError):
        check(snapshot(gm), pruned, kept, x, original_is_private=True)


def test_prune_time_oracle_catches_a_wrong_rewrite_and_names_the_node():
    # right parameters, a wrong graph: the fast reference disagrees, and the fully masked
    # copy that confirms it names the node
    from fxprune.oracle import check, first_divergence, snapshot

    torch.manual_seed(0)
    model = SplitSwap().eval()
    res, x = pruned(model)
    shift_the_split(res)
    plan = res.graph_plan

    def locate(masked, run):
        return first_divergence(masked, run, x, plan.plan, plan.layouts)

    private = snapshot(torch.fx.symbolic_trace(model))
    with pytest.raises(VerificationError) as info:
        check(private, res.module, res.kept, x, locate=locate, original_is_private=True)
    where = source(SplitSwap.forward, "torch.split")
    assert f"First diverging node: node 'split' at tests/{where}" in str(info.value)


def test_verify_masks_an_eval_model_without_copying_its_weights(monkeypatch):
    # a caller's model in eval mode: module objects sharing its tensors, masked when called
    # (ViT-H is verified in little more memory than it takes); in train mode a full copy
    import fxprune.oracle as oracle

    model = randomize(Residual()).eval()
    x = torch.randn(*IMG)
    res = fxprune.prune(model, x, ratio=0.5)
    copies = []
    real = copy.deepcopy

    def counted(obj, *args, **kwargs):
        if isinstance(obj, nn.Module):
            copies.append(type(obj).__name__)
        return real(obj, *args, **kwargs)

    monkeypatch.setattr(oracle.copy, "deepcopy", counted)
    assert fxprune.verify(model, res, x).exact
    assert copies == []
    model.train()
    assert fxprune.verify(model, res, x).exact
    assert "Residual" in copies
    assert model.training  # and left as it was
