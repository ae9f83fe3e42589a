"""The recipe's mutable tables: each objective's section under its name and the data formats objectives add.
dsft.config.objectives fills them for the built-in objectives (no torch: `dsft validate` reads them) and
dsft.train.objective.register for a plug-in's; dsft.config.schema.recipe_model builds the Recipe from them."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dsft.config.base import ObjectiveSection

SECTIONS: dict[str, type[ObjectiveSection]] = {}
FORMATS: list[str] = ["messages", "prompt_completion", "alpaca", "sharegpt"]


def register_section(name: str, model: type[ObjectiveSection]) -> None:
    SECTIONS[name] = model


def register_format(name: str) -> None:
    if name not in FORMATS:
        FORMATS.append(name)


def unregister(section: str | None, formats: tuple[str, ...] = ()) -> None:
    """Take an objective's section and formats out of the recipe again (a plug-in removed, a test's)."""
    SECTIONS.pop(section or "", None)
    for name in formats:
        if name in FORMATS:
            FORMATS.remove(name)
