"""The GPU benchmark scripts' CPU smoke paths: they must run before they are given device time."""
from __future__ import annotations

import json
import math
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
                           "--budget-s", "500", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    with tarfile.open(out) as tar:
        names = tar.getnames()
        status = json.load(tar.extractfile("fidelity_runs/status.json"))["status"]
    assert status == {"single": "ok", "pd": "ok"}
    for policy in ("single", "pd"):
        assert f"fidelity_runs/{policy}/requests.csv" in names and f"fidelity_runs/{policy}/run.json" in names
    report = tmp_path / "fidelity.json"  # the sim half on those runs (analytic: no profile for tiny)
    proc = subprocess.run([sys.executable, "bench/fidelity_bench.py", "sim", str(out), "--model", "tiny",
                           "--hardware", "h100x2", "--seeds", "2", "--out", str(report)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(report.read_text())
    assert set(got["load_elasticity"]) == {"single", "pd"} and set(got["mean_rel_err"]) == {
        "ttft/single", "tpot/single", "ttft/pd", "tpot/pd"}
    assert all(math.isfinite(v) for e in got["load_elasticity"].values() for v in e.values())
    spread = got["seed_spread"]  # the analytic model draws no step times: every seed gives the same errors
    assert spread["seeds"] == 2 and set(spread["mean_rel_err"]) == set(got["mean_rel_err"])
    assert all(v["min"] == v["max"] == got["mean_rel_err"][k] for k, v in spread["mean_rel_err"].items())
    proc = subprocess.run([sys.executable, "bench/fidelity_bench.py", "sim", str(out), "--model", "tiny",  # one policy
                           "--hardware", "h100x2", "--policies", "pd", "--out", str(report)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    only = json.loads(report.read_text())
    assert set(only["mean_rel_err"]) == {"ttft/pd", "tpot/pd"} and set(only["runs"]) == {"pd"}
    assert only["mean_rel_err"] == {k: v for k, v in got["mean_rel_err"].items() if k.endswith("/pd")}
    proc = subprocess.run([sys.executable, "bench/fidelity_bench.py", "sim", str(out), "--model", "tiny",
                           "--hardware", "h100x2", "--policies", "adaptive", "--out", str(tmp_path / "none.json")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "no adaptive runs" in proc.stderr


def test_fidelity_bench_replicates_over_two_calls_are_compared_by_their_mean(tmp_path):
    """Round 1 in one call, round 2 (--first-round 2: folders <policy>_r2) in another, as two device calls on one
    machine would; the sim half takes both archives, simulates each policy once and compares it with the mean
    of its real runs, with their run-to-run spread. The same archive twice is refused."""
    sys.path.insert(0, str(ROOT / "bench"))
    from fidelity_bench import run_order

    assert run_order(["single", "pd"], 2) == [("single", "single"), ("pd", "pd"), ("pd", "pd_r2"),
                                              ("single", "single_r2")]
    assert run_order(["single", "pd"], 1, first_round=2) == [("pd", "pd_r2"), ("single", "single_r2")]
    archives = []
    for first_round in (1, 2):
        out = tmp_path / f"round{first_round}.tgz"
        proc = subprocess.run([sys.executable, "bench/fidelity_bench.py", "real", "--trace", "synthetic",
                               "--num-requests", "3", "--model", "tiny", "--device", "cpu", "--split-step", "8",
                               "--policies", "single", "--first-round", str(first_round), "--out", str(out)],
                              cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
        archives.append(str(out))
    report = tmp_path / "fidelity.json"
    proc = subprocess.run([sys.executable, "bench/fidelity_bench.py", "sim", *archives, "--model", "tiny",
                           "--hardware", "h100x2", "--out", str(report)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(report.read_text())
    (pair,) = got["pairs"]
    rep = pair["replicates"]
    assert rep["runs"] == 2 and set(got["runs"]) == {"single", "single_r2"}
    assert got["real_status"] == {"single": "ok", "single_r2": "ok"}
    for m in ("ttft_mean_ms", "tpot_mean_ms"):
        assert pair["real"][m] == pytest.approx(sum(rep["real_each"][m]) / 2)
        assert got["mean_rel_err"][m.split("_")[0] + "/single"] == pytest.approx(pair["sim"][m] / pair["real"][m] - 1)
    assert set(got["real_run_to_run"]) >= {"ttft_mean/single", "tpot_mean/single"}
    proc = subprocess.run([sys.executable, "bench/fidelity_bench.py", "sim", archives[0], archives[0], "--model",
                           "tiny", "--hardware", "h100x2", "--out", str(tmp_path / "twice.json")], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "in more than one archive" in proc.stderr


def test_fidelity_bench_real_half_keeps_to_its_budget(tmp_path):
    """--budget-s: a policy with less than --min-run-s of the budget left is not run, and says so; the .tgz
    is written all the same (a device call's time limit must not lose the runs that finished)."""
    out = tmp_path / "runs.tgz"
    proc = subprocess.run([sys.executable, "bench/fidelity_bench.py", "real", "--trace", "synthetic", "--num-requests",
                           "3", "--model", "tiny", "--device", "cpu", "--policies", "single", "pd", "--budget-s", "5",
                           "--min-run-s", "60", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    with tarfile.open(out) as tar:
        status = json.load(tar.extractfile("fidelity_runs/status.json"))["status"]
        assert not any(n.endswith("run.json") for n in tar.getnames())
    assert set(status) == {"single", "pd"} and all(v.startswith("not run: ") for v in status.values())
    assert not list(tmp_path.glob("*.partial"))


AZURE = ROOT.parent / "shared/traces/AzureLLMInferenceTrace_conv.csv"
FIDELITY_RUNS = ROOT / "bench/results/fidelity_runs_NVIDIA_H200_x10_copy.tar.xz"
# the profile these assertions were set with, pinned: a newer committed profile (another machine) moves them
FIDELITY_PROFILE = ROOT / "bench/results/profile_h200x2-qwen3-0.6b_session8.csv"


@pytest.mark.skipif(not AZURE.exists() or not FIDELITY_RUNS.exists(), reason="needs ../shared/traces and the real runs")
def test_fidelity_bench_seeds_redraw_the_step_times(tmp_path):
    """--seeds: with a profile that measured the step spread, reseeded simulations draw other step times, so
    the p99 errors move from seed to seed around the run's own seed; the rankings' agreement is a fraction."""
    report = tmp_path / "fidelity.json"
    proc = subprocess.run([sys.executable, "bench/fidelity_bench.py", "sim", str(FIDELITY_RUNS), "--trace", str(AZURE),
                           "--profile", str(FIDELITY_PROFILE), "--seeds", "3", "--out", str(report)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(report.read_text())
    spread = got["seed_spread"]
    assert spread["seeds"] == 3
    p99 = spread["p99_rel_err"]
    assert all(v["min"] <= got["p99_rel_err"][k] <= v["max"] and v["min"] <= v["median"] <= v["max"]
               for k, v in p99.items())
    assert any(v["max"] - v["min"] > 1e-3 for v in p99.values())  # the draws differ
    assert all(f in (0.0, 1 / 3, 2 / 3, 1.0) for f in spread["policy_ranking_agrees_fraction"].values())


def test_fidelity_bench_drop_ops_rejects_ops_the_profile_lacks(tmp_path):
    proc = subprocess.run([sys.executable, "bench/fidelity_bench.py", "sim", str(FIDELITY_RUNS), "--profile",
                           str(FIDELITY_PROFILE), "--drop-ops", "mixed", "--out", str(tmp_path / "f.json")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "--drop-ops mixed: no such rows" in proc.stderr  # session 8 had no mixed rows
    assert not (tmp_path / "f.json").exists()


def test_fidelity_bench_drop_ops_at_batches():
    """`OP@B,B` drops that op's rows at those batches only, `OP@<N` below N; other ops' rows stay; a bad spec is
    an error, not a silent no-op."""
    import pandas as pd

    sys.path.insert(0, str(ROOT / "bench"))
    from fidelity_bench import drop_rows

    df = pd.DataFrame(dict(op=["pipeline"] * 4 + ["decode"] * 2, batch=[2, 16, 24, 48, 24, 48]))
    assert drop_rows(df, "pipeline").tolist() == [True] * 4 + [False] * 2
    assert drop_rows(df, "pipeline@24,48").tolist() == [False, False, True, True, False, False]
    assert drop_rows(df, "pipeline@<16").tolist() == [True] + [False] * 5
    with pytest.raises(SystemExit):
        drop_rows(df, "pipeline@x")


H200_RUNS = ROOT / "bench/results/fidelity_runs_NVIDIA_H200.tar.xz"


@pytest.mark.skipif(not AZURE.exists() or not H200_RUNS.exists(), reason="needs ../shared/traces and the real runs")
def test_fidelity_bench_drop_ops_simulates_without_those_rows(tmp_path):
    """An ablation: without the profile's `mixed` rows single's colocated steps are composed from the prefill
    and decode rows, so its errors move; pd never runs a mixed step, so its errors stay."""
    got = {}
    for name, extra in (("all", []), ("dropped", ["--drop-ops", "mixed"])):
        out = tmp_path / f"{name}.json"
        proc = subprocess.run([sys.executable, "bench/fidelity_bench.py", "sim", str(H200_RUNS), "--trace", str(AZURE),
                               "--out", str(out)] + extra, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
        got[name] = json.loads(out.read_text())["mean_rel_err"]
    assert got["dropped"]["ttft/single"] != got["all"]["ttft/single"]
    assert got["dropped"]["tpot/pd"] == got["all"]["tpot/pd"]


@pytest.mark.skipif(not AZURE.exists() or not FIDELITY_RUNS.exists(), reason="needs ../shared/traces and the real runs")
def test_fidelity_diagnosis_of_the_committed_real_runs(tmp_path):
    """The diagnosis runs end to end. The decode tail (the batch's longest context) brings the modelled decode
    step to the real one at large batches (not in-sample: it comes from the kernel's measured per-program
    rate); the engine overhead read off the real runs closes most of the remaining TPOT error (in-sample by
    construction: a check of the sim's mechanism, not of its fidelity)."""
    out = tmp_path / "diag.json"
    proc = subprocess.run([sys.executable, "bench/fidelity_diagnose.py", str(FIDELITY_RUNS), "--trace", str(AZURE),
                           "--profile", str(FIDELITY_PROFILE), "--json", str(out), "--seeds", "3"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    diag = json.loads(out.read_text())
    for policy in ("pd", "adaptive"):
        big = [r for r in diag[policy]["decode"] if r["batch"] in ("64-127", "128-191")]
        assert big and all(r["tail"] > 1.0 for r in big)  # ms: Azure conv batches mix 1k and 5k+ contexts
        for r in big:  # the modelled step with the tail is nearer the real one (GPU0 idle) than without it
            assert abs(r["real_gpu0_idle"] - r["profile"]) < abs(r["real_gpu0_idle"] - (r["profile"] - r["tail"]))
        by_longest = list(diag[policy]["by_longest_context"].values())  # longer contexts, slower steps
        assert by_longest[0]["real_over_profile"] < by_longest[-1]["real_over_profile"]
        # a long context stays for many steps: the tail carries most of the step-to-step correlation
        assert diag[policy]["step_correlation"]["lag1_autocorrelation"] < \
            diag[policy]["step_correlation_without_tail"]["lag1_autocorrelation"]
        what_if = diag[policy]["what_if"]
        before = what_if["isolated profile + decode tail, no engine rows"]["tpot_mean_ms"]
        after = what_if["+ decode and prefill overhead by the other GPU's state"]["tpot_mean_ms"]
        assert before < -0.1 and abs(after) < 0.5 * abs(before), (policy, before, after)
        assert {r["op"] for r in diag[policy]["engine_rows"]} >= {"engine_decode", "engine_decode_busy"}
        assert all(0 < r["p10_over_mean"] <= r["p50_over_mean"] <= r["p90_over_mean"] <= r["p99_over_mean"]
                   for r in diag[policy]["engine_rows"])
        seeds = diag[policy]["what_if_seeds"]["overhead by state + decode and prefill spread (3 seeds)"]
        assert len({round(e["tpot_p99_ms"], 9) for e in seeds.values()}) > 1  # the draws differ from seed to seed
    # pd's TPOT p99 stays within the goal with the spread drawn (a request's ~200 steps average it out)
    spread = diag["pd"]["what_if"]["overhead by state + decode and prefill spread (3 seeds)"]
    assert abs(spread["tpot_p99_ms"]) < 0.08 and abs(spread["tpot_mean_ms"]) < 0.05


def test_engine_host_overhead_runs_on_cpu():
    proc = subprocess.run([sys.executable, "bench/engine_host_overhead.py", "--policy", "pd", "--batch", "208",
                           "--switch-interval-ms", "0.5"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    idle = [line for line in proc.stdout.splitlines() if "GPU0 idle" in line]
    assert idle and "decode steps, median" in idle[0]
    median_ms = float(idle[0].split("median ")[1].split(" ms")[0])
    assert 0 < median_ms < 50  # a null GPU: host work only


@pytest.mark.parametrize("script,args", [
    ("pipeline_bench.py", ["--skip", "steps"]),
    ("pd_bench.py", ["--transfer-only", "--ttft-pairs", "1", "--requests", "6"]),
])
def test_gpu_benchmarks_smoke_on_cpu(tmp_path, script, args):
    """The GPU benchmarks' CPU smoke runs end to end and write their JSON (the pipeline bench once broke
    on the pd bench's serve() returning one more value, unnoticed until a GPU call)."""
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, f"bench/{script}", "--device", "cpu", *args, "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(out.read_text())
    assert results["gpu"] == "cpu" and results["command"].startswith(f"python bench/{script}")


def test_copy_rows_from_another_profile_replace_the_old_ones(tmp_path):
    """bench/copy_rows.py --from-profile: the decode_copy rows of SRC replace the target's own, every other row
    stays, and the metadata says where they came from (no GPU needed)."""
    from traces.profile import read_profile, write_profile

    meta = dict(gpu="A", date="2026-01-01", command="t", model="qwen3-0.6b", hardware="h100x2", torch="x", sms=132)
    base = [dict(op="decode", batch=b, context=1024, seconds=1e-3 * b) for b in (1, 8)]
    target = write_profile(tmp_path / "t.csv", base + [dict(op="decode_copy", batch=16, tokens=1024, context=1024,
                                                             bytes=10**8, seconds=9.0)], meta)
    src_rows = [dict(op="decode_copy", batch=b, tokens=1024, context=1024, bytes=10**8, seconds=-1e-5 + 1e-3 / b)
                for b in (16, 64)]
    src = write_profile(tmp_path / "s.csv", base + src_rows, dict(meta, gpu="B", kv_transport="pull"))
    out = tmp_path / "merged.csv"
    proc = subprocess.run([sys.executable, "bench/copy_rows.py", str(target), "--from-profile", str(src), "--out",
                           str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    df, got = read_profile(out)
    copies = df[df.op == "decode_copy"].sort_values("batch")
    assert list(copies.batch) == [16, 64] and list(copies.seconds) == [r["seconds"] for r in src_rows]
    assert (df.op == "decode").sum() == 2
    assert got["gpu"] == "A" and got["decode_copy_rows"]["gpu"] == "B"
    assert got["decode_copy_rows"]["from_profile"] == str(src)


def test_gpu_ab_times_the_same_rows_in_fresh_processes_on_cpu(tmp_path):
    """bench/gpu_ab.py's CPU smoke: one fresh process per entry of --order, the ratios between them written."""
    out = tmp_path / "ab.json"
    proc = subprocess.run([sys.executable, "bench/gpu_ab.py", "--device", "cpu", "--model", "tiny", "--reps", "2",
                           "--order", "011", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["gpu"] == "cpu" and r["command"].startswith("python bench/gpu_ab.py")
    assert [x["device_id"] for x in r["runs"]] == [0, 1, 1]
    keys = ["decode b4 ctx128", "prefill 1x128", "prefill 2x128"]
    for x in r["runs"]:
        assert all(0 < x[k] < 1e4 for k in keys)
    assert set(r["gpu1_over_gpu0"]) == set(keys)
    second = r["second_process_over_first"]["1"]  # GPU "1" ran twice
    assert abs(second[keys[0]] - r["runs"][2][keys[0]] / r["runs"][1][keys[0]]) < 1e-12


def test_colocated_steps_against_the_model_at_their_own_shapes(tmp_path):
    """fidelity_diagnose.colocated_at_shape: each GPU0 decode / mixed step's real period (step + the gap to the next,
    when the GPU did not wait for work) against the cost the sim charges at that shape."""
    import importlib.util

    import pandas as pd

    spec = importlib.util.spec_from_file_location("fidelity_diagnose", ROOT / "bench/fidelity_diagnose.py")
    diag = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(diag)

    class Cost:  # a decode step costs 1 ms per sequence, a mixed one 10 ms; GPU0 is 0.5x; no overhead, no tail
        def decode_device_factor(self, device, b):
            return 0.5 if device == "gpu0" else 1.0

        def decode_step(self, b, kv):
            return type("D", (), {"step_s": 1e-3 * b})()

        def forward_s(self, chunks, b, kv):
            return 10e-3

        def engine_overhead_s(self, stage, b, tokens, other_busy=False, colocated=False):
            return 0.0

        def decode_tail_s(self, b, kv, longest):
            return 0.0

        def decode_tail_scale(self, b, excess, split=None):
            return 1.0

    cols = "t_start_s,t_end_s,device,stage,batch_size,tokens,kv_tokens,attn_sms,ffn_sms,microbatch,mode,num_steps,busy_s,kv_bytes"
    rows = ["0.000,0.010,gpu0,prefill,1,100,100,0,0,-1,single,1,0.01,0",
            "0.010,0.0118,gpu0,decode,4,4,404,0,0,-1,single,1,0.0018,0",  # period 2 ms (0.2 ms gap), model 2 ms
            "0.012,0.020,gpu0,mixed,5,104,504,0,0,-1,single,1,0.008,0",  # period 8 ms + 0 gap: next step waits 1 s
            "1.020,1.024,gpu0,decode,4,4,408,0,0,-1,single,1,0.004,0"]  # last step: no gap after it
    (tmp_path / "steps.csv").write_text(cols + "\n" + "\n".join(rows) + "\n")
    pd.DataFrame(dict(request_id=[0], arrival_s=[0.0], prompt_tokens=[100], output_tokens=[3], generated_tokens=[3],
                      first_token_s=[0.01], kv_transfer_end_s=[float("nan")], finish_s=[1.024], decode_device=["gpu0"])
                 ).to_csv(tmp_path / "requests.csv", index=False)
    by_batch, by_chunk = diag.colocated_at_shape(tmp_path, Cost())
    total = by_batch.xs("all", level=1)
    assert total.loc["decode", "steps"] == 2 and total.loc["mixed", "steps"] == 1
    assert total.loc["decode", "real_s"] == pytest.approx(0.002 + 0.004, abs=1e-9)
    assert total.loc["decode", "model_s"] == pytest.approx(0.004, abs=1e-9)  # 2 x (0.5 x 4 ms)
    assert total.loc["mixed", "model_over_real"] == pytest.approx(10 / 8, abs=1e-3)
    assert by_chunk.steps.sum() == 1


def test_gpu1_decode_steps_against_the_model_at_their_own_shapes(tmp_path):
    """fidelity_diagnose.decode_at_shape: each GPU1 decode step's real period against the sim's cost at its
    shape: the isolated step, each micro-batch's decode tail (the requests then decoding, in the order they
    joined), the overhead by GPU0's state, and a KV copy's interference shared by the steps it overlapped."""
    import importlib.util

    import pandas as pd

    spec = importlib.util.spec_from_file_location("fidelity_diagnose", ROOT / "bench/fidelity_diagnose.py")
    diag = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(diag)

    class Cost:  # 1 ms a sequence (2 ms pipelined); tail 1 ms per micro-batch holding a sequence over 1,000
        def decode_step(self, b, kv, split=None, microbatches=1):  # tokens; overhead 0.5 ms with GPU0 busy
            return type("D", (), {"step_s": (2e-3 if split else 1e-3) * b})()

        def decode_tail_s(self, b, kv, longest, padded_batch=None):
            return 1e-3 if longest > 1000 else 0.0

        def decode_tail_scale(self, b, excess, split=None):
            return 1.0

        def engine_overhead_s(self, stage, b, tokens, other_busy=False, colocated=False):
            return 0.5e-3 if other_busy else 0.0

        def copy_interference_s(self, nbytes, b):
            return nbytes * 1e-9

    cols = "t_start_s,t_end_s,device,stage,batch_size,tokens,kv_tokens,attn_sms,ffn_sms,microbatch,mode,num_steps,busy_s,kv_bytes"
    rows = ["0.000,0.010,gpu0,prefill,1,100,100,0,0,-1,pd,1,0.01,0",
            "0.002,0.004,gpu1,decode,2,2,1700,0,0,-1,pd,1,0.002,0",  # GPU0 busy, tail: 2 + 1 + 0.5 = 3.5 ms
            "0.005,0.009,link,transfer,1,100,100,0,0,-1,pd,1,0.004,1000000",  # 1 ms of interference
            "0.004,0.008,gpu1,decode,2,2,1702,64,68,-1,pipeline,1,0.004,0",  # 4 + 2 tails + 0.5 + 0.75 copy
            "1.000,1.004,gpu1,decode,2,2,1704,0,0,-1,pd,1,0.004,0"]  # 2 + 1 (the copy's last 1 ms overlapped no step)
    (tmp_path / "steps.csv").write_text(cols + "\n" + "\n".join(rows) + "\n")
    pd.DataFrame(dict(request_id=[0, 1], arrival_s=[0.0, 0.0], prompt_tokens=[1500, 1200], output_tokens=[5, 5],
                      generated_tokens=[5, 5], first_token_s=[0.001, 0.001], kv_transfer_end_s=[0.001, 0.0015],
                      finish_s=[2.0, 2.0], decode_device=["gpu1", "gpu1"])).to_csv(tmp_path / "requests.csv", index=False)
    got = diag.decode_at_shape(tmp_path, Cost())
    total = got.xs("all", level=1)
    assert total.loc["pipelined", "steps"] == 1 and total.loc["sequential", "steps"] == 2
    assert total.loc["pipelined", "model_s"] == pytest.approx(4e-3 + 2e-3 + 0.5e-3 + 0.75e-3, abs=1e-9)
    assert total.loc["sequential", "model_s"] == pytest.approx(3.5e-3 + 3e-3, abs=1e-9)
    assert total.loc["sequential", "real_s"] == pytest.approx(2e-3 + 4e-3, abs=1e-9)  # 2 ms step + 0 gap; last: none


def test_profile_pooling_simulates_each_set_under_each_profile_and_summarizes(tmp_path, monkeypatch, capsys):
    """bench/profile_pooling.py: the variants a run set gets (own, each other machine's, the median of the
    others, the median of all), the merged profiles it writes, and the summary's arithmetic (simulation
    replaced by fixed errors: the real sims need ../shared/traces)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import profile_pooling as pp

    from traces.profile import read_profile

    r = ROOT / "bench/results"
    profiles = {n: str(r / f"profile_h200x2-qwen3-0.6b_session{s}.csv") for n, s in
                (("a", "13_machine1"), ("b", "13_machine2"), ("c", "14_machine1"))}
    archive, trace = str(r / "fidelity_runs_NVIDIA_H200.tar.xz"), str(r / "workload_heldout_burst_long.csv")
    calls = []

    def fake_simulate(archives, trace_, profile, seeds, out):
        calls.append(profile)
        df, meta = read_profile(profile)  # every profile handed over is a valid one
        e = 0.10 if "merge" in meta else (0.02 if profile == profiles["a"] else -0.04)
        return {"pd": dict.fromkeys(pp.METRICS, e), "single": dict.fromkeys(pp.METRICS, 2 * e)}

    monkeypatch.setattr(pp, "simulate", fake_simulate)
    out = tmp_path / "pool.json"
    monkeypatch.setattr(sys, "argv", ["profile_pooling.py", *[f"--profile={n}={p}" for n, p in profiles.items()],
                                      f"--runs=x=a:{archive}:{trace}", f"--runs=y=-:{archive}+{archive}:{trace}",
                                      "--out", str(out)])
    assert pp.main() == 0
    got = json.loads(out.read_text())
    assert set(got["rel_err"]["x"]) == {"own", "other:b", "other:c", "pooled_others", "pooled_all"}
    assert set(got["rel_err"]["y"]) == {"other:a", "other:b", "other:c", "pooled_others", "pooled_all"}
    assert len(calls) == 9  # y: pooled_others is pooled_all (no own profile), simulated once
    s = got["summary"]["workload_heldout_burst_long"]
    assert s["own"]["without_single"]["mean_abs_err"]["tpot_mean_ms"] == pytest.approx(0.02)
    assert s["other"]["all_policies"]["n"] == 10  # x: 2 others, y: 3 others, 2 policies each
    assert s["other"]["without_single"]["mean_err"]["tpot_mean_ms"] == pytest.approx((0.02 - 4 * 0.04) / 5)
    assert s["pooled_all"]["all_policies"]["max_abs_err"]["ttft_p99_ms"] == pytest.approx(0.2)
    assert "pooled_others" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no --profile named 'z'"):
        pp.parse_runs([f"x=z:{archive}:{trace}"], profiles)
    merged = {"all": "ALL", "without:a": "NOT_A"}
    assert pp.variants("a", profiles, merged, each_other=False) == {
        "own": profiles["a"], "pooled_others": "NOT_A", "pooled_all": "ALL"}  # --no-each-other
    # --fixed only: one profile for every set, each its own variant in the summary
    calls.clear()
    monkeypatch.setattr(sys, "argv", ["profile_pooling.py", f"--fixed=old={profiles['a']}", f"--fixed=new={profiles['b']}",
                                      f"--runs=x=-:{archive}:{trace}", f"--runs=y=-:{archive}:{trace}",
                                      "--out", str(out)])
    assert pp.main() == 0
    got = json.loads(out.read_text())
    assert set(got["rel_err"]["x"]) == {"fixed:old", "fixed:new"} and len(calls) == 4
    s = got["summary"]["workload_heldout_burst_long"]
    assert s["fixed:old"]["without_single"]["mean_err"]["tpot_mean_ms"] == pytest.approx(0.02)
    assert s["fixed:new"]["all_policies"]["mean_err"]["tpot_mean_ms"] == pytest.approx((-0.04 - 0.08) / 2)
    monkeypatch.setattr(sys, "argv", ["profile_pooling.py", f"--profile=a={profiles['a']}",
                                      f"--runs=x=-:{archive}:{trace}", "--out", str(out)])
    with pytest.raises(SystemExit):  # one machine's profile alone pools nothing
        pp.main()


def test_decode_tail_order_places_the_long_sequence_and_models_its_tail():
    """bench/decode_tail_order.py on CPU stand-ins: a kernel that hands back the contexts it was given and a
    timer that runs the grid's programs in order, each on the first of 1,024 slots to free up, so in a grid of
    more programs than slots a long sequence placed last pays a start delay and one placed first does not; the model's tail comes from the
    decode_program rows timed the same way (one program's rate x excess / splits)."""
    import heapq

    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    from decode_tail_order import contexts_for, main, measure

    from policies.specs import decode_context_splits

    assert contexts_for(4, 10, 99, None) == [10] * 4
    assert [contexts_for(4, 10, 99, p).index(99) for p in ("first", "middle", "last")] == [0, 2, 3]
    rate, wave, kv_heads = 1e-8, 1024, 8  # seconds per token per program; programs per wave

    def kernel(q, k, v, tables, lens, splits):
        return lens.tolist(), splits

    def time_fn(fn, device, reps):  # one layer: programs in grid order, each on the first slot to free up
        lens, splits = fn()
        slots = [0.0] * wave
        for c in (c / splits for c in lens for _ in range(kv_heads * splits)):
            heapq.heappush(slots, heapq.heappop(slots) + c)
        return rate * max(slots)

    got = measure([64, 256], 1024, 4096, (16, kv_heads, 128), torch.device("cpu"), 132, 1, kernel=kernel,
                  time_fn=time_fn)
    assert got["program_s_per_token"] == pytest.approx(rate)
    small, big = got["rows"]
    assert small["splits"] == decode_context_splits(64 * kv_heads, 132) and big["programs"] == 256 * kv_heads
    assert small["last_s"] == pytest.approx(small["first_s"])  # one wave: no start delay
    assert big["last_s"] > big["first_s"] and big["first_s"] > big["uniform_s"]  # two waves: the last starts late
    assert small["model_tail_s"] == pytest.approx(rate * (4096 - (63 * 1024 + 4096) / 64) / small["splits"])
    assert main(["--out", "unused.json"]) == 2  # no CUDA here: a clear refusal, nothing written


def test_prefill_extra_by_gpu0_idle_time_before_the_launch(tmp_path):
    """fidelity_diagnose.prefill_extra_by_idle_before: 1-sequence prefills binned by GPU0's idle time before
    they launched (from steps.csv) and GPU1's state, real step minus the isolated one against the modelled
    overhead; prefills of several sequences left out."""
    import importlib.util

    import pandas as pd

    spec = importlib.util.spec_from_file_location("fidelity_diagnose", ROOT / "bench/fidelity_diagnose.py")
    diag = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(diag)

    class Cost:
        def engine_overhead_s(self, stage, b, tokens, other_busy=False, colocated=False):
            assert stage == "prefill"
            return 0.9e-3 if other_busy else 0.4e-3

    cols = "t_start_s,t_end_s,device,stage,batch_size,tokens,kv_tokens,attn_sms,ffn_sms,microbatch,mode,num_steps,busy_s,kv_bytes"
    rows = ["0.000,0.004,gpu0,prefill,1,512,512,0,0,-1,pd,1,0.004,0",  # first: nothing before it (> 5 ms)
            "0.0041,0.0081,gpu0,prefill,1,512,512,0,0,-1,pd,1,0.004,0",  # 0.1 ms after: back to back
            "0.0101,0.0141,gpu0,prefill,2,1024,1024,0,0,-1,pd,1,0.004,0",  # two sequences: not in the table
            "0.0500,0.0535,gpu0,prefill,1,512,512,0,0,-1,pd,1,0.0035,0"]  # 36 ms idle before
    (tmp_path / "steps.csv").write_text(cols + "\n" + "\n".join(rows) + "\n")
    pre = pd.DataFrame(dict(t0=[0.0, 0.0041, 0.0101, 0.05], seqs=[1, 1, 2, 1], tokens=[512, 512, 1024, 512],
                            dur=[4e-3, 4e-3, 4e-3, 3.5e-3], iso=[3e-3] * 4, busy=[True, True, True, False]))
    got = diag.prefill_extra_by_idle_before(pd.read_csv(tmp_path / "steps.csv"), pre, Cost())
    assert got["steps"].sum() == 3
    back = got.loc[("back-to-back (< 0.3 ms)", "GPU1 busy")]
    assert back["extra"] == pytest.approx(1.0) and back["model"] == pytest.approx(0.9)
    idle = got.xs("> 5 ms", level=0)
    assert idle.loc["GPU1 busy", "steps"] == 1 and idle.loc["GPU1 idle", "extra"] == pytest.approx(0.5)
    assert idle.loc["GPU1 idle", "model"] == pytest.approx(0.4)


def test_colocated_decode_steps_beyond_the_model_by_long_sequence_excess_and_place():
    """fidelity_diagnose.colocated_beyond_model: decode steps of 32+ sequences, real minus modelled (ms), by batch
    and the longest context's excess over the mean, and (excess over 1,500 tokens) by the third of the batch the
    longest sat in; mixed steps and smaller batches left out."""
    import importlib.util

    import pandas as pd

    spec = importlib.util.spec_from_file_location("fidelity_diagnose", ROOT / "bench/fidelity_diagnose.py")
    diag = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(diag)
    d = pd.DataFrame(dict(stage=["decode", "decode", "decode", "mixed", "decode"], decodes=[200, 200, 100, 200, 8],
                          real=[20e-3, 19e-3, 8e-3, 30e-3, 2e-3], model=[15e-3, 18e-3, 8e-3, 20e-3, 1e-3],
                          excess=[3000.0, 3000.0, 500.0, 3000.0, 3000.0], longest_at=[0.9, 0.1, 0.5, 0.9, 0.9]))
    by_excess, by_place = diag.colocated_beyond_model(d)
    assert by_excess.steps.sum() == 3 and by_place.steps.sum() == 2  # not the mixed step, not batch 8
    big = by_excess.xs(pd.Interval(192, 256), level=0)
    assert big.steps.iloc[0] == 2 and big.beyond_ms.iloc[0] == pytest.approx(3.0)  # the median of 5 and 1 ms
    assert by_excess.xs(pd.Interval(64, 128), level=0).beyond_ms.iloc[0] == pytest.approx(0.0)
    place = by_place.xs(pd.Interval(192, 256), level=0).beyond_ms
    assert place["last third"] == pytest.approx(5.0) and place["first third"] == pytest.approx(1.0)


def test_decode_mix_replay_exports_served_steps_and_replays_them_in_four_forms(tmp_path):
    """bench/decode_mix_replay.py: `export` picks GPU0 decode steps by decode batch and longest context with their
    contexts (join order), real period and the sim's model; `measure` runs each as served, on blocks scattered over
    the pool, longest first, and uniform at the mean (a stand-in runner records what it was given)."""
    import pandas as pd
    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    from decode_mix_replay import export_mixes, measure, summary

    class Cost:  # 0.1 ms a sequence, no overhead; a tail of 1 us per token of excess
        def decode_device_factor(self, device, b):
            return 1.0

        def decode_step(self, b, kv):
            return type("D", (), {"step_s": 1e-4 * b})()

        def engine_overhead_s(self, stage, b, tokens, other_busy=False, colocated=False):
            return 0.0

        def decode_tail_s(self, b, kv, longest):
            return 1e-6 * max(0.0, longest - (kv - b) / b)

        def decode_tail_scale(self, b, excess, split=None):
            return 1.0

    # 130 requests decode over [0, 1) s (one of 5,000 tokens), 100 short ones over [2, 3) s
    n1, n2 = 130, 100
    prompts = [1000] * (n1 - 1) + [5000] + [800] * n2
    starts = [0.0] * n1 + [2.0] * n2
    pd.DataFrame(dict(request_id=range(n1 + n2), arrival_s=starts, prompt_tokens=prompts, output_tokens=1,
                      generated_tokens=1, first_token_s=starts, kv_transfer_end_s=float("nan"),
                      finish_s=[s + 1.0 for s in starts], decode_device="gpu0")).to_csv(tmp_path / "requests.csv",
                                                                                          index=False)
    kv1, kv2 = sum(prompts[:n1]) + n1, sum(prompts[n1:]) + n2
    cols = "t_start_s,t_end_s,device,stage,batch_size,tokens,kv_tokens,attn_sms,ffn_sms,microbatch,mode,num_steps,busy_s,kv_bytes"
    rows = [f"0.5,0.52,gpu0,decode,{n1},{n1},{kv1},0,0,-1,single,1,0.02,0",
            f"2.5,2.51,gpu0,decode,{n2},{n2},{kv2},0,0,-1,single,1,0.01,0"]
    (tmp_path / "steps.csv").write_text(cols + "\n" + "\n".join(rows) + "\n")
    mixes = export_mixes(tmp_path, Cost(), per_bin=5)
    assert [(m["decodes"], m["longest"]) for m in mixes] == [(n2, 801), (n1, 5001)]  # (96,128] short, (128,160] long
    big = mixes[1]
    assert len(big["contexts"]) == n1 and big["contexts"][-1] == 5001  # join order: the long one joined last
    assert big["real_ms"] == pytest.approx(20.0) and big["model_ms"] == pytest.approx(13.0 + big["model_tail_ms"])
    assert big["model_tail_ms"] == pytest.approx(1e-3 * (5001 - kv1 / n1), rel=1e-3)

    class Runner:  # records each run's contexts and blocks; the KV pool has 40,000 blocks of 16 tokens
        block_size = 16
        kv_cache = torch.zeros(2, 1, 40000, 1, 1, 1)

        def run(self, batch, temps):
            self.last = [(r.kv_len, list(r.blocks)) for r in batch.decode]

    runner, seen = Runner(), {}

    def time_fn(fn, device, reps):  # "seconds": 1e-6 x the longest context + 1e-9 x the total
        fn()
        lens = [c for c, _ in runner.last]
        seen.setdefault(len(seen), runner.last)
        return 1e-6 * max(lens) + 1e-9 * sum(lens)

    rows = measure(mixes, runner, reps=1, time_fn=time_fn)
    served, scattered, first, uniform = (seen[i] for i in range(4, 8))  # the second mix's four forms
    assert [c for c, _ in served] == big["contexts"] == [c for c, _ in scattered]
    assert [c for c, _ in first] == sorted(big["contexts"], reverse=True)
    assert len({c for c, _ in uniform}) == 1
    flat = [b for _, blocks in scattered for b in blocks]
    assert len(set(flat)) == len(flat) and max(flat) < 40000 and flat != sorted(flat)  # spread over the pool
    assert all(blocks == list(range(blocks[0], blocks[0] + len(blocks))) for _, blocks in served)
    assert rows[1]["served_s"] > rows[1]["uniform_s"]
    table = summary(rows)
    long_row = next(r for r in table if r["batch_bin"] == "(128, 160]")
    assert long_row["replay_tail_ms"] == pytest.approx((rows[1]["served_s"] - rows[1]["uniform_s"]) * 1e3, abs=1e-3)
    assert long_row["beyond_served_ms"] == pytest.approx(big["real_ms"] - big["model_ms"], abs=1e-3)


def test_decode_mix_replay_gpu1_exports_pipelined_steps_with_their_split_and_the_charge_in_parts(tmp_path):
    """bench/decode_mix_replay.py --gpu1: GPU1's pipelined one-step rows by batch bin, each with its split, the
    decoding contexts (join order, as many as the batch) and the sim's charge in parts summing to model_ms;
    `measure` runs each pipelined on its split; the summary sets the model's shape against the served replay."""
    import pandas as pd
    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    from decode_mix_replay import GPU1_BATCH_BINS, export_gpu1_mixes, measure, summary

    class Cost:  # 0.1 ms a sequence (pipelined: 0.08), 0.5 ms overhead, a tail of 1 us per token of excess
        def decode_step(self, b, kv, split=None, m=1):
            return type("D", (), {"step_s": (0.8e-4 if split else 1e-4) * b})()

        def engine_overhead_s(self, stage, b, tokens, other_busy=False, colocated=False):
            return 5e-4

        def decode_tail_s(self, b, kv, longest, padded_batch=None):
            return 1e-6 * max(0.0, longest - (kv - b) / b)

        def decode_tail_scale(self, b, excess, split=None):
            return 1.0

    # 150 requests decode on GPU1 over [0, 1) s (the last of 5,000 tokens), 100 over [2, 3) s
    n1, n2 = 150, 100
    prompts = [1000] * (n1 - 1) + [5000] + [800] * n2
    starts = [0.0] * n1 + [2.0] * n2
    pd.DataFrame(dict(request_id=range(n1 + n2), arrival_s=starts, prompt_tokens=prompts, output_tokens=1,
                      generated_tokens=1, first_token_s=starts, kv_transfer_end_s=starts,
                      finish_s=[t + 1.0 for t in starts], decode_device="gpu1")).to_csv(tmp_path / "requests.csv",
                                                                                          index=False)
    kv1, kv2 = sum(prompts[:n1]) + n1, sum(prompts[n1:]) + n2
    cols = "t_start_s,t_end_s,device,stage,batch_size,tokens,kv_tokens,attn_sms,ffn_sms,microbatch,mode,num_steps,busy_s,kv_bytes"
    rows = [f"0.5,0.52,gpu1,decode,{n1},{n1},{kv1},64,68,-1,pipeline,1,0.02,0",
            f"0.6,0.62,gpu1,decode,{n1},{n1},{kv1},0,0,-1,pd,1,0.02,0",  # sequential: not picked
            f"2.5,2.51,gpu1,decode,{n2},{n2},{kv2},32,100,-1,pipeline,1,0.01,0"]
    (tmp_path / "steps.csv").write_text(cols + "\n" + "\n".join(rows) + "\n")
    mixes = export_gpu1_mixes(tmp_path, Cost(), per_bin=5)
    assert [(m["decodes"], m["attn_sms"], m["ffn_sms"]) for m in mixes] == [(n2, 32, 100), (n1, 64, 68)]
    big = mixes[1]
    assert len(big["contexts"]) == n1 and big["contexts"][-1] == 5001 and big["longest"] == 5001
    assert big["real_ms"] == pytest.approx(20.0)  # no GPU1 step after it within the gap: its own span
    assert big["model_iso_ms"] == pytest.approx(0.08 * n1)
    assert big["model_tail_ms"] > 0 and big["model_overhead_ms"] == pytest.approx(0.5)
    assert big["model_ms"] == pytest.approx(big["model_iso_ms"] + big["model_tail_ms"] + big["model_overhead_ms"],
                                            abs=1e-3)
    assert len(export_gpu1_mixes(tmp_path, Cost(), pipelined=False)) == 1  # the sequential step alone
    from fidelity_diagnose import overhead_at_shape

    at = overhead_at_shape(tmp_path, Cost())  # served extra (real - isolated - tail) beside the modelled overhead
    row = at.loc[("pipelined", pd.Interval(128, 192))]
    assert row.steps == 1 and row.modelled_ms == pytest.approx(0.5)
    assert row.served_extra_ms == pytest.approx(big["real_ms"] - big["model_iso_ms"] - big["model_tail_ms"], abs=1e-3)
    assert row.modelled_minus_served_ms == pytest.approx(row.modelled_ms - row.served_extra_ms, abs=2e-3)
    from overhead_by_machine import big_step_overhead

    big_steps = big_step_overhead(tmp_path, Cost())  # the same step, the only pipelined one of 129-256 sequences
    assert big_steps["steps"] == 1 and big_steps["modelled_overhead_ms"] == pytest.approx(0.5)
    assert big_steps["served_extra_ms"] == pytest.approx(row.served_extra_ms, abs=1e-3)
    assert big_step_overhead(tmp_path, Cost(), lo=151)["steps"] == 0

    class Runner:
        block_size = 16
        kv_cache = torch.zeros(2, 1, 40000, 1, 1, 1)

        def run(self, batch, temps, split=None, microbatches=1):
            self.last = (split, microbatches)

    runner, seen = Runner(), []

    def time_fn(fn, device, reps):  # pipelined: served/scattered/longest-first 10 ms, uniform 8; sequential 12 / 11
        fn()
        seen.append(runner.last)
        return (0.010, 0.010, 0.010, 0.008, 0.012, 0.011)[(len(seen) - 1) % 6]

    out = measure(mixes, runner, reps=1, time_fn=time_fn)
    assert seen[:6] == [((32, 100), 2)] * 4 + [(None, 1)] * 2 and seen[6:] == [((64, 68), 2)] * 4 + [(None, 1)] * 2
    row = next(r for r in summary(out, GPU1_BATCH_BINS) if r["batch_bin"] == "(128, 160]")
    assert row["replay_tail_ms"] == pytest.approx(2.0) and row["seq_replay_tail_ms"] == pytest.approx(1.0)
    assert row["replay_pipe_over_seq_tail"] == pytest.approx(2.0)
    assert row["model_pipe_over_seq_tail"] == pytest.approx(big["model_tail_ms"] / big["model_seq_tail_ms"], rel=1e-3)
    assert big["model_seq_tail_ms"] == pytest.approx(1e-3 * (5001 - kv1 / n1), rel=1e-3)  # one kernel's excess
    assert row["shape_model_over_replay"] == pytest.approx((big["model_iso_ms"] + big["model_tail_ms"]) / 10.0, rel=1e-3)
    assert row["serving_ms"] == pytest.approx(big["real_ms"] - 10.0)


def test_model_at_shape_reports_each_run_under_each_profile(tmp_path):
    """bench/model_at_shape.py: every run of the archives (here one colocated run) under every --profile, as
    colocated_at_shape's model / real by stage and batch, written to JSON; a slower profile reads higher."""
    import tarfile

    import pandas as pd

    sys.path.insert(0, str(ROOT / "bench"))
    import model_at_shape

    from traces.profile import read_profile, write_profile

    run = tmp_path / "fidelity_runs" / "single"
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps(dict(policy="single", hardware=dict(device="NVIDIA H200"))))
    cols = "t_start_s,t_end_s,device,stage,batch_size,tokens,kv_tokens,attn_sms,ffn_sms,microbatch,mode,num_steps,busy_s,kv_bytes"
    rows = [f"{i * 0.01:.3f},{i * 0.01 + 0.008:.3f},gpu0,decode,64,64,65600,0,0,-1,single,1,0.008,0" for i in range(5)]
    (run / "steps.csv").write_text(cols + "\n" + "\n".join(rows) + "\n")
    pd.DataFrame(dict(request_id=range(64), arrival_s=0.0, prompt_tokens=1024, output_tokens=10, generated_tokens=10,
                      first_token_s=0.0, kv_transfer_end_s=float("nan"), finish_s=1.0, decode_device="gpu0")
                 ).to_csv(run / "requests.csv", index=False)
    archive = tmp_path / "runs.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "fidelity_runs", arcname="fidelity_runs")
    base = ROOT / "traces/profiles/h200x2-qwen3-0.6b.csv"
    df, meta = read_profile(base)
    slow = write_profile(tmp_path / "slow.csv", [{**r, "seconds": r["seconds"] * 2} for r in df.to_dict("records")], meta)
    out = tmp_path / "m.json"
    assert model_at_shape.main([str(archive), "--profile", str(base), "--profile", str(slow), "--out", str(out)]) == 0
    got = json.loads(out.read_text())["model_over_real"]
    fast, twice = got[str(base)]["single"], got[str(slow)]["single"]
    assert set(fast) == {"decode (16, 64]", "decode all"}
    assert 0.3 < fast["decode all"] < 3 and twice["decode all"] > 1.5 * fast["decode all"]


def test_split_share_counts_pipelined_gpu1_decode_steps_by_batch(tmp_path):
    """fidelity_diagnose.split_share: GPU1 decode steps on a split over all of them, per batch bin, a merged row
    counting its num_steps; sequential steps count in the denominator only, GPU0 rows not at all."""
    import importlib.util

    import pandas as pd

    spec = importlib.util.spec_from_file_location("fidelity_diagnose", ROOT / "bench/fidelity_diagnose.py")
    diag = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(diag)
    cols = "t_start_s,t_end_s,device,stage,batch_size,tokens,kv_tokens,attn_sms,ffn_sms,microbatch,mode,num_steps,busy_s,kv_bytes"
    rows = ["0.0,0.01,gpu1,decode,20,20,20000,0,0,-1,pd,3,0.01,0",  # 3 sequential steps of 20
            "0.01,0.02,gpu1,attn,20,20,20000,96,36,-1,pipeline,1,0.01,0",  # 1 pipelined step of 20 (+ its ffn twin)
            "0.01,0.02,gpu1,ffn,20,20,20000,96,36,-1,pipeline,1,0.01,0",
            "0.02,0.03,gpu1,decode,100,100,1e5,64,68,-1,pipeline,2,0.01,0",  # a graphed pipelined row of 2 steps
            "0.0,0.01,gpu0,decode,20,20,20000,0,0,-1,pd,1,0.01,0"]
    (tmp_path / "steps.csv").write_text(cols + "\n" + "\n".join(rows) + "\n")
    got = diag.split_share(tmp_path)
    assert got[pd.Interval(16, 32)] == pytest.approx(0.25) and got[pd.Interval(64, 128)] == pytest.approx(1.0)
    assert len(got) == 2


def test_challenger_blocks_compare_a_pipelined_run_with_the_sequential_steps_around_it(tmp_path):
    """fidelity_diagnose.challenger_blocks: a block of pipelined steps (a merged sim row weighing its steps) over
    the sequential steps beside it at its batch (within 1/16); neighbours at another batch are left out, and so is
    a block under 8 sequences."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("fidelity_diagnose", ROOT / "bench/fidelity_diagnose.py")
    diag = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(diag)
    cols = "t_start_s,t_end_s,device,stage,batch_size,tokens,kv_tokens,attn_sms,ffn_sms,microbatch,mode,num_steps,busy_s,kv_bytes"
    rows, t = [], 0.0

    def step(b, ms, split=(0, 0), k=1, stage="decode"):
        nonlocal t
        rows.append(f"{t},{t + k * ms / 1e3},gpu1,{stage},{b},{b},{b * 2000},{split[0]},{split[1]},-1,x,{k},0,0")
        t += k * ms / 1e3

    step(20, 5.0), step(20, 5.0), step(40, 9.0)  # the step at batch 40 is no neighbour of a block at 20
    step(20, 5.5, (96, 36)), step(20, 5.5, (96, 36), k=3)  # 4 steps at 1.1x
    step(20, 5.0), step(4, 2.0), step(4, 3.0, (64, 68)), step(4, 2.0)  # a block at batch 4: too small
    step(0, 0.0, stage="x")  # no GPU1 decode row
    (tmp_path / "steps.csv").write_text(cols + "\n" + "\n".join(rows) + "\n")
    got = diag.challenger_blocks(tmp_path)
    assert len(got) == 1
    (blk,) = got.to_dict("records")
    assert blk["batch"] == 20 and blk["attn_sms"] == 96 and blk["steps"] == 4 and blk["context"] == 2000
    assert blk["ratio"] == pytest.approx(1.1)


def test_pipeline_diag_to_profile_makes_decode_tail_rows_of_the_committed_tail_ab(tmp_path):
    """bench/pipeline_diag.py --to-profile (CPU): each --tail-long pass's batch becomes a sequential row and one row
    per split, seconds = mixed - uniform step, at the pass's long context; the result is a valid profile."""
    pytest.importorskip("torch")
    sys.path.insert(0, str(ROOT / "bench"))
    import pipeline_diag

    from traces.profile import read_profile

    src = ROOT / "bench/results/pipeline_tail_ab_longs_NVIDIA_H200.json"
    out = tmp_path / "tail.csv"
    assert pipeline_diag.main(["--to-profile", str(src), str(out)]) == 0
    df, meta = read_profile(out)
    assert len(df) == 3 * 5 * 4 and set(df.op) == {"decode_tail"} and sorted(set(df.context)) == [3072, 5120, 8192]
    got = json.loads(src.read_text())["tail_ab_long5120"]["qwen3-0.6b"]["64"]
    row = df[(df.context == 5120) & (df.batch == 64) & (df.attn_sms == 64)].iloc[0]
    assert row.seconds == pytest.approx((got["pipe_mixed_ms"]["64:68"] - got["pipe_uniform_ms"]["64:68"]) / 1e3)
    assert row.microbatches == 2 and row.ffn_sms == 68 and meta["hardware"] == "h200x2"


def test_tail_model_check_reads_the_committed_placed_tails(tmp_path):
    """bench/tail_model_check.py (CPU): the committed graph-replay tails at batches between graph buckets against the
    model with micro-batches as the engine slices them (halves of the padded batch) and as even halves; at a full
    bucket (48) the two agree, and over all rows the engine's slicing fits better (H200: 0.61 vs 0.90 ms)."""
    import json
    import subprocess
    import sys

    files = sorted(str(p) for p in (ROOT / "bench/results").glob("pipeline_tail_placed_*_NVIDIA_H200.json"))
    assert len(files) == 3
    out = tmp_path / "check.json"
    subprocess.run([sys.executable, str(ROOT / "bench/tail_model_check.py"), *files, "--json", str(out)], check=True,
                   cwd=ROOT, capture_output=True)
    d = json.loads(out.read_text())
    err = d["mean_abs_err_ms"]
    assert err["new"] < err["old"] - 0.2, err
    rows = d["rows"]
    assert {r["batch"] for r in rows} == {20, 33, 40, 48, 65, 100}
    full = [r for r in rows if r["batch"] == 48]
    assert full and all(abs(r["new_ms"] - r["old_ms"]) < 1e-9 for r in full)
    first33 = [r for r in rows if r["batch"] == 33 and r["place"] == "first" and r["split"] != "seq"]
    assert all(abs(r["new_err"]) < abs(r["old_err"]) for r in first33)  # the long one in the 24-row half


def test_step_between_buckets_reads_each_way_against_measured_steps(tmp_path):
    """bench/step_between_buckets.py check (CPU): steps "measured" as the bucket_kv way models them read 1.0 that way
    everywhere, and the interpolated and bucket_ctx ways differ from them between graph buckets only (at a bucket all
    three ways are one reading); the summary splits sequential from pipelined and at from between buckets."""
    import json
    import subprocess
    import sys

    sys.path.insert(0, str(ROOT / "bench"))
    from step_between_buckets import modelled_s
    from sim.cost_model import make_cost_model

    profile = str(ROOT / "traces/profiles/h200x2-qwen3-0.6b.csv")
    cost = make_cost_model("h200x2", "qwen3-0.6b", kind="calibrated", profile=profile)
    rows = [dict(batch=b, context=c, split=sp, seconds=modelled_s(cost, "bucket_kv", b, c, sp))
            for b in (24, 33, 40, 48, 65) for c in (1024, 2048) for sp in (None, [64, 68], [96, 36])]
    res = tmp_path / "measured.json"
    res.write_text(json.dumps(dict(gpu="NVIDIA H200", model="qwen3-0.6b", command="synthetic", rows=rows)))
    out = tmp_path / "check.json"
    subprocess.run([sys.executable, str(ROOT / "bench/step_between_buckets.py"), "check", str(res), "--profile",
                    profile, "--json", str(out)], check=True, cwd=ROOT, capture_output=True)
    d = json.loads(out.read_text())
    got = d["rows"]
    assert len(got) == len(rows) and all(abs(r["bucket_kv"] - 1) < 1e-3 for r in got)
    at = [r for r in got if r["batch"] in (24, 48)]
    assert all(abs(r["interp"] - 1) < 1e-3 and abs(r["bucket_ctx"] - 1) < 1e-3 for r in at)
    between = [r for r in got if r["batch"] not in (24, 48)]
    assert all(r["bucket_ctx"] > r["bucket_kv"] for r in between)  # the padding rows' KV, read as sequences
    assert sum(abs(r["interp"] - 1) > 0.005 for r in between) >= len(between) // 2
    s = d["mean_abs_rel_err"]
    assert set(s) == {f"{k}_{w}_buckets" for k in ("seq", "pipelined", "pipelined_over_seq") for w in ("at", "between")}
    assert s["pipelined_between_buckets"]["bucket_kv"] < 1e-3 < s["pipelined_between_buckets"]["interp"]


def test_step_between_buckets_measure_runs_on_cpu(tmp_path):
    """The measure path on CPU with the tiny model (no graphs, no partitions): every (batch, context) gets its
    sequential row and one row per split, each a positive time."""
    import json
    import subprocess
    import sys

    out = tmp_path / "m.json"
    subprocess.run([sys.executable, str(ROOT / "bench/step_between_buckets.py"), "measure", "--device", "cpu", "--model",
                    "tiny", "--batches", "3", "4", "--contexts", "32", "--reps", "1", "--out", str(out)], check=True,
                   cwd=ROOT, capture_output=True)
    d = json.loads(out.read_text())
    assert d["gpu"] == "cpu" and len(d["rows"]) == 2 * 4
    assert sorted({(r["batch"], str(r["split"])) for r in d["rows"]})[0] == (3, "None")
    assert all(r["seconds"] > 0 for r in d["rows"])


def test_step_between_buckets_within_run_reads_the_runs_own_bucket_steps():
    """within_run: steps linear in batch and flat in context are read exactly by interp; bucket_kv, the upper
    bucket's step at the same KV, then reads them high; a kind with no steps between two measured buckets is None."""
    sys.path.insert(0, str(ROOT / "bench"))
    from step_between_buckets import within_run

    rows = [dict(batch=b, context=c, split=sp, seconds=1e-3 * (1 + 0.01 * b))
            for b in (24, 32, 40, 48) for c in (512, 1024) for sp in (None, [64, 68])]
    rows += [dict(batch=24, context=c, split=[96, 36], seconds=1e-3) for c in (512, 1024)]
    got = within_run(dict(graph_buckets=[16, 24, 32, 48, 64], rows=rows))
    assert got["96:36"] is None
    for kind in ("seq", "64:68"):
        assert got[kind]["interp"]["n"] == 2 and got[kind]["interp"]["mean_abs"] < 1e-9
        assert got[kind]["bucket_kv"]["signed"] > 0.05  # 1.48 / 1.40 - 1
