"""The real engine on CPU with the tiny Qwen3: greedy tokens equal HF transformers', preemption, the CLI."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from real import LLM, SamplingParams  # noqa: E402
from real.weights import export_hf_state_dict  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPT_LENS = (5, 17, 33, 70, 101)
NEW_TOKENS = 24


def prompts(seed=0, lens=PROMPT_LENS, vocab=512):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lens]


def hf_model(llm: LLM):
    runner = llm.engine.runners["gpu0"]
    model = transformers.Qwen3ForCausalLM(runner.model_cfg.to_hf_config()).eval()
    missing, unexpected = model.load_state_dict(export_hf_state_dict(runner.model), strict=False)
    assert not [k for k in missing if "rotary" not in k] and not unexpected
    return model


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def tiny():
    return LLM("tiny", device="cpu", seed=0, enforce_eager=True)


@pytest.fixture(scope="module")
def reference(tiny):
    model = hf_model(tiny)
    return [hf_greedy(model, p, NEW_TOKENS) for p in prompts()]


def test_greedy_matches_hf_generate(tiny, reference):
    outs = tiny.generate(prompts(), SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True))
    assert [o["token_ids"] for o in outs] == reference
    assert all(o["status"] == "finished" for o in outs)


def test_greedy_matches_hf_with_preemption_and_chunked_prefill():
    # 14 blocks of 16 tokens for 5 sequences that need up to 8 blocks each: the scheduler must preempt and
    # recompute; a 32-token mixed budget chunks every prompt over several steps.
    llm = LLM("tiny", device="cpu", seed=0, enforce_eager=True, num_kv_blocks=14, max_model_len=200)
    llm.engine.policy_config.scheduler.mixed_token_budget = 32
    ref_model = hf_model(llm)
    ps = prompts()
    outs = llm.generate(ps, SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True))
    preemptions = sum(r.preemptions for r in llm.engine.ctl.requests)
    assert preemptions > 0, "the test must exercise preemption"
    assert any(d.decision == "preempt" for d in llm.engine.ctl.decisions)
    assert [o["token_ids"] for o in outs] == [hf_greedy(ref_model, p, NEW_TOKENS) for p in ps]


def test_dp_on_two_cpu_workers_gives_the_same_tokens(reference):
    llm = LLM("tiny", policy="dp", device="cpu", seed=0, enforce_eager=True)
    outs = llm.generate(prompts(), SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True))
    assert [o["token_ids"] for o in outs] == reference
    used = {r.prefill_device for r in llm.engine.ctl.requests}
    assert used == {"gpu0", "gpu1"}  # the router spread the load


def test_sampling_is_seeded_and_differs_from_greedy(tiny):
    ps = prompts(lens=(12, 30))
    sp = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
    a = LLM("tiny", device="cpu", seed=3, enforce_eager=True).generate(ps, sp)
    b = LLM("tiny", device="cpu", seed=3, enforce_eager=True).generate(ps, sp)
    greedy = tiny.generate(ps, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))
    assert [o["token_ids"] for o in a] == [o["token_ids"] for o in b]
    assert [o["token_ids"] for o in a] != [o["token_ids"] for o in greedy]


def test_too_long_prompt_is_rejected_and_the_rest_served():
    llm = LLM("tiny", device="cpu", seed=0, enforce_eager=True, max_model_len=64)
    outs = llm.generate(prompts(lens=(10, 100, 20)), SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    assert [o["status"] for o in outs] == ["finished", "rejected", "finished"]
    assert "max context 64" in outs[1]["fail_reason"]
    assert [len(o["token_ids"]) for o in outs] == [8, 0, 8]


def test_clear_errors():
    with pytest.raises(ValueError, match="unknown model 'qwen9'"):
        LLM("qwen9", device="cpu")
    with pytest.raises(TypeError, match="unknown engine option"):
        LLM("tiny", device="cpu", max_num_seq=4)
    with pytest.raises(RuntimeError, match="needs"):
        LLM("tiny", device="cpu", num_kv_blocks=2, max_model_len=256)
    with pytest.raises(ValueError, match="unknown policy"):
        LLM("tiny", policy="fastest", device="cpu")


def run_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "real.run", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def test_cli_single_cpu_tiny_finishes_all(tmp_path):
    out = tmp_path / "run"
    proc = run_cli("--policy", "single", "--device", "cpu", "--model", "tiny", "--num-requests", "8",
                   "--save-outputs", "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr
    from traces.run_folder import load_run

    run = load_run(out)
    assert len(run.requests) == 8 and (run.requests["status"] == "finished").sum() + \
        (run.requests["status"] == "rejected").sum() == 8
    finished = run.requests[run.requests["status"] == "finished"]
    assert len(finished) >= 6
    lines = [json.loads(x) for x in (out / "outputs.jsonl").read_text().splitlines()]
    assert len(lines) == 8
    by_id = {x["request_id"]: x["token_ids"] for x in lines}
    for _, r in finished.iterrows():
        assert len(by_id[r["request_id"]]) == r["output_tokens"]
    assert "TPOT" in proc.stdout and "cpu" in proc.stdout
    stalls = json.loads((out / "run.json").read_text())["host_stalls"]
    assert stalls["frozen_startup_objects"] > 1000  # the start-up heap (model, modules) kept out of the collector's walks


def test_cli_errors_are_one_line(tmp_path):
    proc = run_cli("--device", "cpu", "--model", "nope", "--num-requests", "2", "--out", str(tmp_path / "x"))
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error:") and "Traceback" not in proc.stderr
    bad = tmp_path / "ckpt"
    bad.mkdir()
    proc = run_cli("--device", "cpu", "--checkpoint", str(bad), "--num-requests", "2", "--out", str(tmp_path / "y"))
    assert proc.returncode == 2 and "error:" in proc.stderr and "Traceback" not in proc.stderr


def test_sim_and_real_take_the_same_policy_decisions():
    """One brain, two bodies: the same workload through the simulator and the CPU engine gives the same
    admission decisions (decisions.csv rows) from the same scheduler rule."""
    from real.engine import LLMEngine, SamplingParams as SP, synthetic_prompt
    from real.config import EngineConfig
    from sim.run import simulate
    from traces.workload import RequestSpec, Workload

    specs = [RequestSpec(i, 0.01 * i, p, o) for i, (p, o) in enumerate([(20, 8), (90, 8), (30, 40), (10, 5)])]
    sim = simulate(Workload(specs, "test", "synthetic"), policy="single", model="tiny",
                   overrides={"scheduler": {"max_context_tokens": 64}}, summarize_steps=False)
    engine = LLMEngine(EngineConfig(model="tiny", device="cpu", enforce_eager=True, max_model_len=64), "single",
                       log=lambda *_: None)
    engine.run_until_done([(s.arrival_s, s.request_id, synthetic_prompt(s.request_id, s.prompt_tokens, 512, 0),
                            SP(temperature=0.0, max_tokens=s.output_tokens, ignore_eos=True)) for s in specs])

    def key(rows):
        return sorted((r[1], r[2], r[3], r[5]) for r in rows)  # policy, decision, old, reason

    real_rows = [d.as_row() for d in engine.ctl.decisions]
    assert key(sim.decisions) == key(real_rows)
    assert [r[2] for r in real_rows] == ["reject", "reject"]  # 90+8 and 30+40 exceed 64 tokens
    sim_status = {r[0]: r[15] for r in sim.requests}
    real_status = {r.request_id: r.state for r in engine.ctl.requests}
    assert sim_status == real_status == {0: "finished", 1: "rejected", 2: "rejected", 3: "finished"}


# ---- pd: GPU0 prefills, the KV cache crosses to GPU1, which decodes (both workers on CPU here) ----------
def test_pd_greedy_matches_hf_and_kv_crosses(reference):
    llm = LLM("tiny", device="cpu", seed=0, enforce_eager=True, enable_two_gpu_pd=True,
              prefill_device_id=0, decode_device_id=1)
    outs = llm.generate(prompts(), SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True))
    assert [o["token_ids"] for o in outs] == reference  # the first token, sampled at prefill, is kept
    reqs = llm.engine.ctl.requests
    assert all(r.prefill_device == "gpu0" and r.decode_device == "gpu1" for r in reqs)
    assert all(r.prefill_end_s <= r.kv_transfer_start_s <= r.kv_transfer_end_s <= r.finish_s for r in reqs)
    transfers = [s for s in llm.engine.steps if s[3] == "transfer"]
    assert len(transfers) == len(reqs) and all(s[13] > 0 for s in transfers)
    assert llm.engine.runners["gpu0"].kv_cache is not llm.engine.runners["gpu1"].kv_cache
    pools = llm.engine.ctl.scheduler.pools
    assert pools["gpu0"].num_free == pools["gpu0"].num_blocks  # GPU0 freed every request's blocks


def test_pd_transfer_failures_retry_or_decode_where_the_kv_is(reference):
    from real.config import EngineConfig
    from real.engine import LLMEngine

    sys.setswitchinterval(5e-3)  # Python's default, whatever an earlier test left
    before = sys.getswitchinterval()
    engine = LLMEngine(EngineConfig(model="tiny", device="cpu", seed=0, enforce_eager=True), "pd",
                       log=lambda *_: None, transfer_faults={1: 1, 3: 99})
    assert sys.getswitchinterval() == pytest.approx(0.5e-3)  # two launch threads: the GIL changes hands sooner
    sp = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    engine.run_until_done([(0.0, i, p, sp) for i, p in enumerate(prompts())])
    reqs = engine.ctl.requests
    assert len(reqs) == 5 and all(r.state == "finished" for r in reqs)  # nothing lost, no hang
    assert [r.token_ids[len(p):] for r, p in zip(reqs, prompts())] == reference
    decisions = [(d.decision, d.old) for d in engine.ctl.decisions]
    assert ("retry_transfer", "1") in decisions and ("colocate", "3") in decisions
    assert reqs[1].decode_device == "gpu1" and reqs[3].decode_device == "gpu0"
    engine.close()
    assert sys.getswitchinterval() == before  # process-wide state goes back with the engine


def test_cli_pd_outputs_identical_to_single(tmp_path):
    outs = {}
    for policy in ("single", "pd"):
        out = tmp_path / policy
        proc = run_cli("--policy", policy, "--device", "cpu", "--model", "tiny", "--num-requests", "12", "--seed", "3",
                       "--save-outputs", "--out", str(out), "--quiet")
        assert proc.returncode == 0, proc.stderr
        outs[policy] = (out / "outputs.jsonl").read_text()
        from traces.run_folder import load_run

        assert len(load_run(out).requests) == 12  # requests in == requests out
    assert outs["pd"] == outs["single"]


# ---- pipeline / adaptive: attention/FFN micro-batches on GPU1 (partitions are no-ops on CPU) -------------
def test_pipeline_greedy_matches_hf_and_runs_split_steps(reference):
    llm = LLM("tiny", device="cpu", seed=0, enforce_eager=True, enable_decode_pipeline=True, decode_attention_sm=8)
    outs = llm.generate(prompts(), SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True))
    assert [o["token_ids"] for o in outs] == reference  # micro-batched halves = the sequential math
    split_rows = [s for s in llm.engine.steps if s[3] in ("attn", "ffn")]
    assert split_rows and {(s[7], s[8]) for s in split_rows} == {(8, 8)}
    stats = llm.decode_runner.pipeline_statistics()
    assert stats["pipelined_steps"] > 0 and stats["attn_busy_s"] > 0 and stats["ffn_busy_s"] > 0
    assert stats["mode"] == "pipeline"


def test_green_context_error_mid_run_falls_back_to_pd(reference):
    from real.config import EngineConfig
    from real.engine import LLMEngine

    engine = LLMEngine(EngineConfig(model="tiny", device="cpu", seed=0, enforce_eager=True), "adaptive",
                       log=lambda *_: None, green_ctx_fault_at_step=6)
    sp = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    engine.run_until_done([(0.0, i, p, sp) for i, p in enumerate(prompts())])
    assert [r.token_ids[len(p):] for r, p in zip(engine.ctl.requests, prompts())] == reference
    modes = [(d.old, d.new) for d in engine.ctl.decisions if d.decision == "mode"]
    assert modes and modes[0] == ("pipeline", "pd") and all(r.state == "finished" for r in engine.ctl.requests)


def test_green_context_creation_failure_starts_in_pd(monkeypatch):
    import real.engine as eng
    from real.green import GreenContextUnavailable

    def broken(*a, **k):
        raise GreenContextUnavailable("no green contexts here (test)")

    monkeypatch.setattr(eng, "SmPartitions", broken)
    llm = LLM("tiny", policy="pipeline", device="cpu", seed=0, enforce_eager=True)
    assert llm.engine.ctl.mode == "pd"
    first = llm.engine.ctl.decisions[0]
    assert first.decision == "mode" and first.new == "pd" and "green contexts" in first.reason
    outs = llm.generate(prompts(lens=(9, 40)), SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
    assert all(o["status"] == "finished" for o in outs)


@pytest.mark.parametrize("policy", ["pipeline", "adaptive"])
def test_cli_pipeline_and_adaptive_outputs_identical_to_single(tmp_path, policy):
    outs = {}
    for p in ("single", policy):
        out = tmp_path / p
        proc = run_cli("--policy", p, "--device", "cpu", "--model", "tiny", "--num-requests", "12", "--seed", "5",
                       "--save-outputs", "--out", str(out), "--quiet")
        assert proc.returncode == 0, proc.stderr
        outs[p] = (out / "outputs.jsonl").read_text()
    assert outs[policy] == outs["single"]


def test_decode_kernel_config_from_environment(monkeypatch):
    from real.attention import DECODE_KERNEL_DEFAULT, decode_kernel_config

    monkeypatch.delenv("REAL_DECODE_KERNEL", raising=False)
    assert decode_kernel_config() == DECODE_KERNEL_DEFAULT
    monkeypatch.setenv("REAL_DECODE_KERNEL", "128,8,3")
    assert decode_kernel_config() == (128, 8, 3)
    for bad in ("128,8", "96,4,2", "64,3,2", "64,4,0", "a,b,c"):
        monkeypatch.setenv("REAL_DECODE_KERNEL", bad)
        with pytest.raises(ValueError, match="REAL_DECODE_KERNEL"):
            decode_kernel_config()


def test_decode_length_splits_from_environment(monkeypatch):
    from real.attention import decode_length_splits

    monkeypatch.delenv("REAL_DECODE_LENGTH_SPLITS", raising=False)
    assert decode_length_splits() == 1  # off until timed on a GPU
    monkeypatch.setenv("REAL_DECODE_LENGTH_SPLITS", "4")
    assert decode_length_splits() == 4
    for bad in ("0", "x", "-2"):
        monkeypatch.setenv("REAL_DECODE_LENGTH_SPLITS", bad)
        with pytest.raises(ValueError, match="REAL_DECODE_LENGTH_SPLITS"):
            decode_length_splits()


def test_split_by_length_gives_the_long_sequence_more_splits():
    """The per-sequence split count the kernel derives: one long context among short ones (the tail)."""
    from real.triton_kernels import length_splits

    lens = torch.tensor([1000] * 7 + [8000, 0], dtype=torch.int32)  # one padding entry
    got = length_splits(lens, num_splits=1, max_splits=8, block_n=64).tolist()
    assert got == [1] * 7 + [5, 1]  # 1,875 tokens a split (the mean context): 8000 -> 5 splits
    assert length_splits(lens, num_splits=1, max_splits=4, block_n=64).tolist()[7] == 4  # capped at the grid
    got = length_splits(lens, num_splits=2, max_splits=16, block_n=64).tolist()
    assert got[:7] == [2] * 7 and got[7] == 9


def test_multi_step_decode_matches_hf_and_covers_several_steps_per_schedule(reference):
    llm = LLM("tiny", device="cpu", seed=0, enforce_eager=True, decode_steps=4)
    outs = llm.generate(prompts(), SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True))
    assert [o["token_ids"] for o in outs] == reference
    decode_rows = [s for s in llm.engine.steps if s[3] == "decode"]
    assert max(s[11] for s in decode_rows) == 4  # num_steps column
    assert sum(s[11] for s in decode_rows) < 2 * len(decode_rows) * 4  # not a schedule per step
    assert all(r.generated == NEW_TOKENS and r.kv_len == r.prompt_tokens + NEW_TOKENS - 1
               for r in llm.engine.ctl.requests)


def test_multi_step_decode_with_preemption_matches_hf():
    llm = LLM("tiny", device="cpu", seed=0, enforce_eager=True, num_kv_blocks=14, max_model_len=200, decode_steps=3)
    llm.engine.policy_config.scheduler.mixed_token_budget = 32
    ref_model = hf_model(llm)
    ps = prompts()
    outs = llm.generate(ps, SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True))
    assert sum(r.preemptions for r in llm.engine.ctl.requests) > 0
    assert [o["token_ids"] for o in outs] == [hf_greedy(ref_model, p, NEW_TOKENS) for p in ps]


def test_multi_step_decode_stops_at_eos_like_single_steps(monkeypatch):
    from policies.scheduler import Scheduler

    p = prompts(lens=(20,))  # one sequence: the sampler's random draws line up step for step
    free = LLM("tiny", device="cpu", seed=3, enforce_eager=True).generate(
        p, SamplingParams(temperature=1.0, max_tokens=NEW_TOKENS, ignore_eos=True))[0]["token_ids"]
    # a token first sampled mid-way through a 4-step schedule (decode tokens 1-4, 5-8, ...)
    eos = next(t for i, t in enumerate(free) if i > 1 and i % 4 and free.index(t) == i)
    early = []
    finish = Scheduler.finish_batch

    def recording(self, batch, now, steps_done=None, stopped=None):
        early.extend((stopped or {}).values())
        return finish(self, batch, now, steps_done, stopped)

    monkeypatch.setattr(Scheduler, "finish_batch", recording)
    outs = {}
    for steps in (1, 4):
        llm = LLM("tiny", device="cpu", seed=3, enforce_eager=True, decode_steps=steps)
        llm.engine.model_cfg.eos_token_id = eos
        outs[steps] = llm.generate(p, SamplingParams(temperature=1.0, max_tokens=NEW_TOKENS))[0]["token_ids"]
        assert llm.engine.ctl.requests[0].generated == len(outs[steps])  # the steps after EOS are not counted
    assert early and all(0 < n < 4 for n in early)  # EOS came before the last step of a schedule
    assert outs[4] == outs[1] == free[:free.index(eos) + 1]


def test_decode_steps_must_be_positive():
    with pytest.raises(ValueError, match="decode_steps must be >= 1"):
        LLM("tiny", device="cpu", decode_steps=0)


def test_fused_kernels_must_be_known_and_reach_the_model():
    from real.model import Fused

    with pytest.raises(ValueError, match=r"unknown fused_kernels 'inductor'; choose triton or compile"):
        LLM("tiny", device="cpu", fused_kernels="inductor")
    try:
        LLM("tiny", device="cpu", enforce_eager=True, fused_kernels="compile").close()
        assert Fused.kernels == "compile"
    finally:
        Fused.kernels = "triton"


def test_slots_on_the_device_match_the_hosts():
    """Multi-step decode stages its later steps' slots on the device (real.context.slots_at): the same slots
    as the host's staging of a step (block id * block size + offset)."""
    from real.context import slots_at

    g = torch.Generator().manual_seed(1)
    table = torch.randperm(200, generator=g)[:120].reshape(6, 20).to(torch.int32)
    pos = torch.tensor([0, 15, 16, 40, 159, 319])
    want = [int(table[i, p // 16]) * 16 + p % 16 for i, p in enumerate(pos.tolist())]
    assert slots_at(table, pos, 16).tolist() == want


def test_run_cli_takes_the_gpu_memory_share_and_refuses_one_outside_0_1():
    """`--gpu-memory-utilization` reaches EngineConfig's field (the KV cache's share of memory); 0 and 1.5 are refused."""
    from real.run import build_parser

    assert build_parser().parse_args(["--gpu-memory-utilization", "0.6"]).gpu_memory_utilization == 0.6
    assert build_parser().parse_args([]).gpu_memory_utilization == 0.90
    for bad in ("0", "1.5", "most"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["--gpu-memory-utilization", bad])


def test_run_freezes_the_heap_before_the_clock_starts(tmp_path, monkeypatch):
    """The start-up collection is a full one (146-253 ms mid-run on 2x H200): it must run before the run's clock
    starts, or the first requests' TTFTs carry it."""
    import real.engine
    import real.run
    import real.stall_watch

    order = []
    freeze, reset = real.stall_watch.freeze_startup_heap, real.engine.LLMEngine.reset_clock
    monkeypatch.setattr(real.stall_watch, "freeze_startup_heap", lambda: order.append("freeze") or freeze())
    monkeypatch.setattr(real.engine.LLMEngine, "reset_clock", lambda self: order.append("clock") or reset(self))
    rc = real.run.main(["--policy", "single", "--device", "cpu", "--model", "tiny", "--num-requests", "2",
                        "--out", str(tmp_path / "run"), "--quiet"])
    assert rc == 0 and order[:2] == ["freeze", "clock"]
