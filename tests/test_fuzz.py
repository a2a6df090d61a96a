"""The reply path and the worker as a hostile peer sees them (issue 25), fuzzed with
hypothesis: generated and mutated replies and frames (tests/fuzz_harness.py). The one
allowed outcome for bad input is a failed site or a refused frame with a reason.

A few hundred cases per target, derandomised (the same cases on every run, so CI is
reproducible); benchmarks/fuzz_replies.py runs the same targets for 100,000+ cases."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import fuzz_harness as fh

FAST = dict(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    """One real round of every scenario (method and settings), trained once for the module."""
    return {name: fh.seed_round(name, tmp_path_factory.mktemp(name)) for name in fh.SCENARIOS}


def test_unpack_refuses_with_packing_error_only(seeds):
    outcomes = []

    @settings(max_examples=300, **FAST)
    @given(st.data())
    def case(data):
        outcomes.append(fh.unpack_case(data, seeds[data.draw(st.sampled_from(sorted(seeds)))]))

    case()
    assert {"read", "refused"} <= set(outcomes)


@pytest.mark.parametrize("scenario", sorted(fh.SCENARIOS))
def test_a_hostile_reply_is_a_failed_site_for_every_method(seeds, scenario):
    outcomes = []

    @settings(max_examples=25, **FAST)
    @given(st.data())
    def case(data):
        outcomes.append(fh.strategy_case(data, seeds[scenario]))

    case()
    assert "failed site" in outcomes


def test_the_worker_refuses_hostile_frames():
    outcomes = []

    @settings(max_examples=300, **FAST)
    @given(st.data())
    def case(data):
        outcomes.append(fh.frame_case(data))

    case()
    assert {"read", "refused"} <= set(outcomes)


def test_serve_one_survives_hostile_clients(monkeypatch):
    from client_app import worker

    monkeypatch.setattr(worker, "RECEIVE_TIMEOUT", 0.2)  # a client that sends too little is dropped quickly
    outcomes = []

    @settings(max_examples=150, **FAST)
    @given(st.data())
    def case(data):
        outcomes.append(fh.serve_case(data))

    case()
    assert {"served", "refused", "dropped"} <= set(outcomes)


def test_the_round_loop_goes_on_whatever_one_site_sends(tmp_path_factory):
    cfg, canned = fh.canned_replies(tmp_path_factory.mktemp("canned"))
    outcomes = []

    @settings(max_examples=10, **FAST)  # each case is a whole run: a few seconds
    @given(st.data())
    def case(data):
        outcomes.append(fh.round_loop_case(data, cfg, canned))

    case()
    assert "failed site" in outcomes
