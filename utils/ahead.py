"""Launching work one item ahead: the next item's work is queued before the previous one is handed
on, so a GPU (or a side stream) works on it while the caller finishes the one before."""
from __future__ import annotations

from typing import Callable, Iterable, Iterator, TypeVar

Item = TypeVar("Item")
Launched = TypeVar("Launched")


def launched_one_ahead(items: Iterable[Item], launch: Callable[[Item], Launched]) -> Iterator[Launched]:
    """``launch(item)`` for each item in order, yielding each result only once the next item has
    been launched (the last one at the end)."""
    pending: list[Launched] = []
    for item in items:
        launched = launch(item)
        if pending:
            yield pending.pop()
        pending.append(launched)
    yield from pending
