"""Per-op channel rules, registered by op kind and grouped by family.

Importing this package registers every rule in :data:`RULES`; ops without one use
:func:`default_rule` (freeze).
"""

from __future__ import annotations

from fxprune.passes.channel_rules import attention, conv_linear, elementwise, norm, shape  # noqa: F401
from fxprune.passes.channel_rules.base import RULES, ChannelEnv, default_rule, register

__all__ = ["RULES", "ChannelEnv", "default_rule", "register"]
