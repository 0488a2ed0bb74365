"""Triton store / paged-decode kernels and the GPU prefill path against the torch reference.

Runs on CUDA; skipped without it. `TRITON_INTERPRET=1 pytest tests/test_gpu_kernels.py` runs the
kernel tests on CPU through Triton's interpreter (small cases only; no CUDA graphs there).
"""
from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")
ON_GPU = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not (ON_GPU or INTERPRET):
    pytest.skip("needs CUDA (or TRITON_INTERPRET=1)", allow_module_level=True)

from real.attention import TorchAttention, make_backend, paged_decode_triton, store_kv_triton  # noqa: E402
from real.testing import decode_batch, prefill_batch, scattered_block_tables  # noqa: E402

pytestmark = pytest.mark.gpu
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPE = torch.bfloat16 if ON_GPU else torch.float16  # the interpreter's tl.dot mishandles bf16
REF = TorchAttention()

# (batch, max_context, heads, kv_heads, head_dim, block_size, padded_entries)
DECODE_CASES = [
    (3, 70, 4, 4, 64, 16, 1),      # MHA (group 1), context crosses blocks and tiles
    (4, 150, 8, 2, 128, 16, 2),    # group 4, blocks smaller than the 64-token tile
    (2, 200, 16, 2, 64, 128, 0),   # group 8, tile inside a block
]
if ON_GPU:
    DECODE_CASES += [
        (64, 1024, 32, 8, 128, 16, 0),    # qwen3-8b shape
        (37, 1500, 16, 8, 128, 256, 27),  # qwen3-0.6b shape, padded to a 64 bucket, big blocks
        (5, 3000, 32, 8, 128, 32, 3),     # few long sequences: split-K territory
        (16, 333, 28, 4, 128, 64, 0),     # group 7 (padded rows)
        (8, 64, 8, 8, 64, 16, 0),         # context exactly one tile
    ]


def _decode_inputs(batch, max_context, heads, kv_heads, head_dim, block_size, padded, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, max_context + 1, (batch,), generator=gen).tolist()
    lens[0] = max_context  # the longest always present
    if batch > 1:
        lens[1] = 1  # and a single-token context
    num_blocks = sum(-(-n // block_size) for n in lens) + 7
    tables = scattered_block_tables(lens, block_size, num_blocks, seed=seed)
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(DTYPE).to(DEVICE)
    v_cache = torch.randn(shape, generator=gen).to(DTYPE).to(DEVICE)
    q = torch.randn(batch + padded, heads, head_dim, generator=gen).to(DTYPE).to(DEVICE)
    meta, _ = decode_batch(lens, tables, block_size, pad_to=batch + padded, device=DEVICE)
    return q, k_cache, v_cache, meta


def _check_decode(out, ref, meta):
    assert torch.isfinite(out).all()
    pad = meta.context_lens == 0
    assert (out[pad] == 0).all(), "padded entries must come out as zeros"
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("case", DECODE_CASES, ids=str)
@pytest.mark.parametrize("num_splits", [1, 4])
def test_paged_decode_matches_reference(case, num_splits):
    q, k_cache, v_cache, meta = _decode_inputs(*case)
    scale = case[4] ** -0.5
    out = paged_decode_triton(q, k_cache, v_cache, meta.block_tables, meta.context_lens, scale,
                              num_splits=num_splits)
    _check_decode(out, REF.decode(q, k_cache, v_cache, meta, scale), meta)


@pytest.mark.parametrize("case", DECODE_CASES, ids=str)
@pytest.mark.parametrize("num_splits,max_splits", [(1, 4), (2, 8), (1, 16)])
def test_paged_decode_split_by_length_matches_reference(case, num_splits, max_splits):
    """Splits by length (a long sequence gets more of the grid's splits than short ones) compute the same
    attention, padding included."""
    q, k_cache, v_cache, meta = _decode_inputs(*case)
    scale = case[4] ** -0.5
    out = paged_decode_triton(q, k_cache, v_cache, meta.block_tables, meta.context_lens, scale,
                              num_splits=num_splits, max_splits=max_splits)
    _check_decode(out, REF.decode(q, k_cache, v_cache, meta, scale), meta)


TILES = [(32, 2, 2), (128, 8, 3), (64, 4, 4)]  # (block_n, warps, stages) the sweep bench explores


@pytest.mark.parametrize("tile", TILES, ids=str)
@pytest.mark.parametrize("case", DECODE_CASES[:3] if not ON_GPU else DECODE_CASES[:5], ids=str)
def test_paged_decode_tiles_match_reference(case, tile):
    """Any tile configuration REAL_DECODE_KERNEL may pick computes the same attention."""
    q, k_cache, v_cache, meta = _decode_inputs(*case)
    scale = case[4] ** -0.5
    block_n, warps, stages = tile
    out = paged_decode_triton(q, k_cache, v_cache, meta.block_tables, meta.context_lens, scale, block_n=block_n,
                              num_splits=2, num_warps=warps, num_stages=stages)
    _check_decode(out, REF.decode(q, k_cache, v_cache, meta, scale), meta)


def test_backend_decode_picks_splits_and_matches():
    q, k_cache, v_cache, meta = _decode_inputs(2, 300, 8, 2, 128, 16, 1, seed=1)
    backend = make_backend("triton")
    out = backend.decode(q, k_cache, v_cache, meta, 128 ** -0.5)
    _check_decode(out, REF.decode(q, k_cache, v_cache, meta, 128 ** -0.5), meta)
    if ON_GPU:
        assert backend.num_splits(2 * 2, q.device) > 1  # a tiny batch must be split to fill the GPU


@pytest.mark.parametrize("kv_heads,head_dim", [(2, 64), (8, 128), (3, 128)])
def test_store_kv_matches_reference(kv_heads, head_dim):
    gen = torch.Generator().manual_seed(2)
    tokens, block_size, num_blocks, heads = 37, 16, 12, 2 * kv_heads
    # k/v as the model hands them over: v a strided view of the fused qkv output
    qkv = torch.randn(tokens, heads + 2 * kv_heads, head_dim, generator=gen).to(DTYPE).to(DEVICE)
    k = qkv[:, heads:heads + kv_heads].contiguous()
    v = qkv[:, heads + kv_heads:]
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens]
    slots[::5] = -1
    slots = slots.to(DEVICE)
    caches = [torch.zeros(2, num_blocks, block_size, kv_heads, head_dim, dtype=DTYPE, device=DEVICE)
              for _ in range(2)]
    store_kv_triton(k, v, caches[0][0], caches[0][1], slots)
    REF.store_kv(k, v, caches[1][0], caches[1][1], slots)
    assert torch.equal(caches[0], caches[1])


@pytest.mark.parametrize("has_prefix", [False, True])
def test_prefill_path_matches_fp32_reference(has_prefix):
    """The GPU prefill (per-sequence SDPA, bottom-right causal over a cached prefix) in bf16 against
    the same code in fp32 on CPU."""
    gen = torch.Generator().manual_seed(3)
    heads, kv_heads, head_dim, block_size = 8, 2, 128, 16
    new, cached = [40, 9, 77], ([13, 0, 50] if has_prefix else None)
    totals = [n + (cached[i] if cached else 0) for i, n in enumerate(new)]
    tables = scattered_block_tables(totals, block_size, 40, seed=3)
    num_tokens = sum(new)
    q = torch.randn(num_tokens, heads, head_dim, generator=gen)
    k = torch.randn(num_tokens, kv_heads, head_dim, generator=gen)
    v = torch.randn(num_tokens, kv_heads, head_dim, generator=gen)
    cache = torch.randn(2, 40, block_size, kv_heads, head_dim, generator=gen)
    outs = []
    for device, dtype in ((DEVICE, DTYPE), ("cpu", torch.float32)):
        meta, _ = prefill_batch(new, cached, tables, block_size, device=device)
        k_cache, v_cache = cache.to(device, dtype).clone()
        backend = make_backend("triton") if device == DEVICE else REF
        args = [t.to(device, dtype) for t in (q, k, v)]
        backend.store_kv(args[1], args[2], k_cache, v_cache, meta.slot_mapping)
        outs.append(backend.prefill(*args, k_cache, v_cache, meta, head_dim ** -0.5).float().cpu())
    torch.testing.assert_close(outs[0], outs[1], atol=2e-2, rtol=2e-2)


# (new tokens per sequence, cached prefix per sequence, heads, kv_heads, head_dim, block_size, spare tiles)
PAGED_PREFILL_CASES = [
    ([40, 9, 77], [13, 0, 50], 8, 2, 64, 16, 3),     # prefixes and none, tiles past the last sequence
    ([64, 1], [0, 130], 4, 4, 32, 32, 0),            # a tile exactly full; one token after a long prefix
    ([100], [0], 4, 2, 64, 16, 1),                   # no prefix at all: plain causal
]
if ON_GPU:
    PAGED_PREFILL_CASES += [
        ([2048, 512, 33], [2048, 0, 6000], 16, 8, 128, 16, 8),  # qwen3-0.6b shape, chunked prefill
        ([1000, 77], [300, 4000], 32, 8, 128, 16, 2),           # qwen3-8b shape
    ]


@pytest.mark.parametrize("case", PAGED_PREFILL_CASES, ids=str)
def test_paged_prefill_matches_reference(case):
    """The graph-capturable paged prefill (every key read from the cache by block table) against the
    per-sequence reference over a cached prefix (fp32 on CPU), with spare programs and padding rows."""
    from real.triton_kernels import max_prefill_tiles, paged_prefill_triton, prefill_tiles

    new, cached, heads, kv_heads, head_dim, block_size, spare = case
    gen = torch.Generator().manual_seed(11)
    totals = [n + c for n, c in zip(new, cached)]
    num_blocks = sum(-(-t // block_size) for t in totals) + 5
    tables = scattered_block_tables(totals, block_size, num_blocks, seed=11)
    tokens = sum(new)
    q, k, v = (torch.randn(tokens, h, head_dim, generator=gen) for h in (heads, kv_heads, kv_heads))
    cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, generator=gen)
    scale = head_dim ** -0.5
    ref_meta, _ = prefill_batch(new, cached, tables, block_size)  # slots stored for every sequence
    k_ref, v_ref = cache.clone()
    REF.store_kv(k, v, k_ref, v_ref, ref_meta.slot_mapping)
    expected = REF.prefill(q, k, v, k_ref, v_ref, ref_meta, scale)
    # on the device: padded to one more row and sequence than used, as a graph bucket is
    k_cache, v_cache = (c.to(DEVICE, DTYPE) for c in (k_ref, v_ref))
    pad_rows = 5
    qd = torch.cat([q, torch.randn(pad_rows, heads, head_dim, generator=gen)]).to(DEVICE, DTYPE)
    width = max(len(t) for t in tables) + 2
    table = torch.full((len(new) + 1, width), -1, dtype=torch.int32)
    for i, t in enumerate(tables):
        table[i, :len(t)] = torch.tensor(t, dtype=torch.int32)
    cu = [0]
    for n in new:
        cu.append(cu[-1] + n)
    cu.append(cu[-1])  # the spare sequence is empty
    lens = torch.tensor(totals + [0], dtype=torch.int32)
    num_tiles = max_prefill_tiles(tokens + pad_rows, len(new) + 1) + spare
    tiles = torch.from_numpy(prefill_tiles(new, num_tiles))
    out = paged_prefill_triton(qd, k_cache, v_cache, table.to(DEVICE), lens.to(DEVICE),
                               torch.tensor(cu, dtype=torch.int32, device=DEVICE), tiles.to(DEVICE), scale)
    assert torch.isfinite(out).all()
    assert (out[tokens:] == 0).all(), "rows of no sequence stay zero"
    torch.testing.assert_close(out[:tokens].float().cpu(), expected.float(), atol=2e-2, rtol=2e-2)


def test_prefill_tiles_cover_every_query_row_once():
    from real.triton_kernels import max_prefill_tiles, prefill_tiles

    lens = [1, 64, 65, 200, 0, 3]
    tiles = prefill_tiles(lens, max_prefill_tiles(sum(lens), len(lens)), block_m=64)
    covered = [(int(s), int(m)) for s, m in tiles.T if s >= 0]
    assert covered == [(0, 0), (1, 0), (2, 0), (2, 1), (3, 0), (3, 1), (3, 2), (3, 3), (5, 0)]
    with pytest.raises(ValueError, match="do not fit"):
        prefill_tiles([200], 3, block_m=64)


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need CUDA")
@pytest.mark.parametrize("num_splits,max_splits", [(1, 0), (8, 0), (1, 4)])
def test_decode_kernel_replays_in_cuda_graph(num_splits, max_splits):
    """Captured once, replayed with new queries, lengths and block tables written into the same
    static tensors (fixed padded batch and table width), as the runner's decode graphs will."""
    batch, padded, max_context, block_size, heads, kv_heads, head_dim = 8, 2, 600, 16, 32, 8, 128
    width = -(-max_context // block_size)
    num_blocks = batch * width + 5
    gen = torch.Generator().manual_seed(4)
    k_cache, v_cache = (torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen).to(DEVICE, DTYPE)
                        for _ in range(2))
    scale = head_dim ** -0.5

    def random_step(seed):
        g = torch.Generator().manual_seed(seed)
        lens = torch.randint(1, max_context + 1, (batch,), generator=g).tolist()
        tables = scattered_block_tables(lens, block_size, num_blocks, seed=seed)
        meta, _ = decode_batch(lens, tables, block_size, pad_to=batch + padded, table_width=width, device=DEVICE)
        return torch.randn(batch + padded, heads, head_dim, generator=g).to(DEVICE, DTYPE), meta

    q, meta = random_step(0)
    static_q, static_tables, static_lens = q.clone(), meta.block_tables.clone(), meta.context_lens.clone()

    def step():
        return paged_decode_triton(static_q, k_cache, v_cache, static_tables, static_lens, scale,
                                   num_splits=num_splits, max_splits=max_splits)

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for seed in (1, 2):
        q, meta = random_step(seed)
        static_q.copy_(q)
        static_tables.copy_(meta.block_tables)
        static_lens.copy_(meta.context_lens)
        graph.replay()
        torch.cuda.synchronize()
        _check_decode(out, REF.decode(q, k_cache, v_cache, meta, scale), meta)


@pytest.mark.skipif(not ON_GPU, reason="end to end on the GPU")
@torch.no_grad()
def test_tiny_model_triton_backend_matches_torch_backend():
    from policies.specs import model_spec
    from real.model import Qwen3ForCausalLM
    from real.model_config import ModelConfig
    from real.testing import make_kv_cache
    from real.weights import init_random_weights

    config = ModelConfig.from_spec(model_spec("tiny"))
    prompts = [[int(t) for t in torch.randint(0, config.vocab_size, (n,))] for n in (5, 40, 17)]
    tables = scattered_block_tables([len(p) + 4 for p in prompts], 16, 32, seed=7)
    logits = {}
    for name in ("torch", "triton"):
        model = init_random_weights(Qwen3ForCausalLM(config, backend=name).to(DEVICE, DTYPE), seed=0)
        model.set_kv_cache(make_kv_cache(config, 32, 16, DTYPE, DEVICE))
        meta, pos = prefill_batch([len(p) for p in prompts], block_tables=tables, device=DEVICE)
        model(torch.tensor(sum(prompts, []), device=DEVICE), pos, meta)
        seqs, rows = [list(p) + [1] for p in prompts], []
        for _ in range(4):
            meta, pos = decode_batch([len(s) for s in seqs], tables, 16, pad_to=4, device=DEVICE)
            ids = torch.tensor([s[-1] for s in seqs] + [0], device=DEVICE)
            rows.append(model.compute_logits(model(ids, pos, meta))[:3])
            for s in seqs:
                s.append(2)
        logits[name] = torch.stack(rows)
    torch.testing.assert_close(logits["triton"], logits["torch"], atol=3e-2, rtol=3e-2)


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need CUDA")
def test_tiny_model_decode_step_replays_in_cuda_graph():
    """A whole model decode step (triton backend) has no host sync: capture it, replay it."""
    from policies.specs import model_spec
    from real.model import Qwen3ForCausalLM
    from real.model_config import ModelConfig
    from real.testing import make_kv_cache
    from real.weights import init_random_weights

    config = ModelConfig.from_spec(model_spec("tiny"))
    model = init_random_weights(Qwen3ForCausalLM(config, backend="triton").to(DEVICE, DTYPE), seed=0)
    model.set_kv_cache(make_kv_cache(config, 32, 16, DTYPE, DEVICE))
    lens = [5, 40, 17]
    tables = scattered_block_tables(lens, 16, 32, seed=8)
    meta, pos = prefill_batch(lens, block_tables=tables, device=DEVICE)
    model(torch.randint(0, config.vocab_size, (sum(lens),), device=DEVICE), pos, meta)
    meta, pos = decode_batch([n + 1 for n in lens], tables, 16, pad_to=8, table_width=4, device=DEVICE)
    ids = torch.randint(0, config.vocab_size, (8,), device=DEVICE)
    with torch.no_grad():
        eager = model.compute_logits(model(ids, pos, meta))  # also the warm-up (compiles the kernels)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = model.compute_logits(model(ids, pos, meta))
        graph.replay()  # rewrites the same K/V into the same slots, so the result must not change
        torch.cuda.synchronize()
    torch.testing.assert_close(captured, eager)
    assert torch.isfinite(captured).all()


@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
@pytest.mark.parametrize("has_prefix", [False, True])
def test_varlen_prefill_is_used_and_matches_per_sequence_sdpa(has_prefix):
    """The packed varlen path (one call per layer) against the per-sequence SDPA path, same GPU, bf16."""
    from real import varlen
    from real.attention import TorchAttention, gather_context

    if not varlen.available():
        pytest.skip("this torch has no varlen attention op: the per-sequence path is used")
    gen = torch.Generator().manual_seed(5)
    heads, kv_heads, head_dim, block_size = 16, 8, 128, 16
    new, cached = [64, 5, 130], ([30, 0, 17] if has_prefix else None)
    totals = [n + (cached[i] if cached else 0) for i, n in enumerate(new)]
    tables = scattered_block_tables(totals, block_size, 40, seed=5)
    meta, _ = prefill_batch(new, cached, tables, block_size, device=DEVICE)
    q, k, v = (torch.randn(sum(new), h, head_dim, generator=gen).to(DEVICE, DTYPE) for h in (heads, kv_heads, kv_heads))
    k_cache, v_cache = torch.randn(2, 40, block_size, kv_heads, head_dim, generator=gen).to(DEVICE, DTYPE).clone()
    ref = TorchAttention()
    ref.store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    out = varlen.varlen_prefill(q, k, v, k_cache, v_cache, meta, head_dim ** -0.5, gather_context)
    assert out is not None, "varlen is available but refused these inputs"
    expected = ref.prefill(q, k, v, k_cache, v_cache, meta, head_dim ** -0.5)
    torch.testing.assert_close(out.float(), expected.float(), atol=2e-2, rtol=2e-2)


def test_fused_sampler_greedy_rows_are_argmax_and_sampled_rows_follow_the_softmax():
    from real.triton_kernels import sample_triton

    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(5, 3000, generator=g) * 3).to(DEVICE)
    logits[1, 17] = logits[1, 2900] = 50.0  # a tie goes to the lowest id, as torch.argmax
    temps = torch.tensor([0.0, 0.0, 0.7, 0.0, 1.3], device=DEVICE)
    out = sample_triton(logits, None, temps, seed=11)
    greedy = logits.argmax(-1)
    assert out[[0, 1, 3]].tolist() == greedy[[0, 1, 3]].tolist() and out[1].item() == 17
    # 4,000 rows of one 8-way distribution at T = 0.5: frequencies near p^2 / sum(p^2)
    p = torch.tensor([0.4, 0.2, 0.1, 0.1, 0.05, 0.05, 0.05, 0.05])
    rows = p.log().repeat(4000, 1).to(DEVICE)
    freq = torch.bincount(sample_triton(rows, 0.5, None, seed=7).cpu(), minlength=8).float() / 4000
    want = p ** 2 / (p ** 2).sum()
    assert (freq - want).abs().max().item() < 0.03, (freq, want)
    a, b = (sample_triton(rows[:64], 1.0, None, seed=s).tolist() for s in (1, 1))
    assert a == b and a != sample_triton(rows[:64], 1.0, None, seed=2).tolist()  # seeded


# ---- fused elementwise kernels (real.model.Fused's Triton kind) against the eager functions they replace ------
# bf16 on the GPU; float16 under the interpreter, whose fp32 -> bf16 casts truncate instead of rounding to
# nearest even (so no bf16 result of it can match torch's bit for bit).
FUSED_TOKENS = [1, 7, 64, 300] if ON_GPU else [1, 7]
FUSED_HIDDEN = [1024, 4096, 5120] if ON_GPU else [256, 320]  # 5120 / 320: not a power of 2 (masked lanes)
QK_HEADS = [(32, 8, 128), (16, 8, 128), (12, 2, 64)] + ([(40, 8, 128)] if ON_GPU else [])  # Hq, Hk, head_dim
QK_TOKENS = FUSED_TOKENS if ON_GPU else [1, 7, 300]  # > 256 tokens: blocks of 4 heads (12, 2: a partial one)


def _around_one(n: int, gen, dtype=DTYPE) -> torch.Tensor:
    return (1 + 0.1 * torch.randn(n, generator=gen)).to(DEVICE, dtype)


def _assert_mostly_equal(out: torch.Tensor, ref: torch.Tensor, atol: float = 1e-2, frac: float = 0.99):
    """Within bf16 rounding everywhere and bit-equal almost everywhere: the kernels round where eager does,
    so only a different fp32 summation order (or SiLU's fast exp) can move a result across a rounding edge."""
    assert out.shape == ref.shape and out.dtype == ref.dtype, (out.shape, ref.shape, out.dtype, ref.dtype)
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=1e-2)
    equal = (out == ref).float().mean().item()
    assert equal >= frac, f"only {equal:.4%} of elements bit-equal to eager"


@pytest.mark.parametrize("tokens", FUSED_TOKENS)
@pytest.mark.parametrize("hidden", FUSED_HIDDEN)
def test_add_rms_norm_triton_matches_eager(tokens, hidden):
    """Rows of a wider tensor (a row stride past hidden, as a micro-batch view): the residual sum exact,
    the normed rows as eager's."""
    from real.model import add_rms_norm, rms_norm
    from real.triton_kernels import add_rms_norm_triton, rms_norm_triton

    gen = torch.Generator().manual_seed(tokens * 7 + hidden)
    x = torch.randn(tokens, hidden + 64, generator=gen).to(DEVICE, DTYPE)[:, :hidden]
    residual = (4 * torch.randn(tokens, hidden, generator=gen)).to(DEVICE, DTYPE)
    weight = _around_one(hidden, gen)
    out, total = add_rms_norm_triton(x, residual, weight, 1e-6)
    ref_out, ref_total = add_rms_norm(x, residual, weight, 1e-6)
    assert torch.equal(total, ref_total) and total.is_contiguous()
    _assert_mostly_equal(out, ref_out)
    _assert_mostly_equal(rms_norm_triton(x, weight, 1e-6), rms_norm(x, weight, 1e-6))


@pytest.mark.parametrize("tokens", FUSED_TOKENS[:2])
def test_rms_norm_triton_with_fp32_weight_promotes_as_eager(tokens):
    """An fp32 weight on model-dtype rows: eager's `weight * y` comes out fp32, so must the kernel's."""
    from real.model import rms_norm
    from real.triton_kernels import rms_norm_triton

    gen = torch.Generator().manual_seed(tokens)
    hidden = FUSED_HIDDEN[0]
    x = torch.randn(tokens, hidden, generator=gen).to(DEVICE, DTYPE)
    weight = _around_one(hidden, gen, torch.float32)
    out = rms_norm_triton(x, weight, 1e-6)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, rms_norm(x, weight, 1e-6), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("tokens", FUSED_TOKENS)
@pytest.mark.parametrize("inter", [3072, 12288] if ON_GPU else [1000])  # 1000: a partial column block
def test_silu_mul_triton_matches_eager(tokens, inter):
    from real.model import silu_mul
    from real.triton_kernels import silu_mul_triton

    gen = torch.Generator().manual_seed(tokens + inter)
    gate_up = (2 * torch.randn(tokens, 2 * inter, generator=gen)).to(DEVICE, DTYPE)
    _assert_mostly_equal(silu_mul_triton(gate_up), silu_mul(gate_up))


def _qkv(tokens: int, hq: int, hk: int, d: int, gen):
    """q, k as the attention slices them: [T, heads, D] views of one [T, q + 2 kv] projection output."""
    qkv = torch.randn(tokens, (hq + 2 * hk) * d, generator=gen).to(DEVICE, DTYPE)
    q = qkv[:, :hq * d].unflatten(-1, (hq, d))
    k = qkv[:, hq * d:(hq + hk) * d].unflatten(-1, (hk, d))
    return q, k


@pytest.mark.parametrize("tokens", QK_TOKENS)
@pytest.mark.parametrize("heads", QK_HEADS, ids=str)
def test_qk_norm_rope_triton_matches_eager(tokens, heads):
    """Per-head norm then RoPE at random positions < 4000. A product that lands a bf16 ulp apart (from a
    norm's summation order) moves a rotated value by up to an ulp of the largest operands (|x| < 8 here:
    2^-5), even where the value itself is near 0: hence the atol."""
    from real.model import RotaryEmbedding, qk_norm_rope
    from real.triton_kernels import qk_norm_rope_triton

    hq, hk, d = heads
    gen = torch.Generator().manual_seed(tokens * 31 + hq)
    q, k = _qkv(tokens, hq, hk, d, gen)
    positions = torch.randint(0, 4000, (tokens,), generator=gen).to(DEVICE)
    cos_sin = RotaryEmbedding(d, 4096, 1e6).to(DEVICE).cos_sin
    qw, kw = _around_one(d, gen), _around_one(d, gen)
    q_out, k_out = qk_norm_rope_triton(positions, q, k, qw, kw, 1e-6, cos_sin)
    ref_q, ref_k = qk_norm_rope(positions, q, k, qw, kw, 1e-6, cos_sin)
    assert q_out.is_contiguous() and k_out.is_contiguous()
    _assert_mostly_equal(q_out, ref_q, atol=2 ** -4)
    _assert_mostly_equal(k_out, ref_k, atol=2 ** -4)


def test_fused_kernels_take_empty_batches():
    from real.triton_kernels import add_rms_norm_triton, qk_norm_rope_triton, rms_norm_triton, silu_mul_triton

    x, w = torch.empty(0, 64, device=DEVICE, dtype=DTYPE), torch.ones(64, device=DEVICE, dtype=DTYPE)
    assert rms_norm_triton(x, w, 1e-6).shape == (0, 64)
    assert [t.shape for t in add_rms_norm_triton(x, x, w, 1e-6)] == [(0, 64), (0, 64)]
    assert silu_mul_triton(x).shape == (0, 32)
    q, k = _qkv(0, 4, 2, 16, torch.Generator())
    cos_sin = torch.zeros(8, 16, device=DEVICE)
    out = qk_norm_rope_triton(torch.empty(0, dtype=torch.int64, device=DEVICE), q, k, w[:16], w[:16], 1e-6, cos_sin)
    assert [t.shape for t in out] == [(0, 4, 16), (0, 2, 16)]


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need CUDA")
def test_fused_kernels_replay_in_cuda_graph():
    """All four captured in one graph over static inputs, replayed on new ones: eager's results on those."""
    from real.model import RotaryEmbedding, add_rms_norm, qk_norm_rope, silu_mul
    from real.triton_kernels import add_rms_norm_triton, qk_norm_rope_triton, silu_mul_triton

    tokens, hidden, (hq, hk, d), inter = 64, 4096, QK_HEADS[0], 3072
    gen = torch.Generator().manual_seed(9)
    weight, qw, kw = _around_one(hidden, gen), _around_one(d, gen), _around_one(d, gen)
    cos_sin = RotaryEmbedding(d, 4096, 1e6).to(DEVICE).cos_sin

    def inputs():
        return dict(x=torch.randn(tokens, hidden, generator=gen).to(DEVICE, DTYPE),
                    res=torch.randn(tokens, hidden, generator=gen).to(DEVICE, DTYPE),
                    qkv=torch.randn(tokens, (hq + 2 * hk) * d, generator=gen).to(DEVICE, DTYPE),
                    pos=torch.randint(0, 4000, (tokens,), generator=gen).to(DEVICE),
                    gate_up=torch.randn(tokens, 2 * inter, generator=gen).to(DEVICE, DTYPE))

    def split(qkv):
        return qkv[:, :hq * d].unflatten(-1, (hq, d)), qkv[:, hq * d:(hq + hk) * d].unflatten(-1, (hk, d))

    static = inputs()

    def step(fns):
        s = static
        return (*fns[0](s["x"], s["res"], weight, 1e-6), *fns[1](s["pos"], *split(s["qkv"]), qw, kw, 1e-6, cos_sin),
                fns[2](s["gate_up"]))

    triton_fns = (add_rms_norm_triton, qk_norm_rope_triton, silu_mul_triton)
    step(triton_fns)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step(triton_fns)
    for _ in range(2):
        for name, t in inputs().items():
            static[name].copy_(t)
        graph.replay()
        torch.cuda.synchronize()
        for out, ref in zip(outs, step((add_rms_norm, qk_norm_rope, silu_mul))):
            _assert_mostly_equal(out, ref, atol=2 ** -4)


@pytest.mark.skipif(not ON_GPU, reason="Fused picks kernels for CUDA tensors only")
def test_fused_get_picks_the_triton_kernels_where_it_fuses():
    from real.model import Fused, add_rms_norm, qk_norm_rope, rms_norm, rope, silu_mul
    from real.triton_kernels import add_rms_norm_triton, qk_norm_rope_triton, rms_norm_triton, silu_mul_triton

    x = torch.zeros(4, 64, device=DEVICE, dtype=DTYPE)
    saved = Fused.kernels, Fused.in_graph
    try:
        Fused.in_graph = False
        assert Fused.get(rms_norm, x) is rms_norm  # a short eager step: unfused, as before
        Fused.kernels, Fused.in_graph = "triton", True
        assert [Fused.get(f, x) for f in (rms_norm, add_rms_norm, silu_mul, qk_norm_rope)] == \
            [rms_norm_triton, add_rms_norm_triton, silu_mul_triton, qk_norm_rope_triton]
        assert Fused.get(rope, x) not in (rope, None)  # no kernel of its own: still torch.compile'd
        Fused.kernels = "compile"
        assert Fused.get(rms_norm, x) not in (rms_norm, rms_norm_triton)
    finally:
        Fused.kernels, Fused.in_graph = saved


@pytest.mark.skipif(not ON_GPU, reason="Fused fuses CUDA tensors only")
@pytest.mark.parametrize("kernels", ["triton", "compile"])
@torch.no_grad()
def test_tiny_model_with_fused_kernels_matches_eager(kernels):
    """A whole prefill and decode step with the fusions on (as inside graph capture) against eager."""
    from policies.specs import model_spec
    from real.graphs import compiled_fusions
    from real.model import Fused, Qwen3ForCausalLM
    from real.model_config import ModelConfig
    from real.testing import make_kv_cache
    from real.weights import init_random_weights

    config = ModelConfig.from_spec(model_spec("tiny"))
    model = init_random_weights(Qwen3ForCausalLM(config, backend="triton").to(DEVICE, DTYPE), seed=0)
    lens = [5, 40, 17]
    tables = scattered_block_tables([n + 1 for n in lens], 16, 32, seed=3)
    ids = torch.randint(0, config.vocab_size, (sum(lens),), device=DEVICE)
    step_ids = torch.randint(0, config.vocab_size, (4,), device=DEVICE)
    logits, saved = {}, Fused.kernels
    try:
        Fused.kernels = kernels
        for label in ("eager", "fused"):
            model.set_kv_cache(make_kv_cache(config, 32, 16, DTYPE, DEVICE))
            with compiled_fusions() if label == "fused" else torch.no_grad():
                meta, pos = prefill_batch(lens, block_tables=tables, device=DEVICE)
                model(ids, pos, meta)
                meta, pos = decode_batch([n + 1 for n in lens], tables, 16, pad_to=4, device=DEVICE)
                logits[label] = model.compute_logits(model(step_ids, pos, meta))[:3]
    finally:
        Fused.kernels = saved
    torch.testing.assert_close(logits["fused"], logits["eager"], atol=3e-2, rtol=3e-2)
