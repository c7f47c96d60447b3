"""Pruned and sparse models lowered to ONNX (checked in ONNX Runtime) and TensorRT-RTX engines."""

from __future__ import annotations

import importlib.util

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torchvision
from micro_models import randomize

import fxprune
from fxprune.export import build_engine, to_onnx

HAS_RTX = importlib.util.find_spec("tensorrt_rtx") is not None
HAS_GPU = torch.cuda.is_available()
HAS_TRT = importlib.util.find_spec("tensorrt") is not None
needs_builder = pytest.mark.skipif(
    not HAS_RTX, reason="needs tensorrt_rtx (pip install 'fxprune[trt-rtx]')"
)


def run_ort(path, feeds: dict) -> list[np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    return sess.run(None, {n: feeds[n] for n in names if n in feeds})


@pytest.fixture(scope="module")
def pruned_cnn():
    model = randomize(torchvision.models.resnet18())
    x = torch.randn(1, 3, 64, 64)
    return model, x, fxprune.prune(model, x, ratio=0.5, round_to=8)


def test_pruned_cnn_onnx_dynamic_batch(pruned_cnn, tmp_path):
    _, x, res = pruned_cnn
    out = to_onnx(res.module, x, tmp_path / "r18.onnx")
    assert out.max_abs_err < 1e-3
    xb = torch.randn(3, 3, 64, 64)
    got = run_ort(out.path, {out.input_names[0]: xb.numpy()})[0]
    with torch.no_grad():
        want = res.module(xb).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)


def test_pruned_cnn_fp16_onnx(pruned_cnn, tmp_path):
    import onnx

    _, x, res = pruned_cnn
    out = to_onnx(res.module, x, tmp_path / "r18_fp16.onnx", fp16=True)
    types = {i.data_type for i in onnx.load(str(out.path)).graph.initializer}
    assert onnx.TensorProto.FLOAT16 in types and onnx.TensorProto.FLOAT not in types


@pytest.mark.slow
def test_pruned_vit_onnx(tmp_path):
    model = torchvision.models.vit_b_16().eval()
    x = torch.randn(1, 3, 224, 224)
    res = fxprune.prune(model, x, ratio=0.5, round_to=8)
    out = to_onnx(res.module, x, tmp_path / "vit.onnx")
    assert out.max_abs_err < 1e-3


@pytest.mark.slow
def test_pruned_minilm_onnx(minilm, tmp_path):
    model, inputs = minilm
    res = fxprune.prune(model, inputs, ratio=0.5, round_to=8)
    out = to_onnx(res.module, inputs, tmp_path / "minilm.onnx")
    assert out.max_abs_err < 1e-3
    feeds = {k: v.numpy() for k, v in inputs.items()}
    got = run_ort(out.path, feeds)[0]
    with torch.no_grad():
        want = res.module(**inputs)[0].numpy()
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)


@needs_builder
def test_engine_from_pruned_onnx_with_sparse_weights(pruned_cnn, tmp_path):
    _, x, res = pruned_cnn
    onnx_path = to_onnx(res.module, x, tmp_path / "p.onnx").path
    eng = build_engine(onnx_path, tmp_path / "p.engine", sparse=True)
    assert (tmp_path / "p.engine").stat().st_size > 0 and eng.sparse_weights
    assert "SPARSE_WEIGHTS" in eng.builder_flags
    if not HAS_GPU:
        assert not eng.runnable and "GPU" in eng.runnable_reason


@needs_builder
def test_engine_from_2_4_sparse_model(tmp_path):
    from fxprune.export import check_onnx_nm

    model = randomize(torchvision.models.resnet18())
    x = torch.randn(1, 3, 64, 64)
    sp = fxprune.sparsify(model, x, pattern="2:4", time_budget=0.1)
    onnx_path = to_onnx(sp.module, x, tmp_path / "s.onnx").path
    report = check_onnx_nm(onnx_path, "2:4")
    assert report.passed and not report.failed, str(report)
    eng = build_engine(onnx_path, tmp_path / "s.engine", sparse=True)
    assert eng.sparse_weights and (tmp_path / "s.engine").exists()


@pytest.mark.gpu(reason="needs an NVIDIA GPU: sparse kernels are chosen and timed only on one")
@pytest.mark.skipif(
    not HAS_TRT, reason="needs NVIDIA's tensorrt (runs engines; tensorrt_rtx only builds them)"
)
def test_sparse_engine_picks_sparse_kernels_on_gpu(tmp_path):
    model = randomize(torchvision.models.resnet50())
    x = torch.randn(8, 3, 224, 224)
    sp = fxprune.sparsify(model, x, pattern="2:4", time_budget=0.2)
    onnx_path = to_onnx(sp.module, x, tmp_path / "s.onnx", fp16=True).path
    eng = build_engine(onnx_path, tmp_path / "s.engine", sparse=True)
    assert eng.runnable and eng.sparse_layers, str(eng)
