"""Every bad input to the Python API gets a clear fxprune error, before any tracing starts.

The table runs each bad call on a model whose forward raises ``RuntimeError("traced!")``:
had fxprune traced (or run) it, the error would be a TraceError quoting "traced!". Each
message must name the argument and the bad value.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import fxprune
from fxprune.errors import BenchError, ExportError, PruneError, TraceError
from fxprune.export import to_onnx
from fxprune.export.latency import compare_latency
from fxprune.nm_patterns import SparsityError, nm_eligibility, nm_mask
from fxprune.nm_permutation import search_permutation
from fxprune.nm_training import apply_nm_masks

logger = logging.getLogger(__name__)


class NeverTrace(nn.Module):
    """Real parameters, but any trace or call of forward fails loudly (left in train mode)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("traced!")


X = torch.randn(1, 3, 8, 8)
W = torch.randn(16, 16)


def _shown(text: str, call):
    call.text = text  # what docs/errors_table.py prints as the bad input tried
    return call


def _kw(kw: dict) -> str:
    return ", ".join(f"{k}={v.__name__ if isinstance(v, type) else repr(v)}" for k, v in kw.items())


def _prune(**kw):
    return _shown(f"fxprune.prune(model, x, {_kw(kw)})", lambda m: fxprune.prune(m, X, **kw))


def _pruner(**kw):
    return _shown(f"fxprune.Pruner(model, x, {_kw(kw)})", lambda m: fxprune.Pruner(m, X, **kw))


def _analyze(**kw):
    return _shown(f"fxprune.analyze(model, x, {_kw(kw)})", lambda m: fxprune.analyze(m, X, **kw))


def _sparsify(**kw):
    return _shown(f"fxprune.sparsify(model, x, {_kw(kw)})", lambda m: fxprune.sparsify(m, X, **kw))


def _onnx(**kw):
    return _shown(
        f"fxprune.export.to_onnx(model, x, path, {_kw(kw)})",
        lambda m: to_onnx(m, X, "/nonexistent-folder/m.onnx", **kw),
    )


def _bench(**kw):
    args = {"models": None, "inputs": lambda b: torch.randn(b, 3, 8, 8), **kw}
    shown = {k: v for k, v in kw.items() if k != "models"}
    models = "models" if "models" not in kw else repr(kw["models"])
    return _shown(
        f"compare_latency({', '.join(filter(None, [models, 'inputs', _kw(shown)]))})",
        lambda m: compare_latency(**{**args, "models": args["models"] or {"m": m}}),
    )


# (id, call on the model, error type, what the message must contain: argument, value, ...)
BAD_INPUTS = [
    ("ignore a number", _prune(ignore=42), PruneError, ["ignore", "42"]),
    ("ignore unknown name", _prune(ignore="fcc"), PruneError, ["ignore", "'fcc'", "fc"]),
    (
        "ignore and its alias",
        _prune(ignore="fc", ignored_layers="fc"),
        PruneError,
        ["ignored_layers=", "ignore="],
    ),
    (
        "ignored_layers unknown name",
        _prune(ignored_layers=["fcc"]),
        PruneError,
        ["ignored_layers", "'fcc'", "fc"],
    ),
    (
        "freeze_inputs unknown name",
        _prune(freeze_inputs="fcc"),
        PruneError,
        ["freeze_inputs", "'fcc'", "fc"],
    ),
    ("importance number", _prune(importance=42), PruneError, ["importance", "42", "'l2'"]),
    ("importance None", _prune(importance=None), PruneError, ["importance", "None", "fpgm"]),
    ("importance typo", _prune(importance="L2 "), PruneError, ["importance", "'L2 '"]),
    ("ratio string", _prune(ratio="0.5"), PruneError, ["ratio", "'0.5'", "not a string"]),
    ("ratio 1", _prune(ratio=1.0), PruneError, ["ratio", "[0, 1)", "1.0"]),
    ("round_to 0", _prune(round_to=0), PruneError, ["round_to", "got 0"]),
    ("align up", _prune(align="up"), PruneError, ["align", "'up'", "'round'"]),
    ("global_ranking yes", _prune(global_ranking="yes"), PruneError, ["global_ranking", "'yes'"]),
    ("target_macs 2", _prune(target_macs=2), PruneError, ["target_macs", "(0, 1]", "got 2"]),
    ("max_ratio 1.5", _prune(max_ratio=1.5), PruneError, ["max_ratio", "1.5"]),
    ("min_channels 0", _prune(min_channels=0), PruneError, ["min_channels", "got 0"]),
    ("head_mode x", _prune(head_mode="x"), PruneError, ["head_mode", "'x'"]),
    ("frontend jit", _prune(frontend="jit"), PruneError, ["frontend", "'jit'", "'export'"]),
    ("verify string", _prune(verify="no"), PruneError, ["verify", "'no'"]),
    ("leaf_modules class", _prune(leaf_modules=nn.Conv2d), PruneError, ["leaf_modules", "Conv2d"]),
    ("calibration alone", _prune(calibration=[X]), PruneError, ["calibration", "loss_fn"]),
    ("taylor alone", _prune(importance="taylor"), PruneError, ["taylor", "calibration"]),
    ("ratios unknown key", _prune(ratios={"fcc": 0.3}), PruneError, ["ratios", "'fcc'"]),
    ("ratios bad value", _prune(ratios={"fc": 2}), PruneError, ["ratios['fc']", "got 2"]),
    ("model a function", lambda m: fxprune.prune(m.forward, X), PruneError, ["model", "method"]),
    (
        "inputs a shape",
        lambda m: fxprune.prune(m, (1, 3, 8, 8)),
        TraceError,
        ["example_inputs", "(1, 3, 8, 8)", "torch.randn(1, 3, 224, 224)"],
    ),
    (
        "inputs too many",
        lambda m: fxprune.prune(m, (X, X)),
        TraceError,
        ["example_inputs", "NeverTrace.forward(x)", "too many"],
    ),
    (
        "train mode + export",
        _prune(frontend="export"),
        PruneError,
        ["training mode", "export", "model.eval()"],
    ),
    (
        "sparsify train + export",
        _sparsify(frontend="export"),
        SparsityError,
        ["training mode", "model.eval()"],
    ),
    ("Pruner typo", _pruner(ratio=0.5, steps=4, roundto=8), PruneError, ["roundto", "round_to="]),
    ("Pruner steps 0", _pruner(steps=0), PruneError, ["steps", "got 0"]),
    ("Pruner target_macs", _pruner(target_macs=0.5), PruneError, ["target_macs", "fxprune.prune"]),
    ("Pruner ratio", _pruner(ratio=2), PruneError, ["ratio", "got 2"]),
    ("Pruner importance", _pruner(importance=None), PruneError, ["importance", "None"]),
    ("analyze frontend", _analyze(frontend="jit"), PruneError, ["frontend", "'jit'"]),
    ("analyze head_mode", _analyze(head_mode="x"), PruneError, ["head_mode", "'x'"]),
    ("analyze typo", _analyze(leaf_modulez=[]), PruneError, ["leaf_modulez", "leaf_modules="]),
    ("analyze ignore", _analyze(ignore=3.5), PruneError, ["ignore", "3.5"]),
    ("sparsify pattern", _sparsify(pattern="2-4"), SparsityError, ["pattern", "'2-4'", "'2:4'"]),
    ("sparsify pattern int", _sparsify(pattern=4), SparsityError, ["pattern", "got 4"]),
    ("sparsify budget", _sparsify(time_budget=-1), SparsityError, ["time_budget", "-1"]),
    ("sparsify verify", _sparsify(verify="yes"), SparsityError, ["verify", "'yes'"]),
    ("sparsify min_size", _sparsify(min_size=-5), SparsityError, ["min_size", "-5"]),
    ("sparsify ignore", _sparsify(ignore="fcc"), PruneError, ["ignore", "'fcc'"]),
    (
        "search budget",
        lambda m: search_permutation(W, time_budget=-1),
        SparsityError,
        ["time_budget", "-1"],
    ),
    ("eligibility groups", lambda m: nm_eligibility(W, groups=0), SparsityError, ["groups", "0"]),
    ("nm_mask string", lambda m: nm_mask("w"), SparsityError, ["weight", "'w'"]),
    (
        "masks unknown name",
        lambda m: apply_nm_masks(m, {"fc.weigth": torch.ones(4, 8, dtype=torch.bool)}),
        SparsityError,
        ["fc.weigth", "'fc.weight'"],
    ),
    ("onnx opset 3", _onnx(opset=3), ExportError, ["opset", "got 3", "[18,"]),
    ("onnx opset str", _onnx(opset="18"), ExportError, ["opset", "'18'"]),
    ("onnx rtol", _onnx(rtol=-1), ExportError, ["rtol", "-1"]),
    ("onnx atol", _onnx(atol=float("inf")), ExportError, ["atol", "inf"]),
    ("onnx fp16", _onnx(fp16="yes"), ExportError, ["fp16", "'yes'"]),
    ("onnx inputs", lambda m: to_onnx(m, [1, 3, 8, 8], "m.onnx"), ExportError, ["example_inputs"]),
    ("bench rounds", _bench(rounds=0), BenchError, ["rounds", "got 0"]),
    ("bench warmup", _bench(warmup=-1), BenchError, ["warmup", "-1"]),
    ("bench backends", _bench(backends="ortt"), BenchError, ["backends", "'ortt'", "'ort'"]),
    ("bench batch", _bench(batch_sizes=[0]), BenchError, ["batch_sizes", "got 0"]),
    ("bench min_time", _bench(min_time=-1), BenchError, ["min_time", "-1"]),
    ("bench models", _bench(models=[1]), BenchError, ["models", "[1]"]),
]


@pytest.mark.parametrize(
    "call, error, needles", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS]
)
def test_bad_input_is_rejected_before_tracing_naming_argument_and_value(call, error, needles):
    with pytest.raises(error) as info:
        call(NeverTrace())
    text = str(info.value)
    assert isinstance(info.value, fxprune.FxpruneError)
    assert "traced!" not in text and "could not trace" not in text, text
    for needle in needles:
        assert needle in text, f"{needle!r} not in: {text}"


class TwoLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body(torch.relu(self.conv(x))).mean((2, 3))
        return self.head(torch.relu(self.fc(x)))


@pytest.mark.parametrize("form", ["module", "name"])
def test_ignore_takes_one_module_or_one_name_like_a_list(form):
    model, x = TwoLayer().eval(), torch.randn(1, 3, 8, 8)
    listed = fxprune.prune(model, x, ratio=0.5, ignore=[model.fc])
    single = fxprune.prune(model, x, ratio=0.5, ignore=model.fc if form == "module" else "fc")
    assert single.module.fc.out_features == listed.module.fc.out_features == 16
    assert single.kept.keys() == listed.kept.keys()
    for name, dims in listed.kept.items():
        for d, idx in dims.items():
            assert torch.equal(single.kept[name][d], idx)
    assert fxprune.prune(model, x, ratio=0.5).module.fc.out_features == 8


def test_ignore_of_a_sequential_ignores_it_rather_than_its_children():
    model, x = TwoLayer().eval(), torch.randn(1, 3, 8, 8)
    res = fxprune.prune(model, x, ratio=0.5, ignore=model.body)
    assert res.module.get_submodule("body.0").out_channels == 16


def test_ratios_keys_resolve_modules_like_ignore():
    model, x = TwoLayer().eval(), torch.randn(1, 3, 8, 8)
    res = fxprune.prune(model, x, ratio=0.5, ratios={model.fc: 0.25})
    assert res.module.fc.out_features == 12


def test_pruner_options_default_to_prunes_own():
    model, x = TwoLayer().eval(), torch.randn(1, 3, 8, 8)
    pruner = fxprune.Pruner(model, x, ratio=0.5, steps=2, ignore="fc")
    pruner.step()
    res = pruner.step()
    assert res.module.fc.out_features == 16 and res.module.conv.out_channels == 8


def test_shape_mismatch_advice_names_the_shape_not_control_flow():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()).eval()
    with pytest.raises(TraceError) as info:
        fxprune.prune(model, torch.randn(1, 1, 8, 8))
    text = str(info.value)
    advice = text.split("How to fix:")[1]
    assert "expects 3 input channels" in advice and "(1, 1, 8, 8)" in advice
    assert "control flow" not in advice


def test_dtype_mismatch_advice_says_to_cast():
    class Ids(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 4)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.emb(ids)

    with pytest.raises(TraceError) as info:
        fxprune.trace(Ids(), torch.randn(2, 3))
    advice = str(info.value).split("How to fix:")[1]
    assert "dtype" in advice and "ids.long()" in advice and "control flow" not in advice
    assert "test_errors_api.py" in str(info.value)  # the user's source line stays


def test_missing_argument_advice_shows_the_forward_signature():
    class Two(nn.Module):
        def forward(self, x, y):
            return x + y

    with pytest.raises(TraceError) as info:
        fxprune.trace(Two(), torch.randn(2, 3))
    advice = str(info.value).split("How to fix:")[1]
    assert "forward(x, y)" in advice and "control flow" not in advice


def _train_model() -> nn.Module:
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Conv2d(16, 32, 3),
        nn.Flatten(),
        nn.Linear(32 * 12 * 12, 10),
    )
    return model.train()


def test_sparsify_and_prune_verify_a_train_mode_model_without_touching_its_mode():
    model, x = _train_model(), torch.randn(2, 3, 16, 16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sp = fxprune.sparsify(model, x, time_budget=0.1, progress=False)
    res = fxprune.prune(model, x, ratio=0.5, verify=True)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert sp.module.training and res.module.training  # ready for fine-tuning
    assert "outputs equal" in str(res.report.verified)
