"""bench/real_spread.py: machine-to-machine spread of real runs and the leave-one-out error floor."""
from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import real_spread as rs  # noqa: E402

KEYS = ("ttft_mean_ms", "tpot_mean_ms", "ttft_p99_ms", "tpot_p99_ms", "output_tok_s")


def _archive(path: Path, runs: dict[str, float]) -> Path:
    """An archive of run folders whose summary.json has every metric equal to the given value."""
    with tarfile.open(path, "w:xz") as tar:
        for folder, value in runs.items():
            data = json.dumps({k: value for k in KEYS}).encode()
            info = tarfile.TarInfo(f"fidelity_runs/{folder}/summary.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_leave_one_out_is_the_other_machines_mean_against_this_one():
    got = rs.leave_one_out({"a": 10.0, "b": 12.0, "c": 14.0})
    assert got == pytest.approx({"a": (13 - 10) / 10, "b": 0.0, "c": (11 - 14) / 14})


def test_rounds_of_one_machine_are_averaged_and_sim_errors_set_beside(tmp_path, capsys):
    a = _archive(tmp_path / "a.tar.xz", {"pd": 10.0, "single": 1.0})
    a2 = _archive(tmp_path / "a2.tar.xz", {"pd_r2": 12.0, "single_r2": 1.0})  # round 2 of machine a: pd mean 11
    b = _archive(tmp_path / "b.tar.xz", {"pd": 11.0, "single": 1.0})
    c = _archive(tmp_path / "c.tar.xz", {"pd": 14.0})  # single not run there: two machines, no cell
    sim = tmp_path / "sim.json"
    sim.write_text(json.dumps({"rel_err": {"conv_a": {"fixed:x": {"pd": {"tpot_mean_ms": 0.05}}}}}))
    out = tmp_path / "out.json"
    assert rs.main([f"conv_a={a},{a2}", f"conv_b={b}", f"conv_c={c}", "--sim-errors", str(sim), "--out", str(out)]) == 0
    got = json.loads(out.read_text())
    cell = got["spread"]["conv"]["pd"]["tpot_mean_ms"]
    assert cell["values"] == {"conv_a": 11.0, "conv_b": 11.0, "conv_c": 14.0}
    assert cell["loo_rel_err"]["conv_c"] == pytest.approx((11 - 14) / 14, abs=1e-5)
    assert cell["loo_within_goal"] == pytest.approx(0.0)  # 12.5 / 11 and 11 / 14 are all off by more than 3%
    assert cell["sim_rel_err"] == {"conv_a": 0.05} and cell["sim_within_goal"] == 0.0
    assert "single" not in got["spread"]["conv"]
    assert got["run_sets"]["conv_a"] == [str(a), str(a2)] and "leave one out" in got["note"]
    assert "conv      pd" in capsys.readouterr().out


def test_bad_arguments_exit_with_a_message(tmp_path, capsys):
    assert rs.main([f"conv_a={tmp_path / 'missing.tar.xz'}", "--out", str(tmp_path / "o.json")]) == 2
    assert "no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        rs.main(["conv_a", "--out", str(tmp_path / "o.json")])
