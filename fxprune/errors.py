"""Exceptions raised by fxprune; every one says what failed, where, and how to fix it."""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


class FxpruneError(Exception):
    """Base class of every error fxprune raises on purpose."""


class TraceError(FxpruneError):
    """The model could not be turned into a graph by any requested frontend."""


class PassError(FxpruneError):
    """A pass failed; the message names it and the passes that ran before it."""


class PreconditionError(PassError):
    """A pass was run on a graph that lacks the meta keys it requires."""


class PostconditionError(PassError):
    """A pass did not provide what it promised, or broke an invariant."""


class PruneError(FxpruneError):
    """Bad pruning arguments (ratio, alignment, ignored modules) or an impossible request."""


class VerificationError(FxpruneError):
    """The pruned model disagrees with the masked original (the correctness oracle)."""


class BenchError(FxpruneError, ValueError):
    """Bad benchmark arguments (models, inputs, backends, batch sizes, rounds)."""


class ExportError(FxpruneError):
    """Lowering to ONNX or TensorRT failed or gave numbers that disagree with PyTorch."""
