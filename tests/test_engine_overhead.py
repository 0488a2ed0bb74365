"""The real engine's per-step overhead in the simulator (sim/overhead.py, sim/engine.py), and the sim
running what the real engine ran (split step, policy configuration, KV blocks). CPU, fast.

The overhead comes from a profile's engine_* rows (steps timed inside the engine's body, real/engine_profile.py)
minus the isolated step at the same shape; a profile without them changes nothing.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from policies import Capabilities, load_policy_config
from policies.specs import hardware_spec, model_spec
from sim.calibrated import CalibratedCostModel
from sim.cost_model import AnalyticCostModel, make_cost_model
from sim.engine import SimConfig, Simulation
from traces.profile import ProfileError, write_profile
from traces.schema import STEPS
from traces.workload import synthetic_workload

HW, MODEL = "h200x2", "qwen3-0.6b"
META = dict(gpu="synthetic", date="2026-01-01", command="tests/test_engine_overhead.py", model=MODEL, hardware=HW,
            torch="none", sms=132)
DECODE_ROWS = [(b, c) for b in (1, 16, 64, 256) for c in (512, 2048)]
PREFILL_ROWS = [(1, 512), (1, 2048), (1, 8192), (4, 1024)]  # shapes the isolated rows measured too


def truth() -> AnalyticCostModel:
    return make_cost_model(HW, MODEL, gemm_eff=0.55, hbm_eff=0.85)


def isolated_rows(cm) -> list[dict]:
    rows = [dict(op="decode", batch=b, context=c, seconds=cm.decode_step(b, b * c).step_s)
            for b in (1, 4, 16, 64, 256) for c in (512, 1024, 2048)]
    rows += [dict(op="prefill", batch=1, tokens=t, seconds=cm.forward_s([(t, 0)])) for t in (128, 512, 2048, 8192)]
    rows += [dict(op="prefill", batch=4, tokens=4096, seconds=cm.forward_s([(1024, 0)] * 4))]
    return rows


def decode_overhead(b: int, busy: bool) -> float:
    """The engine's made-up overhead: linear in batch, more with the other GPU busy."""
    return (0.4e-3 + 15e-6 * b) * (1.5 if busy else 1.0)


def prefill_overhead(tokens: int, busy: bool) -> float:
    return (12e-3 if tokens <= 2048 else 4e-3) + (2e-3 if busy else 0.0)


def engine_rows(cm, ops=("engine_decode", "engine_decode_busy", "engine_prefill", "engine_prefill_busy")) -> list[dict]:
    rows = []
    for busy in (False, True):
        op = "engine_decode_busy" if busy else "engine_decode"
        if op in ops:
            rows += [dict(op=op, batch=b, context=c, seconds=cm.decode_step(b, b * c).step_s + decode_overhead(b, busy))
                     for b, c in DECODE_ROWS]
        op = "engine_prefill_busy" if busy else "engine_prefill"
        if op in ops:
            rows += [dict(op=op, batch=n, tokens=n * t,
                          seconds=cm.forward_s([(t, 0)] * n) + prefill_overhead(n * t, busy)) for n, t in PREFILL_ROWS]
    return rows


@pytest.fixture(scope="module")
def cal(tmp_path_factory) -> CalibratedCostModel:
    cm = truth()
    path = write_profile(tmp_path_factory.mktemp("p") / "engine.csv", isolated_rows(cm) + engine_rows(cm), META)
    return CalibratedCostModel(path, HW, MODEL)


def test_overhead_is_engine_minus_isolated_exactly_at_measured_shapes(cal):
    for b, c in DECODE_ROWS:
        for busy in (False, True):
            assert cal.engine_overhead_s("decode", b, b * c, busy) == pytest.approx(decode_overhead(b, busy), abs=1e-9)
    for n, t in PREFILL_ROWS:
        for busy in (False, True):
            got = cal.engine_overhead_s("prefill", n, n * t, busy)
            assert got == pytest.approx(prefill_overhead(n * t, busy), abs=1e-9), (n, t, busy)
    assert cal.overhead_depends_on_other_gpu
    assert "engine_decode 8" in cal.sources["engine"] and "other GPU" in cal.sources["engine"]


def test_rows_a_token_apart_are_one_shape_not_a_slope(tmp_path):
    """Two engine rows of one shape at contexts a token apart (two processes' measurements) fold into their
    median: their difference read as a slope put 537 ms of overhead on a batch-64 step at 4,096 tokens."""
    cm = truth()
    rows = isolated_rows(cm) + engine_rows(cm, ops=("engine_decode",))
    noisy = [dict(op="engine_decode", batch=64, context=c, seconds=cm.decode_step(64, 64 * c).step_s + extra)
             for c, extra in ((2049, 0.2e-3), (2050, 0.5e-3))]
    path = write_profile(tmp_path / "dup.csv", rows + noisy, META)
    cal = CalibratedCostModel(path, HW, MODEL)
    assert "2 row(s) within 1% in context" in cal.sources["profile"]
    at_2048 = [decode_overhead(64, False), 0.2e-3, 0.5e-3]  # the measured row and the two noisy ones
    assert cal.engine_overhead_s("decode", 64, 64 * 2049) == pytest.approx(float(np.median(at_2048)), abs=1e-5)
    assert cal.engine_overhead_s("decode", 64, 64 * 8192) < 2e-3


def test_overhead_between_and_beyond_the_rows(cal):
    # linear in batch between rows, non-decreasing beyond, never negative
    assert cal.engine_overhead_s("decode", 40, 40 * 1024) == pytest.approx(decode_overhead(40, False), rel=1e-6)
    assert cal.engine_overhead_s("decode", 512, 512 * 1024) == pytest.approx(decode_overhead(512, False), rel=1e-6)
    assert cal.engine_overhead_s("prefill", 1, 16384) == pytest.approx(prefill_overhead(8192, False))  # held
    assert cal.engine_overhead_s("decode", 0, 0) == 0.0
    # the isolated steps themselves are untouched: the overhead is only ever added by the simulator
    assert cal.decode_step(64, 64 * 1024).step_s == pytest.approx(truth().decode_step(64, 64 * 1024).step_s, rel=1e-9)


def test_a_profile_without_engine_rows_adds_nothing_and_says_so(tmp_path):
    cal = CalibratedCostModel(write_profile(tmp_path / "p.csv", isolated_rows(truth()), META), HW, MODEL)
    assert cal.engine_overhead_s("decode", 64, 64 * 1024, True) == 0.0
    assert cal.engine_overhead_s("prefill", 1, 1024) == 0.0
    assert not cal.overhead_depends_on_other_gpu
    assert cal.sources["engine"].startswith("none") and "engine" not in cal.fallbacks
    assert make_cost_model(HW, MODEL).engine_overhead_s("decode", 64, 64 * 1024, True) == 0.0


def test_one_measured_state_stands_in_for_the_other(tmp_path):
    cm = truth()
    rows = isolated_rows(cm) + engine_rows(cm, ("engine_decode", "engine_prefill_busy"))
    cal = CalibratedCostModel(write_profile(tmp_path / "p.csv", rows, META), HW, MODEL)
    assert not cal.overhead_depends_on_other_gpu
    assert cal.engine_overhead_s("decode", 16, 16 * 512, True) == pytest.approx(decode_overhead(16, False))
    assert cal.engine_overhead_s("prefill", 1, 512, False) == pytest.approx(prefill_overhead(512, True))


def test_engine_rows_are_validated(tmp_path):
    with pytest.raises(ProfileError, match="tokens"):
        write_profile(tmp_path / "bad.csv", [dict(op="engine_decode", batch=4, tokens=8, seconds=1e-3)], META)
    with pytest.raises(ProfileError, match="tokens"):
        write_profile(tmp_path / "bad.csv", [dict(op="engine_prefill", batch=4, tokens=2, seconds=1e-3)], META)


# ---- the simulator adds it, by the other GPU's state at each step's start ----
class Overhead:
    """A cost model with a known overhead: the analytic steps + 1 ms per decode step (3 ms while GPU0 runs
    a step), + 10 ms per prefill (20 ms while GPU1 runs one)."""
    overhead_depends_on_other_gpu = True

    def __init__(self, base):
        self.base, self.name = base, "test"

    def __getattr__(self, name):
        return getattr(self.base, name)

    def engine_overhead_s(self, stage, batch_size, tokens, other_busy=False, colocated=False):
        if stage == "decode":
            return 3e-3 if other_busy else 1e-3
        return 20e-3 if other_busy else 10e-3


def simulate(cost, policy="pd", n=300, rate=30.0):
    hw, spec = hardware_spec(HW), model_spec(MODEL)
    sim = Simulation(synthetic_workload(n, rate_rps=rate, seed=3).requests, load_policy_config(policy), cost, hw, spec,
                     SimConfig(capabilities=Capabilities(num_gpus=2))).run()
    return sim, pd.DataFrame(sim.steps, columns=STEPS.names)


def _running(steps: pd.DataFrame, device: str, t: np.ndarray) -> np.ndarray:
    g = steps[steps.device == device].sort_values("t_start_s")
    s, e = g.t_start_s.to_numpy(), g.t_end_s.to_numpy()
    i = np.searchsorted(s, t, side="right") - 1
    return (i >= 0) & (t < e[np.maximum(i, 0)] - 1e-12)


def test_each_step_pays_the_overhead_of_the_other_gpus_state_at_its_start():
    base = make_cost_model(HW, MODEL)
    sim, steps = simulate(Overhead(base))
    dec = steps[(steps.device == "gpu1") & (steps.stage == "decode")]
    per_step = ((dec.t_end_s - dec.t_start_s) / dec.num_steps).to_numpy()
    first = np.array([base.decode_step(int(b), int(kv)).step_s for b, kv in zip(dec.batch_size, dec.kv_tokens)])
    extra = per_step - first  # merged runs add a small KV-growth slope on top
    busy = _running(steps, "gpu0", dec.t_start_s.to_numpy())
    assert busy.any() and (~busy).any()
    assert np.all(np.abs(extra[busy] - 3e-3) < 2e-4) and np.all(np.abs(extra[~busy] - 1e-3) < 2e-4)
    pre = steps[steps.stage == "prefill"]
    busy1 = _running(steps, "gpu1", pre.t_start_s.to_numpy())
    assert busy1.any() and (~busy1).any()
    dur = (pre.t_end_s - pre.t_start_s).to_numpy()
    assert np.all(dur[busy1] > 20e-3) and dur[~busy1].min() > 10e-3


def test_a_merged_decode_run_ends_when_the_other_gpu_changes_state():
    """No decode run may straddle GPU0 going busy or idle: its steps would be costed with a stale state.
    Back-to-back GPU0 steps (the next starting as the last ends) are one busy stretch and cut nothing."""
    _, steps = simulate(Overhead(make_cost_model(HW, MODEL)))
    runs = steps[(steps.device == "gpu1") & (steps.num_steps > 1)]
    assert len(runs)
    g0 = steps[steps.device == "gpu0"].sort_values("t_start_s")
    s0, e0 = g0.t_start_s.to_numpy(), g0.t_end_s.to_numpy()
    gap = s0[1:] > e0[:-1] + 1e-12  # GPU0 idled between these two steps
    assert gap.any() and (~gap).any()  # both kinds of boundary occur in this run
    edges = np.sort(np.concatenate([s0[:1], s0[1:][gap], e0[:-1][gap], e0[-1:]]))
    for t0, t1, k in zip(runs.t_start_s, runs.t_end_s, runs.num_steps):
        step = (t1 - t0) / k
        inside = edges[(edges > t0 + 1e-12) & (edges < t1 - step - 1e-9)]  # at most the last step may hold one
        assert not len(inside), (t0, t1, k, inside[:3])
    inner = np.sort(np.concatenate([s0[1:][~gap], e0[:-1][~gap]]))  # boundaries inside GPU0's busy stretches
    held = [((inner > t0 + 1e-12) & (inner < t1 - (t1 - t0) / k - 1e-9)).any()
            for t0, t1, k in zip(runs.t_start_s, runs.t_end_s, runs.num_steps)]
    assert any(held)  # runs go on across them (cutting at every one is what made dp 20x slower)


def test_without_overhead_the_simulation_is_unchanged():
    base = make_cost_model(HW, MODEL)
    _, plain = simulate(base)
    _, zero = simulate(Zero(base))
    pd.testing.assert_frame_equal(plain, zero)


class Zero(Overhead):
    overhead_depends_on_other_gpu = False

    def engine_overhead_s(self, stage, batch_size, tokens, other_busy=False, colocated=False):
        return 0.0


# ---- the sim runs what the real engine ran ----
def test_split_step_offers_the_splits_real_run_offers():
    hw = hardware_spec(HW)
    assert hw.with_split_step(0) == hw
    assert hw.with_split_step(32).allowed_splits() == [(32, 100), (64, 68), (96, 36)]
    assert hw.with_split_step(20).sm_granularity == 24  # rounded up to the 8-SM granularity
    assert hw.with_split_step(200).allowed_splits() == [(64, 68)]  # at most half the GPU: one split remains


def test_fidelity_bench_simulates_the_engines_configuration(tmp_path):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from fidelity_bench import real_settings

    pcfg = load_policy_config("adaptive")
    pcfg.scheduler.prefill_token_budget, pcfg.scheduler.max_context_tokens = 16384, 32768
    info = dict(policy="adaptive", policy_config=json.loads(json.dumps(pcfg.to_dict())),
                engine_config=dict(split_step_sms=32), hardware=dict(device="NVIDIA H200", count=2),
                kv_blocks_per_gpu=70628, command="python -m real.run --split-step 32")
    got = real_settings(info)
    assert got["split_step_sms"] == 32 and got["sim_config"].kv_blocks == 70628
    cfg = load_policy_config("adaptive", overrides=got["overrides"])
    assert cfg.scheduler.prefill_token_budget == 16384 and cfg.scheduler.max_context_tokens == 32768
    del info["engine_config"]
    assert real_settings(info)["split_step_sms"] == 32  # from the recorded command


# ---- policy single: a one-GPU engine, its own decode rows ----
def single_overhead(b: int) -> float:
    """The one-GPU engine's made-up overhead: below pd's (no launch thread)."""
    return 0.1e-3 + 5e-6 * b


def test_an_engine_row_with_an_isolated_twin_is_read_against_the_twin(tmp_path):
    """engine_decode(_single)_isolated rows (the isolated step timed in the engine rows' own process): where an
    engine decode row has a twin at its shape (context within 1%), its overhead is row - twin, whatever the
    profile's isolated step; rows without one keep row - the profile's step. Here the engine process ran 8%
    slower than the profiling one: against the profile, its overhead would carry that 8% of the step."""
    cm = truth()
    slow = 1.08
    engine = [dict(op=op, batch=b, context=c, seconds=slow * cm.decode_step(b, b * c).step_s + decode_overhead(b, busy))
              for op, busy in (("engine_decode", False), ("engine_decode_busy", True)) for b, c in DECODE_ROWS]
    twins = [dict(op="engine_decode_isolated", batch=b, context=c + 5, seconds=slow * cm.decode_step(b, b * c).step_s)
             for b, c in DECODE_ROWS if b != 256]  # 5 tokens off: one shape; none at batch 256
    cal = CalibratedCostModel(write_profile(tmp_path / "t.csv", isolated_rows(cm) + engine + twins, META), HW, MODEL)
    for b, c in DECODE_ROWS:
        for busy in (False, True):
            got = cal.engine_overhead_s("decode", b, b * c, busy)
            if b == 256:  # against the profile's step: the engine process's 8% lands in the overhead
                want = decode_overhead(b, busy) + (slow - 1) * cm.decode_step(b, b * c).step_s
                assert got == pytest.approx(want, rel=1e-3)
            else:
                assert got == pytest.approx(decode_overhead(b, busy), abs=1e-9)
    assert "12 decode rows less their isolated twin timed in the same process" in cal.sources["engine"]
    assert "engine_decode_isolated" not in cal.sources["engine"]  # twins are not overhead rows of their own


def test_single_takes_its_decode_overhead_from_its_own_rows(tmp_path):
    """engine_decode_single rows are timed on GPU0: their overhead is the row less GPU0's isolated step (GPU1's
    decode rows x the decode_prefill_gpu ratio), so at their shapes the simulated single decode step is the row."""
    cm = truth()
    ratio = 0.9  # GPU0 decodes in 0.9x GPU1's time
    gpu0 = [dict(op="decode_prefill_gpu", batch=b, context=1024, seconds=ratio * cm.decode_step(b, b * 1024).step_s)
            for b in (16, 64, 256)]
    single = [dict(op="engine_decode_single", batch=b, context=c,
                   seconds=ratio * cm.decode_step(b, b * c).step_s + single_overhead(b)) for b, c in DECODE_ROWS]
    rows = isolated_rows(cm) + engine_rows(cm)
    cal = CalibratedCostModel(write_profile(tmp_path / "s.csv", rows + gpu0 + single, META), HW, MODEL)
    for b, c in DECODE_ROWS:
        assert cal.engine_overhead_s("decode", b, b * c, False, True) == pytest.approx(single_overhead(b), abs=1e-9)
        assert cal.engine_overhead_s("decode", b, b * c, False) == pytest.approx(decode_overhead(b, False), abs=1e-9)
        step = cal.decode_device_factor("gpu0", b) * cal.decode_step(b, b * c).step_s
        assert step + cal.engine_overhead_s("decode", b, b * c, False, True) == pytest.approx(single[0]["seconds"]
                                                                                            if (b, c) == DECODE_ROWS[0]
                                                                                            else step + single_overhead(b))
    assert "own (one-GPU engine) rows" in cal.sources["engine"]
    without = CalibratedCostModel(write_profile(tmp_path / "p.csv", rows + gpu0, META), HW, MODEL)
    assert without.engine_overhead_s("decode", 64, 64 * 512, False, True) == pytest.approx(decode_overhead(64, False))
    assert "from pd's rows" in without.sources["engine"]


def test_single_takes_its_prefill_overhead_from_its_own_rows(tmp_path):
    """engine_prefill_single rows (prefills under the one-GPU engine): a colocated prefill (or a mixed step's
    prefill side) pays their overhead, the two-GPU engine's prefills keep pd's; without them single falls back to
    pd's, and the description says which."""
    cm = truth()
    own = lambda tokens: 0.3e-3 + tokens * 1e-8  # noqa: E731  the one-GPU engine's made-up prefill overhead
    single = [dict(op="engine_prefill_single", batch=n, tokens=n * t, seconds=cm.forward_s([(t, 0)] * n) + own(n * t))
              for n, t in PREFILL_ROWS]
    rows = isolated_rows(cm) + engine_rows(cm)
    cal = CalibratedCostModel(write_profile(tmp_path / "s.csv", rows + single, META), HW, MODEL)
    for n, t in PREFILL_ROWS:
        assert cal.engine_overhead_s("prefill", n, n * t, False, True) == pytest.approx(own(n * t), abs=1e-9)
        pd = cal.engine_overhead_s("prefill", n, n * t, False)
        assert pd == pytest.approx(prefill_overhead(n * t, False), abs=1e-9)
    assert "single's prefills from its own (one-GPU engine) rows" in cal.sources["engine"]
    without = CalibratedCostModel(write_profile(tmp_path / "p.csv", rows, META), HW, MODEL)
    assert without.engine_overhead_s("prefill", 1, 512, False, True) == pytest.approx(prefill_overhead(512, False))
    assert "single's decode steps and prefills from pd's rows" in without.sources["engine"]


def test_an_engine_row_under_its_isolated_step_is_charged_exactly(tmp_path):
    """Engine rows are timed in fresh processes and the isolated rows in the profiling one, so a row can come in
    under its own shape's isolated step (every 2x H200 profile's engine_decode_single rows did, GPU0's isolated
    step being GPU1's decode row x the decode_prefill_gpu ratio): a decode overhead keeps its sign, so the step
    at the row's shape is the row. A prefill overhead is still floored at zero."""
    cm = truth()
    ratio = 1.1  # the profiling process's GPU0 decodes in 1.1x GPU1's time ...
    gpu0 = [dict(op="decode_prefill_gpu", batch=b, context=1024, seconds=ratio * cm.decode_step(b, b * 1024).step_s)
            for b in (16, 64, 256)]
    under = {b: -0.05 * cm.decode_step(b, b * c).step_s for b, c in DECODE_ROWS}  # ... the engine's in 1.045x
    single = [dict(op="engine_decode_single", batch=b, context=c,
                   seconds=ratio * cm.decode_step(b, b * c).step_s + under[b]) for b, c in DECODE_ROWS]
    slow_prefill = [dict(r, seconds=0.9 * cm.forward_s([(r["tokens"] // r["batch"], 0)] * r["batch"]))
                    if r["op"] == "engine_prefill" else r for r in engine_rows(cm)]  # 10% under the isolated step
    cal = CalibratedCostModel(write_profile(tmp_path / "s.csv", isolated_rows(cm) + slow_prefill + gpu0 + single,
                                            META), HW, MODEL)
    for row in single:
        b, kv = row["batch"], row["batch"] * row["context"]
        assert cal.engine_overhead_s("decode", b, kv, False, True) < 0
        step = cal.decode_device_factor("gpu0", b) * cal.decode_step(b, kv).step_s
        assert step + cal.engine_overhead_s("decode", b, kv, False, True) == pytest.approx(row["seconds"], rel=1e-6)
    for r in slow_prefill:
        if r["op"] == "engine_prefill":
            assert cal.engine_overhead_s("prefill", r["batch"], r["tokens"]) == 0.0


class ColocatedOverhead(Overhead):
    """1 ms per decode step in a two-GPU engine, 0.2 ms in a one-GPU (colocated) one."""

    def engine_overhead_s(self, stage, batch_size, tokens, other_busy=False, colocated=False):
        if stage == "decode":
            return 0.2e-3 if colocated else 1e-3
        return 10e-3


def test_the_sim_charges_single_the_one_gpu_engines_overhead():
    base = make_cost_model(HW, MODEL)
    for policy, want in (("single", 0.2e-3), ("dp", 1e-3)):
        _, steps = simulate(ColocatedOverhead(base), policy=policy, rate=5.0)
        dec = steps[(steps.device == "gpu0") & (steps.stage == "decode")]
        assert len(dec), policy
        first = np.array([base.decode_step(int(b), int(kv)).step_s for b, kv in zip(dec.batch_size, dec.kv_tokens)])
        extra = ((dec.t_end_s - dec.t_start_s) / dec.num_steps).to_numpy() - first
        assert np.all(np.abs(extra - want) < 2e-4), (policy, extra[:5])
