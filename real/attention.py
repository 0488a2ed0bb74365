"""Attention over the paged KV cache, behind one small interface with three backends.

Every backend stores the new tokens' K/V by slot (slot -1 = padding, skipped) and then runs either
prefill (causal, variable-length, optionally over a cached prefix) or decode (one token per sequence).
"torch" is the CPU reference; "triton" adds a paged decode kernel (flash-decoding) and a store kernel;
"flash" uses flash-attn where it is installed. Triton is imported lazily: CPU installs need none.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from policies.specs import decode_context_splits
from real.context import AttnMetadata

from real.triton_kernels import paged_decode_triton, paged_prefill_triton, store_kv_triton, triton  # noqa: F401 (re-exported)


def pick_backend(device: torch.device | str, block_size: int | None = None) -> str:
    """The fastest backend this machine has ("flash" pages its cache only in 256-token blocks)."""
    if torch.device(device).type != "cuda":
        return "torch"
    flash_ok = block_size is None or block_size % 256 == 0
    if flash_ok and importlib.util.find_spec("flash_attn") is not None:
        return "flash"
    return "triton" if triton is not None else "torch"


class SmBudget:
    """The SMs that kernels launched now will run on: a green-context partition's count while the GPU1
    pipeline launches (or captures) a stage on it (real/pipeline.py), else None, the whole GPU. The
    paged-decode kernel sizes its context splits by it."""
    sms: int | None = None


DECODE_KERNEL_DEFAULT = (64, 4, 2)  # tokens per K/V tile, warps, software-pipeline stages


def decode_kernel_config() -> tuple[int, int, int]:
    """The paged-decode kernel's tile: `REAL_DECODE_KERNEL=block_n,warps,stages` (what
    bench/decode_kernel_sweep.py measures best on a GPU) or the default."""
    text = os.environ.get("REAL_DECODE_KERNEL", "").strip()
    if not text:
        return DECODE_KERNEL_DEFAULT
    try:
        block_n, warps, stages = (int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"REAL_DECODE_KERNEL must be 'block_n,warps,stages' (e.g. 64,4,2), got {text!r}") from None
    if block_n < 16 or block_n & (block_n - 1) or warps not in (1, 2, 4, 8, 16) or not 1 <= stages <= 8:
        raise ValueError(f"REAL_DECODE_KERNEL={text!r}: block_n a power of two >= 16, warps 1..16 (power of two), "
                         "stages 1..8")
    return block_n, warps, stages


def decode_length_splits() -> int:
    """`REAL_DECODE_LENGTH_SPLITS=K` (K >= 2): split decode contexts by length, a sequence K times the batch's
    mean context getting K times the splits of one at the mean (grid up to 16), so one long context no
    longer streams alone in one program after the others finished (the decode tail: 1.4-1.6x decode
    steps in Azure conv serving on H200, sim/calibrated.py). Default 1, off: not yet timed on a GPU
    (bench/decode_kernel_sweep.py measures it)."""
    text = os.environ.get("REAL_DECODE_LENGTH_SPLITS", "").strip() or "1"
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"REAL_DECODE_LENGTH_SPLITS must be an integer >= 1, got {text!r}")
    return int(text)


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
        out = torch.zeros_like(q)  # rows of no sequence (a graph bucket's padding) stay zeros
        group = q.shape[1] // k_cache.shape[2] if meta.has_prefix else q.shape[1] // k.shape[1]
        for i in range(len(cu_q) - 1):
            q_len, k_len = cu_q[i + 1] - cu_q[i], cu_k[i + 1] - cu_k[i]
            if q_len == 0:  # an empty (padding) sequence
                continue
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

    def paged_prefill(self, q, k_cache, v_cache, meta: AttnMetadata, scale: float) -> torch.Tensor:
        """Prefill with every key read from the cache (the new tokens' K/V already stored): sequence i's
        queries are its last cu_seqlens_q[i+1] - cu_seqlens_q[i] of context_lens[i] positions. The
        reference for the graph-capturable kernel: `prefill` over a cached prefix, its lengths read back."""
        cu_q, lens = meta.cu_seqlens_q.tolist(), meta.context_lens.tolist()
        cu_k = [0]
        for n in lens[:len(cu_q) - 1]:
            cu_k.append(cu_k[-1] + n)
        host = replace(meta, cu_seqlens_q_host=cu_q, cu_seqlens_k_host=cu_k, has_prefix=True)
        return TorchAttention.prefill(self, q, None, None, k_cache, v_cache, host, scale)  # not a subclass' varlen

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

    def __init__(self):
        self._num_sms: dict[int, int] = {}
        self.block_n, self.num_warps, self.num_stages = decode_kernel_config()
        self.length_splits = decode_length_splits()

    def store_kv(self, k, v, k_cache, v_cache, slot_mapping):
        if not _kernels_run_on(k):
            return super().store_kv(k, v, k_cache, v_cache, slot_mapping)
        store_kv_triton(k, v, k_cache, v_cache, slot_mapping)

    def prefill(self, q, k, v, k_cache, v_cache, meta: AttnMetadata, scale: float) -> torch.Tensor:
        from .varlen import varlen_prefill

        out = varlen_prefill(q, k, v, k_cache, v_cache, meta, scale, gather_context)
        return out if out is not None else super().prefill(q, k, v, k_cache, v_cache, meta, scale)

    def paged_prefill(self, q, k_cache, v_cache, meta: AttnMetadata, scale: float) -> torch.Tensor:
        if not _kernels_run_on(q) or q.dtype not in (torch.bfloat16, torch.float16):
            return super().paged_prefill(q, k_cache, v_cache, meta, scale)
        return paged_prefill_triton(q, k_cache, v_cache, meta.block_tables, meta.context_lens, meta.cu_seqlens_q,
                                    meta.prefill_tiles, scale)

    def decode(self, q, k_cache, v_cache, meta: AttnMetadata, scale: float) -> torch.Tensor:
        if not _kernels_run_on(q) or q.dtype not in (torch.bfloat16, torch.float16):  # fp32 dot: tf32
            return super().decode(q, k_cache, v_cache, meta, scale)
        num_splits = self.num_splits(q.shape[0] * k_cache.shape[2], q.device)
        max_splits = min(16, num_splits * self.length_splits) if self.length_splits > 1 else 0
        return paged_decode_triton(q, k_cache, v_cache, meta.block_tables, meta.context_lens, scale,
                                   block_n=self.block_n, num_splits=num_splits, num_warps=self.num_warps,
                                   num_stages=self.num_stages, max_splits=max_splits)

    def num_splits(self, programs: int, device: torch.device) -> int:
        """Context splits per (sequence, kv head): policies.specs.decode_context_splits on this GPU."""
        if device.type != "cuda":  # the Triton interpreter (TRITON_INTERPRET=1) on CPU tensors
            return 1
        if SmBudget.sms is not None:
            return decode_context_splits(programs, SmBudget.sms)
        if device.index not in self._num_sms:
            self._num_sms[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
        return decode_context_splits(programs, self._num_sms[device.index])


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
