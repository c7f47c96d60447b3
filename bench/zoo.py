"""Model-zoo conformance: fxprune and Torch-Pruning on every model of five zoos, one process each.

For every model (timm: the smallest variant of each family; transformers: tiny random
configs of 20 architectures plus the pretrained MiniLM; torchvision: every classification,
segmentation, video and detection model; ultralytics YOLOv8n / YOLO11n; a tiny diffusers
UNet), a fresh subprocess with a wall-time limit (``--timeout``) and an address-space limit
(``--memory-gb``) does, on random weights:

1. build the model (no downloads), eval mode, then randomise every parameter and every
   norm statistic with a fixed seed (library inits zero residual branches and heads, which
   would make the oracle blind);
2. ``fxprune.prune(model, x, ratio=0.5, round_to=8, ignore=[head], pad_outputs=True)``
   with ``verify=True`` (outputs keep their shape: a feature output, such as an encoder's
   hidden states or the features a detector's opaque heads read, is pruned and padded back
   with zeros; a classifier head is kept)
   (the correctness oracle): status, exact or not, max error against the masked original
   (for inexact results from ``fxprune.verify(..., exact=False)``, with forward and output
   shapes checked), MACs (``fxprune.count_macs``) and parameters before and after, time;
3. Torch-Pruning's documented usage: ``tp.pruner.MetaPruner(model, x,
   importance=MagnitudeImportance(p=2), pruning_ratio=0.5, round_to=8,
   ignored_layers=[head], global_pruning=False)``, ``step()``, a forward, MACs with the same
   counter (``tp.utils.count_ops_and_params`` for both sides where fxprune cannot count it).
   Hugging Face attention gets ``num_heads`` as in TP's ``examples/transformers``;
4. ONNX: ``fxprune.export.to_onnx`` of the pruned model, then our own ONNX Runtime session
   compared with PyTorch; when the pruned model does not export, the original is tried,
   so the report tells "original does not export either" from "only the pruned one fails".

Inside the child, fxprune may take 45% of ``--timeout``, Torch-Pruning and ONNX 25% each (a
stage past its share is recorded as its timeout, and the next stage runs). A timeout,
out-of-memory or crash of the subprocess is recorded as such (with whatever stages had
finished) and the sweep goes on. Results are written after every model
(atomically), so ``--resume`` continues an interrupted sweep (``--retry-failed`` also runs
the models that crashed, timed out or fxprune failed on again).

    python bench/zoo.py                             # every zoo: docs/zoo.json and docs/zoo.md
    python bench/zoo.py --zoo timm --limit 10
    python bench/zoo.py --zoo torchvision,transformers --models resnet18,bert --input-size 64
    python bench/zoo.py --resume --retry-failed     # after a fix: only what failed, again
    python bench/zoo.py --from-json docs/zoo.json   # only rewrite docs/zoo.md
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import logging
import math
import os
import platform
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Nothing may reach for the network: every model is built from code or a shipped file.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("YOLO_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_torch_pruning import git_state  # noqa: E402  one definition for every harness

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

logger = logging.getLogger(__name__)

RATIO = 0.5
ROUND_TO = 8
SEED = 0
MAX_SIDE = 224  # timm models run at their default input size, capped at this
ZOOS = ("timm", "transformers", "torchvision", "yolo", "diffusers")
# The wall-time share of each stage inside the child; the parent kills it at 100%.
STAGE_SHARE = {"fxprune": 0.45, "torch_pruning": 0.25, "onnx": 0.25}
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # colour codes some exporters put in messages
# How an allocation failure reads under the address-space limit (Python, torch, the loader).
OOM_SIGNS = (
    "MemoryError",
    "can't allocate",
    "std::bad_alloc",
    "out of memory",
    "Cannot allocate",
    "failed to map segment",
)

# timm: the smallest variant of each family (``timm.list_modules()``, parameters counted on
# the meta device), plus distinct sub-families that share a module (resnet, efficientnet,
# byobnet, ...). Families whose only models take > 400 M parameters or 500+ px inputs
# (deepseek_vit, gemma4_vit, qwen3_vit, naflexvit, samvit, sam2 hiera) are left out.
_TIMM_NAMES = """
# convolutional: ResNet-like
resnet18 resnet10t resnet18d seresnext26d_32x4d ecaresnet26t skresnet18 resnest14d
res2next50 legacy_seresnet18 resnetv2_18 tresnet_m dla46x_c dla34 dpn48b densenet121
rdnet_tiny selecsls42 vovnet39a ese_vovnet19b_slim_dw hrnet_w18_small
cspresnet50 cs3darknet_focus_s darknet17 cspnext_tiny nf_resnet26 nfnet_l0 dm_nfnet_f0
regnetx_002 regnety_002 regnetz_b16 gernet_s repvgg_a0 resnext26ts eca_resnet33ts
botnet26t_256 halonet26t lambda_resnet26t haloregnetz_b vgg11 xception41p
legacy_xception inception_v3 inception_v4 inception_resnet_v2 nasnetalarge pnasnet5large
# convolutional: mobile
efficientnet_b0 efficientnet_lite0 efficientnetv2_rw_t tf_efficientnetv2_b0 mixnet_s
mnasnet_050 mobilenetv2_050 mobilenetv3_small_050 mobilenetv4_conv_small mobilenetv1_100
fbnetc_100 fbnetv3_b tinynet_e lcnet_050 lcnetv2_small ghostnet_050 ghostnetv2_100
repghostnet_050 hardcorenas_b semnasnet_050 spnasnet_100 mobileone_s0 rexnet_100
hgnet_tiny hgnetv2_b0 fasternet_t0 starnet_s050 repvit_m1 cpubone_nano
convnext_atto convnextv2_atto convmixer_768_32 mambaout_femto inception_next_atto
# vision transformers and hybrids
vit_tiny_patch16_224 deit_tiny_patch16_224 deit3_small_patch16_224
vit_relpos_small_patch16_224 vit_tiny_r_s16_p8_224 beit_base_patch16_224
eva02_tiny_patch14_224 vit_tiny_patch16_dinov3_qkvb cait_xxs24_224 convit_tiny
crossvit_tiny_240 pit_ti_224 tnt_s_legacy_patch16_224 xcit_nano_12_p8_224
volo_d1_224 visformer_tiny levit_128s levit_conv_128s coat_tiny coat_lite_tiny
swin_tiny_patch4_window7_224 swinv2_tiny_window8_256 swinv2_cr_tiny_224
twins_svt_small twins_pcpvt_small pvt_v2_b0 nest_tiny gcvit_xxtiny davit_tiny
focalnet_tiny_srf hiera_tiny_224 mvitv2_tiny tiny_vit_5m_224 maxvit_nano_rw_256
coatnet_nano_rw_224 vitamin_small_224 nextvit_small
# efficient hybrids and mobile transformers
mobilevit_xxs mobilevitv2_050 edgenext_xx_small efficientformer_l1
efficientformerv2_s0 efficientvit_m0 efficientvit_b0 fastvit_t8 swiftformer_xs
shvit_s1 iformer_t lowformer_b0 efficientvim_m1
# MLPs and metaformers
mixer_b16_224 resmlp_12_224 gmlp_ti16_224 sequencer2d_s poolformer_s12
poolformerv2_s12 convformer_s18 caformer_s18
"""
TIMM_MODELS = tuple(
    word for line in _TIMM_NAMES.splitlines() for word in line.partition("#")[0].split()
)

TORCHVISION_KINDS = ("classification", "segmentation", "video", "detection")
CLASS_COUNTS = {"classification": 1000, "segmentation": 21, "video": 400}

YOLO_MODELS = ("yolov8n", "yolo11n")
DIFFUSERS_MODELS = ("unet2d", "unet2d_condition")

# transformers: (class, config overrides, input kind). Tiny random configs (hidden 64-128,
# 2 layers, 4 heads, vocabulary 1000) of each architecture.
_TEXT = dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
_DECODER = dict(_TEXT, intermediate_size=128, num_key_value_heads=2, pad_token_id=0)
_VISION = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
TRANSFORMERS_MODELS: dict[str, tuple[str, dict[str, Any], str]] = {
    # Encoders with a classification head, as they are deployed: the residual stream is then
    # internal (a base model returns it, so it would stay whole as the model's output).
    "bert": ("BertForSequenceClassification", dict(_TEXT, intermediate_size=128), "text"),
    "roberta": (
        "RobertaForSequenceClassification",
        dict(_TEXT, intermediate_size=128, pad_token_id=1),
        "text",
    ),
    "distilbert": (
        "DistilBertForSequenceClassification",
        dict(vocab_size=1000, dim=64, n_layers=2, n_heads=4, hidden_dim=128),
        "text",
    ),
    "albert": (
        "AlbertForSequenceClassification",
        dict(_TEXT, intermediate_size=128, embedding_size=32),
        "text",
    ),
    "electra": (
        "ElectraForSequenceClassification",
        dict(_TEXT, intermediate_size=128, embedding_size=64),
        "text",
    ),
    "gpt2": (
        "GPT2LMHeadModel",
        dict(
            vocab_size=1000,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_inner=128,
            n_positions=64,
            bos_token_id=1,
            eos_token_id=2,
        ),
        "causal",
    ),
    "opt": (
        "OPTForCausalLM",
        dict(_TEXT, ffn_dim=128, word_embed_proj_dim=64, max_position_embeddings=64),
        "causal",
    ),
    "llama": ("LlamaForCausalLM", _DECODER, "causal"),
    "qwen2": ("Qwen2ForCausalLM", _DECODER, "causal"),
    "qwen3": ("Qwen3ForCausalLM", dict(_DECODER, head_dim=16), "causal"),
    "mistral": ("MistralForCausalLM", _DECODER, "causal"),
    "gemma": ("GemmaForCausalLM", dict(_DECODER, head_dim=16), "causal"),
    "gemma2": ("Gemma2ForCausalLM", dict(_DECODER, head_dim=16), "causal"),
    "phi3": ("Phi3ForCausalLM", dict(_DECODER, eos_token_id=2), "causal"),
    "vit": ("ViTForImageClassification", dict(_VISION, patch_size=16), "image"),
    "swin": (
        "SwinForImageClassification",
        dict(embed_dim=32, depths=[1, 1], num_heads=[2, 4], window_size=7, patch_size=4),
        "image",
    ),
    "convnext": (
        "ConvNextForImageClassification",
        dict(hidden_sizes=[32, 64], depths=[1, 1], num_stages=2),
        "image",
    ),
    "clip_vision": ("CLIPVisionModel", dict(_VISION, patch_size=16), "image"),
    "whisper_encoder": (
        "WhisperEncoder",
        dict(
            d_model=64,
            encoder_layers=2,
            encoder_attention_heads=4,
            encoder_ffn_dim=128,
            num_mel_bins=80,
            max_source_positions=32,
        ),
        "audio",
    ),
    "t5_encoder": (
        "T5EncoderModel",
        dict(vocab_size=1000, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4),
        "text",
    ),
    "minilm": ("hf:minilm", {}, "text"),
}
# Module names of a Hugging Face model's head: the one that exists is kept whole.
HF_HEADS = ("lm_head", "classifier", "pooler", "score")


# --------------------------------------------------------------------------- model lists


def zoo_models(zoo: str) -> list[str]:
    """The sweep's model names of one zoo, in sweep order."""
    if zoo == "timm":
        return list(dict.fromkeys(TIMM_MODELS))
    if zoo == "transformers":
        return list(TRANSFORMERS_MODELS)
    if zoo == "yolo":
        return list(YOLO_MODELS)
    if zoo == "diffusers":
        return list(DIFFUSERS_MODELS)
    if zoo == "torchvision":
        return [name for name, _ in torchvision_models()]
    raise SystemExit(f"unknown zoo {zoo!r}: choose from {', '.join(ZOOS)}")


def torchvision_models() -> list[tuple[str, str]]:
    import torchvision

    modules = {
        "classification": torchvision.models,
        "segmentation": torchvision.models.segmentation,
        "video": torchvision.models.video,
        "detection": torchvision.models.detection,
    }
    return [(n, k) for k, m in modules.items() for n in torchvision.models.list_models(module=m)]


def select(zoos: list[str], models: str | None, limit: int | None) -> list[str]:
    """Keys ``zoo:name`` to run: every model of ``zoos``, or the ``--models`` among them.

    A ``--models`` entry is ``zoo:name`` (run as given) or ``name`` (looked up in the
    selected zoos); a name that no selected zoo lists is still run, in the first selected
    zoo, so that its failure to build is recorded like any other.
    """
    if not models:
        keys = [f"{z}:{n}" for z in zoos for n in zoo_models(z)]
        return keys[:limit] if limit else keys
    chosen = []
    for entry in (m.strip() for m in models.split(",") if m.strip()):
        if entry.partition(":")[0] in zoos:
            chosen.append(entry)
            continue
        if entry.partition(":")[0] in ZOOS:
            raise SystemExit(
                f"error: --models {entry}: the zoo '{entry.partition(':')[0]}' is not among "
                f"those this run covers ({', '.join(zoos)}); name it in --zoo (its package "
                "must be installed: see docs/zoo.md)."
            )
        found = [f"{z}:{entry}" for z in zoos if entry in zoo_models(z)]
        chosen += found or [f"{zoos[0]}:{entry}"]
    keys = list(dict.fromkeys(chosen))
    return keys[:limit] if limit else keys


# --------------------------------------------------------------------------- building


@dataclass
class Built:
    """A model ready to prune: eval mode, example inputs in fxprune's convention
    (a tensor, a tuple of positional inputs, or a dict of keyword inputs)."""

    model: Any
    inputs: Any
    heads: list = field(default_factory=list)  # modules whose outputs stay (ignore=)
    family: str = ""
    notes: list[str] = field(default_factory=list)
    randomise: bool = True


def call(model: Any, inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


def describe(inputs: Any) -> str:
    """``1x3x224x224``, ``input_ids 1x16 + attention_mask 1x16``, ``[3x256x256]``."""
    import torch

    if isinstance(inputs, torch.Tensor):
        return "x".join(map(str, inputs.shape))
    if isinstance(inputs, Mapping):
        return " + ".join(f"{k} {describe(v)}" for k, v in inputs.items())
    if isinstance(inputs, (list, tuple)):
        inner = ", ".join(describe(v) for v in inputs)
        return f"[{inner}]" if isinstance(inputs, list) else inner
    return type(inputs).__name__


def build(zoo: str, name: str, size: int | None) -> Built:
    builders: dict[str, Callable[[str, int | None], Built]] = {
        "timm": build_timm,
        "torchvision": build_torchvision,
        "transformers": build_transformers,
        "yolo": build_yolo,
        "diffusers": build_diffusers,
    }
    if zoo not in builders:
        raise ValueError(f"unknown zoo {zoo!r}")
    return builders[zoo](name, size)


def build_timm(name: str, size: int | None) -> Built:
    import timm
    import torch

    model = timm.create_model(name, pretrained=False).eval()
    cfg = getattr(model, "pretrained_cfg", None) or {}
    channels, height, width = cfg.get("input_size", (3, 224, 224))
    notes = []
    shape = (size, size) if size else (min(height, MAX_SIDE), min(width, MAX_SIDE))
    if shape != (height, width) and not _runs(model, torch.randn(1, channels, *shape)):
        try:
            resized = timm.create_model(name, pretrained=False, img_size=shape).eval()
        except Exception:  # no img_size argument, or sizes it cannot take
            resized = None
        if resized is not None and _runs(resized, torch.randn(1, channels, *shape)):
            model = resized
            notes.append(f"built with img_size={shape[0]}x{shape[1]} (default {height}x{width})")
        else:
            shape = (height, width)
            notes.append(f"runs only at its default size {height}x{width}")
    heads = model.get_classifier()
    heads = list(heads) if isinstance(heads, (tuple, list)) else [heads]
    heads = [h for h in heads if any(True for _ in h.parameters())]
    family = type(model).__module__.rsplit(".", 1)[-1]
    return Built(model, torch.randn(1, channels, *shape), heads, family, notes)


def _runs(model: Any, inputs: Any) -> bool:
    import torch

    try:
        with torch.no_grad():
            call(model, inputs)
    except Exception:
        return False
    return True


# torchvision detectors' prediction layers (objectness, class scores, box deltas, masks,
# keypoints): their output channels are what the detector predicts, so they are kept.
DETECTION_HEADS = (
    "cls_logits",
    "bbox_pred",
    "bbox_reg",
    "bbox_ctrness",
    "box_predictor",
    "mask_fcn_logits",
    "kps_score_lowres",
    "classification_head.module_list",
    "regression_head.module_list",
)


def build_torchvision(name: str, size: int | None) -> Built:
    import torch
    import torchvision
    from torch import nn

    kind = dict(torchvision_models()).get(name)
    if kind is None:
        raise ValueError(f"torchvision has no model {name!r} in {', '.join(TORCHVISION_KINDS)}")
    kwargs: dict[str, Any] = {"weights": None}
    notes = []
    if kind in ("segmentation", "detection"):
        kwargs["weights_backbone"] = None
    if kind == "detection":
        side = size or 256
        try:  # the R-CNN family resizes every image to 800 px unless told otherwise
            model = torchvision.models.get_model(name, **kwargs, min_size=side, max_size=side)
            notes.append(f"min_size=max_size={side}")
        except (TypeError, ValueError):
            model = torchvision.models.get_model(name, **kwargs)
        heads = [m for n, m in model.named_modules() if n.endswith(DETECTION_HEADS)]
        return Built(model.eval(), ([torch.randn(3, side, side)],), heads, kind, notes)
    model = torchvision.models.get_model(name, **kwargs).eval()
    if kind == "classification":
        side = size or (299 if name == "inception_v3" else 224)
        x = torch.randn(1, 3, side, side)
    elif kind == "segmentation":
        x = torch.randn(1, 3, size or 256, size or 256)
    elif name.startswith(("mvit", "s3d")):  # fixed positional embeddings / final pool size
        x = torch.randn(1, 3, 16, 224, 224)
        notes.append("needs 16x224x224 clips")
    else:
        x = torch.randn(1, 3, 8, size or 112, size or 112)
    classes = CLASS_COUNTS[kind]
    heads = [
        m
        for m in model.modules()
        if (isinstance(m, nn.Linear) and m.out_features == classes)
        or (isinstance(m, (nn.Conv2d, nn.Conv3d)) and m.out_channels == classes)
    ]
    return Built(model, x, heads, kind, notes)


def build_transformers(name: str, size: int | None) -> Built:
    import torch
    import transformers

    if name not in TRANSFORMERS_MODELS:
        raise ValueError(f"no tiny transformers config named {name!r}")
    cls_name, overrides, kind = TRANSFORMERS_MODELS[name]
    if cls_name == "hf:minilm":
        from fxprune.models import load_model

        model, inputs = load_model("hf:minilm")
        notes = ["pretrained MiniLM weights kept (not randomised)"]
        return Built(model, inputs, [model.pooler], "bert", notes, randomise=False)
    if cls_name == "WhisperEncoder":
        from transformers.models.whisper.modeling_whisper import WhisperEncoder as cls
    else:
        cls = getattr(transformers, cls_name)
    config = dict(overrides)
    side = size or 224
    if kind == "image":
        config.setdefault("image_size", side)
    model = cls(cls.config_class(**config)).eval()
    g = torch.Generator().manual_seed(SEED)
    if kind == "image":
        inputs: Any = {"pixel_values": torch.randn(1, 3, side, side, generator=g)}
    elif kind == "audio":
        frames = 2 * config["max_source_positions"]
        inputs = {"input_features": torch.randn(1, config["num_mel_bins"], frames, generator=g)}
    else:
        ids = torch.randint(0, 1000, (1, 16), generator=g)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if kind == "causal":
            inputs = {"input_ids": ids}
    heads = [
        m
        for n, m in model.named_modules()
        if n.rsplit(".", 1)[-1] in HF_HEADS and any(True for _ in m.parameters())
    ]
    return Built(model, inputs, heads, model.config.model_type, [])


def build_yolo(name: str, size: int | None) -> Built:
    import torch

    try:
        from ultralytics import YOLO
    except ImportError as exc:
        raise ImportError(f"{exc}; pip install 'fxprune[zoo]'") from exc
    if name not in YOLO_MODELS:
        raise ValueError(f"no YOLO model {name!r} (choose from {', '.join(YOLO_MODELS)})")
    model = YOLO(f"{name}.yaml").model.eval()  # the architecture only: no weights
    detect = model.model[-1]
    # The prediction layers (box distribution, class scores, per level) and the DFL decoder
    # are kept, as a torchvision detector's are; the convs before them are pruned.
    heads = [branch[-1] for branch in (*detect.cv2, *detect.cv3)] + [detect.dfl]
    side = size or 320
    return Built(model, torch.randn(1, 3, side, side), heads, "yolo", [])


def build_diffusers(name: str, size: int | None) -> Built:
    import torch

    try:
        import diffusers
    except ImportError as exc:
        raise ImportError(f"{exc}; pip install 'fxprune[zoo]'") from exc
    side = size or 32
    common = dict(
        sample_size=side,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        norm_num_groups=8,
    )
    g = torch.Generator().manual_seed(SEED)
    sample = torch.randn(1, 4, side, side, generator=g)
    timestep = torch.tensor([10])
    if name == "unet2d":
        model = diffusers.UNet2DModel(
            **common,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        )
        inputs: Any = (sample, timestep)
    elif name == "unet2d_condition":
        model = diffusers.UNet2DConditionModel(
            **common,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
        )
        inputs = (sample, timestep, torch.randn(1, 8, 32, generator=g))
    else:
        raise ValueError(f"no diffusers model {name!r} (choose from {DIFFUSERS_MODELS})")
    return Built(model.eval(), inputs, [model.conv_out], "unet", [])


def randomise(model: Any, seed: int = SEED) -> None:
    """Every parameter and norm statistic random, small and nonzero, from a fixed seed.

    Weights get fan-in scaled normals (activations stay bounded through deep nets), the
    weight of a norm (any module with an ``eps``) ``1 + 0.1 n``, every other parameter
    (biases, layer scales, tokens) ``0.1 n``; running means ``0.1 n`` and running
    variances ``0.5 + u``. Zero-initialised residual branches and heads become live.
    """
    import torch

    g = torch.Generator().manual_seed(seed)

    def noise(t: torch.Tensor) -> torch.Tensor:
        return torch.randn(t.shape, generator=g).to(t.dtype)

    with torch.no_grad():
        for module in model.modules():
            norm = hasattr(module, "eps") or hasattr(module, "variance_epsilon")
            for name, p in module.named_parameters(recurse=False):
                if not p.is_floating_point():
                    continue
                if p.dim() >= 2:
                    p.copy_(noise(p) / math.sqrt(max(p[0].numel(), 1)))
                elif norm and name == "weight":
                    p.copy_(1 + 0.1 * noise(p))
                else:
                    p.copy_(0.1 * noise(p))
            if not norm:
                continue
            for name, b in module.named_buffers(recurse=False):
                if not b.is_floating_point():
                    continue
                if name == "running_var":
                    b.copy_(0.5 + torch.rand(b.shape, generator=g).to(b.dtype))
                elif name in ("running_mean", "bias"):
                    b.copy_(0.1 * noise(b))
                elif name == "weight":  # FrozenBatchNorm2d keeps its affine in buffers
                    b.copy_(1 + 0.1 * noise(b))


# --------------------------------------------------------------------------- one model


def _error(exc: BaseException) -> dict[str, str]:
    """Status (``oom`` for an allocation failure, else ``error``), the error's type and
    first line, and the innermost frame that raised it."""
    lines = ANSI.sub("", str(exc)).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}".strip()
    frames = traceback.extract_tb(exc.__traceback__)
    where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    oom = isinstance(exc, MemoryError) or any(sign in text for sign in OOM_SIGNS)
    return {"status": "oom" if oom else "error", "error": text, "where": where}


class StageTimeout(Exception):
    """A stage ran past its share of the model's wall time."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise StageTimeout in the main thread after ``seconds`` (checked between Python ops)."""

    def expire(signum: int, frame: Any) -> None:
        raise StageTimeout(f"no result within {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def tensors(value: Any) -> list:
    """The tensor leaves of a model output: tensors, tuples, lists, dicts, ModelOutputs."""
    import torch

    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in tensors(v)]
    return []


def output_shapes(model: Any, inputs: Any) -> list[list[int]]:
    import torch

    with torch.no_grad():
        return [list(t.shape) for t in tensors(call(model, inputs))]


def _reduction(before: int | None, after: int | None) -> float | None:
    return before / after if before and after else None


def run_fxprune(built: Built, limit: float) -> tuple[dict[str, Any], Any]:
    """(record, pruned module or None): prune with the oracle, then count and check."""
    import fxprune

    rec: dict[str, Any] = {"status": "error"}
    model, x = built.model, built.inputs
    step = "prune"
    try:
        with time_limit(limit):
            start = time.perf_counter()
            res = fxprune.prune(
                model,
                x,
                ratio=RATIO,
                round_to=ROUND_TO,
                ignore=built.heads or None,
                pad_outputs=True,
                verify=True,
            )
            rec["prune_s"] = time.perf_counter() - start
            report = res.report
            rec.update(
                frontend=report.frontend,
                verified=report.verified,
                groups_pruned=len(report.groups),
                groups_frozen=report.frozen,
                frozen_reasons=frozen_reasons(res.groups),
                report_macs=[report.macs_before, report.macs_after],
            )
            step = "oracle"
            rec.update(_oracle(model, res, x))
            step = "count"
            rec.update(_count_fxprune(model, res, x))
    except StageTimeout as exc:
        rec.update(status="timeout", error=str(exc), step=step)
        return rec, None
    except Exception as exc:  # a failure on one model is a result, not a crash
        rec.update(_error(exc), step=step)
        logger.debug("fxprune failed", exc_info=True)
        return rec, None
    rec.update(
        status="ok",
        params_before=fxprune.count_params(model),
        params_after=fxprune.count_params(res.module),
        macs_reduction=_reduction(rec["macs_before"], rec["macs_after"]),
    )
    rec["params_reduction"] = _reduction(rec["params_before"], rec["params_after"])
    return rec, res.module


def frozen_reasons(groups: list, top: int = 5) -> list[list[Any]]:
    """[reason, groups, channels] of the frozen groups, most channels first."""
    by_reason: dict[str, list[int]] = {}
    for g in groups:
        if not g.prunable:
            counts = by_reason.setdefault(str(g.reason)[:160], [0, 0])
            counts[0] += 1
            counts[1] += g.size
    ranked = sorted(by_reason.items(), key=lambda item: -item[1][1])
    return [[reason, n, channels] for reason, (n, channels) in ranked[:top]]


def _count_fxprune(model: Any, res: Any, x: Any) -> dict[str, Any]:
    """MACs by ``fxprune.count_macs``; the prune report's count where that cannot trace the
    whole model (fxprune pruned it part by part, e.g. detection models)."""
    import fxprune

    try:
        return {
            "macs_before": fxprune.count_macs(model, x),
            "macs_after": fxprune.count_macs(res.module, x),
        }
    except Exception as exc:
        note = f"count_macs failed ({_error(exc)['error'][:120]}); the report's MACs are used"
        return {
            "macs_before": res.report.macs_before,
            "macs_after": res.report.macs_after,
            "count_note": note,
        }


def _oracle(model: Any, res: Any, x: Any) -> dict[str, Any]:
    """Exact results: prune's own oracle error. Inexact ones (a norm over pruned channels):
    forward runs, output shapes equal the original's, error against the masked original."""
    import fxprune

    empty = all(0 in shape for shape in output_shapes(model, x))
    if res.report.max_error is not None:
        exact = {"exact": True, "max_error": res.report.max_error, "empty_outputs": empty}
        return {**exact, "forward_ok": True, "shapes_equal": True}
    check = fxprune.verify(model, res, x, exact=False)
    try:
        shapes_equal = output_shapes(res.module, x) == output_shapes(model, x)
        forward_ok = True
    except Exception as exc:
        shapes_equal, forward_ok = False, False
        logger.debug("pruned forward failed: %s", exc)
    return {
        "exact": False,
        "empty_outputs": empty,
        "max_error": check.max_error,
        "scale": check.scale,
        "inexact_note": res.report.verified[:300],
        "forward_ok": forward_ok,
        "shapes_equal": shapes_equal,
    }


# Attention projections of Hugging Face models, by attribute names of the attention module.
_QKV_NAMES = (
    ("query", "key", "value"),
    ("q_proj", "k_proj", "v_proj"),
    ("q_lin", "k_lin", "v_lin"),
    ("q", "k", "v"),
)
_HEAD_COUNTS = ("num_attention_heads", "num_heads", "n_heads")


@dataclass
class Attention:
    module: Any
    q: Any
    k: Any
    v: Any
    heads: int
    kv_heads: int


def hf_attention(model: Any) -> list[Attention]:
    """Attention modules with separate q/k/v Linear layers and their head counts."""
    from torch import nn

    found = []
    for m in model.modules():
        for names in _QKV_NAMES:
            q, k, v = (getattr(m, n, None) for n in names)
            if not all(isinstance(p, nn.Linear) for p in (q, k, v)):
                continue
            config = getattr(m, "config", None)
            heads = next((getattr(m, a) for a in _HEAD_COUNTS if hasattr(m, a)), None)
            heads = heads or getattr(config, "num_attention_heads", None)
            kv = getattr(m, "num_key_value_heads", None) or getattr(
                config, "num_key_value_heads", None
            )
            if isinstance(heads, int):
                found.append(Attention(m, q, k, v, heads, kv if isinstance(kv, int) else heads))
            break
    return found


def _set_heads(attention: list[Attention], pruner: Any) -> None:
    """What TP's HF examples do after ``step()``: the modules' head counts follow the pruning."""
    for a in attention:
        heads, kv = pruner.num_heads[a.q], pruner.num_heads[a.k]
        for attr in _HEAD_COUNTS:
            if hasattr(a.module, attr):
                setattr(a.module, attr, heads)
        for attr, value in (
            ("num_key_value_heads", kv),
            ("num_key_value_groups", max(heads // max(kv, 1), 1)),
            ("all_head_size", a.q.out_features),
            ("inner_dim", a.q.out_features),
        ):
            if hasattr(a.module, attr):
                setattr(a.module, attr, value)


def _graph_tensors(out: Any) -> list:
    return [t for t in tensors(out) if t.grad_fn is not None]


def _tp_macs(model: Any, inputs: Any) -> int:
    import torch_pruning as tp

    macs, _ = tp.utils.count_ops_and_params(model, inputs)
    return int(macs)


def _tp_setup(built: Built, hf: bool) -> tuple[Any, list, dict[str, Any], list[Attention]]:
    """A copy of the model for TP to prune in place, its heads, and TP's head arguments."""
    model = copy.deepcopy(built.model)
    names = {id(m): n for n, m in built.model.named_modules()}
    heads = [model.get_submodule(names[id(h)]) for h in built.heads]  # the copy's own
    attention = hf_attention(model) if hf else []
    if not attention:
        return model, heads, {}, []
    # TP's examples/transformers: whole heads go, head dims stay.
    num_heads = {p: a.heads if p is a.q else a.kv_heads for a in attention for p in (a.q, a.k, a.v)}
    extra = dict(
        num_heads=num_heads, prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=RATIO
    )
    return model, heads, extra, attention


def run_torch_pruning(
    built: Built, limit: float, hf: bool, macs_before: int | None = None
) -> dict[str, Any]:
    """Torch-Pruning 1.6's MetaPruner as documented, on a copy; then forward and count."""
    import torch_pruning as tp

    import fxprune

    rec: dict[str, Any] = {"status": "error", "notes": []}
    x = built.inputs
    step = "setup"
    try:
        with time_limit(limit):
            model, heads, extra, attention = _tp_setup(built, hf)
            if attention:
                rec["notes"].append(f"num_heads given for {len(attention)} attention modules")
            step = "MetaPruner"
            start = time.perf_counter()
            pruner = tp.pruner.MetaPruner(
                model,
                x,
                importance=tp.importance.MagnitudeImportance(p=2),
                pruning_ratio=RATIO,
                round_to=ROUND_TO,
                ignored_layers=heads,
                global_pruning=False,
                # TP's documented hook for outputs its tracer cannot flatten (HF caches,
                # ModelOutput dataclasses): hand it the output's tensors that have a graph.
                output_transform=_graph_tensors,
                **extra,
            )
            step = "step"
            pruner.step()
            rec["prune_s"] = time.perf_counter() - start
            _set_heads(attention, pruner)
            step = "forward"
            rec["shapes_equal"] = output_shapes(model, x) == output_shapes(built.model, x)
            rec["forward_ok"] = True
            step = "count"
            rec.update(_count_both(built.model, model, x, macs_before))
    except StageTimeout as exc:
        rec.update(status="timeout", error=str(exc), step=step)
        return rec
    except Exception as exc:
        rec.update(_error(exc), step=step)
        logger.debug("torch-pruning failed", exc_info=True)
        return rec
    params = fxprune.count_params(model)
    rec.update(
        status="ok",
        params_after=params,
        params_reduction=_reduction(fxprune.count_params(built.model), params),
    )
    return rec


def _count_both(original: Any, pruned: Any, x: Any, before: int | None) -> dict[str, Any]:
    """MACs before and after with fxprune's counter, or TP's for both where fxprune fails.

    ``before``: the original's MACs by fxprune's counter when already known."""
    import fxprune

    try:
        before = before or fxprune.count_macs(original, x)
        after = fxprune.count_macs(pruned, x)
        counter = "fxprune"
    except Exception as exc:
        logger.debug("fxprune.count_macs failed on TP's model: %s", exc)
        before, after, counter = _tp_macs(original, x), _tp_macs(pruned, x), "torch_pruning"
    return {
        "macs_before": before,
        "macs_after": after,
        "macs_counter": counter,
        "macs_reduction": _reduction(before, after),
    }


def _ort_check(path: Path, model: Any, inputs: Any) -> dict[str, Any]:
    """Our own ONNX Runtime run against PyTorch (not to_onnx's check): max abs error."""
    import numpy as np
    import onnxruntime
    import torch

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    named = dict(inputs) if isinstance(inputs, Mapping) else {}
    given = tensors(inputs)
    leftover = [t for t in given if not any(t is v for v in named.values())]
    feed = {}
    for i in session.get_inputs():
        tensor = named.get(i.name)
        if tensor is None:
            if not leftover:
                return {"ort_error": f"ONNX input {i.name!r} has no example tensor"}
            tensor = leftover.pop(0)
        feed[i.name] = tensor.detach().contiguous().numpy()
    got = session.run(None, feed)
    with torch.no_grad():
        want = [t.detach().float().numpy() for t in tensors(call(model, inputs))]
    if len(got) != len(want):
        return {"ort_error": f"{len(got)} ONNX outputs for {len(want)} PyTorch outputs"}
    errors = [
        float(np.abs(np.asarray(g, dtype=np.float32) - w).max()) if w.size else 0.0
        for g, w in zip(got, want)
    ]
    scale = max((float(np.abs(w).max()) for w in want if w.size), default=0.0)
    return {"ort_max_abs_err": max(errors, default=0.0), "ort_scale": scale}


def export_onnx(model: Any, inputs: Any, folder: Path, stem: str) -> dict[str, Any]:
    import fxprune.export

    rec: dict[str, Any] = {"status": "error"}
    path = folder / f"{stem}.onnx"
    start = time.perf_counter()
    try:
        # A list of unbatched images (torchvision's detectors) has no batch dim to free.
        batched = not any(
            isinstance(a, list) for a in (inputs if isinstance(inputs, tuple) else ())
        )
        result = fxprune.export.to_onnx(model, inputs, path, dynamic_batch=batched)
        rec.update(to_onnx_max_abs_err=result.max_abs_err, opset=result.opset)
        rec.update(_ort_check(path, model, inputs))
    except StageTimeout:
        raise
    except Exception as exc:
        rec.update(_error(exc))
        return rec
    finally:
        rec["export_s"] = time.perf_counter() - start
    rec["status"] = "error" if "ort_error" in rec else "ok"
    return rec


def run_onnx(pruned: Any, built: Built, limit: float) -> dict[str, Any]:
    """The pruned model to ONNX; when that fails, whether the original exports at all."""
    rec: dict[str, Any] = {"status": "timeout"}
    with tempfile.TemporaryDirectory(prefix="zoo_onnx_") as folder:
        try:
            with time_limit(limit):
                rec = export_onnx(pruned, built.inputs, Path(folder), "pruned")
                if rec["status"] == "ok":
                    return rec
                rec["original"] = {"status": "timeout"}
                rec["original"] = export_onnx(built.model, built.inputs, Path(folder), "original")
        except StageTimeout as exc:
            if rec["status"] == "timeout":
                return {"status": "timeout", "error": f"timeout: {exc}"}
    rec["verdict"] = {
        "ok": "only the pruned model fails",
        "error": "the original does not export either",
    }.get(rec["original"]["status"], "the original's export timed out")
    return rec


def _save(path: Path, data: Any) -> None:
    """Write JSON whole or not at all: a .tmp beside it, then an atomic replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def measure_one(
    key: str, size: int | None, timeout: float, result: Path, threads: int = 1
) -> dict[str, Any]:
    """Every stage on one model; the record is written after each, so a kill keeps the rest."""
    import torch

    torch.set_num_threads(threads)
    zoo, _, name = key.partition(":")
    record: dict[str, Any] = {"model": key, "zoo": zoo, "name": name, "status": "running"}
    clock = [time.perf_counter()]

    def stage(label: str) -> None:
        """Close the running stage (its seconds), start ``label``, write what we have."""
        now = time.perf_counter()
        if "stage" in record:
            record.setdefault("stage_s", {})[record["stage"]] = now - clock[0]
        clock[0] = now
        record["stage"] = label
        record["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        _save(result, record)

    stage("build")
    start = time.perf_counter()
    try:
        torch.manual_seed(SEED)
        built = build(zoo, name, size)
        if built.randomise:
            randomise(built.model)
        record["input"] = describe(built.inputs)
        record["reference_shapes"] = output_shapes(built.model, built.inputs)
    except Exception as exc:
        record.update(_error(exc), stage_s={"build": time.perf_counter() - start})
        _save(result, record)
        return record
    record.update(
        family=built.family,
        notes=built.notes,
        heads=[type(h).__name__ for h in built.heads],
        params=sum(p.numel() for p in built.model.parameters()),
        build_s=time.perf_counter() - start,
    )
    stage("fxprune")
    record["fxprune"], pruned = run_fxprune(built, STAGE_SHARE["fxprune"] * timeout)
    stage("torch_pruning")
    record["torch_pruning"] = run_torch_pruning(
        built,
        STAGE_SHARE["torch_pruning"] * timeout,
        hf=zoo == "transformers",
        macs_before=record["fxprune"].get("macs_before"),
    )
    stage("onnx")
    if pruned is None:
        record["onnx"] = {"status": "skipped", "error": "fxprune did not prune"}
    else:
        record["onnx"] = run_onnx(pruned, built, STAGE_SHARE["onnx"] * timeout)
    record["status"] = "ok"
    stage("done")
    return record


# --------------------------------------------------------------------------- the sweep


def _limit_memory(max_gb: float) -> Callable[[], None]:
    def apply() -> None:
        # Address space, not RSS: a runaway model fails with an allocation error in the
        # child instead of pushing the shared machine into the OOM killer.
        limit = int(max_gb * (1 << 30))
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return apply


def run_in_subprocess(key: str, args: argparse.Namespace) -> dict[str, Any]:
    """One model in a fresh process; a timeout, OOM or crash becomes the record's status."""
    with tempfile.TemporaryDirectory(prefix="zoo_") as folder:
        result = Path(folder) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--one", key]
        cmd += ["--result", str(result), "--timeout", str(args.timeout)]
        cmd += ["--threads", str(args.threads)]
        if args.input_size:
            cmd += ["--input-size", str(args.input_size)]
        start = time.perf_counter()
        status, reason, tail = "ok", "", []
        try:
            proc = subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                timeout=args.timeout,
                preexec_fn=_limit_memory(args.memory_gb) if args.memory_gb > 0 else None,
            )
            tail = [line for line in proc.stderr.strip().splitlines() if line.strip()][-4:]
            if proc.returncode != 0:
                status, reason = "crash", f"subprocess exited with code {proc.returncode}"
                if proc.returncode < 0:
                    reason += f" ({signal.Signals(-proc.returncode).name})"
                if any(sign in line for line in tail for sign in OOM_SIGNS):
                    status = "oom"
                    reason += f": out of memory (address-space limit {args.memory_gb:g} GB)"
        except subprocess.TimeoutExpired:
            status, reason = "timeout", f"no result within {args.timeout:.0f} s (killed)"
        record = json.loads(result.read_text()) if result.exists() else {}
    zoo, _, name = key.partition(":")
    record = {"model": key, "zoo": zoo, "name": name, **record}
    if status != "ok":
        record.update(status=status, error=f"{reason} during {record.get('stage', 'start-up')}")
        if tail:
            record["stderr_tail"] = tail
    record["subprocess_s"] = time.perf_counter() - start
    return record


def _versions() -> dict[str, str]:
    import importlib.metadata

    out = {}
    for package in (
        "torch", "torchvision", "timm", "transformers", "torch-pruning", "onnx",
        "onnxruntime", "onnxscript", "ultralytics", "diffusers",
    ):  # fmt: skip
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = "not installed"
    return out


def environment(args: argparse.Namespace) -> dict[str, Any]:
    import runpy

    # Read, not imported: the sweep's own process never loads torch.
    version = runpy.run_path(str(ROOT / "fxprune" / "_version.py"))["__version__"]
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "timeout_s": args.timeout,
        "memory_gb": args.memory_gb,
        "input_size": args.input_size,
        "ratio": RATIO,
        "round_to": ROUND_TO,
        "fxprune": version,
        "fxprune_git": git_state(),
        "versions": _versions(),
    }


def missing_zoo(zoo: str) -> str | None:
    """Why a zoo cannot run here (its package is not installed), or None."""
    import importlib.util

    package = {"yolo": "ultralytics", "timm": "timm"}.get(zoo, zoo if zoo != "torchvision" else "")
    if package and importlib.util.find_spec(package) is None:
        return f"{package} is not installed (pip install 'fxprune[zoo]')"
    return None


def sweep(args: argparse.Namespace) -> dict[str, Any]:
    from tqdm import tqdm

    zoos = [z.strip() for z in args.zoo.split(",") if z.strip()]
    for zoo in zoos:
        if zoo not in ZOOS:
            raise SystemExit(f"unknown zoo {zoo!r}: choose from {', '.join(ZOOS)}")
    skipped = {z: why for z in zoos if (why := missing_zoo(z))}
    keys = select([z for z in zoos if z not in skipped], args.models, args.limit)
    out = Path(args.out)
    previous = json.loads(out.read_text()) if args.resume and out.exists() else None
    data = previous or {"environment": environment(args), "results": [], "skipped_zoos": {}}
    if previous:
        data["environment"].setdefault("resumed", []).append(environment(args))
    data.setdefault("skipped_zoos", {}).update(skipped)
    for zoo in zoos:  # installed now: an earlier run's "skipped" no longer holds
        if zoo not in skipped:
            data["skipped_zoos"].pop(zoo, None)
    done = {r["model"] for r in data["results"] if not (args.retry_failed and failed(r))}
    if args.again:
        done -= set(keys)
    bar = tqdm(keys, desc="zoo", unit="model")
    for key in bar:
        if key in done:
            continue
        bar.set_postfix_str(key)
        record = run_in_subprocess(key, args)
        bar.write(progress_line(record))
        data["results"] = [r for r in data["results"] if r["model"] != key] + [record]
        _save(out, data)  # after every model: a long sweep can be polled and resumed
    data["environment"]["fxprune_git_at_end"] = git_state()
    _save(out, data)
    return data


def failed(record: dict[str, Any]) -> bool:
    """The child did not finish, or fxprune did not prune."""
    return record.get("status") != "ok" or record.get("fxprune", {}).get("status") != "ok"


def progress_line(r: dict[str, Any]) -> str:
    fx, tpr, onnx = (r.get(k, {}) for k in ("fxprune", "torch_pruning", "onnx"))
    if r.get("status") != "ok" and not fx:
        return f"{r['model']}: {r.get('status')}: {r.get('error', '')} ({r['subprocess_s']:.0f} s)"
    return (
        f"{r['model']}: fxprune {fx.get('status', r.get('status'))} "
        f"{_x(fx.get('macs_reduction'))}{' exact' if fx.get('exact') else ''}"
        f" | TP {tpr.get('status', '-')} {_x(tpr.get('macs_reduction'))}"
        f" | ONNX {onnx.get('status', '-')} | {r['subprocess_s']:.0f} s"
        + (f" | {r['status']}: {r.get('error', '')}" if r.get("status") != "ok" else "")
    )


def _x(value: float | None) -> str:
    return f"{value:.2f}x" if value else ""


# --------------------------------------------------------------------------- report


def _median(values: list[float]) -> str:
    return f"{statistics.median(values):.2f}x" if values else "n/a"


def zoo_totals(results: list[dict[str, Any]]) -> list[str]:
    """One row of totals for one zoo's results."""
    n = len(results)
    fx = [r.get("fxprune", {}) for r in results]
    tpr = [r.get("torch_pruning", {}) for r in results]
    fx_ok = [f for f in fx if f.get("status") == "ok"]
    exact = [f for f in fx_ok if f.get("exact")]
    inexact = [f for f in fx_ok if not f.get("exact")]
    inexact_ok = [f for f in inexact if f.get("forward_ok") and f.get("shapes_equal")]
    tp_ok = [t for t in tpr if t.get("status") == "ok"]
    tp_same = [t for t in tp_ok if t.get("shapes_equal")]
    wrong = sum("VerificationError" in f.get("error", "") for f in fx)
    # TP results that changed the model's output shapes are no like-for-like comparison.
    tp_fair = [t if t.get("shapes_equal") else {} for t in tpr]
    both = [
        (f["macs_reduction"], t["macs_reduction"])
        for f, t in zip(fx, tp_fair)
        if f.get("macs_reduction") and t.get("macs_reduction")
    ]
    onnx = [r.get("onnx", {}) for r in results if r.get("fxprune", {}).get("status") == "ok"]
    onnx_ok = [o for o in onnx if o.get("status") == "ok"]
    only_pruned = [o for o in onnx if o.get("verdict") == "only the pruned model fails"]

    def big(records: list[dict[str, Any]]) -> int:
        return sum((r.get("macs_reduction") or 0) >= 2.5 for r in records)

    return [
        str(n),
        f"{len(fx_ok)}/{n}",
        f"{len(exact)} exact, held; {wrong} VerificationError; "
        f"{len(inexact_ok)}/{len(inexact)} inexact ran with the original's output shapes",
        f"{len(tp_ok)}/{n} ({len(tp_same)} with the original's output shapes)",
        f"{big(fx)}/{n}",
        f"{big(tp_fair)}/{n}",
        f"{_median([b[0] for b in both])} / {_median([b[1] for b in both])} (n={len(both)})",
        f"{len(onnx_ok)}/{len(onnx)} ({len(only_pruned)} where only the pruned fails)",
        _seconds([r["subprocess_s"] for r in results if r.get("subprocess_s")]),
    ]


def _seconds(values: list[float]) -> str:
    if not values:
        return ""
    return f"{statistics.median(values):.0f} / {max(values):.0f} / {sum(values) / 60:.0f} min"


TOTALS_HEADER = [
    "zoo",
    "models",
    "fxprune ran",
    "fxprune oracle",
    "TP ran",
    "fxprune MACs >= 2.5x",
    "TP MACs >= 2.5x (same output shapes)",
    "median MACs red. fxprune / TP (both ran, TP with the same output shapes)",
    "ONNX of fxprune's model",
    "s per model: median / max / total",
]

MODEL_HEADER = [
    "model",
    "family",
    "input",
    "fxprune",
    "oracle",
    "max err",
    "MACs red. fxprune",
    "MACs red. TP",
    "params red. fxprune",
    "params red. TP",
    "ONNX",
    "fxprune s",
    "TP s",
    "TP",
]


def _s(value: float | None) -> str:
    return f"{value:.1f}" if value is not None else ""


def _oracle_cells(fx: dict[str, Any]) -> tuple[str, str]:
    """(exact / inexact with caveats, max error: absolute when exact, else relative)."""
    if fx.get("status") != "ok":
        return "", ""
    err = fx.get("max_error")
    if fx.get("exact"):
        oracle, error = "exact", "" if err is None else f"{err:.1e}"
    else:
        oracle = "inexact"
        if not (fx.get("forward_ok") and fx.get("shapes_equal")):
            oracle += ", shapes differ"
        error = "" if err is None else f"{err / max(fx.get('scale') or 0.0, 1e-12):.1e} rel"
    if fx.get("empty_outputs"):
        oracle += " (empty outputs: blind)"
    return oracle, error


def model_row(r: dict[str, Any]) -> list[str]:
    fx, tpr, onnx = (r.get(k, {}) for k in ("fxprune", "torch_pruning", "onnx"))
    status = fx.get("status") or r.get("status", "?")
    if fx.get("status") == "ok":
        status = f"ok ({fx.get('frontend', '?').split(',')[0]})"
    elif fx.get("step"):
        status += f" in {fx['step']}"
    if r.get("status") not in ("ok", None) and fx.get("status") == "ok":
        status += f"; then {r['status']}"
    oracle, error = _oracle_cells(fx)
    tp_cell = tpr.get("status", "")
    if tpr.get("status") not in (None, "ok"):
        tp_error = tpr.get("error", "").removeprefix("timeout: ")
        tp_cell = f"{tpr['status']} in {tpr.get('step', '?')}: {tp_error}"[:140]
    else:
        if tpr.get("shapes_equal") is False:
            tp_cell += ", output shapes changed"
        if tpr.get("macs_counter") == "torch_pruning":
            tp_cell += " (TP's MAC counter)"
    onnx_cell = onnx.get("status", "")
    if onnx.get("verdict"):
        onnx_cell += f" ({onnx['verdict']})"
    return [
        r["model"].split(":", 1)[1],
        r.get("family", ""),
        r.get("input", ""),
        status,
        oracle,
        error,
        _x(fx.get("macs_reduction")),
        _x(tpr.get("macs_reduction")),
        _x(fx.get("params_reduction")),
        _x(tpr.get("params_reduction")),
        onnx_cell,
        _s(fx.get("prune_s")),
        _s(tpr.get("prune_s")),
        tp_cell,
    ]


def failures(results: list[dict[str, Any]]) -> list[str]:
    """Every fxprune failure with its reason, then the ONNX failures of pruned models."""
    lines = []
    for r in results:
        fx = r.get("fxprune", {})
        if fx.get("status") == "ok":
            continue
        reason = fx.get("error") or r.get("error", "no result")
        where = fx.get("where") or r.get("where")
        lines.append(f"- `{r['model']}`: {reason}" + (f" (at {where})" if where else ""))
    onnx = [
        f"- `{r['model']}`: {o.get('error') or o.get('ort_error', '')} ({o.get('verdict', '')})"
        for r in results
        if (o := r.get("onnx", {})).get("status") not in (None, "ok", "skipped")
    ]
    return lines, onnx


def frozen_lines(results: list[dict[str, Any]]) -> list[str]:
    """Why channels stay, for each model fxprune pruned by less than 2.5x of its MACs."""
    lines = []
    for r in results:
        fx = r.get("fxprune", {})
        if fx.get("status") != "ok" or (fx.get("macs_reduction") or 0) >= 2.5:
            continue
        reasons = "; ".join(
            f"{reason} ({n} groups, {channels} ch)"
            for reason, n, channels in fx.get("frozen_reasons", [])[:3]
        )
        lines.append(
            f"- `{r['model']}` ({_x(fx.get('macs_reduction'))}): {reasons or 'none frozen'}"
        )
    return lines


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return out + ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]


def render_markdown(data: dict[str, Any]) -> str:
    env = data["environment"]
    results = data["results"]
    zoos = [z for z in ZOOS if any(r.get("zoo") == z for r in results)]
    versions = ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items())
    lines = [
        "# Model-zoo conformance: fxprune and Torch-Pruning",
        "",
        f"Generated by `bench/zoo.py` on {env['date']} (fxprune {env['fxprune']}, "
        f"git {env.get('fxprune_git', '?')}); {env['platform']}, {env['cpu_count']} CPUs, "
        f"{env['threads']} thread(s) per model, {env['timeout_s']:.0f} s and "
        f"{env['memory_gb']:g} GB address space per model.",
        "",
        f"    {env['command']}",
        "",
        f"Versions: {versions}.",
        "",
        f"Every model: random weights (every parameter and norm statistic, seed {SEED}), "
        f"ratio {env['ratio']}, round_to {env['round_to']}, its head kept (fxprune `ignore=`, "
        "TP `ignored_layers=`; for a detector its prediction layers: torchvision's class, "
        "box, mask and keypoint predictors, YOLO's per-level prediction convs and DFL); "
        "fxprune's other outputs keep their shape, not their channels "
        "(`pad_outputs=True`: an encoder's hidden states, or the FPN features a detector's "
        "opaque heads read, are pruned and padded back with zeros; TP changes their shape "
        "instead). fxprune runs with `verify=True`: *exact* results equal the "
        "masked original (the oracle held); *inexact* ones (a norm over pruned channels) "
        "ran, with the output shapes of the original and the max error relative to the "
        "output scale. MACs: `fxprune.count_macs` for both tools (TP's own counter for both "
        "sides where fxprune cannot count TP's model). ONNX: `fxprune.export.to_onnx` of "
        "fxprune's model, then ONNX Runtime compared with PyTorch.",
    ]
    lines += ["", "## Totals", ""]
    totals = [[z, *zoo_totals([r for r in results if r.get("zoo") == z])] for z in zoos]
    lines += _table(TOTALS_HEADER, totals)
    for zoo, why in data.get("skipped_zoos", {}).items():
        lines.append(f"\n- zoo `{zoo}` skipped: {why}")
    for zoo in zoos:
        rows = [model_row(r) for r in results if r.get("zoo") == zoo]
        lines += ["", f"## {zoo}", "", *_table(MODEL_HEADER, rows)]
    fx_failures, onnx_failures = failures(results)
    lines += ["", "## fxprune failures", ""] + (fx_failures or ["None."])
    lines += ["", "## ONNX failures of pruned models", ""] + (onnx_failures or ["None."])
    lines += ["", "## Where fxprune removed < 2.5x of the MACs: the largest frozen groups", ""]
    lines += frozen_lines(results) or ["None."]
    notes = [
        f"- `{r['model']}`: "
        + "; ".join(r.get("notes", []) + r.get("torch_pruning", {}).get("notes", []))
        for r in results
        if r.get("notes") or r.get("torch_pruning", {}).get("notes")
    ]
    if notes:
        lines += ["", "## Notes per model", "", *notes]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--zoo", default=",".join(ZOOS), help=f"comma list of {', '.join(ZOOS)}")
    parser.add_argument("--models", help="comma list of names or zoo:name (default: all)")
    parser.add_argument("--limit", type=int, help="at most this many models")
    parser.add_argument(
        "--timeout", type=float, default=300, help="seconds per model (all stages together)"
    )
    parser.add_argument("--memory-gb", type=float, default=12, help="address space per model")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per model")
    parser.add_argument("--input-size", type=int, help="override the image side (smoke runs)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "zoo.json"))
    parser.add_argument("--md", help="Markdown report (default: --out with .md)")
    parser.add_argument("--resume", action="store_true", help="skip models already in --out")
    parser.add_argument(
        "--again",
        action="store_true",
        help="with --resume: run the selected models again, replacing their records",
    )
    parser.add_argument(
        "--retry-failed",
        action="store_true",
        help="with --resume: run again the models that crashed, timed out or fxprune failed on",
    )
    parser.add_argument("--from-json", help="only rewrite the Markdown of an earlier run")
    parser.add_argument("--markdown", action="store_true", help="also print the Markdown")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if args.one:
        warnings.filterwarnings("ignore")
        measure_one(args.one, args.input_size, args.timeout, Path(args.result), args.threads)
        return 0
    if args.from_json:
        data = json.loads(Path(args.from_json).read_text())
        md = Path(args.md) if args.md else Path(args.from_json).with_suffix(".md")
    else:
        data = sweep(args)
        md = Path(args.md) if args.md else Path(args.out).with_suffix(".md")
        print(f"wrote {args.out}")
    text = render_markdown(data)
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(text)
    print(f"wrote {md}")
    if args.markdown:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
