"""moec.timing: the benchmarks' timer runs each function as asked and reports failures."""

import pytest

from moec.timing import median_time, median_times


@pytest.mark.parametrize("round_robin", [False, True])
def test_median_times_order_and_failures(round_robin):
    calls = []

    def broken():
        raise ValueError("no export")

    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b"), "x": broken}
    out = median_times(fns, reps=3, round_robin=round_robin)
    timed = calls[4:]  # after two warm-up calls each of a and b
    assert timed == (["a", "b"] * 3 if round_robin else ["a"] * 3 + ["b"] * 3)
    assert isinstance(out["x"], ValueError) and out["a"] >= 0 and out["b"] >= 0
    assert median_time(lambda: calls.append("c"), 5) >= 0 and calls.count("c") == 7
