"""Numeric assertions shared by the tests."""

from __future__ import annotations

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
