"""Progress bars for long work, on stderr, only when a person is watching."""

from __future__ import annotations

import sys
from typing import Iterable, Iterator, TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

T = TypeVar("T")
_state = {"enabled": None}


def set_enabled(enabled: bool | None) -> None:
    """True/False forces bars on/off; None shows them when stderr is a terminal."""
    _state["enabled"] = enabled


def _enabled() -> bool:
    forced = _state["enabled"]
    return sys.stderr.isatty() if forced is None else forced


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    if not _enabled():
        yield from items
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task(description, total=total if total is not None else len(items))  # type: ignore[arg-type]
        for item in items:
            yield item
            progress.advance(task)
