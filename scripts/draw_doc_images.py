"""Redraw docs/images from a fresh run of README's first command (the tiny legal SFT run, in a temporary
directory and a fresh data cache): the routing profile with the adapter's experts boxed, and the routing
change after training. Usage: python scripts/draw_doc_images.py"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
IMAGES = {"routing/heatmap.png": "tiny-legal-heatmap.png", "routing/heatmap_diff.png": "tiny-legal-heatmap-diff.png",
          "routing/after/heatmap.png": "tiny-legal-heatmap-after.png"}


def main() -> int:
    from typer.testing import CliRunner

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["DSFT_CACHE"] = str(Path(tmp) / "cache")
        from dsft.cli.app import app

        os.chdir(REPO)
        run = Path(tmp) / "tiny-legal"
        result = CliRunner().invoke(app, ["sft", "recipes/tiny-legal.yaml", "--set", f"output_dir={run}"])
        if result.exit_code != 0:
            print(result.output, file=sys.stderr)
            return result.exit_code
        for source, name in IMAGES.items():
            shutil.copyfile(run / source, REPO / "docs/images" / name)
            print(f"docs/images/{name} <- {source}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
