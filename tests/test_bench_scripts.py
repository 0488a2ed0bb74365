"""The GPU benchmark scripts' CPU smoke paths: they must run before they are given device time."""
from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

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
