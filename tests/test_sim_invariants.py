"""Simulator invariants (sim/engine.py driving policies/): every policy, small loaded runs.

Each run goes through `sim.engine.Simulation` exactly as `sim.run.simulate` builds it, with every
`BlockPool` call audited, and its rows are checked against properties that must hold whatever the
policy decides: each request ends once, tokens are conserved, no two stages share SMs at once, KV
blocks stay within bounds, per-request timestamps are ordered. Then preemption, faults,
capabilities, determinism and one physics comparison.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pytest

from analysis import Slo, summarize
from policies import BlockPool, Capabilities, load_policy_config
from policies.specs import hardware_spec, model_spec
from sim.cost_model import make_cost_model
from sim.engine import Fault, SimConfig, Simulation, kv_blocks_per_gpu
from traces.schema import DECISIONS, REQUESTS, STEPS
from traces.workload import RequestSpec, Workload, synthetic_workload

POLICIES = ("single", "dp", "pd", "pipeline", "adaptive")
TERMINAL = ("finished", "failed", "rejected")
HARDWARE, MODEL = "h100x2", "qwen3-0.6b"
HW, SPEC = hardware_spec(HARDWARE), model_spec(MODEL)
SLACK_S = 1e-9


# ---------------------------------------------------------------------------------------------
# Helpers: an audited run, and one checker per invariant

class BlockAudit:
    """Wraps BlockPool.allocate/grow/free: after every call 0 <= num_free <= num_blocks, a block is
    never handed out twice or freed while free, and a shadow free set agrees with the pool."""

    def __init__(self):
        self.free: dict[BlockPool, set[int]] = {}
        self.calls = 0

    def _shadow(self, pool: BlockPool) -> set[int]:
        if pool not in self.free:
            assert pool.num_free == pool.num_blocks, f"{pool.device}: pool first used while not fully free"
            self.free[pool] = set(range(pool.num_blocks))
        return self.free[pool]

    def _check(self, pool: BlockPool, what: str) -> None:
        self.calls += 1
        assert 0 <= pool.num_free <= pool.num_blocks, f"{pool.device} after {what}: {pool.num_free} free of {pool.num_blocks}"
        assert len(self.free[pool]) == pool.num_free, f"{pool.device} after {what}: free list holds duplicates"

    def _taken(self, pool: BlockPool, ids: list[int], what: str) -> None:
        shadow = self._shadow(pool)
        for i in ids:
            assert i in shadow, f"{pool.device} {what}: block {i} handed out while already in use"
            shadow.discard(i)
        self._check(pool, what)

    def install(self, mp: pytest.MonkeyPatch) -> None:
        audit = self
        allocate, grow, free = BlockPool.allocate, BlockPool.grow, BlockPool.free

        def audited_allocate(pool, n):
            audit._shadow(pool)
            ids = allocate(pool, n)
            audit._taken(pool, ids, f"allocate({n})")
            return ids

        def audited_grow(pool, blocks, tokens):
            audit._shadow(pool)
            before = len(blocks)
            ok = grow(pool, blocks, tokens)
            assert ok or len(blocks) == before, f"{pool.device}: a failed grow changed the block list"
            audit._taken(pool, blocks[before:], f"grow(to {tokens} tokens)")
            return ok

        def audited_free(pool, blocks):
            shadow = audit._shadow(pool)
            ids = list(blocks)
            assert len(set(ids)) == len(ids), f"{pool.device}: free() of a list with repeated ids {ids}"
            for i in ids:
                assert 0 <= i < pool.num_blocks, f"{pool.device}: free() of foreign block id {i}"
                assert i not in shadow, f"{pool.device}: double free of block {i}"
            free(pool, blocks)
            shadow.update(ids)
            audit._check(pool, f"free({len(ids)} blocks)")

        mp.setattr(BlockPool, "allocate", audited_allocate)
        mp.setattr(BlockPool, "grow", audited_grow)
        mp.setattr(BlockPool, "free", audited_free)


@dataclass
class Run:
    policy: str
    workload: Workload
    sim: Simulation
    audit: BlockAudit
    requests: pd.DataFrame = field(init=False)
    steps: pd.DataFrame = field(init=False)
    decisions: pd.DataFrame = field(init=False)

    def __post_init__(self):
        self.requests = pd.DataFrame([r.as_row() for r in self.sim.ctl.requests], columns=REQUESTS.names)
        self.steps = pd.DataFrame(self.sim.steps, columns=STEPS.names)
        self.decisions = pd.DataFrame([d.as_row() for d in self.sim.ctl.decisions], columns=DECISIONS.names)

    def rows(self) -> tuple[list, list, list]:
        return ([r.as_row() for r in self.sim.ctl.requests], list(self.sim.steps),
                [d.as_row() for d in self.sim.ctl.decisions])

    def mode_changes(self) -> list[tuple[float, str, str]]:
        d = self.decisions[self.decisions["decision"] == "mode"]
        return list(zip(d["t_s"], d["old"], d["new"]))


def simulate_audited(workload: Workload, policy: str, sim_config: SimConfig | None = None,
                     overrides: dict | None = None) -> Run:
    """What sim.run.simulate runs, with every BlockPool call audited."""
    pcfg = load_policy_config(policy, None, overrides)
    cfg = sim_config or SimConfig(capabilities=Capabilities(num_gpus=HW.num_gpus))
    audit = BlockAudit()
    with pytest.MonkeyPatch.context() as mp:
        audit.install(mp)
        sim = Simulation(workload.requests, pcfg, make_cost_model(HW, SPEC), HW, SPEC, cfg).run()
    return Run(policy, workload, sim, audit)


def util_for_blocks(blocks: int) -> float:
    """gpu_memory_utilization that leaves exactly `blocks` KV blocks per GPU (default block size)."""
    bs = load_policy_config("adaptive").scheduler.block_size
    util = (SPEC.weight_bytes + SimConfig().activation_reserve_bytes + (blocks + 0.5) * bs * SPEC.kv_bytes_per_token) / HW.hbm_bytes
    assert kv_blocks_per_gpu(HW, SPEC, bs, SimConfig(gpu_memory_utilization=util)) == blocks
    return util


def check_each_request_ends_once(run: Run, expect_all_finished: bool = True) -> None:
    req = run.requests
    ids = sorted(r.request_id for r in run.workload.requests)
    assert len(req) == len(ids), f"{len(run.workload.requests)} requests in, {len(req)} rows out"
    assert not req["request_id"].duplicated().any(), "a request_id appears twice"
    assert sorted(req["request_id"]) == ids
    assert req["status"].isin(TERMINAL).all(), req.loc[~req["status"].isin(TERMINAL), "status"].unique()
    assert req["finish_s"].notna().all(), "a request ended without a finish_s"
    assert run.sim.ctl.scheduler.has_work() is False, "the scheduler still holds work after the run"
    if expect_all_finished:
        bad = req[req["status"] != "finished"]
        assert bad.empty, f"{len(bad)} requests did not finish: {bad[['request_id', 'status', 'fail_reason']].head().values.tolist()}"


def check_tokens_conserved(run: Run) -> None:
    """Token accounting of engine.py (all requests finished or rejected, no partial prefill dropped):

    * decode / attn rows: tokens = batch size x steps run; ffn rows repeat their attn row;
    * prefill / mixed rows: tokens = prefill chunk tokens + one per decode mixed in (mixed steps are 1 step);
    * every completed prefill samples one token: one per prefilled request plus one per recompute.
    So  sum(decode+attn) + sum(prefill+mixed) = prefill chunk tokens P + (generated - completed prefills),
    P = sum(prompt) without preemption and sum(prompt) + recomputed (prompt + generated) tokens with it.
    """
    req, steps = run.requests, run.steps
    fin = req["status"] == "finished"
    short = req[fin & (req["generated_tokens"] != req["output_tokens"])]
    assert short.empty, f"finished with generated != output: {short[['request_id', 'generated_tokens', 'output_tokens']].values.tolist()[:5]}"
    assert (req.loc[req["status"] == "rejected", "generated_tokens"] == 0).all()

    attn = steps[steps["stage"] == "attn"].sort_values(["t_start_s", "device"]).reset_index(drop=True)
    ffn = steps[steps["stage"] == "ffn"].sort_values(["t_start_s", "device"]).reset_index(drop=True)
    same = ["t_start_s", "t_end_s", "device", "batch_size", "tokens", "kv_tokens", "attn_sms", "ffn_sms", "num_steps"]
    pd.testing.assert_frame_equal(attn[same], ffn[same], obj="attn rows vs their ffn rows")

    def tokens(*stages):
        return int(steps.loc[steps["stage"].isin(stages), "tokens"].sum())

    decode_rows, forward_rows = tokens("decode", "attn"), tokens("prefill", "mixed")
    prefilled = req["first_token_s"].notna()
    completed_prefills = int(prefilled.sum() + req.loc[prefilled, "preemptions"].sum())
    generated = int(req["generated_tokens"].sum())
    decoded = generated - completed_prefills
    prefill_tokens = decode_rows + forward_rows - decoded
    prompt = int(req.loc[prefilled, "prompt_tokens"].sum())
    assert decode_rows <= decoded, f"decode rows hold {decode_rows} tokens, only {decoded} were decoded"
    mixed_decodes_max = int(steps.loc[steps["stage"] == "mixed", "batch_size"].sum())
    assert decoded <= decode_rows + mixed_decodes_max, "decoded tokens missing from the steps rows"
    if not steps["stage"].eq("mixed").any():
        assert decode_rows == decoded, "no mixed rows: decode rows must hold every decoded token"
    if req["preemptions"].sum() == 0:
        assert prefill_tokens == prompt, f"prefill rows hold {prefill_tokens} prompt tokens, prompts total {prompt}"
    else:
        recompute_max = int((req["preemptions"] * (req["prompt_tokens"] + req["output_tokens"])).sum())
        assert prompt <= prefill_tokens <= prompt + recompute_max, (prefill_tokens, prompt, recompute_max)


def sm_range(steps: pd.DataFrame, sms: int) -> tuple[np.ndarray, np.ndarray]:
    """[lo, hi) SMs of each row: attn [0, a), ffn [a, a+f), anything else the whole GPU."""
    stage = steps["stage"].to_numpy()
    a, f = steps["attn_sms"].to_numpy(), steps["ffn_sms"].to_numpy()
    lo = np.where(stage == "ffn", a, 0)
    hi = np.where(stage == "attn", a, np.where(stage == "ffn", a + f, sms))
    return lo, hi


def first_time_overlap(start: np.ndarray, end: np.ndarray) -> int | None:
    """Index (in start order) of the first interval that starts before an earlier one ended."""
    if len(start) < 2:
        return None
    order = np.lexsort((end, start))
    s, e = start[order], end[order]
    reach = np.maximum.accumulate(e)[:-1]
    bad = np.flatnonzero(s[1:] < reach - SLACK_S)
    return None if len(bad) == 0 else int(order[bad[0] + 1])


def check_no_sm_overlap(run: Run) -> None:
    steps = run.steps
    assert (steps["t_end_s"] >= steps["t_start_s"]).all(), "a steps row ends before it starts"
    split = steps["stage"].isin(["attn", "ffn"])
    assert (steps.loc[split, "attn_sms"] > 0).all() and (steps.loc[split, "ffn_sms"] > 0).all()
    assert ((steps.loc[split, "attn_sms"] + steps.loc[split, "ffn_sms"]) <= HW.sms).all()
    assert (steps.loc[~split, ["attn_sms", "ffn_sms"]] == 0).all().all(), "unsplit rows must report 0 SMs"
    assert (steps.loc[split, "device"] == "gpu1").all(), "only GPU1 decodes split"
    for device in ("gpu0", "gpu1"):
        rows = steps[steps["device"] == device]
        lo, hi = sm_range(rows, HW.sms)
        start, end = rows["t_start_s"].to_numpy(float), rows["t_end_s"].to_numpy(float)
        edges = np.unique(np.concatenate([lo, hi]))
        for sm in edges[:-1]:  # one representative SM per elementary SM segment
            on = (lo <= sm) & (sm < hi)
            i = first_time_overlap(start[on], end[on])
            assert i is None, f"{device} SM {sm}: two rows at once, e.g. {rows[on].iloc[i].to_dict()}"
    link = steps[steps["device"] == "link"]
    assert (link["stage"] == "transfer").all() and (steps.loc[steps["stage"] == "transfer", "device"] == "link").all()
    if HW.copy_engines == 1:
        i = first_time_overlap(link["t_start_s"].to_numpy(float), link["t_end_s"].to_numpy(float))
        assert i is None, f"two KV copies at once on one copy engine: {link.iloc[i].to_dict()}"


def check_blocks(run: Run) -> None:
    pools = run.sim.ctl.scheduler.pools
    assert run.audit.calls > 0, "the audit saw no BlockPool calls"
    for dev, pool in pools.items():
        assert pool.num_free == pool.num_blocks, f"{dev}: {pool.num_blocks - pool.num_free} KV blocks leaked"
        assert sorted(pool._free) == list(range(pool.num_blocks)), f"{dev}: free list is not every block once"
    for r in run.sim.ctl.requests:
        assert not r.blocks and not r.dst_blocks, f"request {r.request_id} still holds blocks"


def _ordered(req: pd.DataFrame, mask, *cols: str) -> None:
    """cols[0] <= cols[1] <= ... on the rows in mask (1e-9 s slack)."""
    sub = req.loc[mask, list(cols)].to_numpy(float)
    for k in range(len(cols) - 1):
        bad = np.flatnonzero(sub[:, k] > sub[:, k + 1] + SLACK_S)
        assert len(bad) == 0, (f"{cols[k]} > {cols[k + 1]} for request(s) "
                               f"{req.loc[mask, 'request_id'].to_numpy()[bad][:5].tolist()}")


def check_timestamps(run: Run, transfers: bool = True) -> None:
    req = run.requests
    _ordered(req, req["prefill_start_s"].notna(), "arrival_s", "prefill_start_s", "prefill_end_s", "finish_s")
    _ordered(req, req["first_token_s"].notna(), "arrival_s", "first_token_s", "finish_s")
    _ordered(req, req["first_token_s"].notna(), "first_token_s", "prefill_end_s")
    _ordered(req, req["finish_s"].notna(), "arrival_s", "finish_s")
    assert (run.steps["t_end_s"] >= run.steps["t_start_s"]).all()
    if transfers:
        check_transfer_timestamps(run)


def check_transfer_timestamps(run: Run) -> None:
    req = run.requests
    tr = req["kv_transfer_start_s"].notna()
    assert (req.loc[tr, "kv_transfer_end_s"].notna()).all(), "a KV copy started and never ended"
    _ordered(req, tr, "prefill_end_s", "kv_transfer_start_s", "kv_transfer_end_s", "finish_s")


def check_all(run: Run, transfers: bool = True) -> None:
    check_each_request_ends_once(run)
    check_tokens_conserved(run)
    check_no_sm_overlap(run)
    check_blocks(run)
    check_timestamps(run, transfers)


# ---------------------------------------------------------------------------------------------
# Runs shared by several tests (each run takes well under a second)

LOADED = synthetic_workload(300, rate_rps=80, seed=3)
PREEMPT_BLOCKS = 1200  # 1200 x 16 tokens per GPU: GPU1 runs out under LOADED


@pytest.fixture(scope="module")
def loaded_runs() -> dict[str, Run]:
    return {p: simulate_audited(LOADED, p) for p in POLICIES}


@pytest.fixture(scope="module")
def preempt_runs() -> dict[str, Run]:
    cfg = SimConfig(gpu_memory_utilization=util_for_blocks(PREEMPT_BLOCKS))
    return {p: simulate_audited(LOADED, p, sim_config=cfg) for p in POLICIES}


# ---------------------------------------------------------------------------------------------
# 1-5: the invariants, every policy

@pytest.mark.parametrize("policy", POLICIES)
def test_each_request_ends_exactly_once(loaded_runs, policy):
    check_each_request_ends_once(loaded_runs[policy])


@pytest.mark.parametrize("policy", POLICIES)
def test_tokens_are_conserved(loaded_runs, policy):
    check_tokens_conserved(loaded_runs[policy])


@pytest.mark.parametrize("policy", POLICIES)
def test_no_two_stages_share_sms_at_once(loaded_runs, policy):
    check_no_sm_overlap(loaded_runs[policy])


@pytest.mark.parametrize("policy", POLICIES)
def test_kv_blocks_stay_in_bounds_and_all_return(loaded_runs, policy):
    check_blocks(loaded_runs[policy])


@pytest.mark.parametrize("policy", POLICIES)
def test_request_timestamps_are_ordered(loaded_runs, policy):
    check_timestamps(loaded_runs[policy])


def test_loaded_runs_exercise_what_the_invariants_guard(loaded_runs):
    """The shared runs must contain the things checked above, or the checks prove nothing."""
    steps = {p: r.steps for p, r in loaded_runs.items()}
    assert (steps["single"]["stage"] == "mixed").any(), "single never mixed prefill into decode steps"
    assert set(steps["dp"]["device"]) >= {"gpu0", "gpu1"}, "dp used one GPU only"
    assert (steps["pd"]["device"] == "link").any(), "pd never copied KV"
    assert (steps["pipeline"]["stage"] == "attn").any(), "pipeline never split GPU1"
    assert loaded_runs["adaptive"].decisions["decision"].eq("split").any(), "the rebalancer never decided"
    assert max(r.steps["num_steps"].max() for r in loaded_runs.values()) > 1, "no merged decode runs"


def test_measuring_runs_are_as_short_as_the_rebalancer_asks(loaded_runs):
    """A split the rebalancer is measuring runs at most explore_max_steps steps before it is judged; only a
    bucket's chosen split runs longer merged runs (the sim once read a run's length before the rebalancer
    shortened it, and candidates ran up to the merge limit: 11 such rows in this run)."""
    run = loaded_runs["adaptive"]
    chosen = {b.choice for b in run.sim.ctl.rebalancer.buckets.values()}
    cap = load_policy_config("adaptive").rebalancer.explore_max_steps
    split = run.steps[run.steps.stage == "attn"]
    assert len(split) > 0, "the rebalancer measured no split"
    long_runs = split[split.num_steps > cap]
    unchosen = [(a, f) not in chosen for a, f in zip(long_runs.attn_sms, long_runs.ffn_sms)]
    assert not any(unchosen), long_runs[unchosen]


def test_a_rejected_request_also_ends_exactly_once():
    too_long = SPEC.max_position + 1
    w = Workload([RequestSpec(0, 0.0, 100, 10), RequestSpec(1, 0.01, too_long, 10), RequestSpec(2, 0.02, 50, 5)],
                 "test", "synthetic")
    for policy in POLICIES:
        run = simulate_audited(w, policy)
        check_each_request_ends_once(run, expect_all_finished=False)
        assert run.requests["status"].tolist() == ["finished", "rejected", "finished"], policy
        assert run.decisions["decision"].eq("reject").sum() == 1
        check_tokens_conserved(run)
        check_blocks(run)


# ---------------------------------------------------------------------------------------------
# 6: preemption

@pytest.mark.parametrize("policy", POLICIES)
def test_preemption_happens_and_invariants_hold(preempt_runs, policy):
    run = preempt_runs[policy]
    assert run.sim.ctl.scheduler.pools["gpu0"].num_blocks == PREEMPT_BLOCKS
    assert run.requests["preemptions"].sum() > 0, f"{policy}: no preemption with {PREEMPT_BLOCKS} blocks per GPU"
    assert run.decisions["decision"].eq("preempt").sum() == run.requests["preemptions"].sum()
    check_all(run, transfers=False)  # transfer timestamps: next test


@pytest.mark.parametrize("policy", ["pd", "pipeline", "adaptive"])
def test_kv_transfer_timestamps_after_a_recompute(preempt_runs, policy):
    """A request preempted on GPU1 is prefilled again on GPU0 and copied again: its requests.csv
    row must describe that last copy (prefill_end_s <= kv_transfer_start_s), like prefill_start_s."""
    run = preempt_runs[policy]
    again = run.requests[(run.requests["preemptions"] > 0) & run.requests["kv_transfer_start_s"].notna()]
    assert len(again) > 0, "no preempted request was copied again"
    check_transfer_timestamps(run)


@pytest.mark.parametrize("policy", POLICIES)
def test_very_tight_kv_memory_never_stalls(policy):
    """300 blocks (4800 tokens) per GPU: requests that cannot fit are rejected, the rest must finish.
    A stall shows as 'simulation ended before the request finished' (engine.run's safety net)."""
    w = synthetic_workload(300, rate_rps=40, seed=2)
    run = simulate_audited(w, policy, SimConfig(gpu_memory_utilization=util_for_blocks(300)))
    req = run.requests
    failed = req[req["status"] == "failed"]
    assert failed.empty, (f"{policy}: {len(failed)} requests never finished ({failed['fail_reason'].iloc[0]}); "
                          f"first: {failed['request_id'].iloc[0]}")
    assert req["preemptions"].sum() > 0
    check_each_request_ends_once(run, expect_all_finished=False)
    check_tokens_conserved(run)
    check_no_sm_overlap(run)
    check_blocks(run)
    check_timestamps(run, transfers=False)


def test_preemption_on_the_decode_gpu_in_pd(preempt_runs):
    run = preempt_runs["pd"]
    preempt = run.decisions[run.decisions["decision"] == "preempt"]
    assert preempt["reason"].str.startswith("gpu1").any(), "pd never ran GPU1 out of KV blocks"
    assert run.decisions["decision"].eq("throttle").any(), "back-pressure never engaged with GPU1 full"


# ---------------------------------------------------------------------------------------------
# 7: faults

FAULT_LOAD = synthetic_workload(400, rate_rps=40, seed=5)  # ~10 s of arrivals


@pytest.mark.parametrize("policy", ["pipeline", "adaptive"])
def test_green_ctx_fault_falls_back_to_pd(policy):
    run = simulate_audited(FAULT_LOAD, policy, SimConfig(faults=[Fault(2.0, "green_ctx")]))
    down = [(t, o, n) for t, o, n in run.mode_changes() if n == "pd"]
    assert down and down[0][0] >= 2.0 and down[0][1] == "pipeline", run.mode_changes()
    after = run.steps[run.steps["t_start_s"] >= down[0][0]]
    if policy == "pipeline":  # no fallback controller to go back up: no split after the fault
        assert not after["stage"].isin(["attn", "ffn"]).any()
        assert run.sim.ctl.mode == "pd"
    check_all(run)


def test_link_fault_in_pd_falls_back_to_single():
    run = simulate_audited(FAULT_LOAD, "pd", SimConfig(faults=[Fault(3.0, "link", duration_s=2.0)]))
    assert run.mode_changes()[0][1:] == ("pd", "single"), run.mode_changes()
    assert run.mode_changes()[0][0] >= 3.0
    link = run.steps[run.steps["device"] == "link"]
    down = link[(link["t_start_s"] >= 3.0) & (link["t_start_s"] < 5.0)]
    assert (down["kv_bytes"] == 0).all(), "a KV copy succeeded while the link was down"
    late = run.requests[run.requests["arrival_s"] > 3.1]
    assert (late["mode"] == "single").all() and (late["decode_device"] == "gpu0").all()
    check_all(run)


def test_transfer_faults_are_retried():
    faults = [Fault(2.0, "transfer"), Fault(2.0, "transfer")]
    run = simulate_audited(FAULT_LOAD, "pd", SimConfig(faults=faults))
    failed = run.steps[(run.steps["device"] == "link") & (run.steps["kv_bytes"] == 0)]
    retries = run.decisions[run.decisions["decision"] == "retry_transfer"]
    assert len(failed) == 2 and len(retries) == 2, (len(failed), len(retries))
    assert run.sim.ctl.mode == "pd", "two failed copies must not take the link down"
    retried = run.requests.set_index("request_id").loc[retries["old"].astype(int)]
    assert (retried["decode_device"] == "gpu1").all(), "a retried copy did not reach GPU1"
    check_all(run)


def test_a_copy_failing_past_its_retries_decodes_where_the_kv_is():
    run = simulate_audited(FAULT_LOAD, "pd", SimConfig(faults=[Fault(2.0, "transfer")] * 3))
    kinds = run.decisions["decision"].tolist()
    assert kinds.count("retry_transfer") == 2 and kinds.count("colocate") == 1, kinds[:10]
    rid = int(run.decisions.loc[run.decisions["decision"] == "colocate", "old"].iloc[0])
    row = run.requests.set_index("request_id").loc[rid]
    assert (row["prefill_device"], row["decode_device"], row["status"]) == ("gpu0", "gpu0", "finished")
    check_all(run, transfers=False)  # transfer timestamps: next test


def test_a_colocated_request_has_no_kv_transfer_times():
    """requests.csv: kv_transfer_start_s is 'empty when colocated'; a started copy has an end."""
    run = simulate_audited(FAULT_LOAD, "pd", SimConfig(faults=[Fault(2.0, "transfer")] * 3))
    req = run.requests
    colocated = req[req["prefill_device"] == req["decode_device"]]
    assert len(colocated) > 0
    stale = colocated[colocated["kv_transfer_start_s"].notna() | colocated["kv_transfer_end_s"].notna()]
    assert stale.empty, ("colocated requests with KV transfer times: "
                         f"{stale[['request_id', 'kv_transfer_start_s', 'kv_transfer_end_s']].values.tolist()}")
    check_transfer_timestamps(run)


def test_repeated_transfer_faults_mean_the_link_is_down():
    faults = [Fault(2.0 + 0.5 * i, "transfer") for i in range(3)]
    run = simulate_audited(FAULT_LOAD, "pd", SimConfig(faults=faults))
    assert ("pd", "single") in [(o, n) for _, o, n in run.mode_changes()], run.mode_changes()
    check_all(run)


def test_adaptive_returns_to_pipeline_after_a_short_link_fault():
    run = simulate_audited(FAULT_LOAD, "adaptive", SimConfig(faults=[Fault(2.0, "link", duration_s=0.5)]),
                           overrides={"fallback": {"probation_s": 1.5}})
    changes = [(o, n) for _, o, n in run.mode_changes()]
    assert changes[0] == ("pipeline", "single"), changes
    assert changes[-1][1] == "pipeline", f"never came back to pipeline: {changes}"
    assert run.sim.ctl.mode == "pipeline"
    t_back = run.mode_changes()[-1][0]
    assert (run.steps.loc[run.steps["t_start_s"] > t_back, "mode"] == "pipeline").all()
    check_all(run)


# ---------------------------------------------------------------------------------------------
# 8: determinism

@pytest.mark.parametrize("policy", POLICIES)
def test_same_input_gives_identical_rows(loaded_runs, policy):
    again = simulate_audited(LOADED, policy)
    first = loaded_runs[policy].rows()
    second = again.rows()
    for name, a, b in zip(("requests", "steps", "decisions"), first, second):
        assert a == b, f"{policy}: {name} rows differ between two identical runs"


def test_same_faulty_input_gives_identical_rows():
    cfg = lambda: SimConfig(faults=[Fault(2.0, "link", duration_s=0.5), Fault(4.0, "transfer")])  # noqa: E731
    kw = dict(overrides={"fallback": {"probation_s": 1.5}})
    assert simulate_audited(FAULT_LOAD, "adaptive", cfg(), **kw).rows() == simulate_audited(FAULT_LOAD, "adaptive", cfg(), **kw).rows()


# ---------------------------------------------------------------------------------------------
# 9: capabilities

SMALL = synthetic_workload(150, rate_rps=40, seed=7)


def test_one_gpu_runs_pd_as_single():
    run = simulate_audited(SMALL, "pd", SimConfig(capabilities=Capabilities(num_gpus=1)))
    first = run.decisions.iloc[0]
    assert (first["t_s"], first["decision"], first["old"], first["new"]) == (0.0, "mode", "pd", "single")
    assert "2 GPUs" in first["reason"]
    assert set(run.steps["device"]) == {"gpu0"}
    assert (run.requests["mode"] == "single").all()
    assert list(run.sim.ctl.scheduler.pools) == ["gpu0"]
    check_all(run)


def test_no_green_contexts_runs_pipeline_as_pd():
    run = simulate_audited(SMALL, "pipeline", SimConfig(capabilities=Capabilities(green_contexts=False)))
    first = run.decisions.iloc[0]
    assert (first["t_s"], first["decision"], first["old"], first["new"]) == (0.0, "mode", "pipeline", "pd")
    assert "green contexts" in first["reason"]
    assert not run.steps["stage"].isin(["attn", "ffn"]).any()
    assert (run.requests["mode"] == "pd").all()
    check_all(run)


# ---------------------------------------------------------------------------------------------
# 10: physics

@pytest.mark.parametrize("rate, seed", [(40, 0), (40, 1), (80, 2)])
def test_pd_removes_prefill_interference_from_tpot(rate, seed):
    """GPU0 prefills while GPU1 decodes; colocated (single) decodes share steps with prefill chunks."""
    w = synthetic_workload(400, rate_rps=rate, seed=seed)
    slo = Slo(1.0, 0.05)
    runs = {p: simulate_audited(w, p) for p in ("single", "pd")}
    s = {p: summarize(r.requests, slo, steps=r.steps, decisions=r.decisions) for p, r in runs.items()}
    pd_steps = runs["pd"].steps
    prefill = pd_steps[(pd_steps["device"] == "gpu0") & (pd_steps["stage"] == "prefill")]
    decode = pd_steps[pd_steps["device"] == "gpu1"].sort_values("t_start_s")
    t = prefill["t_start_s"].to_numpy()
    latest = np.searchsorted(decode["t_start_s"].to_numpy(), t, side="right") - 1  # GPU1 row running at t, if any
    during = (latest >= 0) & (decode["t_end_s"].to_numpy()[np.maximum(latest, 0)] > t)
    assert during.mean() > 0.5, f"GPU0 prefilled while GPU1 decoded in only {during.mean():.0%} of prefills"
    assert (runs["single"].steps["stage"] == "mixed").any()
    assert s["pd"]["tpot_p99_ms"] < s["single"]["tpot_p99_ms"], (s["pd"]["tpot_p99_ms"], s["single"]["tpot_p99_ms"])


def test_a_mixed_step_pays_the_decode_tail_of_its_decodes():
    """A colocated step of prefill chunks plus decodes runs the decodes' attention kernel as a decode step
    does, so mixed context lengths add their tail there too (on 2x H200, single, Azure conv x8: mixed steps
    at batch > 200 read 10% under the real ones without it, TTFT -88%)."""
    class Tail:
        """The analytic model plus a known tail: 1 ms per 1,000 tokens the longest context is over the mean."""

        def __init__(self, base):
            self.base = base

        def __getattr__(self, name):
            return getattr(self.base, name)

        def decode_tail_s(self, batch_size, kv_tokens, max_context):
            return 1e-3 * max(0.0, max_context - kv_tokens / batch_size) / 1000

    base = make_cost_model(HW, SPEC)
    requests = [RequestSpec(0, 0.0, 8000, 50)] + [RequestSpec(i, 0.0, 200, 50) for i in range(1, 8)] + \
        [RequestSpec(8, 0.05, 3000, 4)]  # a prompt arriving while the eight decode: mixed steps
    cfg = SimConfig(capabilities=Capabilities(num_gpus=1))
    runs = {}
    for name, cost in (("plain", base), ("tail", Tail(base))):
        sim = Simulation(requests, load_policy_config("single"), cost, HW, SPEC, cfg).run()
        steps = pd.DataFrame(sim.steps, columns=STEPS.names)
        runs[name] = steps[steps["stage"] == "mixed"].reset_index(drop=True)
    plain, tail = runs["plain"], runs["tail"]
    assert len(plain) > 0 and len(plain) == len(tail)
    extra = (tail["t_end_s"] - tail["t_start_s"]) - (plain["t_end_s"] - plain["t_start_s"])
    assert (extra >= 0).all() and (extra > 5e-3).sum() >= 2, extra.tolist()  # once decoding, the 8k context
    # is ~7k tokens over its batch's mean (before, the batch is eight 200-token prompts: no tail)


def test_a_kv_copy_into_the_decoding_gpu_slows_its_next_decode_step():
    """The pull transport's copy kernel runs on GPU1 beside its decode steps (fidelity runs: steps a copy
    overlapped ran 3-4.5% over the model): the decode steps it overlapped pay the measured interference, once,
    in the run that follows the copy; a copy into an idle GPU1 costs nothing."""
    class CopyCost:
        """The analytic model plus 2 ms of interference per copy."""

        def __init__(self, base):
            self.base = base

        def __getattr__(self, name):
            return getattr(self.base, name)

        def copy_interference_s(self, kv_bytes, batch_size):
            return 2e-3

    base = make_cost_model(HW, SPEC)
    # request 0's copy finds GPU1 idle; request 1's copy (at ~0.5 s) lands while GPU1 decodes request 0
    requests = [RequestSpec(0, 0.0, 500, 400), RequestSpec(1, 0.5, 500, 3)]
    runs = {}
    for name, cost in (("plain", base), ("copy", CopyCost(base))):
        sim = Simulation(requests, load_policy_config("pd"), cost, HW, SPEC).run()
        steps = pd.DataFrame(sim.steps, columns=STEPS.names)
        gpu1 = steps[steps["device"] == "gpu1"]
        runs[name] = ((gpu1["t_end_s"] - gpu1["t_start_s"]).sum(), len(gpu1),
                      {r.request_id: r.finish_s for r in sim.ctl.requests})
    (plain_s, plain_n, plain_end), (copy_s, copy_n, copy_end) = runs["plain"], runs["copy"]
    assert copy_n == plain_n
    assert copy_s - plain_s == pytest.approx(2e-3, abs=1e-9)  # request 1's copy only, and exactly once
    assert copy_end[0] - plain_end[0] == pytest.approx(2e-3, abs=1e-9)
    idle = [RequestSpec(0, 0.0, 500, 3), RequestSpec(1, 2.0, 500, 3)]  # every copy into an idle GPU1
    ends = [{r.request_id: r.finish_s for r in Simulation(idle, load_policy_config("pd"), c, HW, SPEC).run().ctl.requests}
            for c in (base, CopyCost(base))]
    assert ends[0] == ends[1]


def test_decode_steps_on_gpu0_run_at_gpu0s_measured_speed():
    """The decode rows time GPU1 (where pd decodes); single decodes on GPU0, whose speed the profile's
    decode_prefill_gpu rows give as a factor: its decode steps take that much longer, GPU1's (pd) do not."""
    class SlowGpu0:
        def __init__(self, base):
            self.base = base

        def __getattr__(self, name):
            return getattr(self.base, name)

        def decode_device_factor(self, device, batch_size):
            return 1.1 if device == "gpu0" else 1.0

    base = make_cost_model(HW, SPEC)
    requests = [RequestSpec(i, 0.0, 300, 200) for i in range(4)]
    for policy, device, ratio in (("single", "gpu0", 1.1), ("pd", "gpu1", 1.0)):
        dec = {}
        for name, cost in (("plain", base), ("slow", SlowGpu0(base))):
            cfg = SimConfig(capabilities=Capabilities(num_gpus=1 if policy == "single" else 2))
            steps = pd.DataFrame(Simulation(requests, load_policy_config(policy), cost, HW, SPEC, cfg).run().steps,
                                 columns=STEPS.names)
            d = steps[(steps["stage"] == "decode") & (steps["device"] == device)]
            dec[name] = ((d["t_end_s"] - d["t_start_s"]).sum(), d["num_steps"].sum())
        assert dec["plain"][1] == dec["slow"][1] > 100, (policy, dec)
        assert dec["slow"][0] / dec["plain"][0] == pytest.approx(ratio, rel=0.01), (policy, dec)
