"""The progress line: silent before its delay, fractions inside an item, one final line."""

from __future__ import annotations

import io

import pytest

from onnxcam.progress import Progress, clock


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def fake_clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock_ = Clock()
    monkeypatch.setattr("onnxcam.progress.time.monotonic", clock_)
    return clock_


def test_silent_before_the_delay_then_a_line_with_rate_and_eta(fake_clock: Clock) -> None:
    stream = io.StringIO()
    progress = Progress(4, stream, every=0.0, unit="images", delay=2.0)
    fake_clock.now += 1.0
    progress.advance(0.5)
    assert stream.getvalue() == ""
    fake_clock.now += 1.5  # 2.5 s in, 1 image done: 0.4 images/s, 3 left: 7.5 s
    progress.advance(0.5)
    assert stream.getvalue() == f"[{'#' * 7:<30}] 1/4  25% 0.4 images/s ETA 00:08\n"


def test_a_run_shorter_than_the_delay_prints_nothing(fake_clock: Clock) -> None:
    stream = io.StringIO()
    progress = Progress(2, stream, every=0.0, unit="images", delay=2.0)
    progress.advance(2)
    fake_clock.now += 1.0
    progress.finish()
    assert stream.getvalue() == ""


def test_slow_items_show_three_decimals_and_the_audit_line_is_unchanged(
        fake_clock: Clock) -> None:
    stream = io.StringIO()
    progress = Progress(10, stream, every=0.0)  # the audit's: rows, no delay
    fake_clock.now += 40.0
    progress.advance(0.25)  # a quarter of one image in 40 s
    assert "0.006 rows/s ETA 26:00" in stream.getvalue()  # 9.75 left at 1/160 per s
    assert clock(3725) == "1:02:05"


def test_stages_name_the_step_running_once_the_delay_has_passed() -> None:
    import time

    from onnxcam.progress import Stages

    stream = io.StringIO()
    with Stages("export", stream, every=0.05, delay=0.2) as stages:
        stages.enter("loading the model")
        time.sleep(0.1)
        assert stream.getvalue() == ""
        stages.enter("verifying")
        time.sleep(0.3)
    lines = stream.getvalue().splitlines()
    assert lines and all(line.startswith("export: verifying (00:0") for line in lines)
    quiet = io.StringIO()
    with Stages("export", quiet, delay=5.0):
        pass
    assert quiet.getvalue() == ""  # a quick export prints nothing extra, and does not wait


def test_the_final_line_appears_once(fake_clock: Clock) -> None:
    stream = io.StringIO()
    progress = Progress(2, stream, every=0.0, unit="images")
    fake_clock.now += 1.0
    progress.advance()
    fake_clock.now += 1.0
    progress.advance()  # 2/2 shown here: 1 image/s, nothing left
    progress.finish()
    final = f"[{'#' * 30}] 2/2 100% 1.0 images/s ETA 00:00"
    assert stream.getvalue().splitlines() == [
        f"[{'#' * 15:<30}] 1/2  50% 1.0 images/s ETA 00:01", final]
    late = io.StringIO()
    progress = Progress(2, late, every=10.0, unit="images")
    fake_clock.now += 2.0
    progress.advance()
    fake_clock.now += 1.0
    progress.advance()  # within 10 s of the last line: not shown, so finish shows it
    progress.finish()
    assert late.getvalue().splitlines() == [
        f"[{'#' * 15:<30}] 1/2  50% 0.5 images/s ETA 00:02",
        f"[{'#' * 30}] 2/2 100% 0.7 images/s ETA 00:00"]
