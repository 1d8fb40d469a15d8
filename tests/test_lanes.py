"""The two test lanes: `pytest -m "not slow"` (quick) and plain `pytest` (complete).

Between them they must collect every test: the quick lane and the slow tests
together are the complete lane, test for test.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def collected(*marker: str) -> set[str]:
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
         *marker], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode in (0, 5), done.stdout[-2000:] + done.stderr[-2000:]
    return {line for line in done.stdout.splitlines() if "::" in line}


@pytest.mark.slow
def test_the_lanes_together_collect_every_test() -> None:
    everything = collected()
    quick, slow = collected("-m", "not slow"), collected("-m", "slow")
    assert quick and slow
    assert not quick & slow
    assert quick | slow == everything
