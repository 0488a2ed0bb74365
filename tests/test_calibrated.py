"""The calibrated cost model against synthetic profiles written from analytic models (CPU, fast).

The "measured" profile comes from an analytic model with other parameters (the truth), so the
calibrated model, whose fallback is the default analytic model, must follow the profile, not
its fallback: exactly on the grid, within a few % between grid points.
"""
from __future__ import annotations

import json
import random
import statistics

import pytest

import traces.profile as profile_mod
from sim import run as sim_run
from sim.calibrated import CalibratedCostModel, pick_profile
from sim.cost_model import AnalyticCostModel, make_cost_model
from traces.profile import SPREAD_COLUMNS, ProfileError, read_profile, write_profile

HW, MODEL = "h100x2", "qwen3-0.6b"
BATCHES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
CONTEXTS = [0, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]
TOKENS = [16, 64, 256, 1024, 2048, 4096, 8192, 16384]
SPLITS = [(32, 100), (64, 68), (96, 36)]
META = dict(gpu="synthetic", date="2026-01-01", command="tests/test_calibrated.py", model=MODEL, hardware=HW,
            torch="none", sms=132)
ALL_OPS = ("prefill", "decode", "pipeline", "attn", "ffn", "pair", "transfer")  # + "seq": real.profile's


def truth_model(model: str = MODEL) -> AnalyticCostModel:
    return make_cost_model(HW, model, gemm_eff=0.55, hbm_eff=0.85, attn_host_s=30e-6)


def synthetic_rows(cm: AnalyticCostModel, ops=ALL_OPS, batches=BATCHES, contexts=CONTEXTS, splits=SPLITS,
                   layer_contexts=None, pipeline_min_batch=2) -> list[dict]:
    """What `python -m real.profile` would measure if the GPU were `cm`."""
    rows = []
    for b in batches:
        for c in contexts:
            kv = b * c
            if "decode" in ops:
                rows.append(dict(op="decode", batch=b, context=c, seconds=cm.decode_step(b, kv).step_s))
            for a, f in splits:
                if "pipeline" in ops and b >= pipeline_min_batch:
                    rows.append(dict(op="pipeline", batch=b, context=c, attn_sms=a, ffn_sms=f, microbatches=2,
                                     seconds=cm.decode_step(b, kv, (a, f), 2).step_s))
        for c in layer_contexts or contexts:
            kv = b * c
            if "attn" in ops:
                rows.append(dict(op="attn", batch=b, context=c, attn_sms=132, seconds=cm.stage_s("attn", b, kv)))
            if "ffn" in ops:
                rows.append(dict(op="ffn", batch=b, context=c, ffn_sms=132, seconds=cm.stage_s("ffn", b, kv)))
            if "seq" in ops:
                rows.append(dict(op="seq", batch=b, context=c, attn_sms=132, ffn_sms=132,
                                 seconds=cm.layer_times(b, kv, (64, 68)).seq_s))
            for a, f in splits:
                if "pair" in ops:
                    rows.append(dict(op="pair", batch=b, context=c, attn_sms=a, ffn_sms=f,
                                     seconds=cm.layer_times(b, kv, (a, f)).pair_s))
    if "prefill" in ops:  # one sequence over a token grid and prefixes, and packed batches of 1024-token prompts
        for t in TOKENS:
            for c in (0, 1024, 4096):
                rows.append(dict(op="prefill", batch=1, tokens=t, context=c, seconds=cm.forward_s([(t, c)])))
        for b in (2, 4, 8, 16):
            rows.append(dict(op="prefill", batch=b, tokens=1024 * b, seconds=cm.forward_s([(1024, 0)] * b)))
    if "transfer" in ops:
        for mb in (1, 16, 64, 256):
            rows.append(dict(op="transfer", batch=1, tokens=0, bytes=mb * 10**6, seconds=cm.transfer_s(mb * 10**6)))
    return rows


@pytest.fixture(scope="module")
def profile_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("profiles") / f"{HW}-{MODEL}.csv"
    return write_profile(path, synthetic_rows(truth_model()), META)


@pytest.fixture(scope="module")
def cal(profile_path) -> CalibratedCostModel:
    return make_cost_model(HW, MODEL, kind="calibrated", profile=profile_path)


# ---- 1. the grid, exactly; between it, within a few % ----
def test_reproduces_every_measured_point(cal, profile_path):
    df, meta = read_profile(profile_path)
    assert meta["hardware"] == HW
    for r in df.itertuples():
        b, c, s = r.batch, r.context, r.seconds
        if r.op == "decode":
            got = cal.decode_step(b, b * c).step_s
        elif r.op == "pipeline":
            got = cal.decode_step(b, b * c, (r.attn_sms, r.ffn_sms), r.microbatches).step_s
        elif r.op == "prefill":
            got = cal.forward_s([(r.tokens // b, c)] * b)
        elif r.op == "transfer":
            got = cal.transfer_s(r.bytes)
        else:
            continue
        assert got == pytest.approx(s, rel=1e-9), r


def rel_errors(pairs) -> tuple[float, float]:
    errs = sorted(abs(a / b - 1) for a, b in pairs)
    return statistics.mean(errs), errs[int(0.95 * len(errs))]


def test_between_grid_points_within_a_few_percent(cal):
    truth, rng = truth_model(), random.Random(1)
    dec, pipe, pre = [], [], []
    for _ in range(2000):
        b, c = rng.randint(1, 512), rng.uniform(0, 16384)
        dec.append((cal.decode_step(b, int(b * c)).step_s, truth.decode_step(b, int(b * c)).step_s))
        if b >= 2:
            s = rng.choice(SPLITS)
            pipe.append((cal.decode_step(b, int(b * c), s, 2).step_s, truth.decode_step(b, int(b * c), s, 2).step_s))
        t, p = rng.randint(16, 16384), rng.uniform(0, 4096)
        pre.append((cal.forward_s([(t, int(p))]), truth.forward_s([(t, int(p))])))
    for name, pairs, mean_tol, p95_tol in (("decode", dec, 0.01, 0.03), ("pipeline", pipe, 0.02, 0.06),
                                           ("prefill", pre, 0.01, 0.03)):
        mean, p95 = rel_errors(pairs)
        assert mean < mean_tol and p95 < p95_tol, (name, mean, p95)


def test_prefill_keeps_the_cost_of_how_tokens_split_into_sequences(cal):
    """One 4096-token prompt costs more than eight of 512 (causal attention is per sequence)."""
    truth = truth_model()
    one, eight = cal.forward_s([(4096, 0)]), cal.forward_s([(512, 0)] * 8)
    assert eight < 0.8 * one
    for n, length in ((3, 700), (6, 1024), (12, 1000)):  # between the packed rows (n x 1024 tokens)
        assert cal.forward_s([(length, 0)] * n) == pytest.approx(truth.forward_s([(length, 0)] * n), rel=0.05)


def test_prefill_pays_the_graph_bucket_it_replays_in(tmp_path):
    """With the engine's prefill CUDA-graph buckets in the profile's metadata, a batch costs its padded
    bucket (padding rows through the matmuls, not attention): a truth engine that pads is followed
    between its buckets, where reading the rows as a smooth curve under-predicts mid-bucket batches;
    batches over max_seqs sequences, and cached prefixes without the paged kind, run eagerly, unpadded."""
    truth = truth_model()
    buckets = [256, 512, 1024, 2048, 4096, 8192, 16384]

    def padded(chunks, paged=True):
        tokens = sum(n for n, _ in chunks)
        fits = len(chunks) <= 4 and (paged or not any(c for _, c in chunks))
        pad = next((b for b in buckets if b >= tokens), tokens) - tokens if fits else 0
        return truth.forward_s(chunks, pad_tokens=pad)

    rows = [dict(op="prefill", batch=1, tokens=t, context=c, seconds=padded([(t, c)]))
            for t in (32, 256, 1024, 2048, 4096, 8192) for c in (0, 2048)]
    rows += [dict(op="prefill", batch=b, tokens=1024 * b, seconds=padded([(1024, 0)] * b)) for b in (2, 4, 8)]
    graphs = dict(buckets=buckets, max_seqs=4, paged=True)
    path = write_profile(tmp_path / f"{HW}-{MODEL}.csv", rows, {**META, "prefill_graphs": graphs})
    cal = make_cost_model(HW, MODEL, kind="calibrated", profile=path)
    smooth = make_cost_model(HW, MODEL, kind="calibrated", profile=write_profile(tmp_path / "smooth.csv", rows, META))
    assert "graph token buckets" in cal.describe()
    for chunks in ([(1100, 0)], [(1500, 0)], [(3000, 0)], [(600, 2048)], [(900, 0), (300, 0)], [(5000, 0)]):
        assert cal.forward_s(chunks) == pytest.approx(padded(chunks), rel=0.06), chunks
    assert smooth.forward_s([(1100, 0)]) < 0.85 * padded([(1100, 0)])  # the miss the metadata fixes
    assert cal._pad([(100, 0)] * 4) == 112 and cal._pad([(100, 0)] * 6) == 0  # more sequences than a graph holds
    assert cal._pad([(20000, 0)]) == 0  # more tokens than the largest bucket
    cal._bucket_paged = False  # an engine without the paged kind runs a chunk after a prefix eagerly
    assert cal._pad([(600, 2048)]) == 0 and cal._pad([(600, 0)]) == 424


def test_padding_rows_cost_their_measured_attention_free_share(tmp_path):
    """A prompt just over a bucket replays the next one: its padding rows cost what the rows say a step of
    that many tokens costs without attention (1-sequence and packed rows at the same size differ only by
    attention). A truth whose attention is cheaper than the analytic model's (as FlashAttention is) breaks
    the older charge, the 1-sequence ratio at the bucket's size, which the bucket-sized row's long attention
    sets (a 4,113-token prompt in the 8,192 bucket on 2x H100: 25.7 ms charged, 31.3 ms served)."""
    truth = make_cost_model(HW, MODEL, gemm_eff=0.55, attn_eff=0.9)
    buckets = [256, 512, 1024, 2048, 4096, 8192, 16384]

    def served(chunks):
        tokens = sum(n for n, _ in chunks)
        return truth.forward_s(chunks, pad_tokens=next(b for b in buckets if b >= tokens) - tokens)

    rows = [dict(op="prefill", batch=1, tokens=t, seconds=served([(t, 0)])) for t in (32, 128, 512, 1024, 2048, 4096,
                                                                                       8192)]
    rows += [dict(op="prefill", batch=b, tokens=1024 * b, seconds=served([(1024, 0)] * b)) for b in (2, 4, 8, 16)]
    meta = {**META, "prefill_graphs": dict(buckets=buckets, max_seqs=64, paged=True)}
    cal = make_cost_model(HW, MODEL, kind="calibrated", profile=write_profile(tmp_path / "p.csv", rows, meta))
    assert "attention-free cost" in cal.sources["prefill"]
    for r in rows:  # every row exactly
        chunks = [(r["tokens"] // r["batch"], 0)] * r["batch"]
        assert cal.forward_s(chunks) == pytest.approx(r["seconds"], rel=1e-9), chunks
    for chunks in ([(4113, 0)], [(5000, 0)], [(1100, 0)], [(3000, 0)], [(2000, 0), (2200, 0)], [(1500, 0)] * 3):
        assert cal.forward_s(chunks) == pytest.approx(served(chunks), rel=0.035), chunks  # the older charge: -12..-28%
    no_packed = [r for r in rows if r["batch"] == 1]  # without packed rows: the older charge, which misses
    old = make_cost_model(HW, MODEL, kind="calibrated", profile=write_profile(tmp_path / "o.csv", no_packed, meta))
    assert "attention-free" not in old.sources["prefill"]
    assert old.forward_s([(4113, 0)]) < 0.93 * served([(4113, 0)])


# ---- 2. beyond the grid ----
def test_extrapolation_is_monotone_positive_and_near_the_truth(cal):
    truth = truth_model()
    for c in (0, 1024, 16384, 65536):
        prev = 0.0
        for b in list(range(1, 2049, 37)):
            t = cal.decode_step(b, b * c).step_s
            assert t > 0 and t >= prev - 1e-15, (b, c)
            prev = t
    for b in (1, 64, 512, 1024):
        prev = 0.0
        for c in range(0, 131072, 4099):
            t = cal.decode_step(b, b * c).step_s
            assert t > 0 and t >= prev - 1e-15, (b, c)
            prev = t
    for b, c in ((1024, 1024), (512, 65536), (2048, 256)):  # decode is affine out there: linear extrapolation holds
        assert cal.decode_step(b, b * c).step_s == pytest.approx(truth.decode_step(b, b * c).step_s, rel=0.05)
    prev = 0.0
    for t in (1, 4, 8, 16, 20000, 32768, 65536):
        f = cal.forward_s([(t, 0)])
        assert f >= prev > 0 or prev == 0.0
        prev = f
    assert prev > 4 * cal.forward_s([(16384, 0)])


# ---- 3. the protocol's identities ----
def test_forward_without_chunks_is_the_decode_step(cal):
    for b, kv in ((1, 100), (8, 8192), (100, 300_000), (512, 524288), (700, 700_000)):
        assert cal.forward_s([], b, kv) == cal.decode_step(b, kv).step_s
    assert cal.forward_s([]) == 0.0 and cal.decode_step(0, 0).step_s == 0.0


def test_mixed_step_is_a_decode_pass_plus_a_prefill_pass(cal):
    mixed = cal.forward_s([(512, 0)], 64, 64 * 1024)
    prefill, decode = cal.forward_s([(512, 0)]), cal.decode_step(64, 64 * 1024).step_s
    assert max(prefill, decode) < mixed <= prefill + decode


def test_decode_cost_fields_and_plain_floats(cal):
    L = cal.model.num_layers
    c = cal.decode_step(64, 64 * 1024)
    truth = truth_model()
    assert c.attn_busy_s == pytest.approx(L * truth.stage_s("attn", 64, 64 * 1024))
    assert c.ffn_busy_s == pytest.approx(L * truth.stage_s("ffn", 64, 64 * 1024))
    for split, m in ((None, 1), ((64, 68), 2), ((96, 36), 4), ((64, 68), 1)):
        d = cal.decode_step(33, 33 * 1000, split, m)
        assert all(type(v) is float and 0 <= v <= d.step_s for v in (d.attn_busy_s, d.ffn_busy_s)), (split, m)
        assert d.step_s > 0
    assert type(cal.forward_s([(100, 50)], 3, 3000)) is float


def test_split_between_measured_splits_is_interpolated(cal):
    lo, hi = cal.decode_step(128, 128 * 1024, (64, 68), 2).step_s, cal.decode_step(128, 128 * 1024, (96, 36), 2).step_s
    mid = cal.decode_step(128, 128 * 1024, (80, 52), 2).step_s
    assert min(lo, hi) <= mid <= max(lo, hi)
    assert cal.decode_step(128, 128 * 1024, (8, 124), 2).step_s == cal.decode_step(128, 128 * 1024, (32, 100), 2).step_s


# ---- 4. what the profile lacks ----
def test_missing_ops_fall_back_to_analytic_and_are_reported(tmp_path):
    truth = truth_model()
    path = write_profile(tmp_path / "decode-only.csv", synthetic_rows(truth, ("decode",)), META)
    cal = CalibratedCostModel(path, HW, MODEL)
    base = make_cost_model(HW, MODEL)
    assert set(cal.fallbacks) == {"pipeline", "prefill", "transfer"}
    text = cal.describe()
    for op in ("pipeline", "prefill", "transfer"):
        assert op in text
    assert "analytic model for: pipeline, prefill, transfer" in text
    assert cal.transfer_s(10**8) == base.transfer_s(10**8)
    assert cal.forward_s([(1000, 200)]) == pytest.approx(base.forward_s([(1000, 200)]))
    # pipeline = analytic pipelined/sequential ratio x the calibrated sequential step
    b, kv, s = 64, 64 * 2048, (64, 68)
    ratio = base.decode_step(b, kv, s, 2).step_s / base.decode_step(b, kv).step_s
    assert cal.decode_step(b, kv, s, 2).step_s == pytest.approx(ratio * truth.decode_step(b, kv).step_s)
    # busy times: the analytic attention/FFN share of the calibrated step
    c, a = cal.decode_step(b, kv), base.decode_step(b, kv)
    assert c.attn_busy_s / c.ffn_busy_s == pytest.approx(a.attn_busy_s / a.ffn_busy_s)


def test_decode_tail_from_decode_program_rows(tmp_path):
    """A batch of mixed contexts pays, per layer, one unsplit program's time for longest - mean context,
    divided by the kernel's context splits; none without decode_program rows or for uniform contexts."""
    from policies.specs import decode_context_splits, model_spec

    truth = truth_model()
    rows = synthetic_rows(truth, ("decode",))
    plain = CalibratedCostModel(write_profile(tmp_path / "plain.csv", rows, META), HW, MODEL)
    assert plain.decode_tail_s(128, 128 * 1000, 8000) == 0.0 and "no decode_program rows" in plain.sources["tail"]
    per_token = 25e-9
    prog = [dict(op="decode_program", batch=8, tokens=8, context=c, seconds=2e-6 + per_token * c) for c in (1024, 4096)]
    cal = CalibratedCostModel(write_profile(tmp_path / "tail.csv", rows + prog, META), HW, MODEL)
    layers, kv_heads = model_spec(MODEL).num_layers, model_spec(MODEL).num_kv_heads
    assert decode_context_splits(128 * kv_heads, 132) == 1 and decode_context_splits(8 * kv_heads, 132) == 8
    assert cal.decode_tail_s(128, 128 * 1000, 1000) == 0.0  # uniform contexts: the decode rows' own case
    assert cal.decode_tail_s(128, 128 * 1000, 5000) == pytest.approx(layers * per_token * 4000)  # the slope, not 2 us
    assert cal.decode_tail_s(8, 8 * 1000, 5000) == pytest.approx(layers * per_token * 4000 / 8)  # split 8 ways
    assert "25.0 us per layer" in cal.sources["tail"]
    # plain steps are unchanged: the tail is added where the batch is known (sim/engine.py)
    assert cal.decode_step(128, 128 * 1000).step_s == plain.decode_step(128, 128 * 1000).step_s
    assert make_cost_model(HW, MODEL).decode_tail_s(128, 128 * 1000, 5000) == 0.0  # analytic: not modelled


def test_decode_tail_scaled_by_the_measured_tail_per_split(tmp_path):
    """decode_tail rows (mixed contexts minus uniform ones of the same mean) scale a pipelined step's modelled tail
    by the pipelined rows' measured/modelled over the sequential rows' at the same batch and excess (longest -
    mean): linear between measured points, held flat past them, linear in attention SMs between partitions; a
    negative measured tail charges none; sequential steps and profiles without rows keep the model (scale 1)."""
    from sim.cost_model import microbatch_tail_s, unscaled_microbatch_tail_s
    from traces.profile import tail_mix_contexts

    truth = truth_model()
    rows = synthetic_rows(truth, ("decode",)) + [
        dict(op="decode_program", batch=8, tokens=8, context=c, seconds=25e-9 * c) for c in (1024, 4096)]
    plain = CalibratedCostModel(write_profile(tmp_path / "plain.csv", rows, META), HW, MODEL)
    assert plain.decode_tail_scale(16, 3000) == plain.decode_tail_scale(16, 3000, (64, 68)) == 1.0
    assert "tail scale" not in plain.sources
    want = {(0, 16, 8192): 0.9, (0, 64, 8192): 0.8, (0, 64, 3072): 1.2,
            (32, 16, 8192): 0.6, (32, 64, 8192): 0.7, (96, 16, 8192): 1.0, (96, 64, 8192): -0.5}
    tails = []
    for (a, b, long), k in want.items():
        m = 2 if a else 1
        modelled = unscaled_microbatch_tail_s(plain, tail_mix_contexts(b, long), m)
        assert modelled > 0
        tails.append(dict(op="decode_tail", batch=b, tokens=b, context=long, attn_sms=a, ffn_sms=132 - a if a else 0,
                          microbatches=m, seconds=k * modelled))
    cal = CalibratedCostModel(write_profile(tmp_path / "tail.csv", rows + tails, META), HW, MODEL)
    far, near = 8192 - 1920, 3072 - 1280  # the rows' excess: longest - mean of tail_mix_contexts
    assert cal.decode_tail_scale(16, far) == cal.decode_tail_scale(64, near) == 1.0  # sequential: the model as is
    seq = {16: 0.9, 64: 0.8}  # the sequential rows: what the pipelined ones are read against
    assert cal.decode_tail_scale(16, far, (32, 100)) == pytest.approx(0.6 / seq[16])
    assert cal.decode_tail_scale(64, far, (32, 100)) == pytest.approx(0.7 / seq[64])
    assert cal.decode_tail_scale(40, far, (32, 100)) == pytest.approx(0.65 / 0.85)  # linear in batch, both
    assert cal.decode_tail_scale(4, far, (32, 100)) == pytest.approx(0.6 / 0.9)  # held past the measured batches
    assert cal.decode_tail_scale(256, far, (32, 100)) == pytest.approx(0.7 / 0.8)
    assert cal.decode_tail_scale(64, near, (32, 100)) == pytest.approx(0.7 / 1.2)  # excess: held (pipe), measured (seq)
    mid = (far + near) / 2
    assert cal.decode_tail_scale(64, mid, (32, 100)) == pytest.approx(0.7 / 1.0)  # seq linear in excess
    assert cal.decode_tail_scale(16, far, (64, 68)) == pytest.approx(0.8 / 0.9)  # halfway between 32 and 96 SMs
    assert cal.decode_tail_scale(16, far, (16, 116)) == pytest.approx(0.6 / 0.9)  # past the partitions: the nearest
    assert cal.decode_tail_scale(64, far, (96, 36)) == 0.0  # measured below the uniform step: no tail
    assert cal.decode_tail_scale(64, far, (112, 20)) == 0.0
    contexts = tail_mix_contexts(16, 8192)
    assert microbatch_tail_s(cal, contexts, 2, (32, 100)) == pytest.approx(
        0.6 / 0.9 * unscaled_microbatch_tail_s(plain, contexts, 2))
    assert microbatch_tail_s(cal, contexts) == pytest.approx(unscaled_microbatch_tail_s(plain, contexts))
    assert "attn 32 SMs 0.60@16x8192 0.70@64x8192" in cal.sources["tail scale"]
    no_seq = CalibratedCostModel(write_profile(tmp_path / "pipe-only.csv", rows + [t for t in tails if t["attn_sms"]],
                                               META), HW, MODEL)
    assert no_seq.decode_tail_scale(16, far, (32, 100)) == pytest.approx(0.6)  # no sequential rows: measured/modelled
    assert make_cost_model(HW, MODEL).decode_tail_scale(16, far, (64, 68)) == 1.0  # analytic: no tail to scale


def test_decode_tail_splits_follow_the_graph_bucket(tmp_path):
    """The engine replays a decode step in its smallest graph bucket >= the batch, and the paged-decode
    kernel splits contexts by the padded batch: 33 sequences run in the bucket of 48, one split each, where
    33 unpadded sequences would get 2, so the tail is twice the unpadded one. The step stays at its own batch."""
    from policies.specs import decode_context_splits, model_spec

    truth = truth_model()
    rows = synthetic_rows(truth, ("decode",)) + [
        dict(op="decode_program", batch=8, tokens=8, context=c, seconds=25e-9 * c) for c in (1024, 4096)]
    plain = CalibratedCostModel(write_profile(tmp_path / "plain.csv", rows, META), HW, MODEL)
    meta = {**META, "decode_graphs": {"buckets": [1, 2, 4, 8, 16, 24, 32, 48, 64]}}
    graphs = CalibratedCostModel(write_profile(tmp_path / "graphs.csv", rows, meta), HW, MODEL)
    kv_heads = model_spec(MODEL).num_kv_heads
    assert decode_context_splits(33 * kv_heads, 132) == 2 and decode_context_splits(48 * kv_heads, 132) == 1
    assert [graphs.graph_batch(b) for b in (1, 3, 32, 33, 64, 65)] == [1, 4, 32, 48, 64, 65]  # eager past 64
    assert [plain.graph_batch(b) for b in (3, 33)] == [3, 33]  # no decode_graphs metadata: unpadded
    n, longest = 33, 5000
    assert graphs.decode_tail_s(n, n * 1000, longest) == pytest.approx(2 * plain.decode_tail_s(n, n * 1000, longest))
    assert graphs.decode_tail_s(32, 32 * 1000, longest) == pytest.approx(plain.decode_tail_s(32, 32 * 1000, longest))
    assert graphs.decode_step(n, n * 1000).step_s == plain.decode_step(n, n * 1000).step_s
    assert "graph buckets" in graphs.sources["graphs"] and "graphs" not in plain.sources


def test_pipelined_step_pays_each_micro_batch_its_own_tail():
    """Two micro-batches run two attention kernels a layer, one after the other on the attention partition,
    each waiting for its own longest sequence: long sequences in both halves cost two tails, in one half one."""
    from sim.cost_model import unscaled_microbatch_tail_s as decode_tail_s

    class Excess:  # a tail of (longest - mean context) seconds, as the calibrated model's shape
        @staticmethod
        def decode_tail_s(b, kv, longest, padded_batch=None):
            return max(0.0, longest - kv / b)

    both = [1000, 5000] * 4  # contiguous halves: a 5000-token sequence in each
    one = [1000] * 4 + [5000] * 4  # all long ones in the second half: that half is uniform
    assert decode_tail_s(Excess, both, 1) == pytest.approx(5000 - 3001)
    assert decode_tail_s(Excess, both, 2) == pytest.approx(2 * (5000 - 3001))
    assert decode_tail_s(Excess, one, 1) == pytest.approx(5000 - 3001)
    assert decode_tail_s(Excess, one, 2) == 0.0  # each half uniform: neither kernel waits for a straggler
    assert decode_tail_s(Excess, [4000], 2) == 0.0  # one sequence: one micro-batch


def test_pipelined_micro_batches_are_halves_of_the_padded_batch(tmp_path):
    """A pipelined graph splits the batch padded to its bucket (real/graphs.py capture_pipeline): 33 sequences
    in the bucket of 48 run as 24 + 9, each kernel's grid 24 rows, so a long context among the first 24 gets
    the context splits of 24 rows (2 on 132 SMs), not those of an even half of 16-17 (4 for 16 rows)."""
    from policies.specs import decode_context_splits, model_spec
    from sim.cost_model import unscaled_microbatch_tail_s

    calls = []

    class Recorder:
        @staticmethod
        def graph_batch(b):
            return 48 if 32 < b <= 48 else b

        @staticmethod
        def decode_tail_s(b, kv, longest, padded_batch=None):
            calls.append((b, padded_batch))
            return 0.0

    contexts = [1000] * 33
    unscaled_microbatch_tail_s(Recorder, contexts, 2)
    assert calls == [(24, 24), (9, 24)]
    calls.clear()
    unscaled_microbatch_tail_s(Recorder, contexts[:32], 2)  # a full bucket: even halves
    assert calls == [(16, 16), (16, 16)]
    calls.clear()
    unscaled_microbatch_tail_s(Recorder, contexts[:30], 3)  # no bucket of 30 in Recorder: unpadded thirds
    assert calls == [(10, 10)] * 3

    truth = truth_model()
    rows = synthetic_rows(truth, ("decode",)) + [
        dict(op="decode_program", batch=8, tokens=8, context=c, seconds=25e-9 * c) for c in (1024, 4096)]
    meta = {**META, "decode_graphs": {"buckets": [1, 2, 4, 8, 16, 24, 32, 48, 64]}}
    cal = CalibratedCostModel(write_profile(tmp_path / "graphs.csv", rows, meta), HW, MODEL)
    kv_heads = model_spec(MODEL).num_kv_heads
    assert decode_context_splits(24 * kv_heads, 132) == 2 and decode_context_splits(16 * kv_heads, 132) == 4
    contexts = [6000] + [1000] * 32  # the long one among the first 24 rows
    first = contexts[:24]
    excess = 6000 - (sum(first) + 24) / 24  # over the mean of its micro-batch (each attends over length + 1)
    want = truth.model.num_layers * 25e-9 * excess / 2
    assert unscaled_microbatch_tail_s(cal, contexts, 2) == pytest.approx(want, rel=1e-6)
    assert cal.decode_tail_s(24, sum(first) + 24, 6000, padded_batch=16) == pytest.approx(want / 2, rel=1e-6)


def test_engine_rows_overhead_excludes_their_own_tail(tmp_path):
    """real.profile's engine decode rows spread prompts over context x [1 - s, 1 + s]: the kernel's tail of
    that spread is in the row already, and the simulator adds the tail itself, so the overhead leaves it out."""
    truth = truth_model()
    rows = synthetic_rows(truth, ("decode",))
    rows += [dict(op="decode_program", batch=8, tokens=8, context=1024, seconds=25e-9 * 1024)]
    b, ctx = 128, 1024
    iso = truth.decode_step(b, b * ctx).step_s
    layers = truth.model.num_layers
    tail = layers * 25e-9 * 0.5 * ctx
    rows += [dict(op="engine_decode", batch=b, tokens=b, context=ctx, seconds=iso + tail + 1e-3)]
    meta = dict(META, engine_rows=dict(prompt_spread=0.5))
    cal = CalibratedCostModel(write_profile(tmp_path / "e.csv", rows, meta), HW, MODEL)
    assert cal.engine_overhead_s("decode", b, b * ctx) == pytest.approx(1e-3, rel=1e-6)


@pytest.mark.parametrize("layer_op", ["seq", "attn"])
def test_pair_rows_stand_in_for_missing_pipeline_rows(tmp_path, layer_op):
    truth = truth_model()
    ops = ("decode", "pair", "seq") if layer_op == "seq" else ("decode", "pair", "attn", "ffn")
    path = write_profile(tmp_path / "p.csv", synthetic_rows(truth, ops), META)
    cal = CalibratedCostModel(path, HW, MODEL)
    assert "pair rows" in cal.sources["pipeline"] and "pipeline" not in cal.fallbacks
    for b in (8, 64, 256):
        for s in SPLITS:
            got, want = cal.decode_step(b, b * 1024, s, 2).step_s, truth.decode_step(b, b * 1024, s, 2).step_s
            assert got == pytest.approx(want, rel=0.05), (b, s)


def test_host_rows_are_reported_not_added(tmp_path):
    """real.profile's decode rows time runner.run (staging and launch included); host rows are that part alone."""
    truth = truth_model()
    rows = synthetic_rows(truth, ("decode",)) + [dict(op="host", batch=b, seconds=1e-4 * (1 + b / 512))
                                                 for b in (1, 512)]
    cal = CalibratedCostModel(write_profile(tmp_path / "h.csv", rows, META), HW, MODEL)
    assert cal.decode_step(8, 8 * 1024).step_s == pytest.approx(truth.decode_step(8, 8 * 1024).step_s)
    assert cal.host_s(8) == pytest.approx(1e-4 * (1 + 8 / 512)) and "informational" in cal.sources["host"]


def test_a_profile_shaped_like_real_profile(tmp_path):
    """The grid `python -m real.profile` measures (layers at one context, pipelines from batch 8 on
    three contexts, 16-SM split steps, host rows, large batches at short contexts only): everything
    calibrated, near the truth."""
    truth = truth_model()
    splits = [(a, 132 - a) for a in range(16, 117, 16)]
    rows = synthetic_rows(truth, ALL_OPS + ("seq",), contexts=[512, 1024, 2048, 4096], splits=splits,
                          layer_contexts=[1024], pipeline_min_batch=8)
    rows = [r for r in rows if r["op"] != "pipeline" or r["context"] in (512, 1024, 2048)]
    fits = 262144 // 16 + 2048  # real.profile's default KV blocks (--quick): batch 512 fits one context, 256 two
    rows = [r for r in rows if r["op"] not in ("decode", "pipeline") or r["batch"] * (r["context"] // 16 + 1) <= fits]
    assert {r["context"] for r in rows if r["op"] == "decode" and r["batch"] == 512} == {512}
    rows += [dict(op="attn", batch=b, context=1024, attn_sms=a, seconds=truth.stage_s("attn", b, b * 1024, a))
             for b in (8, 64) for a, _ in splits]
    rows += [dict(op="host", batch=b, context=512, seconds=2e-4) for b in BATCHES]
    cal = CalibratedCostModel(write_profile(tmp_path / f"{HW}-{MODEL}.csv", rows, META), HW, MODEL)
    assert cal.fallbacks == [], cal.describe()
    for b, c in ((8, 300), (100, 3000), (256, 8192), (512, 16384), (384, 2048)):
        assert cal.decode_step(b, b * c).step_s == pytest.approx(truth.decode_step(b, b * c).step_s, rel=0.05)
        d = cal.decode_step(b, b * c)
        t = truth.stage_s("attn", b, b * c) / (truth.stage_s("attn", b, b * c) + truth.stage_s("ffn", b, b * c))
        assert d.attn_busy_s / (d.attn_busy_s + d.ffn_busy_s) == pytest.approx(t, rel=0.05)  # stretched along context
        for s in ((48, 84), (64, 68), (96, 36)):
            want = truth.decode_step(b, b * c, s, 2).step_s
            assert cal.decode_step(b, b * c, s, 2).step_s == pytest.approx(want, rel=0.2), (b, c, s)
    assert cal.forward_s([(700, 0)] * 3) == pytest.approx(truth.forward_s([(700, 0)] * 3), rel=0.05)


def test_transfer_fit_recovers_latency_and_bandwidth(tmp_path):
    rows = [dict(op="transfer", tokens=0, bytes=n, seconds=30e-6 + n / 300e9) for n in (10**6, 10**7, 10**8, 10**9)]
    cal = CalibratedCostModel(write_profile(tmp_path / "t.csv", rows, META), HW, MODEL)
    assert cal.transfer_s(0) == pytest.approx(30e-6, rel=1e-6)
    assert cal.transfer_s(5 * 10**8) == pytest.approx(30e-6 + 5 * 10**8 / 300e9, rel=1e-9)
    assert "300 GB/s" in cal.sources["transfer"]


def test_accepts_a_dataframe_and_rejects_a_profile_of_another_model(profile_path):
    df, meta = read_profile(profile_path)
    cal = make_cost_model(HW, MODEL, kind="calibrated", profile=df)
    assert cal.name == "calibrated" and cal.profile_path is None
    with pytest.raises(ProfileError, match="measured for model 'qwen3-0.6b'.*'qwen3-8b'"):
        CalibratedCostModel(profile_path, HW, "qwen3-8b")
    with pytest.raises(ValueError, match="needs a profile"):
        make_cost_model(HW, MODEL, kind="calibrated")


# ---- 5. the file format ----
def one_line_error(path, text: str) -> str:
    path.write_text(text)
    with pytest.raises(ProfileError) as e:
        read_profile(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    return msg


HEADER = "op,batch,tokens,context,attn_sms,ffn_sms,microbatches,bytes,seconds\n"


def test_validation_errors_are_one_line_and_name_the_file(tmp_path):
    p = tmp_path / "bad.csv"
    no_seconds = HEADER.replace(",seconds", "") + "decode,1,1,0,0,0,1,0\n"
    assert "missing columns ['seconds']" in one_line_error(p, no_seconds)
    msg = one_line_error(p, HEADER + "decode,1,1,0,0,0,1,0,1e-3\nprefil,1,8,0,0,0,1,0,1e-3\n")
    assert "row 3" in msg and "'prefil'" in msg and "decode" in msg
    msg = one_line_error(p, HEADER + "decode,1,1,0,0,0,1,0,-1e-3\n")
    assert "'seconds'" in msg and "more than 0 seconds" in msg  # only decode_copy rows (a difference) may be < 0
    assert "more than 0 seconds" in one_line_error(p, HEADER + "decode,1,1,0,0,0,1,0,0\n")
    assert "must equal batch" in one_line_error(p, HEADER + "decode,4,1,0,0,0,1,0,1e-3\n")
    assert "both attn_sms and ffn_sms" in one_line_error(p, HEADER + "pipeline,4,4,0,64,0,2,0,1e-3\n")
    assert "not a number" in one_line_error(p, HEADER + "decode,1,1,x,0,0,1,0,1e-3\n")
    assert "no rows" in one_line_error(p, HEADER)
    p.write_text(HEADER + "decode,1,1,0,0,0,1,0,1e-3\n")
    p.with_suffix(".json").write_text("{not json")
    with pytest.raises(ProfileError, match="bad.json: not valid JSON"):
        read_profile(p)


def test_write_profile_checks_before_writing(tmp_path):
    p = tmp_path / "w.csv"
    with pytest.raises(ProfileError, match="lacks \\['torch'\\]"):
        write_profile(p, [dict(op="decode", seconds=1e-3)], {k: v for k, v in META.items() if k != "torch"})
    with pytest.raises(ProfileError, match="w.csv: row 2, column 'op'"):
        write_profile(p, [dict(op="nope", seconds=1e-3)], META)
    with pytest.raises(ProfileError, match="unknown column"):
        write_profile(p, [dict(op="decode", seconds=1e-3, sm=4)], META)
    with pytest.raises(ProfileError, match="exceed the GPU's 132 SMs"):
        write_profile(p, [dict(op="pair", attn_sms=100, ffn_sms=100, seconds=1e-3)], META)
    assert not p.exists()
    write_profile(p, [dict(op="decode", batch=4, context=10, seconds=1e-3)], META)
    df, meta = read_profile(p)
    row = df.iloc[0].to_dict()
    spread = {c: row.pop(c) for c in SPREAD_COLUMNS}
    assert meta == META and row == dict(op="decode", batch=4, tokens=4, context=10, attn_sms=0,
                                        ffn_sms=0, microbatches=1, bytes=0, seconds=1e-3)
    assert all(v != v for v in spread.values())  # NaN: a decode row has no spread


def test_merge_takes_each_shapes_median_and_matches_engine_contexts(tmp_path):
    spread = dict(p10_over_mean=0.9, p50_over_mean=1.0, p90_over_mean=1.1, p99_over_mean=1.5)
    paths = []
    for i, (dec, eng, ctx, extra) in enumerate([(1.0, 2.0, 1120, True), (1.2, 2.4, 1122, False),
                                                (1.1, 2.1, 1121, False), (5.0, 2.2, 1119, False)]):
        rows = [dict(op="decode", batch=4, context=1024, seconds=dec * 1e-3),
                dict(op="engine_decode", batch=4, context=ctx, seconds=eng * 1e-3,
                     **{k: v * (1 + i / 10) for k, v in spread.items()})]
        if extra:  # shapes only this profile measured: one with a pooled neighbour of its op, one without
            rows += [dict(op="decode", batch=8, context=1024, seconds=3e-3),
                     dict(op="transfer", tokens=1024, bytes=1 << 20, seconds=1e-4)]
        paths.append(write_profile(tmp_path / f"p{i}.csv", rows, dict(META, date=f"2026-01-0{i + 1}")))
    rows, meta = profile_mod.merge_profiles(paths)
    by_op = {r["op"]: r for r in rows}
    assert len(rows) == 3
    pooled = {r["batch"]: r["seconds"] for r in rows if r["op"] == "decode"}
    assert pooled[4] == pytest.approx(1.15e-3)  # mean of the middle two of 1.0 1.1 1.2 5.0
    # batch 8, timed by profile 0 only, keeps its place beside batch 4 (3x) at the pool's level: x 1.15 / 1.0
    assert pooled[8] == pytest.approx(3e-3 * 1.15)
    assert meta["merge"]["scaled"] == [dict(op="decode", batch=8, tokens=8, context=1024, attn_sms=0, ffn_sms=0,
                                            microbatches=1, bytes=0, profiles=1, scale=1.15)]
    eng = by_op["engine_decode"]
    assert eng["seconds"] == pytest.approx(2.15e-3) and eng["context"] == 1120
    assert eng["p99_over_mean"] == pytest.approx(1.5 * 1.15)
    assert meta["date"] == "2026-01-04" and len(meta["merge"]["profiles"]) == 4
    assert meta["merge"]["dropped"] == [dict(op="transfer", batch=1, tokens=1024, context=0, attn_sms=0, ffn_sms=0,
                                             microbatches=1, bytes=1 << 20, profiles=1)]
    out = tmp_path / "merged.csv"
    write_profile(out, rows, meta)  # a valid profile the calibrated model reads
    df, _ = read_profile(out)
    assert len(df) == 3
    assert "each shape the median of 4 profiles" in sim_run.cost_model_line(HW, MODEL, "auto", str(out))


def test_merge_refuses_profiles_of_different_gpus_and_too_few(tmp_path, capsys):
    a = write_profile(tmp_path / "a.csv", [dict(op="decode", batch=4, seconds=1e-3)], META)
    b = write_profile(tmp_path / "b.csv", [dict(op="decode", batch=4, seconds=1e-3)], dict(META, sms=114))
    with pytest.raises(ProfileError, match="differ in 'sms'"):
        profile_mod.merge_profiles([a, b])
    with pytest.raises(ProfileError, match="at least 2"):
        profile_mod.merge_profiles([a])
    assert profile_mod.main(["merge", str(tmp_path / "m.csv"), str(a), str(b)]) == 2
    assert "differ in 'sms'" in capsys.readouterr().err
    assert profile_mod.main(["merge", str(tmp_path / "m.csv"), str(a), str(a)]) == 0
    assert "1 shapes, each the median of 2 profiles" in capsys.readouterr().out


def test_extend_keeps_the_base_and_adds_new_shapes_scaled_by_their_family(tmp_path, capsys):
    """traces.profile extend: BASE's rows unchanged; a shape only EXTRA measured is scaled by the median base/extra
    ratio over its family's (op, split, micro-batches) shared shapes; one whose family shares nothing is dropped."""
    base = write_profile(tmp_path / "base.csv", [
        dict(op="decode", batch=128, context=1024, seconds=5e-3), dict(op="decode", batch=256, context=1024, seconds=9e-3),
        dict(op="pipeline", batch=128, context=1024, attn_sms=64, ffn_sms=68, microbatches=2, seconds=8e-3)], META)
    extra = write_profile(tmp_path / "extra.csv", [
        dict(op="decode", batch=128, context=1024, seconds=4e-3), dict(op="decode", batch=256, context=1024, seconds=10e-3),
        dict(op="decode", batch=160, context=1024, seconds=6e-3),  # base/extra ratios 1.25 and 0.9: median 1.075
        dict(op="pipeline", batch=128, context=1024, attn_sms=64, ffn_sms=68, microbatches=2, seconds=10e-3),
        dict(op="pipeline", batch=160, context=1024, attn_sms=64, ffn_sms=68, microbatches=2, seconds=12e-3),
        dict(op="pipeline", batch=160, context=1024, attn_sms=96, ffn_sms=36, microbatches=2, seconds=9e-3),
        dict(op="decode_tail", batch=16, context=8192, attn_sms=96, ffn_sms=36, microbatches=2, seconds=-1e-5)],
        dict(META, kv_transport=None))  # not measured there: no disagreement
    rows, meta = profile_mod.extend_profile(base, extra)
    got = {(r["op"], r["batch"], r["attn_sms"]): r["seconds"] for r in rows}
    assert got[("decode", 128, 0)] == 5e-3 and got[("decode", 256, 0)] == 9e-3  # the base, untouched
    assert got[("pipeline", 128, 64)] == 8e-3
    assert got[("decode", 160, 0)] == pytest.approx(6e-3 * 1.075)
    assert got[("pipeline", 160, 64)] == pytest.approx(12e-3 * 0.8)  # its own family's ratio, 8 / 10
    assert ("pipeline", 160, 96) not in got  # the 96:36 family shares no shape with the base
    assert got[("decode_tail", 16, 96)] == -1e-5  # a difference read against the sim's own model: as measured
    assert [d["attn_sms"] for d in meta["extend"]["dropped"]] == [96]
    assert sorted(d["scale"] for d in meta["extend"]["scaled"]) == [0.8, 1.0, 1.075]
    assert [d["op"] for d in meta["extend"]["scaled"] if d.get("as_measured")] == ["decode_tail"]
    out = tmp_path / "ext.csv"
    assert profile_mod.main(["extend", str(out), str(base), str(extra)]) == 0
    assert "3 shapes only" in capsys.readouterr().out and len(read_profile(out)[0]) == 6
    assert "3 decode/decode_tail/pipeline shapes grafted from extra.csv" in sim_run.cost_model_line(
        HW, MODEL, "auto", str(out))  # sim.run names what was grafted
    more = write_profile(tmp_path / "more.csv", [dict(op="decode", batch=128, context=1024, seconds=4e-3),
                                                 dict(op="decode", batch=48, context=1024, seconds=3e-3)], META)
    again = tmp_path / "again.csv"
    assert profile_mod.main(["extend", str(again), str(out), str(more)]) == 0  # a graft on a graft
    chain = read_profile(again)[1]["extend"]
    assert chain["extra"]["path"].endswith("more.csv") and chain["base"]["extend"]["extra"]["path"].endswith("extra.csv")
    line = sim_run.cost_model_line(HW, MODEL, "auto", str(again))
    assert "1 decode shapes grafted from more.csv; 3 decode/decode_tail/pipeline shapes grafted from extra.csv" in line
    other = write_profile(tmp_path / "o.csv", [dict(op="decode", batch=4, seconds=1e-3)], dict(META, sms=114))
    with pytest.raises(ProfileError, match="differ in 'sms'"):
        profile_mod.extend_profile(base, other)
    tail_only = tmp_path / "tail_only.csv"  # --ops: only these ops' new shapes join
    assert profile_mod.main(["extend", str(tail_only), str(base), str(extra), "--ops", "decode_tail"]) == 0
    df, meta = read_profile(tail_only)
    assert sorted(df.op) == ["decode", "decode", "decode_tail", "pipeline"] and meta["extend"]["ops"] == ["decode_tail"]
    assert meta["command"].endswith("--ops decode_tail")
    assert profile_mod.main(["extend", str(tail_only), str(base), str(extra), "--ops"]) == 2
    with pytest.raises(ProfileError, match="unknown op"):
        profile_mod.extend_profile(base, extra, ops=["decode_tails"])


# ---- 6. sim.run and sim.sweep ----
SMALL = ["--num-requests", "40", "--quiet", "--policy", "adaptive"]


def test_sim_run_with_a_profile_end_to_end(tmp_path, profile_path, capsys):
    assert sim_run.main([*SMALL, "--profile", str(profile_path), "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert out.count("cost model:") == 1 and "cost model: calibrated from" in out
    info = json.loads((tmp_path / "run/run.json").read_text())
    assert info["cost_model"] == "calibrated" and info["cost_model_profile"] == str(profile_path)
    assert info["profile_meta"]["gpu"] == "synthetic" and "decode" in info["cost_model_sources"]
    assert "--profile" in info["command"]


def test_default_profile_is_picked_up_and_can_be_refused(tmp_path, profile_path, monkeypatch, capsys):
    folder = tmp_path / "profiles"
    folder.mkdir()
    monkeypatch.setattr(profile_mod, "PROFILES_DIR", folder)
    assert pick_profile(HW, MODEL) is None
    assert sim_run.main([*SMALL, "--no-write"]) == 0
    assert "cost model: analytic (no " in capsys.readouterr().out
    default = folder / f"{HW}-{MODEL}.csv"
    default.write_text(profile_path.read_text())
    default.with_suffix(".json").write_text(profile_path.with_suffix(".json").read_text())
    assert pick_profile(HW, MODEL) == default
    assert sim_run.main([*SMALL, "--out", str(tmp_path / "run")]) == 0
    assert f"cost model: calibrated from {default}" in capsys.readouterr().out
    assert json.loads((tmp_path / "run/run.json").read_text())["cost_model_profile"] == str(default)
    assert sim_run.main([*SMALL, "--no-write", "--cost-model", "analytic"]) == 0
    assert "cost model: analytic (--cost-model analytic)" in capsys.readouterr().out
    assert pick_profile(HW, "qwen3-8b") is None
    assert sim_run.main([*SMALL, "--no-write", "--model", "qwen3-8b", "--cost-model", "calibrated"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "h100x2-qwen3-8b.csv: no such profile" in err and "\n" not in err
    assert sim_run.main([*SMALL, "--no-write", "--cost-model", "analytic", "--profile", str(default)]) == 2
    assert "contradict" in capsys.readouterr().err
    assert sim_run.main([*SMALL, "--no-write", "--hardware", "h200x2", "--profile", str(default)]) == 2
    assert "measured for hardware 'h100x2'" in capsys.readouterr().err


def test_sweep_takes_the_same_flags(tmp_path, profile_path, capsys):
    from sim import sweep

    assert sweep.main(["--policies", "pd", "--rate-scales", "1", "--num-requests", "30", "--jobs", "1",
                       "--profile", str(profile_path), "--out", str(tmp_path / "sw")]) == 0
    assert f"{HW}/{MODEL}: cost model: calibrated from" in capsys.readouterr().out
    import pandas as pd

    table = pd.read_csv(tmp_path / "sw/sweep.csv")
    assert (table["profile"] == str(profile_path)).all() and (table["finished"] == 30).all()


def test_copy_interference_fit_per_byte_and_batch(tmp_path):
    """decode_copy rows: a line through the origin in bytes per measured batch, linear in batch between them
    and held beyond; negatives (noise) clamp to 0; no rows, no interference (the analytic model has none)."""
    mib = 1 << 20
    rows = [dict(op="decode_copy", batch=b, tokens=t, context=1024, bytes=t * mib // 16, seconds=k * (t * mib // 16))
            for b, k in ((16, 1e-12), (256, 3e-12)) for t in (1024, 4096)]
    rows += [dict(op="decode_copy", batch=512, tokens=t, context=1024, bytes=t * mib, seconds=-1e-5) for t in (1024,)]
    cal = CalibratedCostModel(write_profile(tmp_path / "c.csv", rows, META), HW, MODEL)
    assert cal.copy_interference_s(10**8, 16) == pytest.approx(1e-4)
    assert cal.copy_interference_s(10**8, 136) == pytest.approx(2e-4)  # halfway in batch
    assert cal.copy_interference_s(10**8, 4) == pytest.approx(1e-4)  # held below the grid
    assert cal.copy_interference_s(10**8, 512) == 0.0  # measured negative: none
    assert cal.copy_interference_s(10**8, 0) == 0.0
    plain = CalibratedCostModel(write_profile(tmp_path / "p.csv", synthetic_rows(truth_model(), ("transfer",)), META),
                                HW, MODEL)
    assert plain.copy_interference_s(10**8, 64) == 0.0 and "no decode_copy rows" in plain.sources["copy"]
    assert make_cost_model(HW, MODEL).copy_interference_s(10**8, 64) == 0.0


def test_mixed_rows_replace_the_composed_colocated_step(tmp_path):
    """A colocated step (single, dp) is composed of the prefill and decode rows; mixed rows (the step timed
    whole) correct that composition: exact at the rows, as a ratio between and beyond them; prefill-only and
    decode-only steps untouched; without mixed rows nothing changes."""
    cm = truth_model()
    rows = synthetic_rows(cm, ops=("prefill", "decode"))
    plain = CalibratedCostModel(write_profile(tmp_path / "plain.csv", rows, META), HW, MODEL)
    # the GPU: a colocated step 1.5 ms under the composition (the second pass's staging hidden, one read-back)
    truth_mixed = {(b, t): plain.forward_s([(t, 0)], b, b * 1024) - 1.5e-3 for b in (4, 16, 64) for t in (512, 2048)}
    mixed = [dict(op="mixed", batch=b, tokens=t, context=1024, seconds=v) for (b, t), v in truth_mixed.items()]
    cal = CalibratedCostModel(write_profile(tmp_path / "mixed.csv", rows + mixed, META), HW, MODEL)
    assert "mixed rows" in cal.sources["mixed"] and "no mixed rows" in plain.sources["mixed"]
    for (b, t), v in truth_mixed.items():
        assert cal.forward_s([(t, 0)], b, b * 1024) == pytest.approx(v, rel=1e-9)
    between = cal.forward_s([(1024, 0)], 8, 8 * 1024)
    assert between < plain.forward_s([(1024, 0)], 8, 8 * 1024)
    r64 = truth_mixed[(64, 2048)] / plain.forward_s([(2048, 0)], 64, 64 * 1024)  # held beyond the largest batch
    composed = plain.forward_s([(2048, 0)], 256, 256 * 1024)
    assert cal.forward_s([(2048, 0)], 256, 256 * 1024) == pytest.approx(r64 * composed, rel=1e-9)
    assert cal.forward_s([(2048, 0)]) == plain.forward_s([(2048, 0)])  # prefill alone
    assert cal.forward_s([], 16, 16 * 1024) == plain.forward_s([], 16, 16 * 1024)  # decode alone


def test_decode_prefill_gpu_rows_give_gpu0s_decode_speed(tmp_path):
    """decode_prefill_gpu rows (decode steps on GPU0 when the decode rows timed GPU1): GPU0's decode steps in the
    simulator run at their measured ratio, by batch, held beyond; GPU1's, and every GPU without the rows, at 1."""
    cm = truth_model()
    rows = synthetic_rows(cm, ops=("prefill", "decode"))
    ratios = {16: 1.08, 64: 1.05, 256: 1.02}
    extra = [dict(op="decode_prefill_gpu", batch=b, context=1024, seconds=r * cm.decode_step(b, b * 1024).step_s)
             for b, r in ratios.items()]
    cal = CalibratedCostModel(write_profile(tmp_path / "p.csv", rows + extra, META), HW, MODEL)
    plain = CalibratedCostModel(write_profile(tmp_path / "q.csv", rows, META), HW, MODEL)
    for b, r in ratios.items():
        assert cal.decode_device_factor("gpu0", b) == pytest.approx(r, rel=1e-6)
    assert cal.decode_device_factor("gpu0", 40) == pytest.approx(1.08 + (40 - 16) / (64 - 16) * (1.05 - 1.08))
    assert cal.decode_device_factor("gpu0", 512) == pytest.approx(1.02, rel=1e-6)  # held
    assert cal.decode_device_factor("gpu1", 64) == 1.0 and plain.decode_device_factor("gpu0", 64) == 1.0
    assert "gpu0_decode" in cal.sources and "gpu0_decode" not in plain.sources


def test_pipelined_step_outside_its_rows_keeps_their_ratio_to_the_sequential_step(tmp_path):
    """Pipeline rows from batch 16 and contexts 512-2,048 (real.profile --quick): below or beyond them the
    pipelined step is the nearest row's ratio to the sequential step there, times the sequential step at the
    shape asked (each extrapolated on its own, the pipelined step shrank toward the sequential one at small
    batches, where real pipelined steps stay ~1.35x); inside them the rows themselves."""
    truth = truth_model()
    rows = [r for r in synthetic_rows(truth, ("decode", "pipeline"), contexts=[256, 512, 1024, 2048, 4096])
            if r["op"] == "decode" or (r["batch"] >= 16 and r["context"] in (512, 1024, 2048))]
    cal = CalibratedCostModel(write_profile(tmp_path / f"{HW}-{MODEL}.csv", rows, META), HW, MODEL)
    s = (96, 36)

    def ratio(b, c):
        return cal.decode_step(b, b * c, s, 2).step_s / cal.decode_step(b, b * c).step_s

    for b, c, nb, nc in ((4, 1024, 16, 1024), (8, 4096, 16, 2048), (64, 4096, 64, 2048), (2, 256, 16, 512)):
        assert ratio(b, c) == pytest.approx(ratio(nb, nc), rel=1e-9), (b, c)
    for b, c in ((16, 1024), (64, 2048), (256, 512)):
        want = truth.decode_step(b, b * c, s, 2).step_s
        assert cal.decode_step(b, b * c, s, 2).step_s == pytest.approx(want, rel=1e-9)
