"""Decode CUDA graphs: one per batch-size bucket, captured largest first into one memory pool
(nano-vllm), replayed with the smallest bucket that fits. Inputs go through one pinned host staging
area and three async copies, so a step costs no host sync and few launches before the replay.

The GPU1 pipeline gets graphs of its own, one per (SM split, bucket): the whole ping-pong step
(micro-batch halves of the bucket, attention on the split's attention green stream, FFN on its FFN
stream, joined by events) captured as ONE graph. A graph keeps the partition each kernel was captured
on (../shared/notes/hardware-facts.md), so the replay runs each stage on its own SMs, with no
per-layer launches from Python: eager, a 28-layer two-micro-batch step is ~1,000 launches."""
from __future__ import annotations

from contextlib import contextmanager

import torch

from .context import AttnMetadata, slots_at
from .triton_kernels import max_prefill_tiles, prefill_tiles


def capture_graph(fn, pool, stream) -> torch.cuda.CUDAGraph:
    """Run `fn` once (warm-up: allocations, autotuning), then capture it into a graph sharing `pool`."""
    fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool, stream=stream):
        fn()
    torch.cuda.synchronize(stream.device)
    return graph


@contextmanager
def compiled_fusions():
    """The elementwise ops are fused (Triton kernels or torch.compile: model.Fused) inside graphs; eager steps
    fuse them only from Fused.eager_min_tokens tokens (a compiled call costs host time)."""
    from .model import Fused

    Fused.in_graph = True
    try:
        yield
    finally:
        Fused.in_graph = False


GRAPH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)


class DecodeGraphs:
    def __init__(self, model, max_batch: int, max_blocks_per_seq: int, hidden_size: int, dtype: torch.dtype,
                 device: torch.device, block_size: int = 16):
        self.model = model
        self.block_size = block_size
        self.max_batch = min(max_batch, GRAPH_BUCKETS[-1])
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pipeline_graphs: dict[tuple[tuple[int, int], int], torch.cuda.CUDAGraph] = {}
        self.pool = None
        b, w = self.max_batch, max_blocks_per_seq
        tokens = torch.zeros((3, b), dtype=torch.int64, device=device)  # input ids, positions, slots
        tokens[2].fill_(-1)
        self.static = dict(tokens=tokens, input_ids=tokens[0], positions=tokens[1], slot_mapping=tokens[2],
                           context_lens=torch.zeros(b, dtype=torch.int32, device=device),
                           block_tables=torch.zeros((b, w), dtype=torch.int32, device=device),
                           hidden=torch.zeros((b, hidden_size), dtype=dtype, device=device))
        pin = device.type == "cuda"
        self.host = dict(tokens=torch.zeros((3, b), dtype=torch.int64, pin_memory=pin),
                         lens=torch.zeros(b, dtype=torch.int32, pin_memory=pin),
                         table=torch.zeros((b, w), dtype=torch.int32, pin_memory=pin))
        self.host_np = {k: v.numpy() for k, v in self.host.items()}  # numpy views: list assignment is fast
        # torch.cuda.graph's default capture stream is created once per process, on the device current at the
        # first capture: a second GPU's graphs must be captured on a stream of their own device
        self.capture_stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def capture(self) -> None:
        s = self.static

        def step(bs):
            s["hidden"][:bs] = self.model(s["input_ids"][:bs], s["positions"][:bs], self._meta_rows(0, bs))

        with compiled_fusions():
            for bs in reversed([b for b in GRAPH_BUCKETS if b <= self.max_batch]):  # largest first: one pool
                self.graphs[bs] = capture_graph(lambda: step(bs), self.pool, self.capture_stream)
                self.pool = self.pool or self.graphs[bs].pool()

    def capture_pipeline(self, partitions, splits, microbatches: int = 2, min_batch: int = 2,
                         buckets: list[int] | None = None) -> None:
        """One graph per (split, bucket >= min_batch; `buckets` only, if given): the pipelined step on the
        split's green streams."""
        from .pipeline import pipelined_decode

        s = self.static

        def step(bs, split, attn_stream, ffn_stream):
            bounds = [bs * i // microbatches for i in range(microbatches + 1)]
            micro = [(s["input_ids"][a:b], s["positions"][a:b], self._meta_rows(a, b))
                     for a, b in zip(bounds, bounds[1:]) if b > a]
            s["hidden"][:bs] = torch.cat(pipelined_decode(self.model, micro, attn_stream, ffn_stream, split=split))

        sizes = [b for b in GRAPH_BUCKETS if min_batch <= b <= self.max_batch and (buckets is None or b in buckets)]
        with compiled_fusions():
            for split in splits:
                streams = partitions.get(split)
                for bs in reversed(sizes):
                    graph = capture_graph(lambda: step(bs, split, *streams), self.pool, self.capture_stream)
                    self.pool = self.pool or graph.pool()
                    self.pipeline_graphs[(split, bs)] = graph

    def _meta_rows(self, a: int, b: int) -> AttnMetadata:
        s = self.static
        return AttnMetadata(is_prefill=False, slot_mapping=s["slot_mapping"][a:b], block_tables=s["block_tables"][a:b],
                            context_lens=s["context_lens"][a:b])

    def bucket(self, n: int, split: tuple[int, int] | None = None) -> int | None:
        b = next((b for b in GRAPH_BUCKETS if b >= n), None)
        if split is not None:
            return b if (split, b) in self.pipeline_graphs else None
        return b if b in self.graphs else None

    def run(self, ids, pos, slots, lens, table, split: tuple[int, int] | None = None) -> torch.Tensor | None:
        """Hidden states [n, hidden] of one decode step (pipelined on `split` if given), or None when no
        captured graph fits."""
        n = len(ids)
        bucket = self.bucket(n, split)
        if bucket is None:
            return None
        s, host, view = self.static, self.host, self.host_np
        view["tokens"][0, :n] = ids
        view["tokens"][1, :n] = pos
        view["tokens"][2, :n] = slots
        view["tokens"][2, n:bucket] = -1  # padding rows store nothing ...
        view["lens"][:n] = lens
        view["lens"][n:bucket] = 0  # ... and attend over nothing
        w = table.shape[1]
        view["table"][:n, :w] = table
        s["tokens"][:, :bucket].copy_(host["tokens"][:, :bucket], non_blocking=True)
        s["context_lens"][:bucket].copy_(host["lens"][:bucket], non_blocking=True)
        s["block_tables"][:n, :w].copy_(host["table"][:n, :w], non_blocking=True)
        (self.graphs[bucket] if split is None else self.pipeline_graphs[(split, bucket)]).replay()
        return s["hidden"][:n]

    def advance(self, n: int, tokens: torch.Tensor) -> torch.Tensor:
        """The next decode step of the same n sequences, staged on the device (no host round trip): the
        tokens just sampled are the inputs, positions and context lengths move on by one, and the slots
        come from the block tables already staged (the scheduler reserved the blocks of every step)."""
        s, bs = self.static, self.block_size
        s["input_ids"][:n].copy_(tokens)
        s["positions"][:n] += 1
        s["context_lens"][:n] += 1
        s["slot_mapping"][:n] = slots_at(s["block_tables"][:n], s["positions"][:n], bs)
        self.graphs[self.bucket(n)].replay()
        return s["hidden"][:n]


PREFILL_BUCKETS = (256, 512, 1024, 2048, 4096, 8192, 16384)


def padded_prefill(chunks, bucket: int, max_seqs: int, block_size: int):
    """A prefill batch padded to `bucket` tokens and `max_seqs` sequences, as numpy arrays (ids, positions,
    slots, cu_seqlens, sample_rows, num_sampled). A chunk after a cached prefix (chunked prefill) takes
    its tokens, positions and slots from where the prefix ends. Padding tokens store nothing (slot -1)
    and belong to no sequence (they sit past cu_seqlens[-1]; every later sequence is empty), so a graph
    captured once per bucket serves any batch that fits."""
    import numpy as np

    ids = np.zeros(bucket, dtype=np.int64)
    pos = np.zeros(bucket, dtype=np.int64)
    slots = np.full(bucket, -1, dtype=np.int64)
    cu = np.zeros(max_seqs + 1, dtype=np.int32)
    rows = np.zeros(max_seqs, dtype=np.int64)
    t, sampled = 0, 0
    for i, (r, n) in enumerate(chunks):
        start, end = r.prefilled, r.prefilled + n
        p = np.arange(start, end)
        ids[t:t + n] = r.token_ids[start:end]
        pos[t:t + n] = p
        slots[t:t + n] = np.asarray(r.blocks, dtype=np.int64)[p // block_size] * block_size + p % block_size
        t += n
        cu[i + 1] = t
        if end == r.prefill_target:
            rows[sampled] = t - 1
            sampled += 1
    cu[len(chunks) + 1:] = t
    return ids, pos, slots, cu, rows, sampled


class PrefillGraphs:
    """Prefill CUDA graphs, one per token bucket (PREFILL_BUCKETS up to the prefill budget) and kind: plain
    (no cached prefix: torch's varlen flash attention over the new tokens) and paged (some sequence
    continues a cached prefix, chunked prefill or recompute: every key read from the paged cache by the
    Triton paged-prefill kernel, whose launch shape is fixed by a host-built work list). Why: an eager
    prefill costs ~25-30 ms of host time on our H200 node whatever its length (28 layers of small ops),
    which makes GPU0 host-bound and, with both GPUs in one process, slows GPU1's launches. On by default
    (EngineConfig.prefill_graphs): on 2x H200, Azure conv x8, pd's TTFT p50 went from 70 to 14 ms and its
    TPOT mean from 4.25 to 4.1 ms. The paged kind serves the colocated `single` policy, whose 2,048-token
    mixed budget splits long prompts: 2,048 tokens after a 2,048-token prefix took 35.5 ms eager and 18.6 ms
    graphed on H200 (isolated, real.profile; two machines)."""

    def __init__(self, model, max_tokens: int, max_seqs: int, block_size: int, hidden_size: int, dtype,
                 device: torch.device, max_blocks_per_seq: int = 0, paged: bool = False):
        self.model, self.max_seqs, self.block_size, self.device = model, max_seqs, block_size, device
        self.buckets = [b for b in PREFILL_BUCKETS if b <= max_tokens]
        self.graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}
        self.paged = paged and max_blocks_per_seq > 0
        self.table_width = max_blocks_per_seq
        top = self.buckets[-1] if self.buckets else 0
        self.tokens = torch.zeros((3, top), dtype=torch.int64, device=device)  # ids, positions, slots
        self.cu = torch.zeros(max_seqs + 1, dtype=torch.int32, device=device)
        self.rows = torch.zeros(max_seqs, dtype=torch.int64, device=device)
        self.out = torch.zeros((max_seqs, hidden_size), dtype=dtype, device=device)
        pin = device.type == "cuda"
        self.host = dict(tokens=torch.zeros((3, top), dtype=torch.int64, pin_memory=pin),
                         cu=torch.zeros(max_seqs + 1, dtype=torch.int32, pin_memory=pin),
                         rows=torch.zeros(max_seqs, dtype=torch.int64, pin_memory=pin))
        if self.paged:  # the paged kind's block tables, context lengths and work list
            width, num_tiles = max_blocks_per_seq, max_prefill_tiles(top, max_seqs)
            self.tables = torch.full((max_seqs, width), -1, dtype=torch.int32, device=device)
            self.context_lens = torch.zeros(max_seqs, dtype=torch.int32, device=device)
            self.tiles = torch.full((2, num_tiles), -1, dtype=torch.int32, device=device)
            self.host.update(tables=torch.full((max_seqs, width), -1, dtype=torch.int32, pin_memory=pin),
                             context_lens=torch.zeros(max_seqs, dtype=torch.int32, pin_memory=pin),
                             tiles=torch.full((2, num_tiles), -1, dtype=torch.int32, pin_memory=pin))
        self.capture_stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def _meta(self, bucket: int, paged: bool) -> AttnMetadata:
        if not paged:
            return AttnMetadata(is_prefill=True, slot_mapping=self.tokens[2, :bucket], cu_seqlens_q=self.cu,
                                cu_seqlens_k=self.cu, max_seqlen_q=bucket, max_seqlen_k=bucket)
        return AttnMetadata(is_prefill=True, slot_mapping=self.tokens[2, :bucket], cu_seqlens_q=self.cu,
                            max_seqlen_q=bucket, has_prefix=True, block_tables=self.tables,
                            context_lens=self.context_lens,
                            prefill_tiles=self.tiles[:, :max_prefill_tiles(bucket, self.max_seqs)])

    def _forward(self, bucket: int, paged: bool) -> None:
        h = self.model(self.tokens[0, :bucket], self.tokens[1, :bucket], self._meta(bucket, paged))
        self.out.copy_(h[self.rows])

    def capture(self) -> None:
        """Largest bucket first into one pool, with the compiled elementwise fusions (as the decode graphs):
        captured without them, buckets under Fused.eager_min_tokens (4,096) replayed every norm and RoPE as
        a dozen small kernels a layer, and the profiles read 14.3 ms for 2 x 1,024 tokens in the 2,048 bucket
        against 14.6 ms for 4 x 1,024 in the compiled 4,096 one (H200)."""
        pool = None
        self.tokens[2].fill_(-1)
        with compiled_fusions():
            for paged in (False, True) if self.paged else (False,):
                for bucket in reversed(self.buckets):
                    self.graphs[bucket, paged] = capture_graph(lambda: self._forward(bucket, paged), pool,
                                                               self.capture_stream)
                    pool = pool or self.graphs[bucket, paged].pool()

    def fits(self, chunks) -> tuple[int, bool] | None:
        """The (bucket, paged) graph this batch replays in, or None (too many sequences or tokens, or a
        cached prefix without the paged kind)."""
        if len(chunks) > self.max_seqs:
            return None
        paged = any(r.prefilled for r, _ in chunks)
        if paged and any(len(r.blocks) > self.table_width for r, _ in chunks):
            return None  # longer than the engine's max_model_len (a profiler's test batch): eager
        total = sum(n for _, n in chunks)
        return next(((b, paged) for b in self.buckets if b >= total and (b, paged) in self.graphs), None)

    def run(self, chunks, key: tuple[int, bool]) -> torch.Tensor:
        """Final hidden states of the sampled rows [num_sampled, hidden] (inputs staged through pinned memory)."""
        bucket, paged = key
        ids, pos, slots, cu, rows, sampled = padded_prefill(chunks, bucket, self.max_seqs, self.block_size)
        host = self.host
        host["tokens"][0, :bucket].numpy()[:] = ids
        host["tokens"][1, :bucket].numpy()[:] = pos
        host["tokens"][2, :bucket].numpy()[:] = slots
        host["cu"].numpy()[:] = cu
        host["rows"].numpy()[:] = rows
        self.tokens[:, :bucket].copy_(host["tokens"][:, :bucket], non_blocking=True)
        self.cu.copy_(host["cu"], non_blocking=True)
        self.rows.copy_(host["rows"], non_blocking=True)
        if paged:
            self._stage_paged(chunks, bucket)
        self.graphs[key].replay()
        return self.out[:sampled]

    def _stage_paged(self, chunks, bucket: int) -> None:
        """Block tables, context lengths and the kernel's work list for the paged kind. Rows past the
        batch keep stale tables: no program reads them (their context length is 0, no tile names them)."""
        n = len(chunks)
        host = self.host
        tables, lens = host["tables"].numpy(), host["context_lens"].numpy()
        lens[:] = 0
        for i, (r, c) in enumerate(chunks):
            tables[i, :len(r.blocks)] = r.blocks
            tables[i, len(r.blocks):] = -1
            lens[i] = r.prefilled + c
        num_tiles = max_prefill_tiles(bucket, self.max_seqs)
        host["tiles"][:, :num_tiles].numpy()[:] = prefill_tiles([c for _, c in chunks], num_tiles)
        self.tables[:n].copy_(host["tables"][:n], non_blocking=True)
        self.context_lens.copy_(host["context_lens"], non_blocking=True)
        self.tiles.copy_(host["tiles"], non_blocking=True)
