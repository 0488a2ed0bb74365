"""Attention over the paged KV cache, behind one small interface with three backends.

Every backend stores the new tokens' K/V by slot (slot -1 = padding, skipped) and then runs either
prefill (causal, variable-length, optionally over a cached prefix) or decode (one token per sequence).
"torch" is the CPU reference; "triton" adds a paged decode kernel (flash-decoding) and a store kernel;
"flash" uses flash-attn where it is installed. Triton is imported lazily: CPU installs need none.
"""
from __future__ import annotations

import importlib.util
import os

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from real.context import AttnMetadata

try:  # kernels are defined only where triton exists; `import real.attention` must work without it
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None


def pick_backend(device: torch.device | str, block_size: int | None = None) -> str:
    """The fastest backend this machine has ("flash" pages its cache only in 256-token blocks)."""
    if torch.device(device).type != "cuda":
        return "torch"
    flash_ok = block_size is None or block_size % 256 == 0
    if flash_ok and importlib.util.find_spec("flash_attn") is not None:
        return "flash"
    return "triton" if triton is not None else "torch"


def make_backend(name: str) -> TorchAttention:
    backends = {"torch": TorchAttention, "triton": TritonAttention, "flash": FlashAttention}
    if name not in backends:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(backends)}")
    if name == "triton" and triton is None:
        raise RuntimeError("the triton attention backend needs the triton package (pip install triton)")
    return backends[name]()


def gather_context(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` cached tokens of one sequence, [length, kv_heads, head_dim]."""
    block_size = cache.shape[1]
    blocks = block_table[: -(-length // block_size)].long()
    return cache[blocks].flatten(0, 1)[:length]


class TorchAttention:
    """Reference backend: plain PyTorch, correct on any device, fast on none (decode)."""

    name = "torch"

    def store_kv(self, k, v, k_cache, v_cache, slot_mapping):
        keep = slot_mapping >= 0  # boolean indexing syncs with the host: fine for a reference
        slots = slot_mapping[keep]
        k_cache.view(-1, *k_cache.shape[2:])[slots] = k[keep]
        v_cache.view(-1, *v_cache.shape[2:])[slots] = v[keep]

    def prefill(self, q, k, v, k_cache, v_cache, meta: AttnMetadata, scale: float) -> torch.Tensor:
        """Per-sequence SDPA; the mask is causal aligned bottom-right (new token j sees context + j)."""
        cu_q = meta.cu_seqlens_q_host or meta.cu_seqlens_q.tolist()
        cu_k = meta.cu_seqlens_k_host or (meta.cu_seqlens_k.tolist() if meta.cu_seqlens_k is not None else cu_q)
        if meta.has_prefix and (meta.block_tables is None or k_cache.numel() == 0):
            raise ValueError("prefill with a cached prefix needs block_tables and a KV cache")
        out = torch.empty_like(q)
        group = q.shape[1] // k.shape[1]
        for i in range(len(cu_q) - 1):
            q_len, k_len = cu_q[i + 1] - cu_q[i], cu_k[i + 1] - cu_k[i]
            q_i = q[cu_q[i]:cu_q[i + 1]]
            if meta.has_prefix:
                k_i = gather_context(k_cache, meta.block_tables[i], k_len)
                v_i = gather_context(v_cache, meta.block_tables[i], k_len)
            else:
                k_i, v_i = k[cu_q[i]:cu_q[i + 1]], v[cu_q[i]:cu_q[i + 1]]
            k_i = k_i.repeat_interleave(group, dim=1).transpose(0, 1)
            v_i = v_i.repeat_interleave(group, dim=1).transpose(0, 1)
            if q_len == k_len:
                o = F.scaled_dot_product_attention(q_i.transpose(0, 1), k_i, v_i, is_causal=True, scale=scale)
            else:
                mask = causal_lower_right(q_len, k_len)
                o = F.scaled_dot_product_attention(q_i.transpose(0, 1), k_i, v_i, attn_mask=mask, scale=scale)
            out[cu_q[i]:cu_q[i + 1]] = o.transpose(0, 1)
        return out

    def decode(self, q, k_cache, v_cache, meta: AttnMetadata, scale: float) -> torch.Tensor:
        """Gather every sequence's blocks, mask past context_lens, softmax in fp32 (no host sync)."""
        n, num_heads, head_dim = q.shape
        kv_heads = k_cache.shape[2]
        tables = meta.block_tables.clamp(min=0).long()
        k = k_cache[tables].flatten(1, 2).float()  # [n, max_blocks * block_size, kv_heads, head_dim]
        v = v_cache[tables].flatten(1, 2).float()
        valid = torch.arange(k.shape[1], device=q.device)[None, :] < meta.context_lens[:, None]
        qg = q.view(n, kv_heads, num_heads // kv_heads, head_dim).float()
        scores = torch.einsum("nkgd,nskd->nkgs", qg, k) * scale
        scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # padded entries (no context) -> zeros
        return torch.einsum("nkgs,nskd->nkgd", probs, v).reshape(n, num_heads, head_dim).to(q.dtype)


class TritonAttention(TorchAttention):
    """GPU backend: Triton store + paged decode (CUDA-graph safe); prefill through torch's varlen
    flash-attention op where this torch has it, else per-sequence SDPA."""

    name = "triton"
    block_n = 64  # tokens per decode iteration: a [64, head_dim] K tile and V tile

    def __init__(self):
        self._num_sms: dict[int, int] = {}

    def store_kv(self, k, v, k_cache, v_cache, slot_mapping):
        if not _kernels_run_on(k):
            return super().store_kv(k, v, k_cache, v_cache, slot_mapping)
        store_kv_triton(k, v, k_cache, v_cache, slot_mapping)

    def prefill(self, q, k, v, k_cache, v_cache, meta: AttnMetadata, scale: float) -> torch.Tensor:
        from .varlen import varlen_prefill

        out = varlen_prefill(q, k, v, k_cache, v_cache, meta, scale, gather_context)
        return out if out is not None else super().prefill(q, k, v, k_cache, v_cache, meta, scale)

    def decode(self, q, k_cache, v_cache, meta: AttnMetadata, scale: float) -> torch.Tensor:
        if not _kernels_run_on(q) or q.dtype not in (torch.bfloat16, torch.float16):  # fp32 dot: tf32
            return super().decode(q, k_cache, v_cache, meta, scale)
        num_splits = self.num_splits(q.shape[0] * k_cache.shape[2], q.device)
        return paged_decode_triton(q, k_cache, v_cache, meta.block_tables, meta.context_lens, scale,
                                   block_n=self.block_n, num_splits=num_splits)

    def num_splits(self, programs: int, device: torch.device) -> int:
        """Context splits per (sequence, kv head): enough programs for ~4 per SM. Depends on the padded
        batch only, so a CUDA graph per batch bucket stays valid for any context lengths. (H200,
        qwen3-8b shape, ctx 1024: batch 8 -> 8 splits, 32 -> 2, >= 64 -> 1, each the measured best.)"""
        if device.type != "cuda":  # the Triton interpreter (TRITON_INTERPRET=1) on CPU tensors
            return 1
        if device.index not in self._num_sms:
            self._num_sms[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
        ratio = 4 * self._num_sms[device.index] // max(1, programs)
        return 1 if ratio < 2 else min(16, 1 << (ratio.bit_length() - 1))


class FlashAttention(TritonAttention):
    """flash-attn 2 varlen prefill and paged decode (its paged cache needs block_size % 256 == 0)."""

    name = "flash"

    def prefill(self, q, k, v, k_cache, v_cache, meta: AttnMetadata, scale: float) -> torch.Tensor:
        from flash_attn import flash_attn_varlen_func

        table, cu_k, max_k = None, meta.cu_seqlens_q, meta.max_seqlen_q
        if meta.cu_seqlens_k is not None:
            cu_k, max_k = meta.cu_seqlens_k, max(meta.max_seqlen_k, meta.max_seqlen_q)
        if meta.has_prefix:
            k, v, table = k_cache, v_cache, meta.block_tables
        return flash_attn_varlen_func(q, k, v, cu_seqlens_q=meta.cu_seqlens_q, cu_seqlens_k=cu_k,
                                      max_seqlen_q=meta.max_seqlen_q, max_seqlen_k=max_k,
                                      softmax_scale=scale, causal=True, block_table=table)

    def decode(self, q, k_cache, v_cache, meta: AttnMetadata, scale: float) -> torch.Tensor:
        from flash_attn import flash_attn_with_kvcache

        if k_cache.shape[1] % 256:
            raise ValueError(f"flash-attn pages need block_size % 256 == 0, got {k_cache.shape[1]}")
        return flash_attn_with_kvcache(q.unsqueeze(1), k_cache, v_cache, cache_seqlens=meta.context_lens,
                                       block_table=meta.block_tables, softmax_scale=scale, causal=True).squeeze(1)


def _kernels_run_on(t: torch.Tensor) -> bool:
    """Triton kernels run on CUDA tensors, or on CPU ones under the interpreter (TRITON_INTERPRET=1)."""
    return triton is not None and (t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


def store_kv_triton(k, v, k_cache, v_cache, slot_mapping):
    """k, v [T, kv_heads, head_dim] (rows may be strided views of qkv) -> cache rows by slot."""
    row = k.shape[1] * k.shape[2]
    if k.shape[0] == 0:
        return
    assert k.stride(-1) == 1 and k.stride(1) == k.shape[2] and v.stride(-1) == 1 and v.stride(1) == v.shape[2]
    assert k_cache.stride(1) == row and v_cache.stride(1) == row and k_cache.stride(0) == row * k_cache.shape[1]
    _store_kv_kernel[(k.shape[0],)](k, v, k.stride(0), v.stride(0), k_cache, v_cache, slot_mapping,
                                    ROW=row, ROW_PAD=triton.next_power_of_2(row))


def paged_decode_triton(q, k_cache, v_cache, block_tables, context_lens, scale: float,
                        block_n: int = 64, num_splits: int = 1, num_warps: int = 4,
                        num_stages: int = 2) -> torch.Tensor:
    """q [n, heads, head_dim]; caches [blocks, block_size, kv_heads, head_dim] -> out [n, heads, head_dim].

    One program per (sequence, kv head, split) holds its GQA group of queries in registers and streams
    [block_n, head_dim] K/V tiles with an online softmax; splits > 1 add a reduce over the splits.
    Entries with context_lens 0 (padding) come out as zeros.
    """
    n, num_heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    group = num_heads // kv_heads
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    assert head_dim == triton.next_power_of_2(head_dim) and block_size == triton.next_power_of_2(block_size)
    out = torch.empty_like(q)
    if n == 0:
        return out
    if num_splits > 1:
        part_out = torch.empty(n, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(n, num_heads, num_splits, dtype=torch.float32, device=q.device)
    else:
        part_out = part_lse = out  # unused
    _paged_decode_kernel[(n, kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, out, part_out, part_lse, scale * 1.4426950408889634,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1), num_heads,
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size, BLOCK_N=block_n, NUM_SPLITS=num_splits, num_warps=num_warps,
        num_stages=num_stages)
    if num_splits > 1:
        _split_reduce_kernel[(n, num_heads)](part_out, part_lse, out, out.stride(0), out.stride(1), num_heads,
                                             HEAD_DIM=head_dim, NUM_SPLITS=num_splits,
                                             SPLITS_PAD=max(2, triton.next_power_of_2(num_splits)), num_warps=4)
    return out


if triton is not None:

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
    def _paged_decode_kernel(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, out_ptr,
                             part_out_ptr, part_lse_ptr, scale_log2,
                             stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                             stride_bt, stride_ot, stride_oh, num_heads,
                             GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                             BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr):
        seq = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        context_len = tl.load(context_lens_ptr + seq)
        # splits start on BLOCK_N boundaries; trailing splits of short contexts are empty
        split_len = tl.cdiv(tl.cdiv(context_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
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
