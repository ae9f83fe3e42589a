"""Recipe schema, loading and overrides. Imports no torch. Importing it registers the built-in objectives'
sections (dsft.config.objectives)."""

from dsft.config import objectives  # noqa: F401 - registers the built-in objectives' sections
from dsft.config.load import load_recipe, load_run_recipe, validate_recipe
from dsft.config.schema import Recipe

__all__ = ["Recipe", "load_recipe", "load_run_recipe", "validate_recipe"]
