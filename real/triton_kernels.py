"""Triton kernels for the paged KV cache: a slot-mapped store, a flash-decoding paged attention and a
graph-capturable paged prefill attention (chunks after a cached prefix); and the decode step's fused
elementwise ops (residual add + RMSNorm, SiLU * up, Qwen3's q/k norm + RoPE), replacing torch.compile's.

Defined only where triton is importable (`import real.attention` must work on CPU installs without it).
"""
from __future__ import annotations

from contextlib import nullcontext

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None


def _on(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' (dp runs a model per GPU)."""
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()


def store_kv_triton(k, v, k_cache, v_cache, slot_mapping):
    """k, v [T, kv_heads, head_dim] (rows may be strided views of qkv) -> cache rows by slot."""
    row = k.shape[1] * k.shape[2]
    if k.shape[0] == 0:
        return
    assert k.stride(-1) == 1 and k.stride(1) == k.shape[2] and v.stride(-1) == 1 and v.stride(1) == v.shape[2]
    assert k_cache.stride(1) == row and v_cache.stride(1) == row and k_cache.stride(0) == row * k_cache.shape[1]
    with _on(k.device):
        _store_kv_kernel[(k.shape[0],)](k, v, k.stride(0), v.stride(0), k_cache, v_cache, slot_mapping,
                                        ROW=row, ROW_PAD=triton.next_power_of_2(row))


def paged_decode_triton(q, k_cache, v_cache, block_tables, context_lens, scale: float,
                        block_n: int = 64, num_splits: int = 1, num_warps: int = 4,
                        num_stages: int = 2, max_splits: int = 0) -> torch.Tensor:
    """q [n, heads, head_dim]; caches [blocks, block_size, kv_heads, head_dim] -> out [n, heads, head_dim].

    One program per (sequence, kv head, split) holds its GQA group of queries in registers and streams
    [block_n, head_dim] K/V tiles with an online softmax; splits > 1 add a reduce over the splits.
    Entries with context_lens 0 (padding) come out as zeros.

    max_splits > num_splits splits by length instead: a sequence of the batch's mean context gets
    num_splits splits, a longer one proportionally more, up to max_splits (the grid's; a shorter one's
    spare programs exit at once), so a long sequence in a batch of short ones no longer streams its whole
    context in one program while the others wait (the decode tail, sim/calibrated.py). The mean is taken
    on the device: CUDA-graph safe.
    """
    n, num_heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    group = num_heads // kv_heads
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    assert head_dim == triton.next_power_of_2(head_dim) and block_size == triton.next_power_of_2(block_size)
    out = torch.empty_like(q)
    if n == 0:
        return out
    by_length = max_splits > num_splits
    chunk = split_chunk(context_lens, num_splits, block_n) if by_length else context_lens  # (unused if not)
    num_splits = max_splits if by_length else num_splits
    if num_splits > 1:
        part_out = torch.empty(n, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(n, num_heads, num_splits, dtype=torch.float32, device=q.device)
    else:
        part_out = part_lse = out  # unused
    with _on(q.device):
        _launch_decode(q, k_cache, v_cache, block_tables, context_lens, chunk, out, part_out, part_lse, scale, group,
                       head_dim, block_size, block_n, num_splits, num_warps, num_stages, n, num_heads, kv_heads,
                       by_length=by_length)
    return out


PREFILL_TILE_M = 64  # query rows per program of the paged-prefill kernel


def prefill_tiles(q_lens, num_tiles: int, block_m: int = PREFILL_TILE_M):
    """The paged-prefill kernel's work list as an int32 numpy array [2, num_tiles]: row 0 the sequence of
    each program, row 1 its query tile within that sequence; unused programs get sequence -1. Built on
    the host, so a CUDA graph's grid (num_tiles, heads) stays fixed whatever the batch's lengths."""
    import numpy as np

    tiles = np.full((2, num_tiles), -1, dtype=np.int32)
    t = 0
    for seq, n in enumerate(q_lens):
        k = -(-int(n) // block_m)
        if t + k > num_tiles:
            raise ValueError(f"{sum(-(-int(x) // block_m) for x in q_lens)} query tiles do not fit {num_tiles}")
        tiles[0, t:t + k] = seq
        tiles[1, t:t + k] = np.arange(k)
        t += k
    return tiles


def max_prefill_tiles(tokens: int, seqs: int, block_m: int = PREFILL_TILE_M) -> int:
    """Programs a batch of <= `tokens` new tokens in <= `seqs` sequences can need (each sequence adds at
    most one partial tile)."""
    return -(-tokens // block_m) + seqs


def paged_prefill_triton(q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q, tiles, scale: float,
                         block_n: int = 64, num_warps: int = 4, num_stages: int = 2) -> torch.Tensor:
    """Causal prefill attention read entirely from the paged cache (the new tokens' K/V stored first):
    q [T, heads, head_dim] packed by cu_seqlens_q; sequence i's new tokens are the last
    cu_seqlens_q[i+1] - cu_seqlens_q[i] of its context_lens[i] cached ones, so a chunk after a cached
    prefix sees the prefix and, causally, itself (bottom-right aligned). `tiles` [2, P] int32 on the
    device (prefill_tiles): one program per (query tile, head). No host sync and fixed launch shapes:
    graph-capturable, unlike the gather-then-varlen path, so chunked prefills replay in CUDA graphs too.
    Rows of no sequence (padding past cu_seqlens_q[-1]) come out as zeros."""
    t_total, num_heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    assert head_dim == triton.next_power_of_2(head_dim) and block_size == triton.next_power_of_2(block_size)
    out = torch.zeros_like(q)
    num_tiles = tiles.shape[1]
    if t_total == 0 or num_tiles == 0:
        return out
    with _on(q.device):
        _paged_prefill_kernel[(num_tiles, num_heads)](
            q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q, tiles, out, scale * 1.4426950408889634,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
            out.stride(0), out.stride(1), tiles.stride(0),
            GROUP=num_heads // kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=block_size, BLOCK_M=PREFILL_TILE_M,
            BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages)
    return out


def split_chunk(context_lens: torch.Tensor, num_splits: int, block_n: int) -> torch.Tensor:
    """Tokens per split when splitting by length: the mean context (of the non-padding entries) over
    num_splits, at least one tile; a [1] int32 tensor computed on the device (no host sync)."""
    lens = context_lens.to(torch.int64)
    per = (lens > 0).sum().clamp(min=1) * num_splits
    return ((lens.sum() + per - 1) // per).clamp(min=block_n).to(torch.int32).reshape(1)


def length_splits(context_lens: torch.Tensor, num_splits: int, max_splits: int, block_n: int) -> torch.Tensor:
    """Each sequence's split count when splitting by length, as the kernel derives it: one split per
    split_chunk tokens, between 1 and max_splits."""
    chunk = split_chunk(context_lens, num_splits, block_n)
    return (-(-context_lens.to(torch.int64) // chunk)).clamp(min=1, max=max_splits)


def _launch_decode(q, k_cache, v_cache, block_tables, context_lens, chunk, out, part_out, part_lse, scale, group,
                   head_dim, block_size, block_n, num_splits, num_warps, num_stages, n, num_heads, kv_heads,
                   by_length: bool = False):
    _paged_decode_kernel[(n, kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, chunk, out, part_out, part_lse, scale * 1.4426950408889634,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1), num_heads,
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size, BLOCK_N=block_n, NUM_SPLITS=num_splits, BY_LENGTH=by_length, num_warps=num_warps,
        num_stages=num_stages)
    if num_splits > 1:
        _split_reduce_kernel[(n, num_heads)](part_out, part_lse, out, out.stride(0), out.stride(1), num_heads,
                                             HEAD_DIM=head_dim, NUM_SPLITS=num_splits,
                                             SPLITS_PAD=max(2, triton.next_power_of_2(num_splits)), num_warps=4)


def copy_blocks_triton(src_cache, dst_cache, src_blocks, dst_blocks, device: torch.device, tile: int = 4096,
                       num_warps: int = 4, max_programs: int = 0) -> None:
    """Copy whole KV blocks src_cache[:, :, src_blocks[i]] -> dst_cache[:, :, dst_blocks[i]] for every layer, K and
    V, in one launch on `device` (either cache's GPU: the other one is reached through peer access over NVLink).
    Caches [2, layers, blocks, block_size, kv_heads, head_dim], contiguous; block ids integer tensors on `device`.
    The caller orders it: nothing may use the destination blocks on their GPU until the copy has finished.
    max_programs > 0 bounds the grid (each program then loops over pieces), leaving the other SMs to compute."""
    assert src_cache.is_contiguous() and dst_cache.is_contiguous() and src_cache.dtype == dst_cache.dtype
    block_elems = src_cache[0, 0, 0].numel()
    tile = min(tile, block_elems)
    assert block_elems % tile == 0 and tile == triton.next_power_of_2(tile), (block_elems, tile)
    planes = src_cache.shape[0] * src_cache.shape[1]
    pieces = src_blocks.numel() * planes
    if pieces == 0:
        return
    programs = pieces if max_programs <= 0 else min(pieces, max_programs)
    with _on(device):
        _copy_blocks_kernel[(programs,)](src_cache, dst_cache, src_blocks, dst_blocks, src_cache.stride(1),
                                         dst_cache.stride(1), pieces, programs, planes, BLOCK_ELEMS=block_elems,
                                         TILE=tile, num_warps=num_warps)



def sample_triton(logits: torch.Tensor, temperature: float | None, temperatures: torch.Tensor | None,
                  seed: int, block: int = 2048, num_warps: int = 8) -> torch.Tensor:
    """Gumbel-max sampling in one pass over the logits: per row, argmax(logits / T + Gumbel noise), the noise
    drawn in registers from (seed, row, column) by Triton's Philox; rows with T <= 0 are greedy (argmax,
    ties to the lowest id, as torch.argmax). One temperature for every row (`temperature`) or one per row
    (`temperatures`, a float32 tensor). Replaces five full-size elementwise passes (rand, two logs, scale,
    add) and an argmax: 155 MB of fp32 each at batch 256 x 152k vocab."""
    n, vocab = logits.shape
    out = torch.empty(n, dtype=torch.int64, device=logits.device)
    if n == 0:
        return out
    assert logits.stride(-1) == 1 and n * vocab < 2 ** 31
    per_row = temperatures is not None
    with _on(logits.device):
        _sample_kernel[(n,)](logits, logits.stride(0), temperatures if per_row else logits,
                             float(temperature or 0.0), out, vocab, seed, PER_ROW=per_row, BLOCK=block,
                             num_warps=num_warps)
    return out


# ---- fused elementwise ops: each replaces the eager function of real/model.py of the same name ----------------
# Same signatures and results as the eager functions. Each rounds to the model dtype where eager does (the
# residual sum, the normed value before the weight, SiLU before the multiply, each RoPE product), so results
# match eager's but for the order of the fp32 sums of squares (and SiLU's fast exp and division). No FMA
# contraction (enable_fp_fusion=False): LLVM turns a rounded bf16 product into a bf16 multiply and would fuse
# it with the next add, skipping eager's rounding of the product (seen in the RoPE's PTX). A launch costs
# ~10-20 us of host time, against 100-200 us for a torch.compile'd call (its guards); a CUDA graph hides both.

def _norm_warps(block: int) -> int:
    return min(8, max(1, block // 256))  # ~8 bf16 values (one 16-byte load) per thread and per operand


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, hidden] with unit last stride (a view when it can be)."""
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """rms_norm (real/model.py) in one kernel: one program per row."""
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    if x.numel() == 0:
        return out
    x2 = _rows(x)
    _launch_norm(x2, x2, weight, eps, out, out, has_residual=False)
    return out


def add_rms_norm_triton(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """add_rms_norm (real/model.py) in one kernel: (rms_norm(x + residual), x + residual)."""
    assert x.shape == residual.shape and x.dtype == residual.dtype, (x.shape, residual.shape, x.dtype, residual.dtype)
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    total = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return out, total
    _launch_norm(_rows(x), _rows(residual), weight, eps, out, total, has_residual=True)
    return out, total


def _launch_norm(x, residual, weight, eps, out, total, has_residual: bool) -> None:
    hidden = x.shape[1]
    assert weight.shape == (hidden,) and weight.is_contiguous()
    block = triton.next_power_of_2(hidden)
    with _on(x.device):
        _fused_rms_norm_kernel[(x.shape[0],)](x, residual, weight, out, total, x.stride(0), residual.stride(0), eps,
                                              H=hidden, BLOCK=block, HAS_RESIDUAL=has_residual,
                                              num_warps=_norm_warps(block), enable_fp_fusion=False)


SILU_BLOCK = 1024  # columns per program: a 12,288-wide row (qwen3-8b) spreads over 12 programs


def silu_mul_triton(gate_up: torch.Tensor) -> torch.Tensor:
    """silu_mul (real/model.py): gate_up [T, 2I] -> silu(gate) * up [T, I]; a program per (row, column block)."""
    x = _rows(gate_up)
    inter = x.shape[1] // 2
    out = torch.empty((*gate_up.shape[:-1], inter), dtype=gate_up.dtype, device=gate_up.device)
    if x.shape[0] == 0 or inter == 0:
        return out
    with _on(x.device):
        _fused_silu_mul_kernel[(x.shape[0], triton.cdiv(inter, SILU_BLOCK))](x, out, x.stride(0), inter,
                                                                             BLOCK=SILU_BLOCK, num_warps=4,
                                                                             enable_fp_fusion=False)
    return out


def qk_norm_rope_triton(positions, q, k, q_weight, k_weight, eps: float, cos_sin):
    """qk_norm_rope (real/model.py): per-head RMSNorm of q [T, Hq, D] and k [T, Hk, D] (strided views of the
    qkv projection's output), then RoPE at `positions` from the fp32 cos_sin table [max_pos, D]. Contiguous
    outputs. A program per (token, block of heads): one head each for decode-sized batches (many small
    programs finish sooner than few large ones), four for long prefills."""
    tokens, hq, d = q.shape
    hk = k.shape[1]
    q_out = torch.empty(q.shape, dtype=torch.promote_types(q.dtype, q_weight.dtype), device=q.device)
    k_out = torch.empty(k.shape, dtype=torch.promote_types(k.dtype, k_weight.dtype), device=k.device)
    if tokens == 0:
        return q_out, k_out
    assert q.stride(2) == 1 and q.stride(1) == d and k.stride(2) == 1 and k.stride(1) == d and k.shape[2] == d
    assert d == triton.next_power_of_2(d) and cos_sin.shape[1] == d and cos_sin.stride(1) == 1
    assert q_out.dtype == k_out.dtype  # eager casts cos/sin to q's dtype for both
    heads = 1 if tokens <= 256 else 4
    grid = (tokens, triton.cdiv(hq, heads) + triton.cdiv(hk, heads))
    with _on(q.device):
        _fused_qk_norm_rope_kernel[grid](positions, q, k, q_weight, k_weight, cos_sin, q_out, k_out, q.stride(0),
                                         k.stride(0), cos_sin.stride(0), eps, HQ=hq, HK=hk, D=d, HEADS=heads,
                                         num_warps=max(1, heads * d // 256), enable_fp_fusion=False)
    return q_out, k_out


if triton is not None:

    @triton.jit
    def _fused_rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr, x_stride, res_stride, eps,
                               H: tl.constexpr, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < H
        x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)  # issued before the reduction waits
        if HAS_RESIDUAL:  # the sum in the model dtype (eager adds there), kept as the new residual
            r = tl.load(res_ptr + row * res_stride + cols, mask=mask, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
            tl.store(sum_ptr + row * H + cols, x, mask=mask)
        x32 = x.to(tl.float32)
        inv = tl.rsqrt(tl.sum(x32 * x32, 0) * (1.0 / H) + eps)
        y = (x32 * inv).to(x_ptr.dtype.element_ty).to(tl.float32)  # cast back before the weight, as HF
        tl.store(out_ptr + row * H + cols, (w * y).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _fused_silu_mul_kernel(x_ptr, out_ptr, x_stride, inter, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < inter
        gate = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + row * x_stride + inter + cols, mask=mask, other=0.0).to(tl.float32)
        act = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty).to(tl.float32)  # F.silu rounds
        tl.store(out_ptr + row * inter + cols, (act * up).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _round(x, dtype: tl.constexpr):
        """To the model dtype and back: where eager holds a bf16 intermediate."""
        return x.to(dtype).to(tl.float32)

    @triton.jit
    def _norm_rope_heads(src, dst, w_ptr, head0, pos_ptr, cs_ptr, cs_stride, eps, NUM_HEADS: tl.constexpr,
                         D: tl.constexpr, HEADS: tl.constexpr):
        """HEADS heads from head0 of one token: RMSNorm over D, then the rotation of real/model.py's _rotate.
        The rows load first: only the cos/sin row waits for the position's load."""
        HALF: tl.constexpr = D // 2
        heads = head0 + tl.arange(0, HEADS)
        half = tl.arange(0, HALF)
        mask = (heads < NUM_HEADS)[:, None]
        offs = heads[:, None] * D + half[None, :]
        x1 = tl.load(src + offs, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + offs + HALF, mask=mask, other=0.0).to(tl.float32)
        w1 = tl.load(w_ptr + half).to(tl.float32)[None, :]
        w2 = tl.load(w_ptr + HALF + half).to(tl.float32)[None, :]
        cs_row = cs_ptr + tl.load(pos_ptr).to(tl.int64) * cs_stride
        dt = dst.dtype.element_ty
        cos = _round(tl.load(cs_row + half), dt)[None, :]  # eager: cos_sin[positions].to(q.dtype)
        sin = _round(tl.load(cs_row + HALF + half), dt)[None, :]
        inv = tl.rsqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) * (1.0 / D) + eps)[:, None]
        n1 = _round(w1 * _round(x1 * inv, src.dtype.element_ty), dt)
        n2 = _round(w2 * _round(x2 * inv, src.dtype.element_ty), dt)
        o1 = _round(n1 * cos, dt) - _round(n2 * sin, dt)
        o2 = _round(n2 * cos, dt) + _round(n1 * sin, dt)
        tl.store(dst + offs, o1.to(dt), mask=mask)
        tl.store(dst + offs + HALF, o2.to(dt), mask=mask)

    @triton.jit
    def _fused_qk_norm_rope_kernel(pos_ptr, q_ptr, k_ptr, qw_ptr, kw_ptr, cs_ptr, qo_ptr, ko_ptr, q_stride,
                                   k_stride, cs_stride, eps, HQ: tl.constexpr, HK: tl.constexpr, D: tl.constexpr,
                                   HEADS: tl.constexpr):
        token = tl.program_id(0).to(tl.int64)
        block = tl.program_id(1)
        q_blocks: tl.constexpr = (HQ + HEADS - 1) // HEADS
        if block < q_blocks:
            _norm_rope_heads(q_ptr + token * q_stride, qo_ptr + token * (HQ * D), qw_ptr, block * HEADS,
                             pos_ptr + token, cs_ptr, cs_stride, eps, HQ, D, HEADS)
        else:
            _norm_rope_heads(k_ptr + token * k_stride, ko_ptr + token * (HK * D), kw_ptr, (block - q_blocks) * HEADS,
                             pos_ptr + token, cs_ptr, cs_stride, eps, HK, D, HEADS)

    @triton.jit(do_not_specialize=["pieces", "programs"])  # one compiled kernel whatever the request size
    def _copy_blocks_kernel(src_ptr, dst_ptr, src_blocks_ptr, dst_blocks_ptr, src_plane_stride, dst_plane_stride,
                            pieces, programs, planes, BLOCK_ELEMS: tl.constexpr, TILE: tl.constexpr):
        offs = tl.arange(0, TILE)
        for piece in range(tl.program_id(0), pieces, programs):  # piece = (block i, plane: K or V of a layer)
            i = piece // planes
            plane = (piece % planes).to(tl.int64)
            src_block = tl.load(src_blocks_ptr + i).to(tl.int64)
            dst_block = tl.load(dst_blocks_ptr + i).to(tl.int64)
            src = src_ptr + plane * src_plane_stride + src_block * BLOCK_ELEMS
            dst = dst_ptr + plane * dst_plane_stride + dst_block * BLOCK_ELEMS
            for start in range(0, BLOCK_ELEMS, TILE):
                tl.store(dst + start + offs, tl.load(src + start + offs))

    @triton.jit
    def _store_kv_kernel(k_ptr, v_ptr, k_stride, v_stride, k_cache_ptr, v_cache_ptr, slot_ptr,
                         ROW: tl.constexpr, ROW_PAD: tl.constexpr):
        token = tl.program_id(0)
        slot = tl.load(slot_ptr + token).to(tl.int64)
        if slot < 0:
            return
        cols = tl.arange(0, ROW_PAD)
        mask = cols < ROW
        k = tl.load(k_ptr + token * k_stride + cols, mask=mask)
        v = tl.load(v_ptr + token * v_stride + cols, mask=mask)
        tl.store(k_cache_ptr + slot * ROW + cols, k, mask=mask)
        tl.store(v_cache_ptr + slot * ROW + cols, v, mask=mask)

    @triton.jit
    def _paged_decode_kernel(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, chunk_ptr,
                             out_ptr, part_out_ptr, part_lse_ptr, scale_log2,
                             stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                             stride_bt, stride_ot, stride_oh, num_heads,
                             GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                             BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
                             BY_LENGTH: tl.constexpr):
        seq = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        context_len = tl.load(context_lens_ptr + seq)
        splits = NUM_SPLITS
        if BY_LENGTH:  # this sequence's share of the grid's splits: about one per `chunk` tokens
            splits = tl.maximum(tl.minimum(tl.cdiv(context_len, tl.load(chunk_ptr)), NUM_SPLITS), 1)
        # splits start on BLOCK_N boundaries; trailing splits of short contexts are empty
        split_len = tl.cdiv(tl.cdiv(context_len, splits), BLOCK_N) * BLOCK_N
        start = split * split_len
        end = tl.minimum(start + split_len, context_len)

        offs_g = tl.arange(0, GROUP_PAD)
        offs_d = tl.arange(0, HEAD_DIM)
        offs_n = tl.arange(0, BLOCK_N)
        heads = kv_head * GROUP + offs_g
        mask_g = offs_g < GROUP
        # padded query rows are zeros: their scores stay finite and they are never stored
        q = tl.load(q_ptr + seq * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                    mask=mask_g[:, None], other=0.0)
        m = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
        l = tl.zeros([GROUP_PAD], dtype=tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_DIM], dtype=tl.float32)
        table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
        for tile in range(start, end, BLOCK_N):
            pos = tile + offs_n
            valid = pos < end
            block = tl.load(table_row + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
            in_block = pos % BLOCK_SIZE
            k = tl.load(k_cache_ptr + block[:, None] * stride_kb + in_block[:, None] * stride_kt
                        + kv_head * stride_kh + offs_d[None, :], mask=valid[:, None], other=0.0)
            v = tl.load(v_cache_ptr + block[:, None] * stride_vb + in_block[:, None] * stride_vt
                        + kv_head * stride_vh + offs_d[None, :], mask=valid[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k)) * scale_log2  # [GROUP_PAD, BLOCK_N], log2 domain
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))  # finite: column 0 of every tile is valid
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(s - m_new[:, None])
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            l = l * alpha + tl.sum(p, 1)
            m = m_new
        o = acc / tl.where(l > 0, l, 1.0)[:, None]  # empty range (padding, short context): zeros
        if NUM_SPLITS == 1:
            tl.store(out_ptr + seq * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
                     o.to(out_ptr.dtype.element_ty), mask=mask_g[:, None])
        else:
            row = (seq * num_heads + heads) * NUM_SPLITS + split
            tl.store(part_out_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], o, mask=mask_g[:, None])
            tl.store(part_lse_ptr + row, tl.where(l > 0, m + tl.log2(l), float("-inf")), mask=mask_g)

    @triton.jit
    def _paged_prefill_kernel(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, cu_q_ptr, tiles_ptr,
                              out_ptr, scale_log2, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb,
                              stride_vt, stride_vh, stride_bt, stride_ot, stride_oh, stride_tiles,
                              GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        t = tl.program_id(0)
        head = tl.program_id(1)
        seq = tl.load(tiles_ptr + t)
        m_tile = tl.maximum(tl.load(tiles_ptr + stride_tiles + t), 0)  # spare programs: tile -1, no rows
        live = seq >= 0
        seq = tl.maximum(seq, 0)
        q_start = tl.load(cu_q_ptr + seq)
        q_len = tl.where(live, tl.load(cu_q_ptr + seq + 1) - q_start, 0)
        context_len = tl.load(context_lens_ptr + seq)
        prefix = context_len - q_len
        offs_m = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < q_len
        offs_d = tl.arange(0, HEAD_DIM)
        offs_n = tl.arange(0, BLOCK_N)
        kv_head = head // GROUP
        rows = (q_start + offs_m).to(tl.int64)
        q = tl.load(q_ptr + rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :], mask=mask_m[:, None],
                    other=0.0)
        # the tile's last query sits at prefix + its row: no key past that (causal), none past the context
        end = tl.where(live & (m_tile * BLOCK_M < q_len), tl.minimum(context_len, prefix + (m_tile + 1) * BLOCK_M), 0)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
        query_pos = prefix + offs_m
        for tile in range(0, end, BLOCK_N):
            pos = tile + offs_n
            valid = pos < end
            block = tl.load(table_row + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
            in_block = pos % BLOCK_SIZE
            k = tl.load(k_cache_ptr + block[:, None] * stride_kb + in_block[:, None] * stride_kt
                        + kv_head * stride_kh + offs_d[None, :], mask=valid[:, None], other=0.0)
            v = tl.load(v_cache_ptr + block[:, None] * stride_vb + in_block[:, None] * stride_vt
                        + kv_head * stride_vh + offs_d[None, :], mask=valid[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k)) * scale_log2  # [BLOCK_M, BLOCK_N], log2 domain
            s = tl.where(valid[None, :] & (pos[None, :] <= query_pos[:, None]), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: key 0 is visible to every query of the first tile
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            l_i = l_i * alpha + tl.sum(p, 1)
            m_i = m_new
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=mask_m[:, None])

    @triton.jit
    def _split_reduce_kernel(part_out_ptr, part_lse_ptr, out_ptr, stride_ot, stride_oh, num_heads,
                             HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr):
        seq = tl.program_id(0)
        head = tl.program_id(1)
        offs_s = tl.arange(0, SPLITS_PAD)
        offs_d = tl.arange(0, HEAD_DIM)
        mask_s = offs_s < NUM_SPLITS
        rows = (seq * num_heads + head) * NUM_SPLITS + offs_s
        lse = tl.load(part_lse_ptr + rows, mask=mask_s, other=float("-inf"))
        lse_max = tl.max(lse, 0)
        weight = tl.where(lse > float("-inf"), tl.exp2(lse - lse_max), 0.0)  # empty splits weigh 0
        parts = tl.load(part_out_ptr + rows[:, None] * HEAD_DIM + offs_d[None, :], mask=mask_s[:, None], other=0.0)
        total = tl.sum(weight, 0)
        o = tl.sum(parts * weight[:, None], 0) / tl.where(total > 0, total, 1.0)
        tl.store(out_ptr + seq * stride_ot + head * stride_oh + offs_d, o.to(out_ptr.dtype.element_ty))

    @triton.jit(do_not_specialize=["temperature", "seed"])
    def _sample_kernel(logits_ptr, stride, temps_ptr, temperature, out_ptr, vocab, seed,
                       PER_ROW: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        t = tl.load(temps_ptr + row) if PER_ROW else temperature
        row_ptr = logits_ptr + row.to(tl.int64) * stride
        best_v = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
        best_i = tl.zeros([BLOCK], dtype=tl.int32)
        inv_t = 1.0 / tl.maximum(t, 1e-5)
        for start in range(0, vocab, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < vocab
            x = tl.load(row_ptr + cols, mask=mask, other=float("-inf")).to(tl.float32)
            if t > 0:
                u = tl.rand(seed, row * vocab + cols)
                gumbel = -tl.log(-tl.log(tl.maximum(u, 1e-20)))
                x = tl.where(mask, x * inv_t + gumbel, float("-inf"))
            take = x > best_v  # strict: each lane keeps its first maximum
            best_v = tl.where(take, x, best_v)
            best_i = tl.where(take, cols, best_i)
        top = tl.max(best_v, 0)
        tl.store(out_ptr + row, tl.min(tl.where(best_v == top, best_i, vocab), 0).to(tl.int64))
