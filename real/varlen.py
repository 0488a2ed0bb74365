"""Packed variable-length prefill through PyTorch's flash-attention varlen op, when this torch has it.

One call per layer for the whole prefill batch instead of one SDPA per sequence. Sequences with a
cached prefix (chunked prefill, recompute) have their context gathered from the paged cache into a
packed K/V first; flash-attention's causal mask is bottom-right aligned, which is what a chunk needs.
`varlen_prefill` returns None when the op is missing or does not take these inputs: the caller falls
back to per-sequence SDPA.
"""
from __future__ import annotations

import inspect

import torch

try:
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn
    _PARAMS = set(inspect.signature(_varlen_attn).parameters)
except Exception:  # older torch: no varlen op
    _varlen_attn, _PARAMS = None, set()


def available() -> bool:
    return _varlen_attn is not None and ("window_size" in _PARAMS or "is_causal" in _PARAMS)


def varlen_prefill(q, k, v, k_cache, v_cache, meta, scale: float, gather) -> torch.Tensor | None:
    if not available() or not q.is_cuda or q.dtype not in (torch.bfloat16, torch.float16):
        return None
    kw = {"scale": scale}
    kw.update(window_size=(-1, 0)) if "window_size" in _PARAMS else kw.update(is_causal=True)
    group = q.shape[1] // k.shape[1]
    if meta.has_prefix:
        cu_k = meta.cu_seqlens_k_host or meta.cu_seqlens_k.tolist()
        lens = [cu_k[i + 1] - cu_k[i] for i in range(len(cu_k) - 1)]
        k = torch.cat([gather(k_cache, meta.block_tables[i], n) for i, n in enumerate(lens)])
        v = torch.cat([gather(v_cache, meta.block_tables[i], n) for i, n in enumerate(lens)])
        cu_seq_k, max_k = meta.cu_seqlens_k, meta.max_seqlen_k
    else:
        cu_seq_k, max_k = meta.cu_seqlens_q, meta.max_seqlen_q
    if group > 1:
        if "enable_gqa" in _PARAMS:
            kw["enable_gqa"] = True
        else:
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    try:
        return _varlen_attn(q, k, v, meta.cu_seqlens_q, cu_seq_k, meta.max_seqlen_q, max_k, **kw)
    except (RuntimeError, TypeError, NotImplementedError):
        return None
