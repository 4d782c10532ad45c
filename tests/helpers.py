"""Helpers shared by the tests."""

from __future__ import annotations

import numpy as np


def assert_same(actual: np.ndarray, expected: np.ndarray, *, what: str, exact: bool = True) -> None:
    """Compare an emulator result with its NumPy reference, labelling both sides on failure."""
    assert actual.shape == expected.shape, f"{what}: emulator shape {actual.shape} != NumPy shape {expected.shape}"
    assert actual.dtype == expected.dtype, f"{what}: emulator dtype {actual.dtype} != NumPy dtype {expected.dtype}"
    if exact:
        np.testing.assert_array_equal(actual, expected, err_msg=f"{what}: emulator (actual) vs NumPy (desired)")
    else:
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5, err_msg=f"{what}: emulator (actual) vs NumPy (desired)")
