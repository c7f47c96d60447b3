"""Tests of the ONNX and TensorRT lowering: numbers, file handling, engines built on the CPU."""

from __future__ import annotations

import importlib.util
import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from fxprune.errors import ExportError
from fxprune.export import build_engine, run_engine, to_onnx
from fxprune.export.onnx import flatten_outputs

logger = logging.getLogger(__name__)

HAS_GPU = torch.cuda.is_available()
NEEDS_GPU = "needs an NVIDIA GPU: TensorRT engines run (and reveal their tactics) only on one"
HAS_RTX = importlib.util.find_spec("tensorrt_rtx") is not None
HAS_TRT = importlib.util.find_spec("tensorrt") is not None
needs_trt_builder = pytest.mark.skipif(
    not (HAS_RTX or (HAS_TRT and HAS_GPU)),
    reason="needs tensorrt_rtx (CPU-only builds) or tensorrt with a GPU",
)
gpu = pytest.mark.gpu(reason=NEEDS_GPU)


class SmallCNN(nn.Module):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, groups=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(self.conv2(h)) + h
        return self.fc(self.pool(h).flatten(1))


class AttentionBlock(nn.Module):
    """Pre-norm attention block with a padding mask; returns a dict like a HF model."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.norm(x)
        a, _ = self.attn(h, h, h, key_padding_mask=mask == 0, need_weights=False)
        x = x + a
        x = x + self.mlp(x)
        return {"hidden": x, "pooled": (x * mask.unsqueeze(-1)).sum(1)}


def _train_mode_with_stats(model: nn.Module) -> nn.Module:
    # Non-trivial BN statistics, and training mode, so that "left untouched" means something.
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, 3, 16, 16))
    return model


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_state(before: dict[str, torch.Tensor], model: nn.Module) -> None:
    after = model.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert after[key].dtype == value.dtype, key
        assert torch.equal(after[key], value), key


def _ort_run(path, feed):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {k: v.numpy() for k, v in feed.items()})


@pytest.fixture(scope="module")
def cnn_onnx(tmp_path_factory):
    torch.manual_seed(0)
    model = _train_mode_with_stats(SmallCNN())
    before = _state(model)
    path = tmp_path_factory.mktemp("cnn") / "cnn.onnx"
    result = to_onnx(model, torch.randn(1, 3, 16, 16), path)
    return model, before, result


def test_cnn_round_trip_leaves_module_untouched(cnn_onnx):
    model, before, result = cnn_onnx
    assert model.training and model.bn1.training
    _assert_same_state(before, model)
    assert result.input_names == ["x"] and result.output_names == ["output"]
    assert result.opset >= 18 and result.max_abs_err < 1e-4
    onnx.checker.check_model(result.path, full_check=True)
    x = torch.randn(2, 3, 16, 16)
    (got,) = _ort_run(result.path, {"x": x})
    with torch.no_grad():
        want = model.eval()(x).numpy()
    model.train()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_attention_dict_inputs_and_outputs_dynamic_batch(tmp_path):
    torch.manual_seed(0)
    model = AttentionBlock().eval()
    x, mask = torch.randn(1, 6, 32), torch.ones(1, 6)
    mask[0, -2:] = 0
    result = to_onnx(model, {"x": x, "mask": mask}, tmp_path / "attn.onnx")
    assert result.input_names == ["x", "mask"]
    assert result.output_names == ["hidden", "pooled"]
    assert result.dynamic_batch and result.max_rel_err < 1e-4
    # Exported at batch 1, run at batch 3: torch.export's 0/1 specialization must not have
    # frozen the batch (MultiheadAttention does freeze it when traced at batch 1).
    x3, mask3 = torch.randn(3, 6, 32), torch.ones(3, 6)
    mask3[1, -3:] = 0
    got = _ort_run(result.path, {"x": x3, "mask": mask3})
    with torch.no_grad():
        want = flatten_outputs(model(x3, mask3))
    assert [n for n, _ in want] == ["hidden", "pooled"]
    for array, (_, tensor) in zip(got, want):
        np.testing.assert_allclose(array, tensor.numpy(), rtol=1e-4, atol=1e-5)


def test_fp16_export_has_half_weights_and_runs(tmp_path):
    torch.manual_seed(0)
    model = AttentionBlock()  # training mode on purpose
    before = _state(model)
    x, mask = torch.randn(2, 6, 32), torch.ones(2, 6)
    result = to_onnx(model, (x, mask), tmp_path / "attn16.onnx", fp16=True)
    _assert_same_state(before, model)  # still float32, same values
    assert model.training and result.fp16
    proto = onnx.load(result.path)
    # Weights (rank >= 1) are half; a float32 scalar may remain where the graph casts to compare.
    weights = [i for i in proto.graph.initializer if i.data_type in (1, 10) and len(i.dims) > 0]
    assert len(weights) >= 6 and all(i.data_type == onnx.TensorProto.FLOAT16 for i in weights)
    assert {"norm.weight", "attn.in_proj_bias"} <= {i.name for i in weights}
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    # Compared with the float32 module, within fp16 accuracy of the output scale.
    assert result.max_rel_err < 1e-2
    session = ort.InferenceSession(
        result.path,
        providers=["CPUExecutionProvider"],
        # ORT 1.31 segfaults in its ENABLE_ALL fp16 attention fusions on the CPU.
        sess_options=_extended_options(),
    )
    got = session.run(None, {"x": x.half().numpy(), "mask": mask.half().numpy()})
    assert got[0].dtype == np.float16 and np.isfinite(got[0]).all()


def _extended_options():
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    return options


def test_tolerance_failure_writes_nothing(tmp_path):
    torch.manual_seed(0)
    # ORT folds BatchNorm into the conv and reorders the sums: float noise is certain.
    model = _train_mode_with_stats(SmallCNN(width=32)).eval()
    path = tmp_path / "strict.onnx"
    with pytest.raises(ExportError, match=r"disagrees with PyTorch on output 'output'"):
        to_onnx(model, torch.randn(2, 3, 16, 16), path, rtol=0.0, atol=0.0)
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []  # no temp folder or side file left behind


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ExportError, match=r"folder .*nope.* does not exist"):
        to_onnx(SmallCNN(), torch.randn(1, 3, 8, 8), tmp_path / "nope" / "m.onnx")


def test_static_batch_export(tmp_path):
    result = to_onnx(
        SmallCNN().eval(), torch.randn(2, 3, 8, 8), tmp_path / "s.onnx", dynamic_batch=False
    )
    dims = onnx.load(result.path).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [2, 3, 8, 8]


# -- TensorRT / TensorRT-RTX --------------------------------------------------------------


class TwoFourNet(nn.Module):
    """Conv and linear layers whose weights keep 2 of every 4 input channels (2:4 pattern)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(32, 64, 3, padding=1)
        self.fc = nn.Linear(64, 32)
        with torch.no_grad():
            for layer in (self.conv, self.fc):
                w = layer.weight
                groups = w.view(w.shape[0], w.shape[1] // 4, 4, *w.shape[2:])
                groups[:, :, 2:] = 0  # zero 2 of every 4 consecutive input channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def _is_two_four(weight: np.ndarray) -> bool:
    w = np.moveaxis(weight, 1, -1)  # input channels last
    groups = w.reshape(*w.shape[:-1], w.shape[-1] // 4, 4)
    return bool((np.count_nonzero(groups, axis=-1) <= 2).all())


def _check_built(result, engine_path) -> None:
    assert engine_path.is_file() and engine_path.stat().st_size == result.engine_bytes > 0
    assert result.sparse_weights and "SPARSE_WEIGHTS" in result.builder_flags
    assert result.profile["x"][0][0] == 1 and result.profile["x"][2][0] == 32
    assert not [p for p in engine_path.parent.iterdir() if p.name.endswith(".tmp")]
    if result.gpu_present:
        assert result.runnable and result.inspected
    else:
        assert not result.runnable
        assert "cannot be deserialized, run or inspected" in result.runnable_reason
        assert "without an NVIDIA GPU" in result.runnable_reason


@needs_trt_builder
def test_build_engine_with_sparse_weights_flag(cnn_onnx, tmp_path):
    _, _, exported = cnn_onnx
    engine_path = tmp_path / "cnn.engine"
    result = build_engine(exported.path, engine_path, sparse=True, workspace=1 << 28)
    _check_built(result, engine_path)
    assert result.precision == "fp32"


@needs_trt_builder
def test_build_engine_from_two_four_sparse_onnx(tmp_path):
    torch.manual_seed(0)
    exported = to_onnx(TwoFourNet().eval(), torch.randn(1, 32, 8, 8), tmp_path / "sp.onnx")
    weights = {
        i.name: numpy_helper.to_array(i)
        for i in onnx.load(exported.path).graph.initializer
        if i.name.endswith("weight")
    }
    assert len(weights) == 2 and all(_is_two_four(w) for w in weights.values())
    engine_path = tmp_path / "sp.engine"
    result = build_engine(exported.path, engine_path, sparse=True)
    _check_built(result, engine_path)
    if not result.gpu_present:
        # All the CPU can say: the builder's layer report, with placeholder tactics.
        assert result.layers and {layer.source for layer in result.layers} == {"builder log"}


@needs_trt_builder
def test_build_engine_fp16_onnx(tmp_path):
    exported = to_onnx(SmallCNN().eval(), torch.randn(1, 3, 16, 16), tmp_path / "h.onnx", fp16=True)
    result = build_engine(exported.path, tmp_path / "h.engine", fp16=True)
    assert result.precision == "fp16"


@needs_trt_builder
def test_torchvision_resnet18_to_onnx_to_engine(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    exported = to_onnx(model, torch.randn(1, 3, 64, 64), tmp_path / "r18.onnx")
    assert exported.max_rel_err < 1e-4
    engine_path = tmp_path / "r18.engine"
    result = build_engine(exported.path, engine_path, sparse=True)
    _check_built(result, engine_path)
    if not result.gpu_present:
        # 20 convolutions and the classifier: their kernels are only chosen on a GPU.
        stub_note = next(n for n in result.notes if "placeholder tactic" in n)
        assert stub_note.startswith("layers come from the builder's layer report; 21 ")


@pytest.mark.skipif(not HAS_RTX, reason="checks TensorRT-RTX's strongly typed precision rules")
def test_fp16_flag_needs_fp16_onnx_in_strongly_typed_runtimes(cnn_onnx, tmp_path):
    _, _, exported = cnn_onnx
    with pytest.raises(ExportError, match=r"to_onnx\(\.\.\., fp16=True\)"):
        build_engine(exported.path, tmp_path / "x.engine", fp16=True, runtime="tensorrt_rtx")
    assert not (tmp_path / "x.engine").exists()


@needs_trt_builder
def test_parser_errors_are_listed(tmp_path):
    node = onnx.helper.make_node("NoSuchOp", ["x"], ["y"], name="mystery", domain="fxprune.test")
    graph = onnx.helper.make_graph(
        [node],
        "bad",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])],
    )
    model = onnx.helper.make_model(
        graph,
        opset_imports=[
            onnx.helper.make_opsetid("", 17),
            onnx.helper.make_opsetid("fxprune.test", 1),
        ],
    )
    onnx_path = tmp_path / "bad.onnx"
    onnx.save(model, onnx_path)
    with pytest.raises(ExportError, match=r"ONNX parser failed(.|\n)*mystery(.|\n)*NoSuchOp"):
        build_engine(onnx_path, tmp_path / "bad.engine")
    assert not (tmp_path / "bad.engine").exists()


@needs_trt_builder
def test_build_engine_missing_folder(cnn_onnx, tmp_path):
    _, _, exported = cnn_onnx
    with pytest.raises(ExportError, match="does not exist"):
        build_engine(exported.path, tmp_path / "nope" / "m.engine")


@pytest.mark.skipif(HAS_TRT, reason="the standard tensorrt module is installed here")
def test_missing_runtime_says_how_to_install(cnn_onnx, tmp_path):
    _, _, exported = cnn_onnx
    with pytest.raises(ExportError, match=r"pip install 'fxprune\[trt-rtx\]'"):
        build_engine(exported.path, tmp_path / "m.engine", runtime="tensorrt")


@pytest.mark.skipif(HAS_GPU, reason="checks the error raised without a GPU")
def test_run_engine_without_gpu_is_a_clear_error(tmp_path):
    with pytest.raises(ExportError, match="needs an NVIDIA GPU"):
        run_engine(tmp_path / "any.engine", torch.randn(1, 3, 16, 16))


@gpu
@needs_trt_builder
def test_run_engine_matches_torch(cnn_onnx, tmp_path):
    model, _, exported = cnn_onnx
    engine_path = tmp_path / "run.engine"
    build_engine(exported.path, engine_path)
    x = torch.randn(4, 3, 16, 16)
    outputs = run_engine(engine_path, {"x": x})
    with torch.no_grad():
        want = model.eval()(x)
    model.train()
    torch.testing.assert_close(outputs["output"].cpu(), want, rtol=1e-2, atol=1e-3)


@gpu
@needs_trt_builder
def test_engine_inspector_reports_sparse_tactics(tmp_path):
    exported = to_onnx(
        TwoFourNet().eval(), torch.randn(8, 32, 8, 8), tmp_path / "s.onnx", fp16=True
    )
    result = build_engine(exported.path, tmp_path / "s.engine", sparse=True)
    assert result.inspected and result.layers
    # Which layers win with sparse kernels is the builder's timing decision; every layer
    # it reports as sparse must be one that the inspector marked so.
    sparse = {layer.name for layer in result.layers if layer.sparse}
    assert set(result.sparse_layers) == sparse


def test_outputs_the_exporter_cannot_key_are_exported_as_a_tuple(tmp_path):
    """A container registered with pytree but without key paths (diffusers' outputs)."""
    from dataclasses import dataclass as _dc

    @_dc
    class Out:
        sample: torch.Tensor

    torch.utils._pytree.register_pytree_node(
        Out, lambda o: ([o.sample], None), lambda xs, _: Out(xs[0])
    )
    try:

        class Net(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.conv = nn.Conv2d(3, 4, 3)

            def forward(self, x, scale: float = 1.0):
                return Out(self.conv(x) * scale)

        res = to_onnx(Net().eval(), torch.randn(1, 3, 8, 8), tmp_path / "m.onnx")
        assert res.output_names == ["output.0"] and res.max_abs_err < 1e-5
    finally:
        torch.utils._pytree._deregister_pytree_node(Out)


def test_a_detector_torch_export_cannot_capture_goes_through_torchscript(tmp_path):
    """torchvision's detectors (data-dependent box decoding and NMS) fail in torch.export;
    the TorchScript exporter writes them, with the same checks, at a static batch."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=3, box_score_thresh=0.0
    ).eval()
    images = ([torch.rand(3, 160, 160)],)
    with pytest.raises(ExportError, match="dynamic_batch=False"):
        to_onnx(model, images, tmp_path / "det_dynamic.onnx")
    assert not (tmp_path / "det_dynamic.onnx").exists()
    out = to_onnx(model, images, tmp_path / "det.onnx", dynamic_batch=False)
    with torch.no_grad():
        want = model(*images)[0]
    assert len(want["boxes"]) > 0  # detections to compare, not empty outputs
    sess = ort.InferenceSession(str(out.path), providers=["CPUExecutionProvider"])
    boxes = sess.run(None, {sess.get_inputs()[0].name: images[0][0].numpy()})[0]
    np.testing.assert_allclose(boxes, want["boxes"].numpy(), rtol=1e-3, atol=1e-3)


class GroupedAttention(nn.Module):
    """Attention within groups of tokens, as Twins, NesT and Hiera compute it: q, k, v of
    shape (batch, groups, heads, tokens, dim), which the ONNX exporter does not translate,
    with a mask that broadcasts over the batch."""

    def __init__(self, dim: int = 16, heads: int = 2, groups: int = 4) -> None:
        super().__init__()
        self.heads, self.groups = heads, groups
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.register_buffer("mask", torch.rand(groups, 1, 1, 6) > 0.3)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, self.groups, n // self.groups, 3, self.heads, -1)
        q, k, v = qkv.permute(3, 0, 1, 4, 2, 5).unbind(0)  # each (b, groups, heads, t, d)
        y = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)
        return self.proj(y.permute(0, 1, 3, 2, 4).reshape(b, n, c))


def test_grouped_rank5_attention_exports_with_a_dynamic_batch(tmp_path, caplog):
    torch.manual_seed(0)
    model = GroupedAttention().eval()
    with caplog.at_level(logging.INFO, logger="fxprune.export.onnx"):
        result = to_onnx(model, torch.randn(1, 24, 16), tmp_path / "grouped.onnx")
    # through the dynamo exporter, attention rewritten to rank 4 (not the TorchScript one)
    assert "rewritten for the ONNX exporter" in caplog.text
    assert result.dynamic_batch and result.max_rel_err < 1e-4
    x3 = torch.randn(3, 24, 16)
    (got,) = _ort_run(result.path, {result.input_names[0]: x3})
    with torch.no_grad():
        want = model(x3)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-5)
    graph = onnx.load(result.path).graph
    assert any(n.op_type == "Softmax" or n.op_type == "Attention" for n in graph.node)


@pytest.mark.parametrize(
    "shape, kv_heads, mask, causal",
    [
        ((2, 3, 5, 4), 3, None, False),
        ((2, 3, 2, 5, 4), 2, "bool", False),  # grouped: (batch, groups, heads, tokens, dim)
        ((2, 4, 5, 4), 4, "float", False),
        ((2, 4, 5, 4), 4, None, True),
        ((2, 4, 5, 4), 2, None, False),  # grouped-query attention
    ],
)
def test_attention_as_matmuls_equals_the_op(shape, kv_heads, mask, causal):
    from fxprune.export.onnx import _sdpa_as_matmuls

    torch.manual_seed(0)
    q = torch.randn(*shape)
    kv = torch.randn(*shape[:-3], kv_heads, *shape[-2:])
    m = {
        None: None,
        "bool": torch.rand(shape[-2], shape[-2]) > 0.3,
        "float": torch.randn(shape[-2], shape[-2]),
    }[mask]
    if m is not None and m.dtype == torch.bool:
        m[:, 0] = True  # no row fully masked
    gqa = kv_heads != shape[-3]
    want = nn.functional.scaled_dot_product_attention(
        q, kv, kv, attn_mask=m, is_causal=causal, enable_gqa=gqa
    )
    got = _sdpa_as_matmuls(q, kv, kv, m, 0.0, causal, enable_gqa=gqa)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert _sdpa_as_matmuls(q, q, q, None, 0.1) is NotImplemented  # dropout: the exporter's


def test_a_pruned_hugging_face_swin_exports_with_a_dynamic_batch(tmp_path, caplog):
    # torch.export records Swin's attention tail (transpose, .contiguous(), reshape) as a bare
    # view of the CPU attention kernel's output layout; the ONNX exporter's own attention
    # kernel returns other strides and the view fails, unless attention is exported as the
    # products and softmax it stands for
    import fxprune

    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.SwinConfig(
        embed_dim=32, depths=[1, 1], num_heads=[2, 4], window_size=7, patch_size=4
    )
    model = transformers.SwinForImageClassification(config).eval()
    x = {"pixel_values": torch.randn(1, 3, 224, 224)}
    res = fxprune.prune(model, x, ratio=0.5, round_to=8, ignore=[model.classifier], verify=False)
    assert not any(n.target is torch.ops.aten.view.default for n in res.module.graph.nodes)
    with caplog.at_level(logging.INFO, logger="fxprune.export.onnx"):
        result = to_onnx(res.module, x, tmp_path / "swin.onnx")
    assert "rewritten for the ONNX exporter" in caplog.text
    assert result.dynamic_batch and result.max_rel_err < 1e-3
    x2 = torch.randn(2, 3, 224, 224)
    got = _ort_run(result.path, {result.input_names[0]: x2})[0]
    with torch.no_grad():
        want = res.module(pixel_values=x2).logits
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-3, atol=1e-4)


def test_weights_past_the_external_data_size_go_beside_the_model(tmp_path, monkeypatch):
    # a protobuf file holds at most 2 GiB: weights past that go to a .data file beside the
    # model, which the checks and ONNX Runtime read (the switch lowered to test it)
    import fxprune.export.onnx as onnx_export

    monkeypatch.setattr(onnx_export, "_EXTERNAL_DATA_BYTES", 4096)
    torch.manual_seed(0)
    model = SmallCNN().eval()
    x = torch.randn(1, 3, 8, 8)
    result = to_onnx(model, x, tmp_path / "cnn.onnx")
    assert (tmp_path / "cnn.onnx.data").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cnn.onnx", "cnn.onnx.data"]
    (got,) = _ort_run(result.path, {result.input_names[0]: x})
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x).numpy(), rtol=1e-4, atol=1e-5)
