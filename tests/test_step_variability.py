"""Step-time variability (sim/variability.py, traces/profile.py spread columns, sim/engine.py draws): each
simulated step's time is drawn from the spread of the engine's measured step periods, seeded. CPU, fast.

Must hold: the drawn ratio has mean 1 and the measured quantiles; same seed, same run; no spread data or
the switch off, no variability; a merged decode run is the same in distribution as its steps one by one;
policies see per-run samples of the drawn times.
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from policies import Capabilities, load_policy_config
from policies.specs import hardware_spec, model_spec
from sim.calibrated import CalibratedCostModel
from sim.cost_model import make_cost_model
from sim.engine import SimConfig, Simulation
from sim.variability import _MEASURED, KNOT_U, StepNoise, StepSpread
from traces.profile import SPREAD_COLUMNS, SPREAD_PERCENTILES, ProfileError, read_profile, write_profile
from traces.schema import STEPS
from traces.workload import RequestSpec, synthetic_workload

HW, MODEL = "h200x2", "qwen3-0.6b"
META = dict(gpu="synthetic", date="2026-01-01", command="tests/test_step_variability.py", model=MODEL, hardware=HW,
            torch="none", sms=132)
HEAVY = (0.85, 0.95, 1.12, 1.9)  # p10, p50, p90, p99 of period / mean: a heavy tail like the busy H200 steps
LIGHT = (0.95, 0.99, 1.03, 1.15)


# ---- the distribution ----
@pytest.mark.parametrize("q", [HEAVY, LIGHT, (0.7, 0.9, 1.3, 2.5)])
def test_a_spread_has_mean_one_and_the_measured_quantiles(q):
    sp = StepSpread.from_quantiles(*q)
    assert sp.mean() == pytest.approx(1.0, abs=1e-12)
    assert list(sp.quantile([0.10, 0.50, 0.90, 0.99])) == pytest.approx(list(q), abs=1e-12)
    assert all(a <= b for a, b in zip(sp.knots, sp.knots[1:])) and sp.knots[0] >= 0
    draws = StepNoise(0).ratios(sp, 400_000)
    assert draws.mean() == pytest.approx(1.0, abs=4 * draws.std() / np.sqrt(len(draws)))
    below = [np.mean(draws < v) for v in q]  # the CDF at each quantile (a percentile's error grows with the slope)
    assert below == pytest.approx([0.10, 0.50, 0.90, 0.99], abs=0.003)
    assert draws.var() == pytest.approx(sp.variance(), rel=0.02)


def test_the_knots_sit_at_the_profiles_percentiles():
    assert [KNOT_U[i] for i in _MEASURED] == [q / 100 for q in SPREAD_PERCENTILES]


def test_a_convex_body_bends_between_the_quantiles_and_keeps_them():
    light_tail = StepSpread.from_quantiles(0.93, 0.97, 1.12, 1.35)  # straight lines would average above 1
    assert light_tail.knots[-1] == light_tail.knots[-2] == 1.35 and light_tail.mean() == pytest.approx(1.0)
    assert list(light_tail.quantile([0.10, 0.50, 0.90, 0.99])) == pytest.approx([0.93, 0.97, 1.12, 1.35])
    assert light_tail.knots[4] < (0.97 + 1.12) / 2  # bent below the chord
    sp = StepSpread.from_quantiles(1.0, 1.1, 1.2, 1.25)  # impossible even bent: scaled, shape kept
    assert sp.mean() == pytest.approx(1.0) and sp.knots[3] / sp.knots[1] == pytest.approx(1.1)


# ---- the profile format ----
def engine_row(op, batch, q=None, **kw) -> dict:
    row = dict(op=op, batch=batch, seconds=kw.pop("seconds", 5e-3), **kw)
    return row | (dict(zip(SPREAD_COLUMNS, q)) if q else {})


def test_profiles_without_spread_columns_still_load(tmp_path):
    legacy = tmp_path / "old.csv"
    legacy.write_text("op,batch,tokens,context,attn_sms,ffn_sms,microbatches,bytes,seconds\n"
                      "decode,4,4,512,0,0,1,0,0.002\nengine_decode,4,4,512,0,0,1,0,0.003\n")
    df, _ = read_profile(legacy)
    assert len(df) == 2 and df[list(SPREAD_COLUMNS)].isna().all().all()
    write_profile(tmp_path / "legacy_tuples.csv", [("decode", 4, 4, 512, 0, 0, 1, 0, 0.002)], META)  # old tuples too


def test_spread_columns_round_trip_and_are_validated(tmp_path):
    rows = [engine_row("engine_decode", 16, HEAVY, context=1024), engine_row("decode", 16, context=1024)]
    df, _ = read_profile(write_profile(tmp_path / "p.csv", rows, META))
    assert df[list(SPREAD_COLUMNS)].iloc[0].tolist() == list(HEAVY) and df[list(SPREAD_COLUMNS)].iloc[1].isna().all()
    bad = [(dict(op="engine_decode", batch=4, seconds=1e-3, p10_over_mean=0.9), "all four"),
           (engine_row("decode", 4, HEAVY), "only engine_"),
           (engine_row("engine_decode", 4, (0.9, 1.2, 1.1, 2.0)), "must not decrease"),
           (engine_row("engine_decode", 4, (0.0, 1.0, 1.1, 2.0)), "> 0")]
    for row, problem in bad:
        with pytest.raises(ProfileError, match=problem):
            write_profile(tmp_path / "bad.csv", [row], META)


# ---- the calibrated model reads it ----
def spread_profile(tmp_path, spread: bool = True, name: str = "p.csv"):
    cm = make_cost_model(HW, MODEL)
    rows = [dict(op="decode", batch=b, context=c, seconds=cm.decode_step(b, b * c).step_s)
            for b in (1, 16, 64, 256) for c in (512, 2048)]
    rows += [dict(op="prefill", batch=1, tokens=t, seconds=cm.forward_s([(t, 0)])) for t in (512, 2048, 8192)]
    for busy, q in ((False, LIGHT), (True, HEAVY)):
        suffix = "_busy" if busy else ""
        rows += [engine_row("engine_decode" + suffix, b, (LIGHT if busy and b < 256 else q) if spread else None,
                            context=c, seconds=cm.decode_step(b, b * c).step_s + 1e-3)
                 for b in (1, 64, 256) for c in (512, 2048)]
        rows += [engine_row("engine_prefill" + suffix, 1, q if spread else None, tokens=t,
                            seconds=cm.forward_s([(t, 0)]) + 10e-3) for t in (512, 2048, 8192)]
    return write_profile(tmp_path / name, rows, META)


def test_the_calibrated_model_gives_each_shapes_spread_by_the_other_gpus_state(tmp_path):
    cal = CalibratedCostModel(spread_profile(tmp_path), HW, MODEL)
    assert cal.has_step_spread and "spread from 18 rows" in cal.sources["engine"]
    light, heavy = StepSpread.from_quantiles(*LIGHT), StepSpread.from_quantiles(*HEAVY)
    assert cal.engine_step_spread("decode", 64, 64 * 1000).knots == pytest.approx(light.knots)
    assert cal.engine_step_spread("decode", 512, 512 * 9000, True).knots == pytest.approx(heavy.knots)  # held beyond
    assert cal.engine_step_spread("prefill", 1, 3000, True).knots == pytest.approx(heavy.knots)
    between = cal.engine_step_spread("decode", 128, 128 * 1000, True)  # batch 64 light, 256 heavy: a mix
    assert between.mean() == pytest.approx(1.0) and list(between.knots) == sorted(between.knots)
    assert light.knots[7] < between.knots[7] < heavy.knots[7]  # p99 between the two rows' p99s
    plain = CalibratedCostModel(spread_profile(tmp_path, spread=False, name="q.csv"), HW, MODEL)
    assert not plain.has_step_spread and plain.engine_step_spread("decode", 64, 64 * 1000) is None
    assert "every step takes its mean" in plain.sources["engine"]
    assert not make_cost_model(HW, MODEL).has_step_spread


# ---- the simulator draws from it ----
class Spread:
    """The analytic steps + 1 ms per decode step, 10 ms per prefill, and a known spread on every step."""
    overhead_depends_on_other_gpu = False
    has_step_spread = True

    def __init__(self, base, q=HEAVY):
        self.base, self.name, self.spread = base, "test", StepSpread.from_quantiles(*q)

    def __getattr__(self, name):
        return getattr(self.base, name)

    def engine_overhead_s(self, stage, batch_size, tokens, other_busy=False, colocated=False):
        return 1e-3 if stage == "decode" else 10e-3

    def engine_step_spread(self, stage, batch_size, tokens, other_busy=False, colocated=False):
        return self.spread


def simulate(cost, requests=None, policy="pd", seed=0, merged=32, variability=True):
    hw, spec = hardware_spec(HW), model_spec(MODEL)
    requests = requests or synthetic_workload(300, rate_rps=30.0, seed=3).requests
    cfg = SimConfig(capabilities=Capabilities(num_gpus=2), seed=seed, max_merged_steps=merged,
                    step_variability=variability)
    sim = Simulation(requests, load_policy_config(policy), cost, hw, spec, cfg).run()
    return sim, pd.DataFrame(sim.steps, columns=STEPS.names)


def test_same_seed_same_run_another_seed_another():
    cost = Spread(make_cost_model(HW, MODEL))
    _, a = simulate(cost, seed=7)
    _, b = simulate(cost, seed=7)
    _, c = simulate(cost, seed=8)
    pd.testing.assert_frame_equal(a, b)
    assert not a.t_end_s.equals(c.t_end_s)


def test_no_spread_data_or_the_switch_off_gives_the_mean_run(tmp_path):
    base = make_cost_model(HW, MODEL)
    _, plain = simulate(base)
    _, off = simulate(Spread(base), variability=False)
    _, mean_only = simulate(Mean(base))
    pd.testing.assert_frame_equal(off, mean_only)  # the switch off: every step takes its mean
    _, drawn = simulate(Spread(base))
    assert not drawn.t_end_s.equals(off.t_end_s)
    with_rows = CalibratedCostModel(spread_profile(tmp_path, spread=False), HW, MODEL)  # engine rows, no spread
    _, a = simulate(with_rows, seed=1)
    _, b = simulate(with_rows, seed=2)
    pd.testing.assert_frame_equal(a, b)  # nothing drawn: the seed does not matter
    assert len(plain)


class Mean(Spread):
    has_step_spread = False

    def engine_step_spread(self, stage, batch_size, tokens, other_busy=False, colocated=False):
        return None


def per_step_ratios(steps: pd.DataFrame, base, stage: str) -> np.ndarray:
    """Each one-step row's time over its mean time (the isolated step at its shape + the overhead)."""
    if stage == "decode":
        rows = steps[(steps.device == "gpu1") & (steps.stage == "decode")]
        mean = np.array([base.decode_step(int(b), int(kv)).step_s + 1e-3
                         for b, kv in zip(rows.batch_size, rows.kv_tokens)])
    else:
        rows = steps[steps.stage == "prefill"]
        mean = np.array([base.forward_s([(int(t), 0)]) + 10e-3 for t in rows.tokens])
        keep = (rows.batch_size == 1).to_numpy() & (rows.kv_tokens == rows.tokens).to_numpy()  # one whole prompt
        rows, mean = rows[keep], mean[keep]
    assert (rows.num_steps == 1).all()
    return ((rows.t_end_s - rows.t_start_s).to_numpy()) / mean


def test_drawn_steps_have_the_profiles_mean_and_quantiles():
    base = make_cost_model(HW, MODEL)
    _, steps = simulate(Spread(base), requests=synthetic_workload(600, rate_rps=30.0, seed=5).requests, merged=1)
    for stage in ("decode", "prefill"):
        r = per_step_ratios(steps, base, stage)
        assert len(r) > 200, stage
        assert r.mean() == pytest.approx(1.0, abs=4 * r.std() / np.sqrt(len(r))), stage
        below = [np.mean(r < v - 1e-9) for v in HEAVY]
        tol = 0.025 if stage == "decode" else 0.05  # fewer prefills
        assert below[:3] == pytest.approx([0.10, 0.50, 0.90], abs=tol), stage
        assert below[3] == pytest.approx(0.99, abs=0.006 if stage == "decode" else 0.015), stage


def closed_batch(n: int = 4, output: int = 300) -> list[RequestSpec]:
    """Requests all there at t = 0, one prefill then a long decode of a fixed batch."""
    return [RequestSpec(i, 0.0, 256, output) for i in range(n)]


def test_a_merged_run_is_the_same_in_distribution_as_its_steps_one_by_one():
    """Total GPU1 decode time over seeds: merged runs (32 steps an event) and step by step must have the same
    mean (the mean-time run's) and spread (sqrt(sum of squared step means) x the ratio's std)."""
    base = make_cost_model(HW, MODEL)
    cost = Spread(base)
    _, ref = simulate(cost, closed_batch(), merged=1, variability=False)
    dec = ref[(ref.device == "gpu1") & (ref.stage == "decode")]
    means = (dec.t_end_s - dec.t_start_s).to_numpy()
    want_mean, want_std = means.sum(), np.sqrt((means ** 2).sum() * cost.spread.variance())
    totals = {}
    for merged in (1, 32):
        t = []
        for seed in range(150):
            _, s = simulate(cost, closed_batch(), merged=merged, seed=seed)
            d = s[(s.device == "gpu1") & (s.stage == "decode")]
            assert d.num_steps.sum() == len(dec)
            t.append((d.t_end_s - d.t_start_s).sum())
        totals[merged] = np.array(t)
    for merged, t in totals.items():
        assert t.mean() == pytest.approx(want_mean, abs=4 * want_std / np.sqrt(len(t))), merged
        assert t.std() == pytest.approx(want_std, rel=0.25), merged
    assert (totals[32] > 0).all() and s.num_steps.max() > 1  # the merged case did merge


def test_policies_see_per_run_samples_of_the_drawn_times():
    base = make_cost_model(HW, MODEL)
    hw, spec = hardware_spec(HW), model_spec(MODEL)
    sim = Simulation(synthetic_workload(200, rate_rps=30.0, seed=3).requests, load_policy_config("adaptive"),
                     Spread(base), hw, spec, SimConfig(capabilities=Capabilities(num_gpus=2), seed=1))
    samples = []
    finish = sim.ctl.finish_batch

    def spy(batch, now, steps_done=None, sample=None):
        if sample is not None:
            samples.append((now, sample))
        return finish(batch, now, steps_done, sample)

    sim.ctl.finish_batch = spy
    sim.run()
    steps = pd.DataFrame(sim.steps, columns=STEPS.names)
    runs = steps[(steps.device == "gpu1") & steps.stage.isin(["decode", "attn"])].sort_values("t_end_s")
    assert len(samples) == len(runs) and (runs.num_steps > 1).any()
    for (now, sample), (_, row) in zip(samples, runs.iterrows()):
        assert now == row.t_end_s and sample.num_steps == row.num_steps
        assert sample.step_s * sample.num_steps == pytest.approx(row.t_end_s - row.t_start_s)
    noise_free = [base.decode_step(s.batch_size, s.kv_tokens, s.split, s.microbatches).step_s + 1e-3
                  for _, s in samples]
    ratios = np.array([s.step_s for _, s in samples]) / np.array(noise_free)
    assert ratios.std() > 0.05  # the rebalancer is fed the noise, not the mean


def test_sim_run_seeds_the_draws_and_can_switch_them_off(tmp_path, capsys):
    from sim.run import main

    profile = spread_profile(tmp_path, name=f"{HW}-{MODEL}.csv")
    args = ["--policy", "pd", "--num-requests", "60", "--hardware", HW, "--profile", str(profile), "--quiet"]
    outs = {}
    runs = (("a", ["--seed", "3"]), ("b", ["--seed", "3"]), ("off", ["--seed", "3", "--no-step-variability"]))
    for name, extra in runs:
        assert main(args + extra + ["--out", str(tmp_path / name)]) == 0
        outs[name] = pd.read_csv(tmp_path / name / "steps.csv")
    assert "and its measured spread" in capsys.readouterr().out
    pd.testing.assert_frame_equal(outs["a"], outs["b"])
    assert not outs["a"].t_end_s.equals(outs["off"].t_end_s)

    info = json.loads((tmp_path / "a" / "run.json").read_text())["sim_config"]
    assert info["seed"] == 3 and info["step_times_drawn"]
    assert not json.loads((tmp_path / "off" / "run.json").read_text())["sim_config"]["step_times_drawn"]
