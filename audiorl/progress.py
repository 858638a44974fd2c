"""Progress bars (rich) for long work: data checks, precomputing, training, evaluation.

Set AUDIORL_NO_PROGRESS=1 to turn them off (logs of batch jobs stay readable without them);
`silence()` turns them off for this process (a training run's other ranks: one bar per job).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from audiorl.secrets import redact


class RedactingConsole(Console):
    """A rich Console that masks secrets (by the one rule of `audiorl.secrets`) in every string it
    prints: paths, URIs and error texts in a log can carry a token (a presigned URL's signature,
    a URL's password) where nobody put it on purpose."""

    def print(self, *objects, **kwargs) -> None:
        super().print(*(redact(o) if isinstance(o, str) else o for o in objects), **kwargs)

    def log(self, *objects, **kwargs) -> None:
        super().log(*(redact(o) if isinstance(o, str) else o for o in objects), **kwargs)


console = RedactingConsole(stderr=True)


_silenced = False


def silence() -> None:
    """No progress bars from this process from now on."""
    global _silenced
    _silenced = True


def enabled() -> bool:
    return not _silenced and os.environ.get("AUDIORL_NO_PROGRESS", "").lower() not in ("1", "true", "yes")


def make_progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
        disable=not enabled(),
    )


@contextlib.contextmanager
def progress_bar(description: str, total: int | None) -> Iterator[Callable[..., None]]:
    """Yields `advance(n=1, status="")`."""
    with make_progress() as progress:
        task = progress.add_task(description, total=total, status="")

        def advance(n: int = 1, status: str | None = None) -> None:
            if status is None:
                progress.advance(task, n)
            else:
                progress.update(task, advance=n, status=status)

        yield advance
