"""`dsft simpo`: align on preference pairs with SimPO: length-normalised margins, no reference model."""

from __future__ import annotations

from dsft.cli._common import PREFERENCE_COLUMNS, preference_rows, training_command

simpo = training_command(
    "simpo", "Align on preference pairs with SimPO: length-normalised margins, no reference model.",
    PREFERENCE_COLUMNS, preference_rows)
