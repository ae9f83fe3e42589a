"""`dsft orpo`: align on preference pairs with ORPO: SFT loss plus an odds-ratio penalty, no reference model."""

from __future__ import annotations

from dsft.cli._common import PREFERENCE_COLUMNS, preference_rows, training_command

orpo = training_command(
    "orpo", "Align on preference pairs with ORPO: SFT loss plus an odds-ratio penalty, no reference model.",
    PREFERENCE_COLUMNS, preference_rows)
