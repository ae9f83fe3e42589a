"""Recipe schema, loading and overrides. Imports no torch."""

from dsft.config.load import load_recipe, load_run_recipe, validate_recipe
from dsft.config.schema import Recipe

__all__ = ["Recipe", "load_recipe", "load_run_recipe", "validate_recipe"]
