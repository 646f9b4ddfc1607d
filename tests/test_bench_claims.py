"""benchmarks/methods_claims.py: the paired-seed decision rule of the methods benchmark (issue 15), checked
against intervals computed independently with scipy.stats."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

stats = pytest.importorskip("scipy.stats")

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def claims():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("bench_method_claims", BENCH / "methods_claims.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(BENCH))
    return mod


def scipy_interval(values, comparison):
    d = [a - b for a, b in zip(values, comparison)]
    n = len(d)
    mean = sum(d) / n
    return stats.t.interval(0.95, n - 1, loc=mean, scale=stats.sem(d))


def test_t_quantile_matches_scipy(claims):
    for df in (1, 2, 3, 4, 9, 30, 200):
        assert claims.t_quantile(0.975, df) == pytest.approx(stats.t.ppf(0.975, df), rel=1e-9)
    assert claims.t_quantile(0.9, 5) == pytest.approx(stats.t.ppf(0.9, 5), rel=1e-9)


def test_held_failed_and_inconclusive_with_scipys_interval(claims):
    method, base = [0.80, 0.82, 0.81, 0.83], [0.70, 0.71, 0.72, 0.70]
    low, high = scipy_interval(method, base)
    assert low > 0  # the inputs are what they claim to be
    res = claims.paired_claim(method, base)
    assert res["status"] == "held" and res["n"] == 4
    assert res["low"] == pytest.approx(low, abs=1e-12) and res["high"] == pytest.approx(high, abs=1e-12)
    assert claims.paired_claim(base, method)["status"] == "failed"           # entirely against "above"
    assert claims.paired_claim(base, method, direction="below")["status"] == "held"
    assert claims.paired_claim(method, base, direction="below")["status"] == "failed"
    noisy, ref = [0.75, 0.70, 0.74], [0.70, 0.74, 0.72]
    low, high = scipy_interval(noisy, ref)
    assert low < 0 < high
    assert claims.paired_claim(noisy, ref)["status"] == "inconclusive"
    assert claims.paired_claim(noisy, ref, direction="below")["status"] == "inconclusive"


def test_the_boundary_is_the_t_interval_not_two_standard_errors(claims):
    # differences m - 1, m, m + 1: sd 1, standard error 1 / sqrt(3); the interval excludes 0 iff m > t * se
    edge = stats.t.ppf(0.975, 2) / math.sqrt(3)  # about 2.48, well beyond 2 standard errors (1.15)
    cases = ((edge * (1 + 1e-6), "held"), (edge * (1 - 1e-6), "inconclusive"), (2.5 / math.sqrt(3), "inconclusive"),
             (-edge * (1 + 1e-6), "failed"))
    for m, want in cases:
        assert claims.paired_claim([m - 1, m, m + 1], [0.0, 0.0, 0.0])["status"] == want, m


def test_fewer_than_three_seeds_decide_nothing(claims):
    res = claims.paired_claim([0.9, 0.91], [0.1, 0.1])
    assert res["status"] == "insufficient seeds" and res["n"] == 2 and res["low"] is None
    assert claims.paired_claim([], [])["status"] == "insufficient seeds"


def test_seeds_are_paired_by_name(claims):
    method = {0: 0.80, 1: 0.82, 2: 0.81, 7: 0.10}          # seed 7 has no comparison: left out
    base = {2: 0.72, 1: 0.71, 0: 0.70, 5: 0.99}            # seed 5 has no method value: left out
    res = claims.paired_claim(method, base)
    low, high = scipy_interval([0.80, 0.82, 0.81], [0.70, 0.71, 0.72])
    assert res["seeds"] == [0, 1, 2] and res["status"] == "held"
    assert res["low"] == pytest.approx(low, abs=1e-12) and res["high"] == pytest.approx(high, abs=1e-12)
    assert claims.paired_claim({0: 0.8, 1: 0.8, 9: 0.8}, {0: 0.7, 1: 0.7})["status"] == "insufficient seeds"


def test_bad_inputs_are_refused(claims):
    with pytest.raises(ValueError, match="pair them by seed"):
        claims.paired_claim([0.1, 0.2, 0.3], [0.1, 0.2])
    with pytest.raises(ValueError, match="direction"):
        claims.paired_claim([0.1] * 3, [0.0] * 3, direction="up")
