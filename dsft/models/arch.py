"""Moved to dsft.arch (below every package: moe, models, config and export all read it); this name is the
same module."""

import sys

from dsft import arch as _arch

sys.modules[__name__] = _arch
