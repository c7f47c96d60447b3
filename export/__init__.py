"""Lowering of (pruned) PyTorch modules to checked ONNX files and TensorRT engines.

`to_onnx` writes an ONNX file only after the ONNX checker and ONNX Runtime agree with
PyTorch; `build_engine` turns it into a TensorRT / TensorRT-RTX engine (2:4 sparse
weights allowed) and reports which layers got sparse kernels when a GPU can tell;
`compare_latency` times models side by side in interleaved rounds (ONNX Runtime, torch,
TensorRT when a GPU is present).
"""

from __future__ import annotations

import logging

from fxprune.export.latency import BenchReport, compare_latency
from fxprune.export.onnx import OnnxExportResult, OutputError, to_onnx
from fxprune.export.onnx_sparsity import check_onnx_nm
from fxprune.export.tensorrt import (
    EngineBuildResult,
    EngineLayer,
    TrtEngineRunner,
    available_runtimes,
    build_engine,
    gpu_available,
    run_engine,
    time_engine,
)

logger = logging.getLogger(__name__)

__all__ = [
    "BenchReport",
    "EngineBuildResult",
    "EngineLayer",
    "OnnxExportResult",
    "OutputError",
    "TrtEngineRunner",
    "available_runtimes",
    "build_engine",
    "check_onnx_nm",
    "compare_latency",
    "gpu_available",
    "run_engine",
    "time_engine",
    "to_onnx",
]
