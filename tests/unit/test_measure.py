"""stratus.measure: the one percentile and the one bounded wait."""
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stratus.measure import percentile, wait_for


@given(st.lists(st.floats(allow_nan=False, allow_infinity=False), min_size=1, max_size=200),
       st.floats(min_value=0, max_value=100))
def test_percentile_is_the_nearest_rank(values, pct):
    values.sort()
    v = percentile(values, pct)
    at_or_below = sum(1 for x in values if x <= v)
    assert v in values
    assert at_or_below / len(values) * 100 >= pct - 1e-9          # at least pct% at or below it
    smaller = [x for x in values if x < v]
    assert len(smaller) / len(values) * 100 < max(pct, 1e-9) or not smaller   # and it is the smallest such


def test_percentile_of_nothing_and_the_usual_ranks():
    assert percentile([], 50) is None
    xs = list(range(1, 101))
    assert (percentile(xs, 50), percentile(xs, 99), percentile(xs, 100), percentile(xs, 0)) == (50, 99, 100, 1)


def test_wait_for_returns_the_first_true_value_and_is_bounded():
    calls = iter([0, None, "", "yes"])
    assert wait_for(lambda: next(calls), 2, interval=0.001) == "yes"
    t0 = time.monotonic()
    with pytest.raises(AssertionError, match="timed out after 0.2s waiting for nothing"):
        wait_for(lambda: False, 0.2, interval=0.01, what="nothing")
    assert time.monotonic() - t0 < 1.0


def test_wait_for_treats_the_named_errors_as_not_yet_and_others_as_errors():
    calls = iter([OSError("not yet"), OSError("not yet"), 7])

    def pred():
        v = next(calls)
        if isinstance(v, Exception):
            raise v
        return v
    assert wait_for(pred, 2, interval=0.001, errors=(OSError,)) == 7
    with pytest.raises(ValueError):
        wait_for(lambda: int("x"), 1, errors=(OSError,))
