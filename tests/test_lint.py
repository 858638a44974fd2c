"""ruff (lint and import order, configured in pyproject.toml) runs with the suite, so the README's
test command and CI check it too."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing():
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert "No module named ruff" not in proc.stderr, "ruff is in the test extra: pip install -e '.[test]'"
    assert proc.returncode == 0, proc.stdout + proc.stderr
