"""Every op fxprune knows, declared once per family, and the environments their hooks use.

Importing this package registers each family's op specs (targets, typed attributes,
channel rule, surgery rewrite, MACs) in :data:`fxprune.ops.REGISTRY`; ops without a
spec use :func:`default_rule` (freeze). Families: ``boundary`` (inputs, outputs,
parameters, scalars), ``conv_linear``, ``norm``, ``elementwise``, ``pooling``,
``shape``, ``attention``, ``recurrent``.
"""

from __future__ import annotations

import logging

from fxprune.ops import REGISTRY
from fxprune.passes.channel_rules import (  # noqa: F401  (each registers its specs)
    attention,
    boundary,
    conv_linear,
    elementwise,
    norm,
    pooling,
    recurrent,
    shape,
)
from fxprune.passes.channel_rules.base import (
    ChannelEnv,
    SurgeryEnv,
    default_rule,
    op_spec,
    rule_of,
)

logger = logging.getLogger(__name__)

REGISTRY.mark_loaded(__name__)

__all__ = ["ChannelEnv", "SurgeryEnv", "default_rule", "op_spec", "rule_of"]
