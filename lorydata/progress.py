"""Progress bars for long loops (rich), quiet when output is not a terminal."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def progress_enabled() -> bool:
    """Bars are drawn on terminals only; LORY_PROGRESS=0/1 forces them off/on."""
    forced = os.environ.get("LORY_PROGRESS")
    if forced is not None:
        return forced not in ("0", "", "false")
    return sys.stderr.isatty()


def progress_bar(items: Iterable[T], total: int | None = None, description: str = "") -> Iterator[T]:
    """Iterate `items` with a rich progress bar (elapsed, rate, ETA) on stderr.

    Args:
        items: what to iterate.
        total: number of items, when `items` has no len().
        description: label shown left of the bar.
    """
    if not progress_enabled():
        yield from items
        return
    from rich.console import Console
    from rich.progress import track

    yield from track(items, total=total, description=description, console=Console(stderr=True), transient=True)
