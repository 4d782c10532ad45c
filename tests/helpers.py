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


def reference_greedy(cfg, weights, prompt_ids: list[int], new: int) -> list[int]:
    """The ``new`` tokens the NumPy reference model picks greedily after ``prompt_ids``."""
    from llm.reference import ReferenceModel

    ref = ReferenceModel(cfg, weights, len(prompt_ids) + new)
    for i, t in enumerate(prompt_ids):
        logits = ref.forward(t, i)
    out = []
    for i in range(new):
        out.append(int(np.argmax(logits)))
        logits = ref.forward(out[-1], len(prompt_ids) + i)
    return out
