"""Moved to dsft.moe.fused (the kernels sit below the loaders that use them); this name is the same module."""

import sys

from dsft.moe import fused as _fused

sys.modules[__name__] = _fused
