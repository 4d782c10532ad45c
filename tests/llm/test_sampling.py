import numpy as np
import pytest

from llm.sampling import Sampler

LOGITS = np.log(np.array([0.05, 0.5, 0.3, 0.15]))


def test_greedy_takes_the_arg_max():
    """Temperature 0 always returns the most likely token."""
    assert Sampler()(LOGITS) == 1


def test_top_k_and_top_p_cut_the_tail():
    """top_k=2 only ever returns the two likeliest tokens; top_p=0.7 those whose mass reaches 0.7."""
    k = Sampler(temperature=1.0, top_k=2, seed=1)
    assert {k(LOGITS) for _ in range(300)} == {1, 2}
    p = Sampler(temperature=1.0, top_p=0.7, seed=2)
    assert {p(LOGITS) for _ in range(300)} == {1, 2}


def test_sampling_follows_the_distribution_and_the_seed():
    """At temperature 1 frequencies follow softmax(logits); the same seed repeats the same draws."""
    s = Sampler(temperature=1.0, seed=3)
    draws = np.array([s(LOGITS) for _ in range(4000)])
    np.testing.assert_allclose(np.bincount(draws, minlength=4) / 4000, [0.05, 0.5, 0.3, 0.15], atol=0.03)
    a, b = Sampler(temperature=0.8, seed=9), Sampler(temperature=0.8, seed=9)
    assert [a(LOGITS) for _ in range(50)] == [b(LOGITS) for _ in range(50)]


@pytest.mark.parametrize("kwargs, match", [(dict(temperature=-1), "temperature"), (dict(top_k=-2), "top_k"), (dict(top_p=0), "top_p")])
def test_bad_sampling_settings_are_refused(kwargs, match):
    """Invalid settings name the field and the valid range."""
    with pytest.raises(ValueError, match=match):
        Sampler(**kwargs)
