"""Real speech from Debian's espeak-ng: a sentence to a WAV file in milliseconds, in many voices.

Used by the quickstart, the tests and examples, so that nothing needs a dataset download.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from audiorl.errors import DataError, ToolMissingError

INSTALL_HINT = "install it with `apt-get install espeak-ng` (Debian/Ubuntu) or `brew install espeak-ng` (macOS)"


def espeak_binary() -> str:
    binary = shutil.which("espeak-ng")
    if binary is None:
        raise ToolMissingError(f"espeak-ng is not installed: {INSTALL_HINT}")
    return binary


def speak(text: str, path: str | Path, *, voice: str = "en-us", speed: int = 160, pitch: int = 50) -> Path:
    """Speak `text` into a 16-bit mono WAV at `path` (espeak-ng's own rate, 22.05 kHz)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # text goes through stdin so that a sentence starting with '-' is never read as an option
    proc = subprocess.run(
        [espeak_binary(), "--stdin", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(path)],
        input=text.encode("utf-8"),
        capture_output=True,
        check=False,
    )
    if proc.returncode != 0 or not path.exists() or path.stat().st_size <= 44:
        detail = proc.stderr.decode(errors="replace").strip() or f"exit code {proc.returncode}"
        raise DataError(f"espeak-ng could not speak {text[:40]!r} with voice {voice!r}: {detail}")
    return path
