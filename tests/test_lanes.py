"""The two test lanes: `pytest -m "not slow"` (quick) and plain `pytest` (complete).

Between them they must collect every test: what the quick lane leaves out is what
is marked slow, and nothing else.
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


def whole_suite(config: pytest.Config) -> bool:
    """Whether this session is the complete lane: plain `pytest`, nothing filtered."""
    return (not config.option.keyword and not config.option.markexpr
            and [Path(arg).resolve() for arg in config.args] == [REPO / "tests"])


@pytest.mark.slow
def test_the_lanes_together_collect_every_test(request: pytest.FixtureRequest) -> None:
    # In the complete lane this session's own items are everything (one collection
    # saved); run alone, the test collects everything itself.
    if whole_suite(request.config):
        everything = {item.nodeid for item in request.session.items}
        slow = {item.nodeid for item in request.session.items
                if item.get_closest_marker("slow")}
    else:
        everything, slow = collected(), collected("-m", "slow")
    quick = collected("-m", "not slow")
    assert quick and slow
    assert not quick & slow
    assert quick | slow == everything
