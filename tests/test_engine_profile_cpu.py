"""real/engine_profile.py on CPU (tiny Qwen3, pd over two CPU "devices" with their launch threads): the
engine_* rows it writes, with the spread of their periods, must be valid profile rows the calibrated cost
model reads. Timings on CPU mean nothing; the GPU run is `python -m real.profile` on a two-GPU node."""
from __future__ import annotations

import pytest

pytest.importorskip("torch")

from real.engine_profile import EngineProfileConfig, engine_rows, single_engine_rows  # noqa: E402
from traces.profile import ENGINE_OPS, SPREAD_COLUMNS, read_profile, write_profile  # noqa: E402

PD_OPS = (set(ENGINE_OPS) - {"engine_decode_single", "engine_prefill_single"}) | {"engine_decode_isolated"}  # engine_rows


CFG = EngineProfileConfig(decode=((2, 16), (4, 24)), prefill=((1, 8), (2, 8)), fillers=((1, 8), (2, 4)),
                          decode_steps=8, prefill_reps=6, extra_steps=8, after_idle=((4, 24),), filler_pause_s=0.05,
                          log=lambda *a: None)


@pytest.fixture(scope="module")
def rows():
    return engine_rows("tiny", "cpu", CFG)


def test_prefill_log_gives_step_and_period_by_the_decode_batch_beside(rows):
    """The metadata's prefill_log: every engine_prefill row's shape alone, and the busy runs' fillers by the
    decode batch they ran beside, each with a step no longer than its period."""
    log = CFG.prefill_log
    alone = {(e["seqs"], e["tokens"]) for e in log if e["kind"] == "prefill"}
    assert alone == {(r["batch"], r["tokens"]) for r in rows if r["op"] == "engine_prefill"}
    busy = [e for e in log if e["kind"] == "prefill_busy"]
    assert {e["decode_batch"] for e in busy} <= {2, 4} and busy
    gap = CFG.launch_gap_s
    assert set(gap) == {"idle", "busy"} and all(0 <= v < 1 for v in gap.values())
    pooled = {(r["batch"], r["tokens"]): r["seconds"] for r in rows if r["op"] == "engine_prefill_busy"}
    for shape, mean in pooled.items():  # the pooled row: the n-weighted mean step of its entries + the busy gap
        parts = [e for e in busy if (e["seqs"], e["tokens"]) == shape]
        steps = sum(e["n"] * e["mean_step_s"] for e in parts) / sum(e["n"] for e in parts)
        assert steps + gap["busy"] == pytest.approx(mean)
    for r in rows:  # alone: its entry's mean step + the idle gap
        if r["op"] == "engine_prefill":
            e = next(e for e in log if e["kind"] == "prefill" and (e["seqs"], e["tokens"]) == (r["batch"], r["tokens"]))
            assert e["mean_step_s"] + gap["idle"] == pytest.approx(r["seconds"])
    assert all(0 < e["median_step_s"] <= e["median_period_s"] + 1e-9 and e["n"] >= 1 for e in log)


def test_fillers_after_an_idle_gpu0_are_logged_not_made_rows(rows):
    """cfg.after_idle: one more busy run whose filler groups each arrive filler_pause_s after the last was
    reported, logged as prefill_busy_after_idle (their periods hold the pause), no rows of their own."""
    after = [e for e in CFG.prefill_log if e["kind"] == "prefill_busy_after_idle"]
    assert after and {e["decode_batch"] for e in after} == {4} and {e["pause_s"] for e in after} == {0.05}
    assert all(e["median_period_s"] >= 0.05 > e["median_step_s"] for e in after)
    assert sum(r["op"] == "engine_decode_busy" and r["batch"] == 4 for r in rows) == 1


def test_prefill_rows_from_steps_and_gap_or_from_periods():
    """A prefill row is its steps plus the launch gap (each step's cost; the spread of those), or with
    prefill_cost="period" (or no gap measured) its periods as before; a bad prefill_cost is an error."""
    from real.engine_profile import _prefill_rows, launch_gap, prefill_row

    timed = [(0.010, 0.004), (0.012, 0.005), (0.011, 0.006), (0.010, 0.004), (0.013, 0.006)]
    row = prefill_row("engine_prefill", 1, 512, timed, 0.0005)
    assert row["seconds"] == pytest.approx(0.005 + 0.0005) and row["p99_over_mean"] == pytest.approx(0.0065 / 0.0055, rel=0.01)
    assert prefill_row("engine_prefill", 1, 512, timed, None)["seconds"] == pytest.approx(0.0112)
    assert launch_gap([3.0, 1.0, 2.0]) == 2.0 and launch_gap([]) is None
    cfg = EngineProfileConfig(log=lambda *a: None)
    rows = _prefill_rows(cfg, {(1, 512): timed}, {(1, 128): timed, (2, 64): timed[:1]}, {"idle": [], "busy": [0.001]})
    assert [(r["op"], r["tokens"]) for r in rows] == [("engine_prefill", 512), ("engine_prefill_busy", 128)]
    assert all(r["seconds"] == pytest.approx(0.006) for r in rows)  # no idle gap measured: the busy one stands in
    assert cfg.launch_gap_s == {"busy": 0.001}
    old = EngineProfileConfig(prefill_cost="period", log=lambda *a: None)
    assert _prefill_rows(old, {(1, 512): timed}, {}, {"idle": [0.001], "busy": []})[0]["seconds"] == pytest.approx(0.0112)
    with pytest.raises(ValueError, match="prefill_cost"):
        EngineProfileConfig(prefill_cost="median")


def test_every_engine_op_is_measured_at_its_shapes(rows):
    assert {r["op"] for r in rows} == PD_OPS
    dec = {(r["op"], r["batch"]) for r in rows if r["op"].startswith("engine_decode")}
    assert dec == {(op, b) for op in ("engine_decode", "engine_decode_busy", "engine_decode_isolated") for b in (2, 4)}
    idle = {r["batch"]: r["context"] for r in rows if r["op"] == "engine_decode"}  # each idle row's twin at its shape
    assert {r["batch"]: r["context"] for r in rows if r["op"] == "engine_decode_isolated"} == idle
    pre = {(r["batch"], r["tokens"]) for r in rows if r["op"] == "engine_prefill"}
    assert pre == {(1, 8), (2, 16)}
    assert {(r["batch"], r["tokens"]) for r in rows if r["op"] == "engine_prefill_busy"} <= {(1, 8), (2, 8)}
    for r in rows:
        assert r["seconds"] > 0
        if r["op"].startswith("engine_decode"):  # mean context: prompts spread around it, plus the steps decoded
            assert 16 <= r["context"] <= 24 + 8 + 8 * 8


def test_single_engine_rows_time_a_one_gpu_engines_decode_steps_and_prefills(tmp_path):
    """policy single: decode steps on GPU0 (a colocated engine forms its batch through mixed steps first), at
    every shape, with their spread, its launch gap in the config; prefills alone at every single_prefill shape,
    each its mean step + that gap (logged as kind prefill_single); all valid profile rows."""
    cfg = EngineProfileConfig(decode=((2, 16), (4, 24)), decode_steps=8, extra_steps=8, single_prefill=((1, 8), (2, 8)),
                              prefill_reps=6, log=lambda *a: None)
    got = single_engine_rows("tiny", "cpu", cfg)
    assert {(r["op"], r["batch"]) for r in got} == {("engine_decode_single", 2), ("engine_decode_single", 4),
                                                     ("engine_decode_single_isolated", 2),
                                                     ("engine_decode_single_isolated", 4),
                                                     ("engine_prefill_single", 1), ("engine_prefill_single", 2)}
    twins = {r["batch"]: r for r in got if r["op"] == "engine_decode_single_isolated"}
    for r in got:
        if r["op"] == "engine_decode_single":
            assert twins[r["batch"]]["context"] == r["context"] and twins[r["batch"]]["seconds"] > 0
    got = [r for r in got if not r["op"].endswith("_isolated")]  # no spread: a median of isolated steps
    for r in got:
        q = [r[c] for c in SPREAD_COLUMNS]
        assert r["seconds"] > 0 and 0 < q[0] <= q[1] <= q[2] <= q[3], r
        if r["op"] == "engine_decode_single":
            assert 16 <= r["context"] <= 24 + 8 + 8 * 8
    gap = cfg.launch_gap_s["single"]
    assert gap >= 0
    log = {(e["seqs"], e["tokens"]): e for e in cfg.prefill_log if e["kind"] == "prefill_single"}
    for r in got:
        if r["op"] == "engine_prefill_single":
            step = log[(r["batch"], r["tokens"])]["mean_step_s"]
            assert r["tokens"] == 8 * r["batch"] and r["seconds"] == pytest.approx(step + gap)
    meta = dict(gpu="cpu", date="2026-01-01", command="test", model="tiny", hardware="cpu", torch="x", sms=16)
    df, _ = read_profile(write_profile(tmp_path / "p.csv", got, meta))
    assert set(df["op"]) == {"engine_decode_single", "engine_prefill_single"}


def test_every_row_records_the_spread_of_its_periods(rows):
    for r in rows:
        if r["op"].endswith("_isolated"):  # a median of isolated runner steps: no periods
            continue
        q = [r[c] for c in SPREAD_COLUMNS]
        assert 0 < q[0] <= q[1] <= q[2] <= q[3], r


def test_rows_round_trip_through_the_profile_format(rows, tmp_path):
    meta = dict(gpu="cpu", date="2026-01-01", command="test", model="tiny", hardware="cpu", torch="x", sms=16)
    df, _ = read_profile(write_profile(tmp_path / "p.csv", rows, meta))
    assert len(df) == len(rows) and set(df["op"]) == PD_OPS
    assert df[df.op != "engine_decode_isolated"][list(SPREAD_COLUMNS)].notna().all().all()


def test_spread_columns_are_percentiles_of_period_over_mean():
    from real.engine_profile import spread_columns

    periods = [1.0] * 90 + [2.0] * 10  # mean 1.1
    got = spread_columns(periods)
    assert got["p10_over_mean"] == pytest.approx(1 / 1.1) and got["p50_over_mean"] == pytest.approx(1 / 1.1)
    assert got["p99_over_mean"] == pytest.approx(2 / 1.1)
    assert spread_columns([1.0, 2.0, 3.0, 4.0]) == {}  # too few periods for a spread
    ramp = [1.0 + 0.01 * i for i in range(50)]  # a decode run's contexts grow: a trend, not noise
    assert all(v == pytest.approx(1.0) for v in spread_columns(ramp, detrend=True).values())
    spiky = ramp[:]
    spiky[-1] *= 3  # one slow step does not tilt the line (Theil-Sen), it shows as the tail
    got = spread_columns(spiky, detrend=True)
    body = [got[c] for c in SPREAD_COLUMNS[:3]]  # the other steps sit on the line: one ratio, the means' ratio
    assert max(body) - min(body) < 0.02 and body[1] == pytest.approx(sum(ramp) / sum(spiky), abs=0.01)
    assert got["p99_over_mean"] > 1.5


def test_periods_and_forming_steps_read_the_engines_step_rows():
    from real.engine_profile import _forming_steps, _periods

    def row(t0, t1, dev, stage, batch):  # real/engine.py's step tuple, the fields these read
        return (t0, t1, dev, stage, batch, batch, 0)

    rows = [row(0.0, 1.0, "gpu1", "decode", 2), row(1.1, 2.0, "gpu1", "decode", 3), row(2.2, 3.0, "gpu1", "decode", 4),
            row(3.5, 4.0, "gpu1", "decode", 4), row(4.1, 5.0, "gpu1", "decode", 4), row(1.0, 9.0, "gpu0", "prefill", 1)]
    periods = _periods(rows, "gpu1", lambda r: r[3] == "decode" and r[4] == 4)
    assert [round(p, 6) for p, _ in periods] == [1.3, 0.6]  # launch to next launch, both steps at the batch
    assert _forming_steps(rows, 4) == 2 and _forming_steps(rows, 8) == 2 * 5


def test_decode_program_rows_are_valid_profile_rows(tmp_path):
    """real.profile's decode_program rows (here a torch stand-in for the kernel, timed on CPU): one row per
    context, sms // kv_heads sequences, valid for the profile schema and read by the simulator as the tail."""
    import torch

    from real.profile import DECODE_PROGRAM_CONTEXTS, decode_program_rows, median_s
    from sim.calibrated import CalibratedCostModel

    seen = []

    def kernel(q, k, v, tables, lens):
        seen.append((q.shape[0], int(lens.max())))
        return (k[tables.clamp(min=0).long()].float().sum(dim=(1, 2)) * q.float().mean()).sum()

    rows = decode_program_rows(16, 8, 128, torch.device("cpu"), 132, 1, kernel=kernel, time_fn=median_s)
    assert [r["context"] for r in rows] == list(DECODE_PROGRAM_CONTEXTS)
    assert {r["batch"] for r in rows} == {132 // 8} and {n for n, _ in seen} == {132 // 8}
    assert {c for _, c in seen} == set(DECODE_PROGRAM_CONTEXTS)
    meta = dict(gpu="cpu", date="2026-01-01", command="test", model="qwen3-0.6b", hardware="h200x2", torch="x",
                sms=132)
    path = write_profile(tmp_path / "h200x2-qwen3-0.6b.csv", rows, meta)
    df, _ = read_profile(path)
    assert set(df.op) == {"decode_program"}
    cal = CalibratedCostModel(path, "h200x2", "qwen3-0.6b")
    assert "decode_program rows" in cal.sources["tail"]


def test_engine_rows_come_from_a_process_of_their_own(tmp_path):
    """real.profile measures the engine_* rows in a child process and takes its rows and metadata (run after
    the runner-level rows in one process, the engine's decode steps were 1.5-2 ms slow on 2x H100)."""
    import sys

    from real.profile import measure_engine_fresh

    child = [sys.executable, "-c", "import json, sys; json.dump({'rows': [{'op': 'engine_decode', 'batch': 1, "
             "'seconds': 0.002}], 'engine_rows': {'policy': 'pd'}}, open(sys.argv[1], 'w'))"]
    meta = {}
    rows = measure_engine_fresh("tiny", True, meta, command=child)
    assert rows == [{"op": "engine_decode", "batch": 1, "seconds": 0.002}]
    assert meta["engine_rows"]["policy"] == "pd" and "fresh" in meta["engine_rows"]["process"]
    with pytest.raises(RuntimeError, match="engine rows' process failed"):
        measure_engine_fresh("tiny", True, {}, command=[sys.executable, "-c", "raise SystemExit(3)"])


def test_engine_rows_over_several_processes_keep_each_shapes_median(tmp_path):
    """--engine-processes 3: three child processes; each shape's seconds and spread columns are their
    medians over the processes that measured it (two: the mean of the two), rows whose contexts are a token
    apart match, and the metadata says how many processes and how far apart they were."""
    import sys

    from real.profile import measure_engine_processes

    script = tmp_path / "child.py"  # process k (counted in a file) times batch 1 at 2.0/2.6/2.1 ms
    script.write_text(
        "import json, sys, pathlib\n"
        f"n = pathlib.Path({str(tmp_path / 'count')!r})\n"
        "k = int(n.read_text()) if n.exists() else 0\n"
        "n.write_text(str(k + 1))\n"
        "rows = [{'op': 'engine_decode', 'batch': 1, 'context': 1120, 'seconds': [0.0020, 0.0026, 0.0021][k],"
        " 'p99_over_mean': [1.1, 1.9, 1.2][k]}]\n"
        "if k == 1: rows.append({'op': 'engine_prefill_busy', 'batch': 7, 'tokens': 16384, 'seconds': 0.05})\n"
        "json.dump({'rows': rows, 'engine_rows': {'policy': 'pd', 'launch_gap_s': k}}, open(sys.argv[1], 'w'))\n")
    meta = {}
    rows = measure_engine_processes("tiny", True, meta, processes=3, command=[sys.executable, str(script)])
    assert rows == [{"op": "engine_decode", "batch": 1, "context": 1120, "seconds": 0.0021, "p99_over_mean": 1.2},
                    {"op": "engine_prefill_busy", "batch": 7, "tokens": 16384, "seconds": 0.05}]
    info = meta["engine_rows"]
    assert info["processes"] == 3 and info["launch_gap_s"] == 0  # the first process's metadata
    assert info["max_spread_between_processes"] == {"engine_decode": pytest.approx(0.3, abs=1e-4)}
    one = {}
    (tmp_path / "count").unlink()
    assert measure_engine_processes("tiny", True, one, processes=1, command=[sys.executable, str(script)]) == [
        {"op": "engine_decode", "batch": 1, "context": 1120, "seconds": 0.0020, "p99_over_mean": 1.1}]
    assert "processes" not in one["engine_rows"] and "fresh" in one["engine_rows"]["process"]
    (tmp_path / "count").unlink()  # two processes: the mean of the two (not the faster), contexts a token apart
    script.write_text(script.read_text().replace("'context': 1120", "'context': 1120 + k"))
    two = measure_engine_processes("tiny", True, {}, processes=2, command=[sys.executable, str(script)])
    assert two[0] == {"op": "engine_decode", "batch": 1, "context": 1120, "seconds": pytest.approx(0.0023),
                      "p99_over_mean": pytest.approx(1.5)}
    with pytest.raises(ValueError):
        measure_engine_processes("tiny", True, {}, processes=0, command=[sys.executable, str(script)])


def test_gpu_state_reads_nvidia_smi_or_says_none(tmp_path, monkeypatch):
    """The profile's metadata records each GPU's driver and clocks (machines of one GPU model differ); without
    nvidia-smi it is None, not an error."""
    from real.profile import gpu_state

    monkeypatch.setenv("PATH", str(tmp_path))
    assert gpu_state() is None
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho '0, NVIDIA H200, 580.159.04, 345 MHz, 3201 MHz, 1980 MHz, 84.20 W, 38, 0x1'\n")
    fake.chmod(0o755)
    (gpu,) = gpu_state()
    assert gpu["driver_version"] == "580.159.04" and gpu["clocks.mem"] == "3201 MHz" and gpu["index"] == "0"


def test_copy_beside_decode_rows_copy_and_make_valid_rows(tmp_path):
    """real.profile's decode_copy rows on CPU (tiny model; the "copy" transport runs synchronously there, so
    the timings mean nothing): one row per (tokens, batch), the copy lands in the cache's last blocks, and
    the rows, a difference that may be < 0, make a valid profile the simulator fits per byte."""
    import torch

    from real.profile import copy_beside_decode_rows, profile_runner
    from sim.calibrated import CalibratedCostModel

    runner = profile_runner("tiny", torch.device("cpu"), 4, 32, 4096)
    src = torch.randn((*runner.kv_cache.shape[:2], 5, *runner.kv_cache.shape[3:]), dtype=runner.kv_cache.dtype)
    rows, mode = copy_beside_decode_rows(runner, src, "copy", 1, batches=(2, 4), tokens=(32, 64), context=32)
    assert mode == "copy"
    assert [(r["tokens"], r["batch"]) for r in rows] == [(32, 2), (32, 4), (64, 2), (64, 4)]
    block_bytes = runner.kv_cache[:, :, 0].numel() * runner.kv_cache.element_size()
    assert [r["bytes"] for r in rows] == [2 * block_bytes] * 2 + [4 * block_bytes] * 2
    top = runner.kv_cache.shape[2]
    assert torch.equal(runner.kv_cache[:, :, top - 4:], src[:, :, :4])  # the 64-token copy's four blocks
    rows[0]["seconds"] = -1e-5  # what noise can give: allowed for this op only
    meta = dict(gpu="cpu", date="2026-01-01", command="test", model="qwen3-0.6b", hardware="h200x2", torch="x",
                sms=132)
    path = write_profile(tmp_path / "h200x2-qwen3-0.6b.csv", rows, meta)
    df, _ = read_profile(path)
    assert set(df.op) == {"decode_copy"} and df.seconds.iloc[0] == -1e-5
    cal = CalibratedCostModel(path, "h200x2", "qwen3-0.6b")
    assert "4 decode_copy rows" in cal.sources["copy"]
    assert cal.copy_interference_s(10 * block_bytes, 4) >= 0
    from traces.profile import ProfileError

    with pytest.raises(ProfileError, match="more than 0 seconds"):
        write_profile(tmp_path / "bad.csv", [dict(op="decode", batch=1, context=8, seconds=-1e-5)], meta)


def test_profile_times_the_decode_side_on_the_engines_decode_gpu():
    """real.profile's default decode GPU is the engine's (GPU1 beside prefill GPU0); one GPU measures both."""
    from real.profile import decode_device
    assert decode_device(0, None, 2) == 1 and decode_device(1, None, 2) == 0
    assert decode_device(0, None, 1) == 0  # one GPU: everything there
    assert decode_device(0, 0, 2) == 0  # asked for: the old one-GPU profile on a two-GPU node
    assert decode_device(2, None, 4) == 2
    with pytest.raises(ValueError, match="--decode-device-id 3: 2 GPU"):
        decode_device(0, 3, 2)
    with pytest.raises(ValueError, match="--device-id 1: 1 GPU"):
        decode_device(1, None, 1)


def test_mixed_batch_is_one_colocated_step_on_disjoint_blocks():
    """real.profile's mixed rows time runner.run on mixed_batch: a prefill chunk beside `decodes` decodes, on
    blocks apart from theirs; one step samples a token for every decode and for the chunk's prompt."""
    import torch

    from real.profile import mixed_batch, profile_runner

    runner = profile_runner("tiny", torch.device("cpu"), 16, 256, 16384)
    try:
        with torch.inference_mode():
            batch = mixed_batch(runner, 64, 4, 128)
            assert batch.stage == "mixed" and batch.prefill_tokens == 64 and len(batch.decode) == 4
            (req, _), = batch.prefill
            decode_blocks = {b for r in batch.decode for b in r.blocks}
            assert not decode_blocks & set(req.blocks) and req.request_id not in {r.request_id for r in batch.decode}
            sampled, tokens = runner.run(batch, {})
            assert len(sampled) == 5 and len(tokens) == 5 and req in sampled
    finally:
        runner.close()


def test_a_batch_the_kv_cache_cannot_hold_is_named_as_such():
    """On 2x H100 (session 21) every engine decode row was skipped: the parent profile process still held the
    decode GPU's 64 GB runner cache, so the engine's KV cache was too small. The skip now says so."""
    from types import SimpleNamespace

    from real.engine_profile import kv_shortfall

    bench = SimpleNamespace(engine=SimpleNamespace(runners={"gpu1": SimpleNamespace(block_size=16, num_blocks=4000)}))
    lengths = [512 + 16 * i for i in range(64)]  # 1,016 tokens mean, as decode_point spreads them
    need = sum(-(-(n + 192) // 16) for n in lengths)
    assert need > 4000
    got = kv_shortfall(bench, lengths, 192, "gpu1")
    assert f"has 4000 blocks of 16 tokens, the batch needs {need} at its last step" in got
    bench.engine.runners["gpu1"].num_blocks = need
    assert kv_shortfall(bench, lengths, 192, "gpu1") == ""
    assert kv_shortfall(bench, lengths, 192, "gpu0") == ""  # no such runner: nothing to say


def test_release_cuda_memory_reports_each_visible_gpu():
    import torch

    from real.profile import release_cuda_memory

    got = release_cuda_memory()
    assert len(got) == torch.cuda.device_count() and all(g >= 0 for g in got)
