"""Two small tools that the load scripts, the benchmarks and the tests share:
a percentile and a bounded wait. One copy of each (they had drifted apart)."""
from __future__ import annotations

import math
import time


def percentile(sorted_values: list[float], pct: float) -> float | None:
    """Nearest-rank percentile of an ascending list: the smallest value with
    at least pct% of the values at or below it. None when the list is empty."""
    if not sorted_values:
        return None
    k = math.ceil(pct / 100 * len(sorted_values)) - 1
    return sorted_values[max(0, min(len(sorted_values) - 1, k))]


def wait_for(pred, timeout: float = 20.0, interval: float = 0.05, what: str = "condition", *,
             errors: tuple[type[BaseException], ...] = ()):
    """Call `pred` until it returns something true, at most `timeout`
    seconds; return that. Exceptions of the types in `errors` (a service not
    answering yet) count as not yet. Raises AssertionError at the deadline,
    with the last result."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = pred()
        except errors as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
