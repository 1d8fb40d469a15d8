"""A progress line on stderr: done/total, items per second and time left.

On a terminal it redraws one line; otherwise (logs, CI) it prints a line every few
seconds. With a ``delay`` it stays silent until the work has taken that long, so
quick commands print nothing extra.
"""

from __future__ import annotations

import sys
import threading
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
                 done: int = 0, unit: str = "rows", delay: float = 0.0) -> None:
        self.total = total
        self.done: float = done
        self.unit = unit
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self.every = 0.1 if self.tty else every
        self.started = time.monotonic()
        self.skipped: float = done  # done by an earlier run: not counted in the rate
        self.shown = 0.0
        self.delay = delay
        self.visible = False
        self.shown_done: float | None = None  # the count on the last line shown

    def advance(self, count: float = 1) -> None:
        """``count`` more done; fractions let slow work (Score-CAM's masked runs)
        show progress inside one item."""
        self.done += count
        now = time.monotonic()
        if now - self.started < self.delay:
            return
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
        speed = f"{rate:.1f}" if rate >= 0.1 else f"{rate:.3f}"  # slow: minutes per item
        return (f"[{bar:<{WIDTH}}] {int(self.done)}/{self.total} {100 * share:3.0f}% "
                f"{speed} {self.unit}/s ETA {eta}")

    def show(self, now: float) -> None:
        self.visible = True
        self.shown_done = self.done
        text = self.line(now)
        self.stream.write(f"\r{text}" if self.tty else f"{text}\n")
        self.stream.flush()

    def finish(self) -> None:
        """The last line; nothing when the work ended before the delay, nor when the
        last line shown already counts everything (a log would hold it twice)."""
        now = time.monotonic()
        if now - self.started < self.delay and not self.visible:
            return
        if self.shown_done != self.done:
            self.show(now)
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


class Stages:
    """Which step of a long, indivisible job is running, and for how long: a line on
    stderr every few seconds once the job has taken ``delay`` seconds (an export's
    conversion and verification give no count to show a bar for).

    Use as a context manager; ``enter(name)`` names the step now running.
    """

    def __init__(self, what: str, stream: TextIO | None = None, every: float = 5.0,
                 delay: float = 2.0) -> None:
        self.what = what
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self.every = 1.0 if self.tty else every
        self.delay = delay
        self.stage = "starting"
        self.started = time.monotonic()
        self.visible = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._tick, name="onnxcam-stages", daemon=True)

    def enter(self, stage: str) -> None:
        self.stage = stage

    def line(self, now: float) -> str:
        return f"{self.what}: {self.stage} ({clock(now - self.started)})"

    def _tick(self) -> None:
        if self._stop.wait(self.delay):
            return
        while True:
            self.visible = True
            text = self.line(time.monotonic())
            self.stream.write(f"\r{text:<60}" if self.tty else f"{text}\n")
            self.stream.flush()
            if self._stop.wait(self.every):
                return

    def __enter__(self) -> Stages:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if self.visible and self.tty:
            self.stream.write("\n")
            self.stream.flush()
