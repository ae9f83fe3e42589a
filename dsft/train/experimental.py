"""TRL's experimental trainers (ORPO, CPO for SimPO), imported in this one place: `trl.experimental` moves
between TRL's minor versions, so a TRL without them stops the command in its preflight, before anything
is created, with one line naming the TRL it needs."""

from __future__ import annotations

import importlib
import os
from typing import Any

from dsft.compat import TESTED
from dsft.errors import DsftError

NEEDED = f"trl=={TESTED['trl']}.*"


def load(module: str, *names: str) -> tuple[Any, ...]:
    """`names` from trl.experimental.`module`, or one line saying which TRL has them."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # its import warning is TRL's, not dsft's console
    try:
        found = importlib.import_module(f"trl.experimental.{module}")
        return tuple(getattr(found, name) for name in names)
    except (ImportError, AttributeError) as e:
        from importlib.metadata import PackageNotFoundError, version

        try:
            installed = version("trl")
        except PackageNotFoundError:
            installed = "none"
        raise DsftError(f"trl.experimental.{module}: not in the installed TRL ({installed}; {type(e).__name__}: "
                        f"{str(e).splitlines()[0][:120]}); install the TRL it needs: pip install '{NEEDED}'") from None
