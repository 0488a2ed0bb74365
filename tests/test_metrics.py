"""analysis.metrics and analysis.goodput on small hand-made traces with known answers."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, strategies as st

from analysis import (GoodputResult, Slo, compare_table, find_goodput, format_summary, request_latencies,
                      slo_attainment, summarize)
from analysis.metrics import interval_union_s
from traces.schema import DECISIONS, REQUESTS, STEPS, read_table, write_table


def req(rid, arrival, first, finish, generated, status="finished", prompt=10, preemptions=0):
    """One requests.csv row in schema column order."""
    return (rid, arrival, prompt, max(generated, 1), generated, arrival if first else None, first, None, None,
            first, finish, "gpu0" if first else None, "gpu1" if first else None, "pd", preemptions, status,
            None if status == "finished" else "test")


def step(t0, t1, device, stage, kv_bytes=0):
    return (t0, t1, device, stage, 1, 1, 0, 0, 0, -1, "pd", 1, t1 - t0, kv_bytes)


def decision(t, kind):
    return (t, "rebalancer", kind, "a", "b", "test")


# ttft / tpot / e2e (s):  r0 .1/.1/1.1  r1 .2/.1/.6  r2 .5/-/.5 (1 token)  r3 .05/.2/.45
# r4 failed after 2 tokens, r5 rejected; prompts 10..60; 3 preemptions; first arrival 0, last finish 5.
REQUEST_ROWS = [
    req(0, 0.0, 0.1, 1.1, 11, prompt=10),
    req(1, 1.0, 1.2, 1.6, 5, prompt=20, preemptions=2),
    req(2, 2.0, 2.5, 2.5, 1, prompt=30),
    req(3, 3.0, 3.05, 3.45, 3, prompt=40),
    req(4, 4.0, 4.1, 4.5, 2, status="failed", prompt=50, preemptions=1),
    req(5, 5.0, None, 5.0, 0, status="rejected", prompt=60),
]
STEP_ROWS = [
    step(0.0, 2.0, "gpu1", "attn"), step(1.0, 3.0, "gpu1", "ffn"),  # overlap: 3 s busy, not 4
    step(0.0, 1.0, "gpu0", "prefill"), step(2.0, 2.5, "gpu0", "decode", kv_bytes=7 * 10**8),  # not a transfer
    step(1.0, 1.5, "link", "transfer", kv_bytes=10**9), step(1.2, 1.4, "link", "transfer", kv_bytes=5 * 10**8),
]
DECISION_ROWS = [decision(0.1, "mode"), decision(0.2, "split"), decision(0.3, "split"),
                 decision(0.4, "throttle"), decision(0.5, "preempt"), decision(0.6, "hold")]


@pytest.fixture
def requests(tmp_path) -> pd.DataFrame:
    return read_table(write_table(tmp_path / "requests.csv", REQUESTS, REQUEST_ROWS), REQUESTS)


@pytest.fixture
def steps(tmp_path) -> pd.DataFrame:
    return read_table(write_table(tmp_path / "steps.csv", STEPS, STEP_ROWS), STEPS)


@pytest.fixture
def decisions(tmp_path) -> pd.DataFrame:
    return read_table(write_table(tmp_path / "decisions.csv", DECISIONS, DECISION_ROWS), DECISIONS)


def test_request_latencies(requests):
    lat = request_latencies(requests)
    assert len(lat) == len(requests) and "ttft_s" not in requests  # a copy, the input is untouched
    np.testing.assert_allclose(lat["ttft_s"], [0.1, 0.2, 0.5, 0.05, np.nan, np.nan], atol=1e-12)
    np.testing.assert_allclose(lat["tpot_s"], [0.1, 0.1, np.nan, 0.2, np.nan, np.nan], atol=1e-12)
    np.testing.assert_allclose(lat["e2e_s"], [1.1, 0.6, 0.5, 0.45, np.nan, np.nan], atol=1e-12)


def test_request_latencies_on_plain_frame():
    plain = pd.DataFrame({"arrival_s": [0.0, 1.0], "first_token_s": [0.5, np.nan], "finish_s": [2.5, 1.0],
                          "generated_tokens": [5, 0], "status": ["finished", "rejected"]})
    lat = request_latencies(plain)
    np.testing.assert_allclose(lat[["ttft_s", "tpot_s", "e2e_s"]].to_numpy(),
                               [[0.5, 0.5, 2.5], [np.nan, np.nan, np.nan]])


def test_slo_attainment_counts_failed_and_rejected_as_misses(requests):
    # r0, r1 meet both; r2 misses TTFT; r3 misses TPOT; r4 failed; r5 rejected.
    assert slo_attainment(requests, Slo(ttft_s=0.3, tpot_s=0.15)) == pytest.approx(2 / 6)
    # r0 and r1 sit exactly on the TPOT target; r2 has one token, so only its TTFT (= target) counts.
    assert slo_attainment(requests, Slo(ttft_s=0.5, tpot_s=0.1)) == pytest.approx(3 / 6)
    assert slo_attainment(requests, Slo(ttft_s=10.0, tpot_s=10.0)) == pytest.approx(4 / 6)
    assert slo_attainment(requests, Slo(ttft_s=0.01, tpot_s=10.0)) == 0.0


def test_one_token_request_needs_only_ttft(requests):
    one = requests[requests["request_id"] == 2]
    assert slo_attainment(one, Slo(ttft_s=0.5, tpot_s=1e-6)) == 1.0
    assert slo_attainment(one, Slo(ttft_s=0.4, tpot_s=10.0)) == 0.0


def test_summarize_requests(requests):
    s = summarize(requests, Slo(ttft_s=0.3, tpot_s=0.15))
    assert (s["requests"], s["finished"], s["failed"], s["rejected"], s["preemptions"]) == (6, 4, 1, 1, 3)
    expected = {
        "duration_s": 5.0, "throughput_rps": 4 / 5, "output_tok_s": 22 / 5, "input_tok_s": 150 / 5,
        "ttft_p50_ms": 150.0, "ttft_p99_ms": 491.0, "ttft_mean_ms": 212.5,
        "tpot_p50_ms": 100.0, "tpot_p99_ms": 198.0, "tpot_mean_ms": 400 / 3,
        "e2e_p50_s": 0.55, "e2e_p99_s": 0.6 + 0.97 * 0.5,
        "slo_attainment": 2 / 6, "slo_ttft_ms": 300.0, "slo_tpot_ms": 150.0,
    }
    for key, value in expected.items():
        assert s[key] == pytest.approx(value, rel=1e-9), key
    assert not any(k in s for k in ("gpu0_busy_pct", "transfer_gb", "mode_changes"))


def test_summarize_explicit_duration(requests):
    s = summarize(requests, Slo(0.3, 0.15), duration_s=10.0)
    assert s["duration_s"] == 10.0 and s["throughput_rps"] == pytest.approx(0.4)


def test_summarize_steps_union_and_transfer(requests, steps):
    s = summarize(requests, Slo(0.3, 0.15), steps=steps)  # duration 5 s
    assert s["gpu1_busy_pct"] == pytest.approx(100 * 3 / 5)  # [0,2] U [1,3] = 3 s
    assert s["gpu0_busy_pct"] == pytest.approx(100 * 1.5 / 5)
    assert s["link_busy_pct"] == pytest.approx(100 * 0.5 / 5)  # [1.2,1.4] inside [1,1.5]
    assert s["transfer_gb"] == pytest.approx(1.5)


def test_summarize_decisions(requests, decisions):
    s = summarize(requests, Slo(0.3, 0.15), decisions=decisions)
    assert (s["mode_changes"], s["split_changes"], s["throttle_events"], s["preempt_decisions"]) == (1, 2, 1, 1)


def test_summarize_nothing_finished(tmp_path):
    rows = [req(0, 0.0, None, 0.5, 0, status="rejected"), req(1, 1.0, 1.2, 2.0, 2, status="failed")]
    reqs = read_table(write_table(tmp_path / "r.csv", REQUESTS, rows), REQUESTS)
    s = summarize(reqs, Slo(0.3, 0.1))
    assert s["finished"] == 0 and s["slo_attainment"] == 0.0 and s["throughput_rps"] == 0.0
    for key in ("ttft_p50_ms", "ttft_p99_ms", "ttft_mean_ms", "tpot_p50_ms", "tpot_mean_ms", "e2e_p99_s"):
        assert math.isnan(s[key]), key
    assert "-" in format_summary(s)


def test_summarize_empty_run(tmp_path):
    reqs = read_table(write_table(tmp_path / "r.csv", REQUESTS, []), REQUESTS)
    stps = read_table(write_table(tmp_path / "s.csv", STEPS, []), STEPS)
    s = summarize(reqs, Slo(0.3, 0.1), steps=stps)
    assert s["requests"] == 0 and math.isnan(s["slo_attainment"]) and math.isnan(s["duration_s"])
    assert math.isnan(s["gpu0_busy_pct"]) and s["transfer_gb"] == 0.0


def test_interval_union_cases():
    assert interval_union_s(np.array([]), np.array([])) == 0.0
    assert interval_union_s(np.array([1.0, 0.0]), np.array([3.0, 2.0])) == pytest.approx(3.0)  # unsorted overlap
    assert interval_union_s(np.array([0.0, 1.0, 5.0]), np.array([10.0, 2.0, 6.0])) == pytest.approx(10.0)  # nested
    assert interval_union_s(np.array([0.0, 1.0, 3.0]), np.array([1.0, 2.0, 4.0])) == pytest.approx(3.0)  # touching + gap


@given(st.lists(st.tuples(st.integers(0, 50), st.integers(0, 10)), max_size=30))
def test_interval_union_matches_unit_grid(intervals):
    # Integer endpoints: the union length equals the number of covered unit cells.
    covered = {cell for start, length in intervals for cell in range(start, start + length)}
    starts = np.array([float(s) for s, _ in intervals])
    ends = np.array([float(s + n) for s, n in intervals])
    assert interval_union_s(starts, ends) == pytest.approx(len(covered))


def test_format_summary(requests, steps, decisions):
    text = format_summary(summarize(requests, Slo(0.3, 0.15), steps=steps, decisions=decisions), title="pd @ 2 rps")
    assert text.splitlines()[0] == "== pd @ 2 rps =="
    for piece in ("load", "latency", "SLO", "GPUs", "policy", "TTFT p99 (ms)", "491.0", "33.3%", "GPU1 busy (%)"):
        assert piece in text, piece
    assert "other" not in text
    assert "my_extra" in format_summary({"requests": 3, "my_extra": 1.5})


def test_compare_table(requests, steps):
    slo = Slo(0.3, 0.15)
    table = compare_table({"a": summarize(requests, slo), "b": summarize(requests, slo, steps=steps)})
    assert list(table.index) == ["a", "b"] and table.index.name == "run"
    assert table.loc["b", "gpu1_busy_pct"] == pytest.approx(60.0) and math.isnan(table.loc["a", "gpu1_busy_pct"])
    assert list(table.columns[:2]) == ["requests", "finished"]
    picked = compare_table({"a": {"x": 1}, "b": {"y": 2}}, keys=["y", "x"])
    assert list(picked.columns) == ["y", "x"] and picked.loc["b", "y"] == 2 and math.isnan(picked.loc["b", "x"])


def test_goodput_step_function():
    result = find_goodput(lambda r: 1.0 if r <= 3.7 else 0.0, lo=1.0, hi=2.0)
    assert isinstance(result, GoodputResult)
    assert 3.7 / 1.02 <= result.rate_scale <= 3.7 and result.attainment == 1.0
    assert (4.0, 0.0) in result.evaluations  # hi grew 2 -> 4 before bisecting
    rates = [r for r, _ in result.evaluations]
    assert len(rates) == len(set(rates))  # no rate evaluated twice


def test_goodput_target_is_inclusive():
    result = find_goodput(lambda r: 0.9 if r <= 3.7 else 0.89, lo=1.0, hi=2.0)
    assert 3.7 / 1.02 <= result.rate_scale <= 3.7 and result.attainment == 0.9


def test_goodput_never_met():
    calls = []
    result = find_goodput(lambda r: calls.append(r) or 0.5, lo=1.0, hi=2.0)
    assert result.rate_scale == 0.0 and result.attainment == 0.5
    assert calls == [1.0, 0.5, 0.25, 0.125, 0.0625]  # lo halved a few times, then gives up


def test_goodput_nan_counts_as_miss():
    assert find_goodput(lambda r: math.nan, lo=1.0, hi=2.0).rate_scale == 0.0


def test_goodput_low_edge_found_by_shrinking_lo():
    result = find_goodput(lambda r: 0.95 if r <= 0.3 else 0.2, lo=1.0, hi=2.0)
    assert 0.3 / 1.02 <= result.rate_scale <= 0.3 and result.attainment == 0.95


def test_goodput_always_met_stops_at_growth_limit():
    result = find_goodput(lambda r: 1.0, lo=1.0, hi=2.0, max_doublings=3)
    assert result.rate_scale == 16.0  # 2 doubled 3 times; a lower bound on goodput


def test_goodput_not_monotone_returns_highest_measured_meeting_rate():
    def attainment(r):
        return 1.0 if r <= 1.0 or 7.5 <= r <= 8.5 else 0.0

    result = find_goodput(attainment, lo=1.0, hi=8.0)  # hi lands in the second window
    assert result.rate_scale == max(r for r, a in result.evaluations if a >= 0.9)
    assert attainment(result.rate_scale) == 1.0 and result.rate_scale >= 8.0


def test_goodput_rejects_bad_bracket():
    with pytest.raises(ValueError):
        find_goodput(lambda r: 1.0, lo=2.0, hi=1.0)
