"""Prepare the next chunk of work in a thread while the caller uses the current one.

Decoding images (Pillow releases the GIL) overlaps a session run this way; the
engine, ``explain``'s file loop, the service's jobs and the local audit share it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

Chunk = TypeVar("Chunk")
Prepared = TypeVar("Prepared")


def prefetched(chunks: Iterable[Chunk],
               prepare: Callable[[Chunk], Prepared]) -> Iterator[tuple[Chunk, Prepared]]:
    """``(chunk, prepare(chunk))`` in order, with chunk i+1 prepared while chunk i is used.

    At most one chunk is prepared ahead, so memory stays at two chunks. An error in
    ``prepare`` is raised when its chunk's turn comes.
    """
    iterator = iter(chunks)
    end = object()
    current = next(iterator, end)
    if current is end:
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(prepare, current)  # type: ignore[arg-type]
        while True:
            prepared = pending.result()
            following = next(iterator, end)
            if following is not end:
                pending = pool.submit(prepare, following)  # type: ignore[arg-type]
            yield current, prepared  # type: ignore[misc]
            if following is end:
                return
            current = following
