"""analysis.report and analysis.fidelity on small committed sim runs (tests/fixtures/run_*).

The fixtures were written by `python -m sim.run --policy P --num-requests 60 --quiet --out
tests/fixtures/run_P` for P in pd, single, pipeline. A "real" run is a sim run with every request
time scaled by a known factor k, so the expected relative errors are exact: latencies 1/k - 1,
rates k - 1.
"""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis import fidelity as fid
from analysis import report
from analysis.metrics import Slo, summarize
from traces.run_folder import load_run
from traces.schema import REQUESTS, write_table

FIXTURES = Path(__file__).parent / "fixtures"
RUNS = [FIXTURES / f"run_{p}" for p in ("pd", "single", "pipeline")]
TIME_COLUMNS = ("arrival_s", "prefill_start_s", "prefill_end_s", "kv_transfer_start_s", "kv_transfer_end_s",
                "first_token_s", "finish_s")
LATENCY_METRICS = ("ttft_mean_ms", "ttft_p50_ms", "ttft_p99_ms", "tpot_mean_ms", "tpot_p50_ms", "tpot_p99_ms",
                   "e2e_p50_s", "e2e_p99_s")
RATE_METRICS = ("throughput_rps", "output_tok_s")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# scaled copies are written with times rounded to the nanosecond (traces.schema): relative to the fixtures'
# millisecond latencies that moves an error by ~1e-6 at most, far below any bug these tests look for
TOL = 1e-5


def _cell(value):
    """DataFrame value -> write_table cell (None for missing)."""
    return None if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)) else value


def scaled_copy(run_dir: Path, dest: Path, time_factor: float) -> Path:
    """A copy of a run folder with every request time multiplied by time_factor (a fake "real" run)."""
    shutil.copytree(run_dir, dest)
    requests = load_run(run_dir).requests.copy()
    for col in TIME_COLUMNS:
        requests[col] = requests[col] * time_factor
    rows = [tuple(_cell(v) for v in row) for row in requests.astype(object).itertuples(index=False)]
    write_table(dest / REQUESTS.filename, REQUESTS, rows)
    return dest


# ---------------------------------------------------------------- fixtures


@pytest.mark.parametrize("run_dir", RUNS, ids=lambda p: p.name)
def test_fixtures_are_small_and_valid(run_dir):
    size_bytes = sum(f.stat().st_size for f in run_dir.iterdir())
    assert size_bytes < 200_000
    run = load_run(run_dir)
    assert 0 < len(run.steps) < 1000 and len(run.requests) == 60


# ---------------------------------------------------------------- fidelity


@pytest.mark.parametrize("k", [2.0, 0.8, 1.37])
def test_relative_errors_equal_known_factors(tmp_path, k):
    real = scaled_copy(RUNS[0], tmp_path / "real", k)
    result = fid.compare_runs(RUNS[0], real)
    for m in LATENCY_METRICS:
        assert result["rel_err"][m] == pytest.approx(1 / k - 1, abs=TOL), m
    for m in RATE_METRICS:
        assert result["rel_err"][m] == pytest.approx(k - 1, abs=TOL), m
    assert result["rel_err"]["slo_attainment"] == 0.0
    assert result["policy"] == "pd"


def test_identical_runs_have_zero_error():
    result = fid.compare_runs(RUNS[1], RUNS[1])
    assert all(abs(e) < 1e-12 for e in result["rel_err"].values())


def test_slo_attainment_error(tmp_path):
    """TTFT SLO = 2x the sim median: the 2x-slower real run meets only about half; sim reads high."""
    sim_ttft_s = report.request_latencies(load_run(RUNS[0]).requests)["ttft_s"].to_numpy(dtype=float)
    slo = Slo(ttft_s=2 * float(np.nanmedian(sim_ttft_s)), tpot_s=1.0)
    real = scaled_copy(RUNS[0], tmp_path / "real", 2.0)
    result = fid.compare_runs(RUNS[0], real, slo)
    sim_att, real_att = result["sim"]["slo_attainment"], result["real"]["slo_attainment"]
    assert sim_att > real_att > 0
    assert result["rel_err"]["slo_attainment"] == pytest.approx((sim_att - real_att) / real_att, abs=1e-12)


def test_relative_error_edge_cases():
    assert fid.relative_error(1.0, 2.0) == -0.5
    assert math.isnan(fid.relative_error(1.0, 0.0))
    assert math.isnan(fid.relative_error(math.nan, 1.0))


def test_ranking_agrees_when_real_is_uniformly_slower(tmp_path):
    pairs = [(RUNS[0], scaled_copy(RUNS[0], tmp_path / "pd", 2.0)),
             (RUNS[1], scaled_copy(RUNS[1], tmp_path / "single", 2.0))]
    result = fid.fidelity(pairs)
    assert result["policy_ranking_agrees"] == {"output_tok_s": True, "tpot_p99_ms": True}
    assert result["mean_rel_err"]["ttft/pd"] == pytest.approx(-0.5, abs=TOL)
    assert result["p99_rel_err"]["tpot/single"] == pytest.approx(-0.5, abs=TOL)
    assert result["p99_rel_err"]["e2e/pd"] == pytest.approx(-0.5, abs=TOL)


def test_ranking_disagrees_when_real_flips_the_order(tmp_path):
    """Sim: single slightly ahead of pd on tok/s and TPOT p99; a 2x-faster real pd flips both."""
    sim = {p.name: summarize(load_run(p).requests, fid._default_slo()) for p in RUNS[:2]}
    assert sim["run_single"]["output_tok_s"] > sim["run_pd"]["output_tok_s"]
    assert sim["run_single"]["tpot_p99_ms"] < sim["run_pd"]["tpot_p99_ms"]
    pairs = [(RUNS[0], scaled_copy(RUNS[0], tmp_path / "pd", 0.5)), (RUNS[1], RUNS[1])]
    result = fid.fidelity(pairs)
    assert result["policy_ranking_agrees"] == {"output_tok_s": False, "tpot_p99_ms": False}


def test_ranking_tolerates_ties_the_hardware_did_not_decide():
    """Real: a 0.3% apart, b far behind; the sim swaps the near-tie (disagrees only strictly) or b (disagrees)."""
    def pair(name, sim, real):
        return {"policy": name, "sim": {"output_tok_s": sim}, "real": {"output_tok_s": real}}

    near_tie = [pair("pd", 100.0, 100.3), pair("adaptive", 100.1, 100.0), pair("pipeline", 90.0, 95.0)]
    assert fid.ranking_agrees(near_tie, "output_tok_s") is False
    assert fid.ranking_agrees(near_tie, "output_tok_s", tie=0.01) is True
    flipped = near_tie[:2] + [pair("pipeline", 100.2, 95.0)]
    assert fid.ranking_agrees(flipped, "output_tok_s", tie=0.01) is False


def test_replicates_compare_by_their_mean_and_report_their_spread(tmp_path):
    """Two "real" replicates 0.8x and 1.25x the sim's times: latencies are compared with their mean (1.025x),
    their spread is (1.25 - 0.8) / 1.025, and the sim (1x) lies between them."""
    fast, slow = scaled_copy(RUNS[0], tmp_path / "fast", 0.8), scaled_copy(RUNS[0], tmp_path / "slow", 1.25)
    c = fid.compare_replicates(RUNS[0], [fast, slow])
    rep = c["replicates"]
    assert c["policy"] == "pd" and rep["runs"] == 2
    for m in LATENCY_METRICS:
        assert c["real"][m] == pytest.approx(c["sim"][m] * 1.025, rel=TOL), m
        assert c["rel_err"][m] == pytest.approx(1 / 1.025 - 1, abs=TOL), m
        assert rep["real_spread"][m] == pytest.approx(0.45 / 1.025, abs=TOL), m
        assert rep["rel_err_each"][m] == pytest.approx([1 / 0.8 - 1, 1 / 1.25 - 1], abs=TOL), m
        assert rep["sim_within_real_range"][m] is True
    slower = scaled_copy(RUNS[0], tmp_path / "slower", 1.5)  # both replicates slower than the sim: outside
    assert fid.compare_replicates(RUNS[0], [slow, slower])["replicates"]["sim_within_real_range"]["ttft_mean_ms"] is False
    assert "replicates" not in fid.compare_replicates(RUNS[0], [slow])  # one real run: compare_runs' record


def test_fidelity_maps_use_the_replicate_mean_and_add_the_spread(tmp_path):
    fast, slow = scaled_copy(RUNS[0], tmp_path / "fast", 0.8), scaled_copy(RUNS[0], tmp_path / "slow", 1.25)
    result = fid.fidelity([(RUNS[0], [fast, slow]), (RUNS[1], scaled_copy(RUNS[1], tmp_path / "single", 2.0))])
    assert result["mean_rel_err"]["ttft/pd"] == pytest.approx(1 / 1.025 - 1, abs=TOL)
    assert result["mean_rel_err"]["ttft/single"] == pytest.approx(-0.5, abs=TOL)
    assert set(result["real_run_to_run"]) == {f"{k}/pd" for k in ("ttft_mean", "tpot_mean", "ttft_p99", "tpot_p99",
                                                                   "output_tok_s")}
    assert result["real_run_to_run"]["tpot_p99/pd"] == pytest.approx(0.45 / 1.025, abs=TOL)
    assert all(result["sim_within_real_range"].values())


def test_ranking_counts_differences_within_the_replicates_spread_as_ties(tmp_path):
    """pd's real replicates spread 45% (0.8x and 1.25x); a single 1.1x pd's mean, flipped in the sim, is a tie
    the hardware did not decide; the strict order still sees the flip."""
    fast, slow = scaled_copy(RUNS[0], tmp_path / "fast", 0.8), scaled_copy(RUNS[0], tmp_path / "slow", 1.25)
    pd_c = fid.compare_replicates(RUNS[0], [fast, slow])
    single = {"policy": "single", "real": {m: v * 1.1 for m, v in pd_c["real"].items()},
              "sim": {m: v * 0.99 for m, v in pd_c["sim"].items()}}  # real: single slower; sim: single faster
    assert fid.ranking_agrees([pd_c, single], "tpot_p99_ms", fid.RANKING_TIE) is True
    assert fid.ranking_agrees([pd_c, single], "tpot_p99_ms") is False
    pd_one = fid.compare_runs(RUNS[0], fast)  # without replicates: 10% apart is decided
    single["real"] = {m: v * 1.1 for m, v in pd_one["real"].items()}
    single["sim"] = {m: v * 0.99 for m, v in pd_one["sim"].items()}
    assert fid.ranking_agrees([pd_one, single], "tpot_p99_ms", fid.RANKING_TIE) is False


def test_fidelity_cli_takes_replicates_joined_by_commas(tmp_path, capsys):
    fast, slow = scaled_copy(RUNS[0], tmp_path / "fast", 0.8), scaled_copy(RUNS[0], tmp_path / "slow", 1.25)
    out = tmp_path / "f.json"
    assert fid.main([str(RUNS[0]), f"{fast},{slow}", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "the mean of 2 runs" in text and "in range" in text
    got = json.loads(out.read_text())
    assert got["pairs"][0]["replicates"]["runs"] == 2
    assert got["real_run_to_run"]["ttft_mean/pd"] == pytest.approx(0.45 / 1.025, abs=TOL)


def test_single_pair_has_no_ranking():
    assert fid.fidelity([(RUNS[0], RUNS[0])])["policy_ranking_agrees"]["output_tok_s"] is None


def test_fidelity_cli_json(tmp_path, capsys):
    real = scaled_copy(RUNS[2], tmp_path / "real", 2.0)
    out = tmp_path / "f.json"
    assert fid.main([str(RUNS[0]), str(RUNS[0]), str(RUNS[2]), str(real), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "pipeline" in text and "policy ranking by output_tok_s" in text
    data = json.loads(out.read_text())
    assert set(data) >= {"mean_rel_err", "p99_rel_err", "policy_ranking_agrees"}
    assert data["p99_rel_err"]["ttft/pipeline"] == pytest.approx(-0.5, abs=TOL)
    assert data["mean_rel_err"]["tpot/pd"] == pytest.approx(0.0, abs=1e-12)


def test_fidelity_cli_errors(tmp_path, capsys):
    assert fid.main([str(RUNS[0])]) == 2
    assert fid.main([str(RUNS[0]), str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.startswith("error:")


# ---------------------------------------------------------------- report


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    assert report.main([str(p) for p in RUNS] + ["--out", str(out)]) == 0
    return out


def test_report_writes_pngs(report_dir):
    pngs = sorted(report_dir.glob("*.png"))
    assert {p.name for p in pngs} == {"latency_cdf.png", "throughput.png", "queue_depth.png",
                                      "sm_split_mode.png", "timeline.png"}
    for png in pngs:
        data = png.read_bytes()
        assert len(data) > 1000 and data.startswith(PNG_SIGNATURE), png.name


def test_report_md_has_policies_and_summary_numbers(report_dir):
    text = (report_dir / "report.md").read_text()
    slo = Slo(1.0, 0.05)
    for run_dir in RUNS:
        run = load_run(run_dir)
        summary = summarize(run.requests, slo, steps=run.steps, decisions=run.decisions)
        assert f"| {run.info['policy']} |" in text
        assert f"{summary['throughput_rps']:.3f}" in text
        assert f"{summary['tpot_p99_ms']:.2f}" in text
    assert "h100x2" in text and "qwen3-0.6b" in text
    assert "![timeline](timeline.png)" in text


def test_trace_json_has_one_event_per_step(report_dir):
    trace = json.loads((report_dir / "trace.json").read_text())
    events = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    step_rows = [len(load_run(p).steps) for p in RUNS]
    assert len(events) == sum(step_rows)
    assert all(e["dur"] >= 0 and e["ts"] >= 0 for e in events)
    per_pid = pd.Series([e["pid"] for e in events]).value_counts().sort_index().tolist()
    assert per_pid == step_rows
    first = load_run(RUNS[0]).steps.iloc[0]
    assert events[0]["ts"] == pytest.approx(first["t_start_s"] * 1e6)
    assert events[0]["dur"] == pytest.approx((first["t_end_s"] - first["t_start_s"]) * 1e6)


def test_report_default_out_dir(tmp_path):
    run_dir = shutil.copytree(RUNS[1], tmp_path / "run_single")
    assert report.main([str(run_dir)]) == 0
    assert (run_dir / "report" / "report.md").is_file()


def test_report_missing_folder_exits_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "analysis.report", str(tmp_path / "nope")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error:") and len(proc.stderr.strip().splitlines()) == 1


def test_report_invalid_folder_exits_2(tmp_path, capsys):
    bad = shutil.copytree(RUNS[0], tmp_path / "bad")
    (bad / "steps.csv").write_text("t_start_s,t_end_s\n1,0\n")
    assert report.main([str(bad), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.startswith("error:")


def test_throughput_bins_stay_bounded():
    assert report.throughput_bin_s(10.0) == 1.0
    assert 3600.0 / report.throughput_bin_s(3600.0) <= report.MAX_THROUGHPUT_BINS


def test_queue_depth_counts_unfinished():
    requests = pd.DataFrame({"arrival_s": [0.0, 1.0, 2.0], "finish_s": [1.0, 3.0, np.nan]})
    t_s, depth = report.queue_depth(requests)
    assert t_s.tolist() == [0.0, 1.0, 1.0, 2.0, 3.0]
    assert depth.tolist() == [1, 0, 1, 2, 1]


def test_analysis_imports_no_sim_real_or_torch():
    code = ("import sys, analysis.report, analysis.fidelity; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('sim', 'real', 'torch')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
