"""Test helpers: AttnMetadata, positions and block tables built from plain Python lists.

Shared by the model tests and the runner tests so both lay out batches the way the runner will:
slot = block_table[pos // block_size] * block_size + pos % block_size, -1 for padding.
"""
from __future__ import annotations

import random

import torch

from real.context import AttnMetadata
from real.model_config import ModelConfig


def scattered_block_tables(total_lens: list[int], block_size: int, num_blocks: int,
                           seed: int = 0) -> list[list[int]]:
    """Each sequence gets enough blocks for total_lens[i] tokens, drawn at random from the pool so
    that no table is contiguous (catches kernels that assume block i+1 follows block i)."""
    needed = [-(-n // block_size) for n in total_lens]
    if sum(needed) > num_blocks:
        raise ValueError(f"{sum(needed)} blocks needed, the pool has {num_blocks}")
    pool = list(range(num_blocks))
    random.Random(seed).shuffle(pool)
    tables, start = [], 0
    for k in needed:
        tables.append(pool[start:start + k])
        start += k
    return tables


def make_kv_cache(config: ModelConfig, num_blocks: int, block_size: int, dtype=torch.float32,
                  device="cpu") -> torch.Tensor:
    """[2, layers, blocks, block_size, kv_heads, head_dim], zeroed."""
    return torch.zeros(2, config.num_hidden_layers, num_blocks, block_size, config.num_key_value_heads,
                       config.head_dim, dtype=dtype, device=device)


def _slot(table: list[int] | None, pos: int, block_size: int) -> int:
    return -1 if table is None else table[pos // block_size] * block_size + pos % block_size


def _table_tensor(tables: list[list[int]], device, rows: int | None = None,
                  width: int | None = None) -> torch.Tensor:
    rows = rows or len(tables)
    width = width or max([len(t) for t in tables] + [1])
    out = torch.full((rows, width), -1, dtype=torch.int32)
    for i, t in enumerate(tables):
        out[i, :len(t)] = torch.tensor(t, dtype=torch.int32)
    return out.to(device)


def prefill_batch(new_lens: list[int], cached_lens: list[int] | None = None,
                  block_tables: list[list[int]] | None = None, block_size: int = 16,
                  device="cpu") -> tuple[AttnMetadata, torch.Tensor]:
    """(meta, positions [T]) for a packed prefill: sequence i brings new_lens[i] tokens after
    cached_lens[i] already-cached ones. Without block_tables nothing is stored (slots -1)."""
    cached_lens = cached_lens or [0] * len(new_lens)
    if any(cached_lens) and block_tables is None:
        raise ValueError("a cached prefix lives in blocks: pass block_tables")
    slots, positions = [], []
    for i, (new, cached) in enumerate(zip(new_lens, cached_lens)):
        table = block_tables[i] if block_tables is not None else None
        for pos in range(cached, cached + new):
            positions.append(pos)
            slots.append(_slot(table, pos, block_size))
    cu_q = [0]
    cu_k = [0]
    for new, cached in zip(new_lens, cached_lens):
        cu_q.append(cu_q[-1] + new)
        cu_k.append(cu_k[-1] + cached + new)
    has_prefix = any(cached_lens)
    meta = AttnMetadata(
        is_prefill=True, slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        cu_seqlens_q=torch.tensor(cu_q, dtype=torch.int32, device=device),
        cu_seqlens_k=torch.tensor(cu_k, dtype=torch.int32, device=device),
        max_seqlen_q=max(new_lens), max_seqlen_k=max(c + n for c, n in zip(cached_lens, new_lens)),
        has_prefix=has_prefix,
        block_tables=_table_tensor(block_tables, device) if has_prefix else None)
    return meta, torch.tensor(positions, dtype=torch.int64, device=device)


def decode_batch(context_lens: list[int], block_tables: list[list[int]], block_size: int = 16,
                 pad_to: int | None = None, table_width: int | None = None,
                 device="cpu") -> tuple[AttnMetadata, torch.Tensor]:
    """(meta, positions [n]) for one decode step: sequence i's new token sits at position
    context_lens[i] - 1 (context_lens include it). pad_to adds padding entries the way a CUDA-graph
    bucket does: context 0, slot -1, block table -1, position 0; table_width fixes the block-table
    width (a graph's static tensor)."""
    n = pad_to or len(context_lens)
    if n < len(context_lens):
        raise ValueError(f"pad_to={pad_to} is below the batch size {len(context_lens)}")
    slots = [_slot(t, c - 1, block_size) for t, c in zip(block_tables, context_lens)] + [-1] * (n - len(context_lens))
    positions = [c - 1 for c in context_lens] + [0] * (n - len(context_lens))
    meta = AttnMetadata(
        is_prefill=False, slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        block_tables=_table_tensor(block_tables, device, rows=n, width=table_width),
        context_lens=torch.tensor(list(context_lens) + [0] * (n - len(context_lens)), dtype=torch.int32,
                                  device=device))
    return meta, torch.tensor(positions, dtype=torch.int64, device=device)


def fake_decode_batch(runner, batch: int, context: int | list[int], steps: int = 1):
    """A decode Batch of `batch` sequences with `context` cached tokens each (or context[i] for sequence i), on
    consecutive blocks (benchmarks), covering `steps` decode steps (blocks reserved for all of them)."""
    from policies.request import Request
    from policies.scheduler import Batch

    contexts = [context] * batch if isinstance(context, int) else list(context)
    if len(contexts) != batch:
        raise ValueError(f"{len(contexts)} contexts for a batch of {batch}")
    reqs, start = [], 0
    for i, ctx in enumerate(contexts):
        per = (ctx + steps - 1) // runner.block_size + 1
        r = Request(i, 0.0, ctx, 10**6)
        r.blocks = list(range(start, start + per))
        start += per
        r.kv_len, r.generated, r.token_ids = ctx, 1, [1] * (ctx + 1)
        reqs.append(r)
    return Batch("gpu0", decode=reqs, num_steps=steps)
