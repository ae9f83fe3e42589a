"""`dsft kto`: align on desirable / undesirable completions (unpaired, or preference pairs) with KTO."""

from __future__ import annotations

from dsft.cli._common import PREFERENCE_COLUMNS, preference_rows, training_command

kto = training_command(
    "kto", "Align on desirable / undesirable completions (unpaired, or preference pairs) with KTO.",
    PREFERENCE_COLUMNS, preference_rows)
