"""`python -m sim.run` as a user meets it: flags, the run folder, error messages, seeds, --config."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from traces.run_folder import FILES, load_run

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--num-requests", "100", "--quiet"]


def sim_run(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-m", "sim.run", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


def assert_one_line_error(result: subprocess.CompletedProcess, *words: str) -> str:
    """Exit 2, exactly one stderr line starting with 'error:', no traceback; returns the line."""
    assert result.returncode == 2, f"exit {result.returncode}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for w in words:
        assert w in lines[0], f"{w!r} not in {lines[0]!r}"
    return lines[0]


def azure_csv(path: Path, rows: int = 40, bad_row: int | None = None) -> Path:
    """An Azure-format trace; data row `bad_row` (1-based, i.e. CSV line bad_row + 1) has a negative prompt."""
    lines = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    for i in range(rows):
        prompt = -5 if bad_row is not None and i + 1 == bad_row else 200 + 37 * i
        lines.append(f"2023-11-16 18:15:{i // 4:02d}.{(i % 4) * 25:02d}00000,{prompt},{20 + i}")
    path.write_text("\n".join(lines) + "\n")
    return path


def read(path: Path) -> str:
    return path.read_text()


# ---------------------------------------------------------------------------------------------

def test_help_names_every_flag(tmp_path):
    result = sim_run(tmp_path, "--help")
    assert_ok(result)
    for flag in ("--workload", "--rate-scale", "--num-requests", "--hardware", "--model", "--config", "--out",
                 "--seed", "--slo-ttft-ms", "--slo-tpot-ms", "--policy", "--fault", "--skip-bad-rows"):
        assert flag in result.stdout, flag


def test_a_run_writes_a_complete_run_folder(tmp_path):
    result = sim_run(tmp_path, "--policy", "pd", *SMALL, "--seed", "3", "--hardware", "h200x2",
                     "--model", "qwen3-8b", "--out", "out")
    assert_ok(result)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    run = load_run(out)
    assert len(run.requests) == 100 and (run.requests["status"] == "finished").all()
    assert len(run.steps) > 0
    info = run.info
    for key in ("policy_config", "sim_config", "versions", "git_commit", "hardware", "model", "seed", "workload", "slo"):
        assert key in info, key
    assert info["seed"] == 3 and info["policy"] == "pd"
    assert info["hardware"]["name"] == "h200x2" and info["model"]["name"] == "qwen3-8b"
    assert {"python", "pdlab", "simpy", "numpy", "pandas"} <= set(info["versions"])
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?|unknown", info["git_commit"]), info["git_commit"]
    assert info["policy_config"]["preset"] == "pd" and info["workload"]["requests"] == 100
    assert run.summary["requests"] == 100 and run.summary["policy"] == "pd"


def test_stdout_shows_the_summary_table(tmp_path):
    result = sim_run(tmp_path, "--policy", "single", *SMALL, "--no-write")
    assert_ok(result)
    for label in ("throughput (req/s)", "TTFT p50 (ms)", "TTFT p99 (ms)", "TPOT p50 (ms)", "TPOT p99 (ms)",
                  "attainment", "GPU0 busy (%)", "GPU1 busy (%)"):
        assert label in result.stdout, label
    assert not (tmp_path / "runs").exists(), "--no-write wrote a run folder"


def test_without_out_it_writes_under_runs_in_the_cwd(tmp_path):
    assert_ok(sim_run(tmp_path, "--policy", "pd", *SMALL))
    folders = list((tmp_path / "runs").iterdir())
    assert len(folders) == 1 and re.fullmatch(r"\d{8}-\d{6}-pd(-\d+)?", folders[0].name), folders
    assert sorted(p.name for p in folders[0].iterdir()) == sorted(FILES)
    load_run(folders[0])


# ---- bad inputs: exit 2, one line, no traceback -------------------------------------------------

def test_missing_workload_file(tmp_path):
    assert_one_line_error(sim_run(tmp_path, "--workload", "nope.csv", *SMALL), "nope.csv", "not found")


def test_csv_with_unknown_columns(tmp_path):
    (tmp_path / "odd.csv").write_text("when,input,output\n0,10,5\n1,20,6\n")
    assert_one_line_error(sim_run(tmp_path, "--workload", "odd.csv", *SMALL), "odd.csv", "unknown format")


def test_csv_row_with_a_negative_length_is_named(tmp_path):
    azure_csv(tmp_path / "bad.csv", bad_row=7)  # data row 7 is CSV line 8
    line = assert_one_line_error(sim_run(tmp_path, "--workload", "bad.csv", *SMALL), "bad.csv", "line 8", "-5")
    assert "ContextTokens" in line


def test_skip_bad_rows_runs_the_rest(tmp_path):
    azure_csv(tmp_path / "bad.csv", rows=40, bad_row=7)
    result = sim_run(tmp_path, "--workload", "bad.csv", "--skip-bad-rows", "--quiet", "--out", "out")
    assert_ok(result)
    run = load_run(tmp_path / "out")
    assert len(run.requests) == 39
    assert run.info["workload"]["skipped_rows"] == 1 and run.info["workload"]["format"] == "azure"


def test_unknown_yaml_key_in_config(tmp_path):
    (tmp_path / "cfg.yaml").write_text("scheduler:\n  max_decode_bach: 4\n")
    assert_one_line_error(sim_run(tmp_path, "--config", "cfg.yaml", *SMALL), "max_decode_bach")
    (tmp_path / "cfg2.yaml").write_text("schedular:\n  max_decode_batch: 4\n")
    assert_one_line_error(sim_run(tmp_path, "--config", "cfg2.yaml", *SMALL), "schedular")


def test_missing_config_file(tmp_path):
    assert_one_line_error(sim_run(tmp_path, "--config", "nope.yaml", *SMALL), "nope.yaml")


@pytest.mark.parametrize("spec", ["5:meteor", "soon:link", "5"])
def test_bad_fault_spec(tmp_path, spec):
    result = sim_run(tmp_path, "--fault", spec, *SMALL)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "error:" in result.stderr and "fault" in result.stderr, result.stderr


@pytest.mark.parametrize("args, words", [(["--num-requests", "0"], ["num_requests"]),
                                         (["--rate-scale", "0", "--num-requests", "10"], ["rate"])])
def test_bad_numbers(tmp_path, args, words):
    assert_one_line_error(sim_run(tmp_path, *args, "--quiet"), *words)


def test_out_path_that_is_a_file(tmp_path):
    (tmp_path / "taken").write_text("not a folder\n")
    assert_one_line_error(sim_run(tmp_path, *SMALL, "--out", "taken"), "taken")


# ---- reproducibility and overrides ---------------------------------------------------------------

def test_same_seed_gives_identical_requests_csv(tmp_path):
    for name, seed in (("a", "5"), ("b", "5"), ("c", "6")):
        assert_ok(sim_run(tmp_path, "--policy", "adaptive", *SMALL, "--seed", seed, "--out", name))
    assert read(tmp_path / "a/requests.csv") == read(tmp_path / "b/requests.csv")
    assert read(tmp_path / "a/steps.csv") == read(tmp_path / "b/steps.csv")
    assert read(tmp_path / "a/requests.csv") != read(tmp_path / "c/requests.csv"), "--seed is ignored"


def test_config_override_takes_effect(tmp_path):
    (tmp_path / "cfg.yaml").write_text("scheduler: {max_decode_batch: 4}\n")
    load = ["--policy", "pd", *SMALL, "--rate-scale", "8"]
    assert_ok(sim_run(tmp_path, *load, "--out", "base"))
    assert_ok(sim_run(tmp_path, *load, "--config", "cfg.yaml", "--out", "small"))
    base, small = load_run(tmp_path / "base"), load_run(tmp_path / "small")
    assert small.info["policy_config"]["scheduler"]["max_decode_batch"] == 4
    assert base.info["policy_config"]["scheduler"]["max_decode_batch"] != 4

    def largest_decode_batch(run):
        return int(run.steps.loc[run.steps["stage"].isin(["decode", "attn"]), "batch_size"].max())

    assert largest_decode_batch(base) > 4, "the baseline load never batched more than 4 decodes"
    assert largest_decode_batch(small) <= 4
    assert read(tmp_path / "base/requests.csv") != read(tmp_path / "small/requests.csv")


def test_sweep_writes_table_and_goodput(tmp_path):
    out = tmp_path / "sw"
    proc = subprocess.run([sys.executable, "-m", "sim.sweep", "--policies", "pd", "adaptive", "--rate-scales", "1", "4",
                           "--num-requests", "60", "--goodput", "--jobs", "1", "--out", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    import pandas as pd

    table = pd.read_csv(out / "sweep.csv")
    assert sorted(zip(table["policy"], table["rate_scale"])) == [("adaptive", 1), ("adaptive", 4), ("pd", 1), ("pd", 4)]
    assert (table["finished"] == 60).all()
    goodput = pd.read_csv(out / "goodput.csv")
    assert set(goodput["policy"]) == {"pd", "adaptive"}
    assert (goodput["goodput_rps"] > 0).all() and (goodput["attainment_at_goodput"] >= 0.9).all()
    assert "goodput" in proc.stdout


def test_sweep_rejects_unknown_grid_key(tmp_path):
    grid = tmp_path / "g.yaml"
    grid.write_text("policies: [pd]\nrate_scalez: [1]\n")
    proc = subprocess.run([sys.executable, "-m", "sim.sweep", "--grid", str(grid)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error:") and "rate_scalez" in proc.stderr


def test_engine_note_flags_prefill_rows_timed_as_periods():
    """The committed 2x H100 profile (session 9) timed engine_prefill rows as launch-to-launch periods; against
    the engine of session 21 it read TTFT 17-23% high, and sim.run says so. Profiles timed as step + launch gap
    (metadata engine_rows.prefill_cost) do not get the warning."""
    from sim.run import _engine_note

    root = Path(__file__).resolve().parents[1]
    old = _engine_note(root / "traces/profiles/h100x2-qwen3-0.6b.csv")
    assert "launch-to-launch periods" in old and "re-profile" in old
    assert "launch-to-launch" not in _engine_note(root / "traces/profiles/h200x2-qwen3-0.6b.csv")
