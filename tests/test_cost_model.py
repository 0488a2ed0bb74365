"""The analytic cost model against the measured facts (../shared/notes/hardware-facts.md)."""
import math

import pytest

from policies.specs import hardware_spec, model_spec
from sim.cost_model import (AnalyticCostModel, AnalyticParams, DecodeCost, layer_pair_times,
                            make_cost_model)

CONTEXT = 1024
# (model, batch, seq_ms, best-pair speed-up) measured on H200, one decode layer, context 1024.
FACTS_H200 = [
    ("qwen3-8b", 8, 0.118, 0.88), ("qwen3-8b", 128, 0.234, 1.02), ("qwen3-8b", 512, 0.724, 1.08),
    ("qwen3-0.6b", 8, 0.091, 0.90), ("qwen3-0.6b", 32, 0.103, 1.10), ("qwen3-0.6b", 128, 0.189, 1.32),
    ("qwen3-0.6b", 512, 0.548, 1.07),
]


def cost_model(hw="h200x2", model="qwen3-0.6b", **overrides) -> AnalyticCostModel:
    return make_cost_model(hw, model, **overrides)


def best_speedup(cm: AnalyticCostModel, batch: int) -> float:
    split, _ = cm.best_split(batch, batch * CONTEXT)
    _, _, seq_s, pair_s = layer_pair_times(cm, batch, batch * CONTEXT, split)
    return seq_s / pair_s


# ---- 1. the facts table, in shape ----
@pytest.mark.parametrize("model,batch,seq_ms,speedup", FACTS_H200)
def test_seq_within_30_percent_of_table(model, batch, seq_ms, speedup):
    attn_s, ffn_s, seq_s, _ = layer_pair_times(cost_model(model=model), batch, batch * CONTEXT, (64, 68))
    assert seq_s == pytest.approx(attn_s + ffn_s)
    assert abs(seq_s * 1e3 / seq_ms - 1) < 0.30


@pytest.mark.parametrize("model", ["qwen3-0.6b", "qwen3-8b"])
def test_split_loses_at_batch_8(model):
    assert best_speedup(cost_model(model=model), 8) < 1.0


def test_split_gains_at_batch_128_small_model():
    assert best_speedup(cost_model(), 128) > 1.1


def test_speedup_tracks_table_direction():
    """Where the table says loss (< 0.95) or gain (> 1.05), the model agrees on the side of 1."""
    for model, batch, _, measured in FACTS_H200:
        predicted = best_speedup(cost_model(model=model), batch)
        if measured < 0.95:
            assert predicted < 1.0, (model, batch)
        if measured > 1.05 and batch <= 128:
            assert predicted > 1.0, (model, batch)


@pytest.mark.parametrize("model", ["qwen3-0.6b", "qwen3-8b"])
def test_attention_at_batch_512_near_hbm_roofline(model):
    hw, spec = hardware_spec("h200x2"), model_spec(model)
    batch, kv_tokens = 512, 512 * CONTEXT
    kv_bytes = (kv_tokens + batch) * 2 * spec.num_kv_heads * spec.head_dim * spec.dtype_bytes
    roofline_s = (kv_bytes + spec.attn_params_per_layer * spec.dtype_bytes) / hw.hbm_bytes_per_s
    attn_s = layer_pair_times(cost_model(model=model), batch, kv_tokens, (64, 68))[0]
    assert roofline_s <= attn_s <= 1.15 * roofline_s


def test_concurrency_never_beats_either_stage_alone_on_its_partition():
    cm = cost_model(model="qwen3-8b")
    for batch in (8, 128, 512):
        for a, f in cm.hardware.allowed_splits():
            pair_s = cm.layer_times(batch, batch * CONTEXT, (a, f)).pair_s
            alone = max(cm.stage_s("attn", batch, batch * CONTEXT, a), cm.stage_s("ffn", batch, batch * CONTEXT, f))
            assert pair_s >= alone


def test_bandwidth_contention_stretches_two_memory_bound_stages():
    """8B at batch 128: both stages stream HBM, so the pair costs more than the longer one alone."""
    cm = cost_model(model="qwen3-8b")
    batch, split = 128, (64, 68)
    pair_s = cm.layer_times(batch, batch * CONTEXT, split).pair_s
    alone = max(cm.stage_s("attn", batch, batch * CONTEXT, 64), cm.stage_s("ffn", batch, batch * CONTEXT, 68))
    assert pair_s > 1.3 * alone


# ---- 2. the full decode step: pipelining loses small, wins at 128 ----
@pytest.mark.parametrize("hw", ["h100x2", "h200x2"])
def test_pipeline_step_vs_sequential(hw):
    cm = cost_model(hw=hw)

    def best_pipeline_s(batch):
        return min(cm.decode_step(batch, batch * CONTEXT, s, 2).step_s for s in cm.hardware.allowed_splits())

    assert best_pipeline_s(8) > cm.decode_step(8, 8 * CONTEXT).step_s
    assert best_pipeline_s(128) < cm.decode_step(128, 128 * CONTEXT).step_s


def test_decode_cost_fields():
    cm = cost_model()
    for split, m in ((None, 1), ((64, 68), 1), ((64, 68), 2), ((96, 36), 4)):
        c = cm.decode_step(64, 64 * CONTEXT, split, m)
        assert isinstance(c, DecodeCost)
        assert 0 < c.attn_busy_s < c.step_s and 0 < c.ffn_busy_s < c.step_s
    seq = cm.decode_step(64, 64 * CONTEXT)
    assert seq.attn_busy_s + seq.ffn_busy_s < seq.step_s  # stages back to back, LM head on top


def test_forward_and_unsplit_decode_agree():
    cm = cost_model()
    for batch, kv in ((1, 100), (8, 8192), (128, 131072), (512, 524288)):
        assert cm.forward_s([], batch, kv) == pytest.approx(cm.decode_step(batch, kv).step_s, rel=1e-12)
        assert cm.decode_step(batch, kv, None, 4).step_s == cm.decode_step(batch, kv).step_s
    assert cm.forward_s([]) == 0.0 and cm.decode_step(0, 0).step_s == 0.0


def test_mixed_step_costs_more_than_its_parts_alone():
    cm = cost_model()
    mixed = cm.forward_s([(512, 0)], 64, 64 * CONTEXT)
    assert mixed > cm.forward_s([(512, 0)]) and mixed > cm.forward_s([], 64, 64 * CONTEXT)


# ---- 3. prefill and the link ----
@pytest.mark.parametrize("model", ["qwen3-0.6b", "qwen3-8b"])
def test_long_prefill_is_compute_bound(model):
    cm, spec, hw, p = cost_model(model=model), model_spec(model), hardware_spec("h200x2"), AnalyticParams()
    n = 2048
    gemm_flops = 2 * n * (spec.attn_params_per_layer + spec.ffn_params_per_layer)
    attn_flops = 4 * spec.num_heads * spec.head_dim * n * (n + 1) / 2
    compute_s = spec.num_layers * (gemm_flops / (hw.bf16_flops * p.gemm_eff) + attn_flops / (hw.bf16_flops * p.attn_eff))
    # Slack: LM head + sampling, and the 0.6B FFN of 2048 tokens is about as short as its eager issue time.
    assert compute_s <= cm.forward_s([(n, 0)]) <= 1.15 * compute_s


def test_prefill_grows_superlinearly_with_context():
    cm = cost_model()
    t = [cm.forward_s([(n, 0)]) for n in (2048, 4096, 8192, 16384)]
    per_token = [ti / n for ti, n in zip(t, (2048, 4096, 8192, 16384))]
    assert all(b > a for a, b in zip(per_token, per_token[1:]))
    assert t[-1] > 8 * 1.5 * t[0]
    with_ctx = [cm.forward_s([(2048, c)]) for c in (0, 2048, 8192, 32768)]
    assert all(b > a for a, b in zip(with_ctx, with_ctx[1:]))


@pytest.mark.parametrize("mb,gbps", [(16, 246), (256, 382)])
def test_transfer_matches_measured_bandwidth(mb, gbps):
    kv_bytes = mb * 1_000_000
    assert kv_bytes / cost_model().transfer_s(kv_bytes) / 1e9 == pytest.approx(gbps, rel=0.10)
    assert cost_model().transfer_s(0) == hardware_spec("h200x2").nvlink_latency_s


# ---- 4. monotonicity ----
@pytest.mark.parametrize("hw", ["h100x2", "h200x2"])
@pytest.mark.parametrize("model", ["qwen3-0.6b", "qwen3-8b"])
def test_step_monotone_in_batch_and_kv(hw, model):
    cm = cost_model(hw=hw, model=model)
    configs = [(None, 1), ((32, 100), 1), ((64, 68), 2), ((96, 36), 2), ((64, 68), 4)]
    for split, m in configs:
        for ctx in (0, 256, 1024, 4096):
            prev = 0.0
            for batch in range(1, 520, 7):
                t = cm.decode_step(batch, batch * ctx, split, m).step_s
                assert t >= prev - 1e-15, (split, m, ctx, batch)
                prev = t
        for batch in (1, 8, 64, 256):
            prev = 0.0
            for kv in range(0, 600_000, 9973):
                t = cm.decode_step(batch, kv, split, m).step_s
                assert t >= prev - 1e-15, (split, m, batch, kv)
                prev = t


def test_fewer_sms_never_faster_for_a_stage():
    for model in ("qwen3-0.6b", "qwen3-8b"):
        cm = cost_model(model=model)
        for stage in ("attn", "ffn"):
            for batch in (1, 8, 64, 512):
                times = [cm.stage_s(stage, batch, batch * CONTEXT, s) for s in range(8, 133, 4)]
                assert all(a >= b for a, b in zip(times, times[1:]))


def test_faster_hbm_never_slower():
    h100, h200 = cost_model(hw="h100x2"), cost_model(hw="h200x2")
    for batch in (1, 64, 512):
        assert h200.decode_step(batch, batch * CONTEXT).step_s <= h100.decode_step(batch, batch * CONTEXT).step_s


# ---- construction ----
def test_make_cost_model_overrides_and_errors():
    cm = make_cost_model(hardware_spec("h200x2"), model_spec("qwen3-0.6b"), handoff_s=0.0)
    assert cm.params.handoff_s == 0.0 and cm.name == "analytic"
    assert isinstance(make_cost_model("h100x2", "tiny"), AnalyticCostModel)
    with pytest.raises(ValueError):
        make_cost_model("h200x2", "qwen3-0.6b", kind="nope")
    with pytest.raises(ValueError):
        make_cost_model("h200x2", "qwen3-0.6b", not_a_param=1.0)


def test_every_param_has_a_docstring():
    import ast
    import inspect

    import sim.cost_model as mod
    tree = ast.parse(inspect.getsource(mod))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "AnalyticParams")
    body = cls.body
    for i, node in enumerate(body):
        if isinstance(node, ast.AnnAssign):
            nxt = body[i + 1]
            assert isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant), node.target.id


def test_calls_return_plain_floats():
    cm = cost_model()
    c = cm.decode_step(33, 33 * CONTEXT, (64, 68), 2)
    assert all(type(v) is float and math.isfinite(v) for v in (c.step_s, c.attn_busy_s, c.ffn_busy_s))
    assert type(cm.forward_s([(100, 50)], 3, 3000)) is float
