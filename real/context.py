"""What one forward pass needs to know about the batch's KV cache layout (the attention metadata).

The runner builds it from the scheduler's batch; every attention layer reads it. Passed explicitly
through the model (no global), so CUDA graphs capture it as static tensors.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class AttnMetadata:
    is_prefill: bool
    slot_mapping: torch.Tensor  # [num_tokens] int64: cache slot (block * block_size + offset) of each new token; -1 = padding, not stored
    # prefill (variable-length, packed): sequence i's new tokens are q[cu_seqlens_q[i]:cu_seqlens_q[i+1]]
    cu_seqlens_q: torch.Tensor | None = None  # [n+1] int32
    cu_seqlens_k: torch.Tensor | None = None  # [n+1] int32: cached context + new tokens per sequence
    cu_seqlens_q_host: list[int] | None = None  # the same on the host: per-sequence loops need no device sync
    cu_seqlens_k_host: list[int] | None = None
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0
    has_prefix: bool = False  # some prefill sequence already has KV in the cache (chunked prefill, recompute)
    # block tables: decode always; prefill when has_prefix
    block_tables: torch.Tensor | None = None  # [n, max_blocks_per_seq] int32, -1 past the end
    context_lens: torch.Tensor | None = None  # [n] int32: KV length per sequence including this step's token (decode); prefill: prefix + new tokens
    # prefill over the paged cache (graph-capturable, real/triton_kernels.py paged_prefill_triton): every key read by
    # block table; [2, programs] int32 (sequence, query tile) of each program, -1 unused
    prefill_tiles: torch.Tensor | None = None


def slots_at(block_tables, positions, block_size: int):
    """KV cache slots of `positions` (one per row of `block_tables`, int32 [n, width]): the block holding each
    position times block_size plus the offset in it; int64 [n]. On the device: multi-step decode stages
    its later steps without the host."""
    block = block_tables.gather(1, (positions // block_size).unsqueeze(1)).squeeze(1)
    return block.to(positions.dtype) * block_size + positions % block_size
