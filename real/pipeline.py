"""The attention/FFN decode pipeline on GPU1: micro-batches ping-pong between two SM partitions.

Per layer, attention of micro-batch i runs on the attention partition's stream while the FFN of
micro-batch i-1 runs on the FFN partition's stream; CUDA events order attention(i, l) -> FFN(i, l)
-> attention(i, l+1). Every layer finishes attention before its FFN for each micro-batch, so the
math is exactly the sequential step's (the prototype this replaces ran all attention layers first).
On CPU, or without partitions, the streams are None and the same order runs sequentially.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch

from .attention import SmBudget
from .context import AttnMetadata


class PartitionKernels:
    """How kernels launched on a partition size their grids (class-wide switches, read while a stage is
    launched or captured; bench/pipeline_diag.py A/Bs them). `attention_splits`: the paged-decode kernel picks
    its context splits for the partition's SMs instead of the whole GPU's. With uniform 1k contexts that sped
    the pipelined step up at qwen3-0.6b batch 64 (4.49 -> 4.20 ms, H200) and changed nothing at larger batches;
    but fewer splits make a long sequence's programs stream more of its context alone (the decode tail), and
    serving mixes contexts: with 1 in 8 sequences at 8k tokens and the rest at 1k the best pipelined step took
    5.6 / 9.8 / 17.7 ms against 4.5 / 7.1 / 11.9 ms at batch 16 / 32 / 64 (H100,
    bench/results/pipeline_mixed_contexts_NVIDIA_H100_80GB_HBM3.json). Off. `gemm_carveout`: matmuls are told to
    leave the other partition's SMs out
    (torch's experimental SM carveout): off, as it changed nothing measurable through torch 2.11's cuBLAS
    path and, with cuBLASLt preferred, moved steps -8..+3%."""
    attention_splits = False
    gemm_carveout = False


@contextmanager
def on_partition(stream, sms: int | None, total_sms: int | None):
    """Launch on `stream` (a partition of `sms` of the GPU's `total_sms` SMs) with kernels sized for it
    as PartitionKernels says; without a stream (CPU, no partitions) nothing changes."""
    if stream is None:
        yield
        return
    budget, carveout = SmBudget.sms, None
    with torch.cuda.stream(stream):
        if PartitionKernels.attention_splits and sms:
            SmBudget.sms = sms
        if PartitionKernels.gemm_carveout and sms and total_sms:
            carveout = torch._C._get_sm_carveout_experimental()
            torch._C._set_sm_carveout_experimental(total_sms - sms)
        try:
            yield
        finally:
            SmBudget.sms = budget
            if PartitionKernels.gemm_carveout and sms and total_sms:
                torch._C._set_sm_carveout_experimental(carveout)


class StageTimer:
    """Attention and FFN busy time of one pipelined step (CUDA events; wall clock on CPU)."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.marks: list[tuple[str, object, object]] = []

    def start(self, stage: str):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return stage, e
        import time

        return stage, time.perf_counter()

    def stop(self, token) -> None:
        stage, begin = token
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.marks.append((stage, begin, e))
        else:
            import time

            self.marks.append((stage, begin, time.perf_counter()))

    def totals(self) -> tuple[float, float]:
        """(attention seconds, FFN seconds); waits for the events."""
        out = {"attn": 0.0, "ffn": 0.0}
        for stage, begin, end in self.marks:
            out[stage] += begin.elapsed_time(end) / 1e3 if self.cuda else end - begin
        return out["attn"], out["ffn"]


def pipelined_decode(model, micro: list[tuple[torch.Tensor, torch.Tensor, AttnMetadata]],
                     attn_stream=None, ffn_stream=None, timer: StageTimer | None = None,
                     split: tuple[int, int] | None = None) -> list[torch.Tensor]:
    """micro: (input_ids, positions, meta) per micro-batch -> final-normed hidden states per micro-batch.
    `split`: the partitions' SM counts (attention, FFN), for kernels sized to them (PartitionKernels)."""
    use_streams = attn_stream is not None and ffn_stream is not None
    attn_sms, ffn_sms = split if split else (None, None)
    total = sum(split) if split else None
    on = (lambda s, n: on_partition(s, n, total)) if use_streams else (lambda s, n: nullcontext())
    hidden = [model.embed_tokens(ids) for ids, _, _ in micro]
    residual: list[torch.Tensor | None] = [None] * len(micro)
    ffn_done: list = [None] * len(micro)
    if use_streams:
        ready = torch.cuda.Event()
        ready.record()
        attn_stream.wait_event(ready)
        ffn_stream.wait_event(ready)
    for layer in model.layers:
        for i, (_, pos, meta) in enumerate(micro):
            with on(attn_stream, attn_sms):
                if ffn_done[i] is not None:
                    attn_stream.wait_event(ffn_done[i])
                t = timer.start("attn") if timer else None
                hidden[i], residual[i] = layer.attention_half(pos, hidden[i], residual[i], meta)
                if timer:
                    timer.stop(t)
                attn_done = None
                if use_streams:  # the FFN stream reads these: keep the allocator from reusing them early
                    hidden[i].record_stream(ffn_stream)
                    residual[i].record_stream(ffn_stream)
                    attn_done = record_event()
            with on(ffn_stream, ffn_sms):
                if attn_done is not None:
                    ffn_stream.wait_event(attn_done)
                t = timer.start("ffn") if timer else None
                hidden[i], residual[i] = layer.ffn_half(hidden[i], residual[i])
                if timer:
                    timer.stop(t)
                if use_streams:
                    hidden[i].record_stream(attn_stream)
                    residual[i].record_stream(attn_stream)
                    ffn_done[i] = record_event()
    outs = []
    for i in range(len(micro)):
        with on(ffn_stream, ffn_sms):
            out, _ = model.norm(hidden[i], residual[i])
            outs.append(out)
    if use_streams:
        torch.cuda.current_stream().wait_stream(ffn_stream)
        torch.cuda.current_stream().wait_stream(attn_stream)
    return outs


def record_event() -> torch.cuda.Event:
    """An event recorded on the current stream (what another stream waits on)."""
    e = torch.cuda.Event()
    e.record()
    return e
