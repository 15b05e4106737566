"""Progress reporting as a library interface: library code reports, the CLI renders.

Long-running library functions (rollouts, index builds, training, SFT, eval) take a
``progress: ProgressFactory | None`` argument and call it as
``with progress(label, total) as advance: advance(n)``. ``None`` means silent. The CLI
passes a rich-backed factory (``sr1.cli.common.rich_progress``); tests and notebooks pass
nothing, or their own callable (e.g. one that records the calls). Nothing under ``sr1/``
outside ``sr1/cli`` imports rich's console for progress.

``total`` may be None when the amount of work is not known up front (an index build
streams its corpus). ``advance(n, description=...)`` may also replace the label shown
for the task (training shows the latest reward, SFT the latest loss, an index build
"finishing ..."); ``advance(0, description=...)`` changes only the label. Every
``advance`` must accept the keyword; a factory that does not display labels ignores it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol


class Advance(Protocol):
    """``advance(n, description=None)``: ``n`` more units done; a new label if given."""

    def __call__(self, n: int, *, description: str | None = None) -> None: ...


class ProgressFactory(Protocol):
    """``factory(label, total, completed=0)`` gives a context manager yielding ``advance``."""

    def __call__(
        self, label: str, total: int | None, completed: int = 0
    ) -> contextlib.AbstractContextManager[Advance]: ...


def _ignore(n: int, *, description: str | None = None) -> None:
    return None


@contextlib.contextmanager
def silent(label: str, total: int | None, completed: int = 0) -> Iterator[Advance]:
    """The no-op progress factory."""
    yield _ignore


def resolve(progress: ProgressFactory | bool | None) -> ProgressFactory:
    """The factory to use: ``None``/``False`` -> silent. ``True`` is refused: rendering is the
    caller's choice, so pass a factory (the CLI passes ``sr1.cli.common.rich_progress``)."""
    if progress is None or progress is False:
        return silent
    if progress is True:
        raise TypeError("progress=True: pass a progress factory (see sr1.progress), or None")
    return progress
