"""The claim's report: paired intervals, verdicts and health flags in the cells."""

from __future__ import annotations

import pytest

from benchmarks.claim_report import Run, health, interval, verdict


def _run(seed: int, paper: float, r2: float | None = 0.9, dep: float | None = 0.8) -> Run:
    return Run(seed, paper, paper, paper, r2, dep, 0.02, None, 50)


def test_a_t_interval_with_n_minus_1_degrees_of_freedom():
    mean, low, high = interval([1.0, 2.0, 3.0])
    assert mean == 2.0
    assert (high - mean) == pytest.approx(4.303 * 1.0 / 3**0.5, rel=1e-3)  # t(0.975, 2) = 4.303
    assert interval([1.0]) is None


def test_verdicts():
    assert verdict(None, 14.9, 1).startswith("undecided")
    assert verdict((5.0, 1.0, 9.0), 14.9, 5).startswith("reproduced in direction")
    assert verdict((-2.0, -4.0, 0.5), 14.9, 5).startswith("not reproduced")  # published lead above the interval
    assert verdict((2.0, -4.0, 20.0), 14.9, 5).startswith("undecided")
    # both methods at the majority class in every seed: a zero-width interval is no verdict
    assert verdict((0.0, 0.0, 0.0), 1.36, 2, at_majority=True).startswith("undecided: both methods score the majority")
    assert verdict((0.0, 0.0, 0.0), 1.36, 2).startswith("not reproduced")


def test_health_flags_name_broken_reconstruction_and_the_majority_class():
    flags = health([_run(1, 43.5, r2=-0.7, dep=0.01), _run(2, 50.0)], majority=43.5)
    assert "R² -0.70 **broken**" in flags and "dep 0.01 **none**" in flags
    assert "**at majority class** in 1/2" in flags
    assert health([_run(1, 50.0, r2=None, dep=None)], majority=43.5) == "BN gap +2.0"
