"""A progress line on stderr: done/total, rows per second and time left.

On a terminal it redraws one line; otherwise (logs, CI) it prints a line every few
seconds.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

WIDTH = 30


def clock(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else \
        f"{rest // 60:02d}:{rest % 60:02d}"


class Progress:
    def __init__(self, total: int, stream: TextIO | None = None, every: float = 5.0,
                 done: int = 0) -> None:
        self.total = total
        self.done = done
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self.every = 0.1 if self.tty else every
        self.started = time.monotonic()
        self.skipped = done  # rows done by an earlier run do not count toward the rate
        self.shown = 0.0

    def advance(self, count: int = 1) -> None:
        self.done += count
        now = time.monotonic()
        if now - self.shown >= self.every:
            self.shown = now
            self.show(now)

    def line(self, now: float) -> str:
        elapsed = max(now - self.started, 1e-9)
        rate = (self.done - self.skipped) / elapsed
        left = self.total - self.done
        eta = clock(left / rate) if rate > 0 else "--:--"
        share = self.done / self.total if self.total else 1.0
        bar = "#" * int(WIDTH * share)
        return (f"[{bar:<{WIDTH}}] {self.done}/{self.total} {100 * share:3.0f}% "
                f"{rate:.1f} rows/s ETA {eta}")

    def show(self, now: float) -> None:
        text = self.line(now)
        self.stream.write(f"\r{text}" if self.tty else f"{text}\n")
        self.stream.flush()

    def finish(self) -> None:
        self.show(time.monotonic())
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
