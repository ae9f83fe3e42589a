"""`dsft dpo`: align a model (or an SFT run, dpo.init_adapter) on preference pairs with DPO."""

from __future__ import annotations

from dsft.cli._common import PREFERENCE_COLUMNS, preference_rows, training_command

dpo = training_command(
    "dpo", "Align a model (or an SFT run, dpo.init_adapter) on preference pairs with DPO.",
    PREFERENCE_COLUMNS, preference_rows)
