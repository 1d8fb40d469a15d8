"""Numeric assertions shared by the tests, and pictures of HTML pages to make them on."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np


def assert_close(actual: Any, expected: Any, rtol: float, what: str) -> None:
    """max |actual - expected| over max |expected| must be within ``rtol``."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = max(float(np.abs(expected).max()), 1e-12)
    error = float(np.abs(actual - expected).max()) / scale
    assert error <= rtol, f"{what}: relative error {error:.2e} > {rtol:.0e}"


def chromium() -> str | None:
    """The headless browser reports are rendered in, or None where there is none."""
    return shutil.which("chromium") or shutil.which("chromium-browser") \
        or shutil.which("google-chrome")


def screenshot(page: Path, picture: Path, width: int, height: int) -> np.ndarray:
    """``page`` rendered by headless Chromium at ``width`` x ``height`` into ``picture``
    (PNG), as uint8 RGB [height, width, 3]."""
    from PIL import Image

    subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu",
                    "--disable-background-networking", f"--screenshot={picture}",
                    # its own profile: two test processes may render at once
                    f"--user-data-dir={picture.parent / (picture.stem + '-chromium')}",
                    f"--window-size={width},{height}", page.as_uri()],
                   check=True, capture_output=True, timeout=120)
    return np.asarray(Image.open(picture).convert("RGB"))
