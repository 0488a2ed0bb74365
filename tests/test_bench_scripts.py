"""The GPU benchmark scripts' CPU smoke paths: they must run before they are given device time."""
from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_fidelity_bench_real_half_packs_one_run_per_policy(tmp_path):
    out = tmp_path / "runs.tgz"
    proc = subprocess.run([sys.executable, "bench/fidelity_bench.py", "real", "--trace", "synthetic", "--num-requests",
                           "3", "--model", "tiny", "--device", "cpu", "--split-step", "8", "--policies", "single", "pd",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    with tarfile.open(out) as tar:
        names = tar.getnames()
        status = json.load(tar.extractfile("fidelity_runs/status.json"))["status"]
    assert status == {"single": "ok", "pd": "ok"}
    for policy in ("single", "pd"):
        assert f"fidelity_runs/{policy}/requests.csv" in names and f"fidelity_runs/{policy}/run.json" in names


AZURE = ROOT.parent / "shared/traces/AzureLLMInferenceTrace_conv.csv"
FIDELITY_RUNS = ROOT / "bench/results/fidelity_runs_NVIDIA_H200.tgz"


@pytest.mark.skipif(not AZURE.exists() or not FIDELITY_RUNS.exists(), reason="needs ../shared/traces and the real runs")
def test_fidelity_diagnosis_of_the_committed_real_runs(tmp_path):
    """The diagnosis runs end to end; the engine overhead it reads off the real runs closes most of the
    TPOT error (in-sample by construction: a check of the sim's mechanism, not of its fidelity)."""
    out = tmp_path / "diag.json"
    proc = subprocess.run([sys.executable, "bench/fidelity_diagnose.py", str(FIDELITY_RUNS), "--trace", str(AZURE),
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    diag = json.loads(out.read_text())
    for policy in ("pd", "adaptive"):
        what_if = diag[policy]["what_if"]
        before = what_if["isolated profile (as committed)"]["tpot_mean_ms"]
        after = what_if["+ decode and prefill overhead by the other GPU's state"]["tpot_mean_ms"]
        assert before < -0.5 and abs(after) < 0.5 * abs(before), (policy, before, after)
        assert {r["op"] for r in diag[policy]["engine_rows"]} >= {"engine_decode", "engine_decode_busy"}
