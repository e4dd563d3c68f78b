"""`import nas_minitron` (and the CLI's parser) stays light: heavy libraries load only where used."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "transformers", "ray", "optuna", "lm_eval", "plotly", "pandas", "datasets")


def test_import_and_help_do_not_load_heavy_libraries() -> None:
    code = (
        "import sys, nas_minitron, nas_minitron.arch, nas_minitron.families, nas_minitron.cli;"
        "nas_minitron.cli.build_parser();"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""
