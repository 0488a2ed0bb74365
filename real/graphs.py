"""Decode CUDA graphs: one per batch-size bucket, captured largest first into one memory pool
(nano-vllm), replayed with the smallest bucket that fits. Inputs go through one pinned host staging
area and three async copies, so a step costs no host sync and few launches before the replay.

The GPU1 pipeline gets graphs of its own, one per (SM split, bucket): the whole ping-pong step
(micro-batch halves of the bucket, attention on the split's attention green stream, FFN on its FFN
stream, joined by events) captured as ONE graph. A graph keeps the partition each kernel was captured
on (../shared/notes/hardware-facts.md), so the replay runs each stage on its own SMs, with no
per-layer launches from Python: eager, a 28-layer two-micro-batch step is ~1,000 launches."""
from __future__ import annotations

import torch

from .context import AttnMetadata

GRAPH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)


class DecodeGraphs:
    def __init__(self, model, max_batch: int, max_blocks_per_seq: int, hidden_size: int, dtype: torch.dtype,
                 device: torch.device):
        self.model = model
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

    def _meta(self, bs: int) -> AttnMetadata:
        s = self.static
        return AttnMetadata(is_prefill=False, slot_mapping=s["slot_mapping"][:bs], block_tables=s["block_tables"][:bs],
                            context_lens=s["context_lens"][:bs])

    def capture(self) -> None:
        from .model import Fused

        Fused.in_graph = True  # compiled elementwise fusions inside graphs only
        try:
            self._capture()
        finally:
            Fused.in_graph = False

    def _capture(self) -> None:
        s, pool = self.static, None
        for bs in reversed([b for b in GRAPH_BUCKETS if b <= self.max_batch]):
            meta = self._meta(bs)
            s["hidden"][:bs] = self.model(s["input_ids"][:bs], s["positions"][:bs], meta)  # warm up
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool, stream=self.capture_stream):
                s["hidden"][:bs] = self.model(s["input_ids"][:bs], s["positions"][:bs], meta)
            pool = pool or graph.pool()
            self.graphs[bs] = graph
            torch.cuda.synchronize()
        self.pool = pool

    def capture_pipeline(self, partitions, splits, microbatches: int = 2, min_batch: int = 2) -> None:
        """One graph per (split, bucket >= min_batch): the pipelined step on the split's green streams."""
        from .model import Fused

        Fused.in_graph = True
        try:
            self._capture_pipeline(partitions, splits, microbatches, min_batch)
        finally:
            Fused.in_graph = False

    def _capture_pipeline(self, partitions, splits, microbatches: int, min_batch: int) -> None:
        from .pipeline import pipelined_decode

        s = self.static
        for split in splits:
            attn_stream, ffn_stream = partitions.get(split)
            for bs in reversed([b for b in GRAPH_BUCKETS if min_batch <= b <= self.max_batch]):
                bounds = [bs * i // microbatches for i in range(microbatches + 1)]
                micro = [(s["input_ids"][a:b], s["positions"][a:b], self._meta_rows(a, b))
                         for a, b in zip(bounds, bounds[1:]) if b > a]
                pipelined_decode(self.model, micro, attn_stream, ffn_stream)  # warm up
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, self.pool, stream=self.capture_stream):
                    outs = pipelined_decode(self.model, micro, attn_stream, ffn_stream)
                    s["hidden"][:bs] = torch.cat(outs)
                self.pool = self.pool or graph.pool()
                self.pipeline_graphs[(split, bs)] = graph
                torch.cuda.synchronize()

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
