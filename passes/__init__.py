"""The fxprune pass library (installed as ``fxprune.passes``): one pass per module."""

from __future__ import annotations

from fxprune.passes.build_groups import BuildGroupsPass
from fxprune.passes.propagate_channels import PropagateChannelsPass

__all__ = ["BuildGroupsPass", "PropagateChannelsPass"]
