"""python -m real.profile: measure, on the node it runs on, the stage costs the simulator needs.

Writes traces/profiles/<hardware>-<model>.csv (+ .json metadata) in the schema of traces/profile.py,
read by the sim's calibrated cost model (`python -m sim.run --profile FILE`, or picked up by default):
  prefill    one whole forward (LM head + sampling included) vs new tokens, sequences and cached prefix
  decode     one whole decode step (CUDA graph, LM head, sampling, input staging) vs batch and context
  pipeline   the same step pipelined over 2 micro-batches on each attention:FFN SM split (graphs)
  attn, ffn  ONE layer's attention half / FFN half vs batch, on the whole GPU and on each partition
  pair       one layer: attention on the split's attention SMs || FFN on its FFN SMs (the contention)
  transfer   one request's KV through the engine's GPU0 -> GPU1 transport vs bytes (needs 2 GPUs)
  decode_copy  what one request's KV copy into the decode GPU adds to the decode steps it overlaps (2 GPUs)
  mixed      a colocated step (single, dp): a prefill chunk beside a decode batch, one forward step
  decode_prefill_gpu  a few decode rows on the prefill GPU, when the decode side is timed on another one
  host       CPU time to stage and launch one decode step vs batch (what the GPU must hide)
  decode_program  ONE layer's decode-attention kernel, unsplit, one program per SM at most, vs context
             (one program's rate: the decode tail of batches mixing short and long contexts)
  decode_tail  what mixed contexts add to a whole step over uniform ones, sequential and on each split
Every time is the median of --reps runs after a warm-up, synchronised, in wall-clock seconds.
Prefill rows are timed on the prefill GPU (--device-id, 0) and every other row on the decode GPU (GPU1 when
two are visible), where the engine runs them: two GPUs of one node can differ by more than the simulator's
error bar (bench/gpu_ab.py).
With two GPUs it then times steps inside the engine's body (real/engine_profile.py; --no-engine skips):
  engine_decode, engine_prefill            a step under LLMEngine (pd), launch to next launch, other GPU idle
  engine_decode_busy, engine_prefill_busy  the same while the other GPU's launch thread works
  engine_decode_single                     decode steps under LLMEngine (single) on GPU0 (any GPU count)
  engine_prefill_single                    prefills alone under LLMEngine (single) on GPU0
which the simulator adds to its steps as the engine's overhead (sim/overhead.py).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
BATCHES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 512)
# --quick: every other batch, plus the decode graph buckets (real/graphs.py) where served decode batches gather:
# 32, 96 and 128 (Azure conv x8 on 2x H200: 7,200 of pd's 9,750 GPU1 steps at 33-128 sequences; with knots at
# 16, 64 and 256 only, the simulator charged pipelined steps of 64-96 sequences 11% short, session 14) and 160 and
# 192: a step of 129-191 sequences replays the 160- or 192-sequence graph, and between knots 128 and 256 the
# simulator charged the pipelined ones 0.95-0.98x in all six pipeline runs of sessions 15 and 16; timed there (1x
# H200, bench/results/profile_knots160_NVIDIA_H200.*) the 64:68 split's step at 160 ran 7-9% over the line from
# 128 to 256, and with them the three session 16 runs read 0.99-1.01x (bench/model_at_shape.py,
# bench/results/model_at_shape_NVIDIA_H200_session16_knots160.json). 24 and 48: a pipelined step of 33-48 sequences
# replays the 48 graph, two micro-batches of 24 rows; read off the line from 32 to 64 the model charged uniform
# pipelined replays at 40-48 sequences 1.03-1.34x, where the sequential step read 1.09-1.21x (session 19, 1x H200,
# bench/results/pipeline_tail_placed_*_NVIDIA_H200.json); bench/step_between_buckets.py reads steps between buckets.
# 224: a step of 193-224 sequences replays the 224 graph, read off the line from 192 to 256 without it; the
# pipeline's conv x8 run of session 24 (2x H200) spent 734 of its 5,413 GPU1 steps there, modelled 0.93x (its
# 129-191 steps, with the 160/192 knots, 0.95-0.98x; bench/fidelity_diagnose.py's decode_model_over_real by batch).
QUICK_BATCHES = (1, 4, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 512)
CONTEXTS = (128, 512, 1024, 2048, 4096)
PREFILL_SINGLE = (32, 128, 512, 1024, 2048, 4096, 8192)
PREFILL_PACKED = (2, 4, 8, 16)  # sequences of 1024 tokens
TRANSFER_TOKENS = (128, 512, 2048, 8192, 16384)
MIXED_CHUNKS, MIXED_DECODES, MIXED_CONTEXT = (512, 2048), (4, 16, 64), 1024  # colocated steps: chunk x decodes
# decode rows also timed on the prefill GPU (context 1024): GPU0's decode speed for single and dp, a line in batch
# between them. Session 16's single steps were modelled 1.01-1.06x at every batch bin up to 128 sequences, knot
# (16, 64) or not (bench/results/model_at_shape_NVIDIA_H200_session16_knots160.json): more knots show whether the
# ratio bends between them or the whole level is off
PREFILL_GPU_DECODES = (16, 32, 64, 128, 192, 256)
# pipelined rows also at these batches (the decode grid's other rows need not be there): the held-out workload's
# pipelined steps are mostly of 2-17 sequences, below the smallest pipelined row (16), where the simulator read them
# as that row's ratio to the sequential step. Session 20 (2x H200): one machine's were modelled 0.92-0.96x at every
# batch bin (its sequential ones 1.00), another's 1.00-1.03x with these rows or without; in the default profile
# (with the 24/48 knots) adaptive's held-out TPOT error reads +0.9..+5.6% over five machines' runs, +8.3..+13.4%
# without these rows, +7.7..+12.8% before both (bench/results/profile_knots*_NVIDIA_H200_session20.json)
PIPELINE_SMALL_BATCHES = (2, 4, 8)
# decode_tail rows: tail_mix_contexts(batch, long) for each long context (the tail's scale falls with the excess).
# 192 and 256 too: pipeline's conv steps of 129-224 sequences (session 24, 2x H200) ran 0.5-1.5 ms over the isolated
# step + the tail scaled as the 128 rows say (held flat past them). On three 1x H200 (session 26) the pipelined (64:68)
# tail over the sequential one reads 0.93-1.04 at 192-256 x 4k tokens of excess and 1.03-1.35 at 7k, where 128 reads
# 0.85-1.02 and 0.96-0.98; grafted into the default, pipeline's conv TPOT error fell 1.5-1.7 points on all six H200 run sets
# (bench/results/profile_tail_rows_192_256_NVIDIA_H200_session26.json)
TAIL_BATCHES, TAIL_LONGS = (8, 16, 32, 64, 128, 192, 256), (3072, 5120, 8192)


def hardware_preset(gpu_name: str) -> str:
    for key, preset in (("H100", "h100x2"), ("H200", "h200x2")):
        if key in gpu_name:
            return preset
    return gpu_name.replace(" ", "_").lower()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_s(fn, device: torch.device, reps: int) -> float:
    fn()
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def graphed_s(fn, device: torch.device, reps: int, inner: int = 8) -> float:
    """Seconds per call of `fn` replayed from a CUDA graph of `inner` back-to-back calls (NaN if the
    capture fails: the caller reports the point as not measured)."""
    stream = torch.cuda.Stream(device)
    try:
        fn()
        _sync(device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(inner):
                fn()
    except RuntimeError:
        _sync(device)
        return float("nan")
    return median_s(graph.replay, device, reps) / inner


DECODE_PROGRAM_CONTEXTS = (1024, 4096)


def decode_program_rows(num_heads: int, kv_heads: int, head_dim: int, device: torch.device, sms: int, reps: int,
                        kernel=None, time_fn=None, block_size: int = 16) -> list[dict]:
    """decode_program rows: ONE layer's paged-decode kernel, unsplit, over sms // kv_heads sequences of each
    context in DECODE_PROGRAM_CONTEXTS, so each (sequence, kv head) program has an SM to itself and streams
    its context at one program's rate. The simulator reads the slope over context as the time one program
    takes per token: the decode tail, where the longest sequence of a mixed batch runs on alone
    (sim/calibrated.py). `kernel(q, k, v, block_tables, context_lens)` and `time_fn(fn, device, reps)`
    default to the engine's Triton kernel timed in a CUDA graph."""
    from real.testing import decode_batch, scattered_block_tables

    if kernel is None:
        from real.attention import decode_kernel_config
        from real.triton_kernels import paged_decode_triton

        block_n, warps, stages = decode_kernel_config()  # the engine's tile
        kernel = lambda q, k, v, t, lens: paged_decode_triton(  # noqa: E731
            q, k, v, t, lens, head_dim ** -0.5, block_n=block_n, num_splits=1, num_warps=warps, num_stages=stages)
    time_fn = time_fn or graphed_s
    n = max(1, sms // kv_heads)
    rows = []
    for context in DECODE_PROGRAM_CONTEXTS:
        lens = [context] * n
        blocks = sum(-(-c // block_size) for c in lens) + 8
        tables = scattered_block_tables(lens, block_size, blocks)
        k = torch.randn(blocks, block_size, kv_heads, head_dim, dtype=torch.bfloat16, device=device)
        v = torch.randn_like(k)
        q = torch.randn(n, num_heads, head_dim, dtype=torch.bfloat16, device=device)
        meta, _ = decode_batch(lens, tables, block_size, device=device)
        seconds = time_fn(lambda: kernel(q, k, v, meta.block_tables, meta.context_lens), device, reps)
        if seconds == seconds and seconds > 0:  # NaN: the capture failed, the point is not measured
            rows.append(dict(op="decode_program", batch=n, tokens=n, context=context, attn_sms=0, ffn_sms=0,
                             microbatches=1, bytes=2 * n * context * kv_heads * head_dim * 2, seconds=seconds))
    return rows


COPY_BATCHES = (16, 64, 256)  # decode batches (1,024-token contexts) a KV copy is timed beside
COPY_TOKENS = (1024, 4096)  # the copied request's tokens


@torch.inference_mode()
def decode_tail_rows(runner, device: torch.device, reps: int, splits, max_batch: int,
                     batches=TAIL_BATCHES, longs=TAIL_LONGS, short: int = 1024) -> list[dict]:
    """decode_tail rows: what tail_mix_contexts (every 8th sequence `long` tokens, the rest 1,024) add to the
    whole step over uniform contexts of the same mean (the same KV read), sequential and pipelined on each
    split (2 micro-batches; the runner's pipeline enabled), each the difference of two medians of `reps`
    steps. Why: the simulator models the tail as one program streaming the longest context's excess alone
    after the others finish (decode_program rows), per micro-batch; on one H200
    (bench/results/pipeline_tail_ab_longs_NVIDIA_H200.json) the sequential tail read 0.83-1.11 of that and the
    pipelined one 0.64-1.18 (batch 16-128), falling as the excess grows. The simulator scales a
    pipelined step's tail by the pipelined rows' measured/modelled over the sequential rows' (sim/calibrated.py
    decode_tail_scale). Session 18's profile timed them at 5 reps: one sequential row read 1.23 where graph
    replays gave 0.96; hence the caller's reps x 4."""
    from real.testing import fake_decode_batch
    from traces.profile import tail_mix_contexts

    rows = []
    for long in longs:
        for b in batches:
            mixed = tail_mix_contexts(b, long, short)
            if b > max_batch or sum(mixed) // runner.block_size + 2 * b > runner.num_blocks:
                continue
            uniform = fake_decode_batch(runner, b, round(sum(mixed) / b))
            mix = fake_decode_batch(runner, b, mixed)
            for split in [None] + list(splits):
                extra = () if split is None else (split, 2)
                t_uniform = median_s(lambda: runner.run(uniform, {}, *extra), device, reps)
                t_mixed = median_s(lambda: runner.run(mix, {}, *extra), device, reps)
                a, f = split or (0, 0)
                rows.append(dict(op="decode_tail", batch=b, tokens=b, context=long, attn_sms=a, ffn_sms=f,
                                 microbatches=1 if split is None else 2, bytes=0, seconds=t_mixed - t_uniform))
    return rows


@torch.inference_mode()
def copy_beside_decode_rows(runner, src_cache: torch.Tensor, mode: str, reps: int, batches=COPY_BATCHES,
                            tokens=COPY_TOKENS, context: int = 1024, min_steps: int = 4) -> tuple[list[dict], str]:
    """decode_copy rows: the time one request's KV copy INTO this runner's cache adds to the decode steps it
    overlaps, here where the engine runs them (the pull transport's kernel runs on the decode GPU, beside its
    steps; the copy transport's scatter too). The 2x H100 and 2x H200 fidelity runs' decode steps that a
    pull overlapped ran 3-4.5% above the model, which the isolated decode rows cannot show.
    Per (batch, tokens): n back-to-back decode steps (n covers the copy's own time at least `min_steps`
    times) with and without one copy started just before the first, in alternating pairs; `seconds` is the
    median of the pairs' differences (noise can make it slightly negative), `bytes` the copy's size.
    src_cache: a cache of the runner's layout on the other GPU (the prefill side). Returns the rows and the
    transport's mode ("auto" resolved)."""
    from policies.request import Request
    from real.testing import fake_decode_batch
    from real.transfer import BlockCopyTransport

    device = runner.kv_cache.device
    transport = BlockCopyTransport(src_cache, runner.kv_cache, mode=mode)
    top = runner.kv_cache.shape[2]  # the copies land in the cache's last blocks, away from the decode batch's
    sync = lambda: [torch.cuda.synchronize(d) for d in {device, src_cache.device} if d.type == "cuda"]  # noqa: E731
    rows = []
    for n_tokens in tokens:
        n_blocks = -(-n_tokens // runner.block_size)
        req = Request(0, 0.0, n_tokens, 1)
        req.blocks = list(range(n_blocks))
        req.dst_blocks = list(range(top - n_blocks, top))

        def copy():
            transport.start(req)
            while not transport.poll():
                pass
        copy_s = median_s(copy, device, reps)
        for b in batches:
            if b * (context // runner.block_size + 1) > top - n_blocks:
                continue
            batch = fake_decode_batch(runner, b, context)
            step_s = median_s(lambda: runner.run(batch, {}), device, reps)
            n = max(min_steps, math.ceil(min_steps * copy_s / max(step_s, 1e-9)))

            def steps(with_copy: bool) -> float:
                sync()
                t0 = time.perf_counter()
                if with_copy:
                    transport.start(req)
                for _ in range(n):
                    runner.run(batch, {})
                while with_copy and not transport.poll():
                    pass
                return time.perf_counter() - t0
            steps(True), steps(False)  # warm-up
            diffs = []
            for i in range(max(3, 3 * reps)):  # alternate which runs first: a drift cancels
                if i % 2 == 0:
                    with_s = steps(True)
                    without_s = steps(False)
                else:
                    without_s = steps(False)
                    with_s = steps(True)
                diffs.append(with_s - without_s)
            rows.append(dict(op="decode_copy", batch=b, tokens=n_tokens, context=context, attn_sms=0, ffn_sms=0,
                             microbatches=1, bytes=len(req.blocks) * transport.block_bytes,
                             seconds=statistics.median(diffs)))
    return rows, transport.mode


def prefill_batch(runner, lens: list[int], prefix: int = 0):
    """A prefill Batch of sequences with `lens` new tokens after `prefix` cached ones, on disjoint blocks."""
    from policies.request import Request
    from policies.scheduler import Batch

    bs, rng, chunks, first = runner.block_size, np.random.default_rng(0), [], 0
    for i, n in enumerate(lens):
        r = Request(i, 0.0, prefix + n, 1)
        per = -(-(prefix + n) // bs)
        r.blocks = list(range(first, first + per))
        first += per
        r.prefilled, r.prefill_target = prefix, prefix + n
        r.token_ids = rng.integers(0, runner.model_cfg.vocab_size, prefix + n).tolist()
        chunks.append((r, n))
    return Batch("gpu0", prefill=chunks)


class LayerBench:
    """One decoder layer's attention half, FFN half, and the two concurrently on a split (facts-file method)."""

    def __init__(self, runner, batch: int, context: int):
        from real.context import AttnMetadata
        from real.testing import fake_decode_batch

        self.runner, self.layer = runner, runner.model.layers[0]
        ids, pos, slots, lens, table = runner.prepare_decode(fake_decode_batch(runner, batch, context).decode)
        self.meta = AttnMetadata(is_prefill=False, slot_mapping=runner._tensor(slots, torch.int64),
                                 block_tables=runner._tensor(table, torch.int32),
                                 context_lens=runner._tensor(lens, torch.int32))
        self.pos = runner._tensor(pos, torch.int64)
        self.h = runner.model.embed_tokens(runner._tensor(ids, torch.int64))
        self.res = torch.zeros_like(self.h)

    def attn(self):
        return self.layer.attention_half(self.pos, self.h, self.res, self.meta)

    def ffn(self):
        return self.layer.ffn_half(self.h, self.res)

    def seq(self):
        a, r = self.attn()
        self.layer.ffn_half(a, r)

    def on(self, stream, fn):
        """fn on `stream` (a partition), ordered after and joined back to the current stream."""
        def run():
            start = torch.cuda.Event()
            start.record()
            stream.wait_event(start)
            with torch.cuda.stream(stream):
                fn()
            torch.cuda.current_stream().wait_stream(stream)
        return run

    def pair(self, attn_stream, ffn_stream):
        def run():
            start = torch.cuda.Event()
            start.record()
            attn_stream.wait_event(start)
            ffn_stream.wait_event(start)
            with torch.cuda.stream(attn_stream):
                self.attn()
            with torch.cuda.stream(ffn_stream):
                self.ffn()
            torch.cuda.current_stream().wait_stream(attn_stream)
            torch.cuda.current_stream().wait_stream(ffn_stream)
        return run


def mixed_batch(runner, chunk: int, decodes: int, context: int):
    """A colocated step's Batch: `decodes` sequences of `context` cached tokens (fake_decode_batch's blocks) and
    one prefill chunk of `chunk` new tokens, no cached prefix, on the blocks after theirs."""
    from real.testing import fake_decode_batch

    batch = fake_decode_batch(runner, decodes, context)
    (req, n), = prefill_batch(runner, [chunk]).prefill
    req.request_id = 10**6  # apart from the decodes' ids 0..decodes-1
    offset = max(b for r in batch.decode for b in r.blocks) + 1
    req.blocks = [b + offset for b in req.blocks]
    batch.prefill = [(req, n)]
    return batch


def profile_runner(model: str, device: torch.device, max_batch: int, max_context: int, token_budget: int):
    """The ModelRunner every runner-level row is timed on (the engine's defaults, a cache of token_budget)."""
    from policies.specs import model_spec
    from real.config import EngineConfig
    from real.model_config import ModelConfig
    from real.runner import ModelRunner

    cfg = EngineConfig(model=model, device=device.type, seed=0, max_num_seqs=max_batch,  # + the prefix prefill rows:
                       max_model_len=max(max_context, 8192) + 64,
                       num_kv_blocks=token_budget // 16 + 2048, max_num_batched_tokens=16384)
    with torch.inference_mode():
        return ModelRunner(cfg, ModelConfig.from_spec(model_spec(model)), device, None)


def profile(model: str, device_id: int, reps: int, split_step: int, token_budget: int, quick: bool,
            log=print, eager_rows: list | None = None, decode_device_id: int | None = None) -> tuple[list[dict], dict]:
    """The profile rows and metadata. `eager_rows`, if a list, also gets rows that are not part of the
    profile: the pipelined step run eagerly (op "pipeline_eager", graphs vs eager), and the per-layer
    ceiling measured inside CUDA graphs (ops "seq_graph", "pair_graph": no host launch time in either,
    like the pipelined step it is compared with)."""
    from real.config import EngineConfig
    from real.engine import hardware_of
    from real.green import GreenContextUnavailable, SmPartitions
    from real.testing import fake_decode_batch
    from real.transfer import BlockCopyTransport

    decode_device_id = device_id if decode_device_id is None else decode_device_id
    prefill_device = torch.device(f"cuda:{device_id}")
    device = torch.device(f"cuda:{decode_device_id}")  # every row but prefill: where the engine decodes
    batches = QUICK_BATCHES if quick else BATCHES
    contexts = (512, 1024, 2048, 4096) if quick else CONTEXTS  # 4096: long-prompt traces decode there (cheap rows)
    runner = profile_runner(model, prefill_device, max(batches), max(contexts), token_budget)
    rows: list[dict] = []

    def row(op, batch, tokens, context, seconds, attn_sms=0, ffn_sms=0, microbatches=1, nbytes=0):
        rows.append(dict(op=op, batch=batch, tokens=tokens, context=context, attn_sms=attn_sms, ffn_sms=ffn_sms,
                         microbatches=microbatches, bytes=nbytes, seconds=seconds))

    with torch.inference_mode(), torch.cuda.device(prefill_device):
        log(f"{model} on {torch.cuda.get_device_name(prefill_device)} (GPU{device_id}): prefill")
        for lens, prefix in ([[n] for n in PREFILL_SINGLE], 0), ([[1024] * k for k in PREFILL_PACKED], 0), \
                ([[2048]], 2048), ([[2048]], 6144):
            for ln in lens:
                if sum(ln) + prefix * len(ln) > token_budget:
                    continue
                b = prefill_batch(runner, ln, prefix)
                row("prefill", len(ln), sum(ln), prefix, median_s(lambda: runner.run(b, {}), prefill_device, reps))
        log("colocated steps: a prefill chunk beside a decode batch (single, dp)")
        for chunk in MIXED_CHUNKS:
            for decodes in MIXED_DECODES:
                if decodes * (MIXED_CONTEXT // 16 + 2) + chunk // 16 + 1 > runner.num_blocks:
                    continue
                b = mixed_batch(runner, chunk, decodes, MIXED_CONTEXT)
                row("mixed", decodes, chunk, MIXED_CONTEXT, median_s(lambda: runner.run(b, {}), prefill_device, reps))
        if decode_device_id != device_id:  # single and dp decode on this GPU too: its speed beside the decode GPU's
            log("decode steps on the prefill GPU (the two GPUs' speed ratio)")
            for b in PREFILL_GPU_DECODES:
                if b * (1024 // 16 + 1) <= runner.num_blocks:
                    batch = fake_decode_batch(runner, b, 1024)
                    row("decode_prefill_gpu", b, b, 1024, median_s(lambda: runner.run(batch, {}), prefill_device, reps))
    graphs = runner.prefill_graphs  # the prefill rows ran in these (a batch pays its token bucket's padded cost)
    prefill_graphs = dict(buckets=list(graphs.buckets), max_seqs=graphs.max_seqs, paged=graphs.paged) if graphs else None
    if device != prefill_device:
        runner.close()
        runner = profile_runner(model, device, max(batches), max(contexts), token_budget)
    fits = [(b, c) for b in batches for c in contexts if b * (c // 16 + 1) <= runner.num_blocks]
    with torch.inference_mode(), torch.cuda.device(device):  # streams and events made below: on the decode GPU
        if device != prefill_device:
            log(f"decode side on GPU{decode_device_id} (where pd, pipeline and adaptive decode)")
        log("decode (CUDA graphs) and host launch time")
        for b, c in fits:
            batch = fake_decode_batch(runner, b, c)
            row("decode", b, b, c, median_s(lambda: runner.run(batch, {}), device, reps))
            if c == 512 or (c == contexts[-1] and b * (c // 16 + 1) > runner.num_blocks // 2):
                host = []
                for _ in range(reps):
                    t0 = time.perf_counter()
                    pending = runner.launch(batch, {})
                    host.append(time.perf_counter() - t0)
                    runner.collect(pending)
                row("host", b, b, c, statistics.median(host))
        log("one decode-attention program's rate (the decode tail of mixed contexts)")
        mc = runner.model_cfg
        rows += decode_program_rows(mc.num_attention_heads, mc.num_key_value_heads, mc.head_dim, device,
                                    torch.cuda.get_device_properties(device).multi_processor_count, reps)
        hw = hardware_of(device, 2, split_step)
        try:
            parts = SmPartitions(device, hw.allowed_splits())
        except GreenContextUnavailable as e:
            log(f"green contexts unavailable ({e}): no pipeline, attn/ffn-per-partition or pair rows")
            parts = None
        log("one layer: attention and FFN halves, alone and as pairs on each split")
        for b in [b for b in batches if (b, 1024) in fits]:
            c = 1024
            lb = LayerBench(runner, b, c)
            row("attn", b, b, c, median_s(lb.attn, device, reps * 4), hw.sms)
            row("ffn", b, b, c, median_s(lb.ffn, device, reps * 4), 0, hw.sms)
            row("seq", b, b, c, median_s(lb.seq, device, reps * 4), hw.sms, hw.sms)
            if parts is None:
                continue
            for split in hw.allowed_splits():
                a_s, f_s = parts.get(split)
                row("attn", b, b, c, median_s(lb.on(a_s, lb.attn), device, reps * 2), split[0])
                row("ffn", b, b, c, median_s(lb.on(f_s, lb.ffn), device, reps * 2), 0, split[1])
                row("pair", b, b, c, median_s(lb.pair(a_s, f_s), device, reps * 2), *split)
                if eager_rows is not None:
                    eager_rows.append(dict(op="pair_graph", batch=b, context=c, attn_sms=split[0], ffn_sms=split[1],
                                           seconds=graphed_s(lb.pair(a_s, f_s), device, reps)))
            if eager_rows is not None:
                eager_rows.append(dict(op="seq_graph", batch=b, context=c, attn_sms=hw.sms, ffn_sms=hw.sms,
                                       seconds=graphed_s(lb.seq, device, reps)))
        if parts is not None:
            log(f"pipelined decode step (graphs) on {len(hw.allowed_splits())} splits")
            runner.enable_pipeline(parts, hw.allowed_splits(), 2)
            pipe_fits = sorted({(b, c) for b in PIPELINE_SMALL_BATCHES for c in contexts
                                if b * (c // 16 + 1) <= runner.num_blocks} | set(fits))
            for b, c in pipe_fits:  # 4,096-token contexts too, where they fit: the held-out workload decodes at 2-4k+
                # tokens, past 2,048, where the simulator scales the pipelined step by its ratio to the sequential
                # one at 2,048 (sim/calibrated.py _pipe_step_s)
                if b < 2 or c not in (512, 1024, 2048, 4096):
                    continue
                batch = fake_decode_batch(runner, b, c)
                for split in hw.allowed_splits():
                    row("pipeline", b, b, c, median_s(lambda: runner.run(batch, {}, split, 2), device, reps), *split, 2)
                    if eager_rows is not None and c == 1024:
                        graphs, runner.graphs.pipeline_graphs = runner.graphs.pipeline_graphs, {}
                        t = median_s(lambda: runner.run(batch, {}, split, 2), device, reps)
                        runner.graphs.pipeline_graphs = graphs
                        eager_rows.append(dict(op="pipeline_eager", batch=b, context=c, attn_sms=split[0],
                                               ffn_sms=split[1], seconds=t))
        log("the decode tail measured: mixed contexts against uniform ones of the same mean, sequential and "
            "pipelined on each split")
        rows += decode_tail_rows(runner, device, reps * 4, hw.allowed_splits() if parts is not None else [],
                                 max(batches))
        kv_transport = None
        if torch.cuda.device_count() > 1:
            log("KV transfer through the engine's transport")
            # the other end: the prefill GPU when the decode side is measured apart, else any other GPU
            other = prefill_device if prefill_device != device else torch.device(f"cuda:{1 if device_id == 0 else 0}")
            blocks = max(TRANSFER_TOKENS) // 16 + 1
            other_cache = torch.zeros((*runner.kv_cache.shape[:2], blocks, *runner.kv_cache.shape[3:]),
                                      dtype=runner.kv_cache.dtype, device=other)
            # the engine's direction, prefill GPU -> decode GPU (a profile on one GPU times the reverse one)
            src_cache, dst_cache = ((other_cache, runner.kv_cache) if other == prefill_device
                                    else (runner.kv_cache, other_cache))
            transport = BlockCopyTransport(src_cache, dst_cache, mode=EngineConfig().kv_transport)
            kv_transport = transport.mode
            from policies.request import Request

            for tokens in TRANSFER_TOKENS:
                r = Request(0, 0.0, tokens, 1)
                r.blocks = list(range(tokens // 16))
                r.dst_blocks = list(range(tokens // 16 + 1))

                def copy():
                    transport.start(r)
                    while not transport.poll():
                        pass
                row("transfer", 1, tokens, 0, median_s(copy, device, reps), nbytes=len(r.blocks) * transport.block_bytes)
            if kv_transport == "push":
                log("the push transport copies on GPU0 (beside prefills): no decode_copy rows")
            else:
                log("decode steps beside a KV copy into this GPU (what a copy adds to the steps it overlaps)")
                rows += copy_beside_decode_rows(runner, other_cache, EngineConfig().kv_transport, reps)[0]
    # the engine replays a decode step of n sequences in its smallest graph bucket >= n (padding rows attend over
    # nothing): the sim splits the decode tail by the padded batch, as the kernel does (sim/calibrated.py graph_batch)
    decode_graphs = dict(buckets=sorted(runner.graphs.graphs)) if runner.graphs is not None else None
    runner.close()
    name = torch.cuda.get_device_name(device)
    meta = dict(gpu=name, date=date.today().isoformat(), command=_command(),
                model=model, hardware=hardware_preset(name), torch=torch.__version__, sms=hw.sms,
                split_step_sms=hw.sm_granularity, reps=reps, kv_transport=kv_transport, prefill_graphs=prefill_graphs,
                decode_graphs=decode_graphs,
                devices=dict(prefill=device_id, decode=decode_device_id), gpu_state=gpu_state())
    return rows, meta


def gpu_state() -> list[dict] | None:
    """Each GPU's driver, clocks, power and temperature as nvidia-smi reads them (None without nvidia-smi).
    Why: profiles of one GPU model differ from machine to machine (2x H200: decode at the full 524,288-token
    cache took 17.0-17.8 ms in sessions 11-12 and 22.0-23.0 ms on both session 13 machines, where smaller
    shapes moved 4-15%), and the metadata should say what the machines were."""
    import subprocess

    fields = ("index", "name", "driver_version", "clocks.sm", "clocks.mem", "clocks.max.sm", "power.draw",
              "temperature.gpu", "clocks_throttle_reasons.active")
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return [dict(zip(fields, (v.strip() for v in line.split(",")))) for line in out.stdout.strip().splitlines()]


def measure_engine(model: str, quick: bool, meta: dict, spread: float = 0.5, policy: str = "pd") -> list[dict]:
    """The engine_* rows (real/engine_profile.py), after freeing what the runner-level rows cached; policy
    "single": the engine_decode_single rows (a one-GPU engine), their metadata under engine_rows_single."""
    from real.engine_profile import (DECODE_GRID, DECODE_GRID_QUICK, EngineProfileConfig, engine_rows,
                                     single_engine_rows)

    release_cuda_memory()
    cfg = EngineProfileConfig(decode=DECODE_GRID_QUICK if quick else DECODE_GRID, spread=spread)
    from real.config import EngineConfig

    if policy == "single":
        rows = single_engine_rows(model, "cuda", cfg)
        meta["engine_rows_single"] = dict(policy="single", decode_steps=cfg.decode_steps, prompt_spread=cfg.spread,
                                          statistic=("decode: mean launch-to-launch period of decode steps on GPU0; "
                                                     "prefill: mean step + launch_gap_s"),
                                          launch_gap_s=cfg.launch_gap_s.get("single"), isolated_reps=cfg.isolated_reps,
                                          prefill_shapes=[list(x) for x in cfg.single_prefill],
                                          prefill_reps=cfg.prefill_reps, prefill_log=cfg.prefill_log)
        return rows

    meta["engine_rows"] = dict(policy="pd", prefill_graphs=EngineConfig().prefill_graphs,  # the engine's defaults
                               decode_steps=cfg.decode_steps, prefill_reps=cfg.prefill_reps,
                               prompt_spread=cfg.spread, fillers=[list(f) for f in cfg.fillers],
                               statistic=("decode: mean launch-to-launch period; prefill: mean step (launch to "
                                          "tokens reported) + launch_gap_s of its state (real/engine_profile.py)"),
                               prefill_cost=cfg.prefill_cost, isolated_reps=cfg.isolated_reps,
                               after_idle=dict(decode_shapes=[list(s) for s in cfg.after_idle],
                                               filler_pause_s=cfg.filler_pause_s,
                                               note="prefill_log kind prefill_busy_after_idle: fillers arriving "
                                                    "after GPU0 idled; logged, not rows"),
                               spread="p10/p50/p90/p99 of period / mean (decode: / a Theil-Sen line over the run)")
    rows = engine_rows(model, "cuda", cfg)
    meta["engine_rows"]["prefill_log"] = cfg.prefill_log  # each prefill point's step and period (busy: by decode batch)
    meta["engine_rows"]["launch_gap_s"] = cfg.launch_gap_s  # the median end-to-next-launch of back-to-back decode steps
    return rows


def measure_engine_fresh(model: str, quick: bool, meta: dict, spread: float = 0.5, command=None,
                         policy: str = "pd") -> list[dict]:
    """measure_engine in a fresh Python process: run after this process's runner-level rows, the engine's
    decode steps came out 1.5-2 ms slower at batch 1-64 than the same engine in a process of its own, which
    matched serving (2x H100, 2026-11-26: engine_decode batch 1 at 3.55 vs 1.86 ms; serving 1.73-1.86 ms).
    `command` (tests): the child's argv; it writes {"rows": [...], "engine_rows": {...}} to the JSON path
    given as its last argument."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "engine_rows.json"
        cmd = command or [sys.executable, "-m", "real.profile", "--engine-only", "--model", model,
                          "--engine-policy", policy, "--engine-spread", str(spread), *(["--quick"] if quick else []),
                          "--engine-json"]
        proc = subprocess.run([*cmd, str(out)], cwd=ROOT)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"the engine rows' process failed (exit {proc.returncode}): {' '.join(cmd)}")
        got = json.loads(out.read_text())
    key = "engine_rows_single" if policy == "single" else "engine_rows"
    meta[key] = {**got[key], "process": "a fresh one (real.profile --engine-only)"}
    return got["rows"]


def measure_engine_processes(model: str, quick: bool, meta: dict, spread: float = 0.5, policy: str = "pd",
                             processes: int = 1, command=None) -> list[dict]:
    """measure_engine_fresh `processes` times, each shape's seconds and spread columns their median over the
    processes that measured it (traces.profile.group_shapes and median_row: contexts within 1% match, since
    each process records the contexts it measured; an even count takes the mean of the middle two). Why: the
    simulator's engine overhead is an engine row less the isolated step timed in the profiling process, and a
    GPU's speed moves from process to process (decode steps 3.5-11% over 9 fresh processes on one H200,
    bench/results/gpu_process_spread_NVIDIA_H200.json), so the engine process's speed lands in every
    overhead: session 13's 2x H200 profile read 0.54 ms over the isolated step at batch 1 (its engine row
    2.20 ms; three other profiles' 2.02-2.04 ms, overheads 0.28-0.39).
    The metadata is the first process's, plus how many processes and, per op, the largest max/min - 1 of a
    shape's seconds between them."""
    from traces.profile import group_shapes, median_row

    if processes < 1:
        raise ValueError(f"processes {processes}: at least 1")
    runs, metas = [], []
    for _ in range(processes):
        metas.append({})
        runs.append(measure_engine_fresh(model, quick, metas[-1], spread, command, policy))
    if processes == 1:
        out, between = runs[0], {}
    else:
        groups = group_shapes([(i, row) for i, rows in enumerate(runs) for row in rows])
        first_seen = {id(row): n for n, row in enumerate(row for rows in runs for row in rows)}
        groups.sort(key=lambda g: min(first_seen[id(row)] for _, row in g))
        out, between = [median_row(g) for g in groups], {}
        for g in groups:
            seconds = [row["seconds"] for _, row in g]
            if len(seconds) > 1:
                op = g[0][1]["op"]
                between[op] = max(between.get(op, 0.0), max(seconds) / min(seconds) - 1)
    key = "engine_rows_single" if policy == "single" else "engine_rows"
    meta[key] = metas[0][key]
    if processes > 1:
        meta[key] = {**meta[key], "processes": processes,
                     "process": f"{processes} fresh ones (real.profile --engine-only); each row the median of theirs "
                                "(metadata such as prefill_log from the first)",
                     "max_spread_between_processes": {op: round(v, 4) for op, v in between.items()}}
    return out


def release_cuda_memory() -> list[float]:
    """Hand this process's cached GPU memory back to the driver; the GiB then free on each GPU. The engine rows
    run in fresh processes that size their KV cache from free memory, and PyTorch's allocator keeps what the
    runner-level rows freed: with --token-budget 524288 the decode GPU's 64 GB cache stayed reserved, which on
    an 80 GB H100 left the engine's KV cache too small for a batch of 64 (2x H100, session 21: "the batch never
    decoded whole", every engine decode row skipped)."""
    import gc

    gc.collect()
    free = []
    for i in range(torch.cuda.device_count()):
        with torch.cuda.device(i):
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            free.append(round(torch.cuda.mem_get_info(i)[0] / 2**30, 1))
    return free


def decode_device(prefill_id: int, decode_id: int | None, count: int) -> int:
    """The GPU the decode-side rows are timed on: `decode_id`, or by default the engine's decode GPU (the
    other of GPUs 0 and 1 when two are visible; with one GPU, the prefill GPU)."""
    if decode_id is None:
        decode_id = (1 - prefill_id) if count > 1 and prefill_id in (0, 1) else prefill_id
    for name, i in (("--device-id", prefill_id), ("--decode-device-id", decode_id)):
        if not 0 <= i < count:
            raise ValueError(f"{name} {i}: {count} GPU(s) visible")
    return decode_id


def _command() -> str:
    """How this process was started (real.profile itself, or a bench script calling profile())."""
    entry = Path(sys.argv[0])
    head = "python -m real.profile" if entry.name in ("profile.py", "__main__.py") and entry.parent.name == "real" \
        else f"python {entry.relative_to(ROOT) if entry.is_relative_to(ROOT) else entry}"
    return " ".join([head, *sys.argv[1:]])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen3-0.6b", help="preset name (random weights; timing does not depend on them)")
    ap.add_argument("--device-id", type=int, default=0, help="the prefill GPU: the prefill rows (default 0)")
    ap.add_argument("--decode-device-id", type=int, default=None,
                    help="the decode GPU: every other row, transfers and copies arriving there (default: GPU1 when "
                         "two are visible, as the engine decodes in pd/pipeline/adaptive; two GPUs of one node "
                         "differed by 4-10%% in decode steps on 2x H200, bench/results/gpu_ab_NVIDIA_H200.json)")
    ap.add_argument("--reps", type=int, default=5, help="timed runs per point (median)")
    ap.add_argument("--split-step", type=int, default=16, help="SM splits measured in steps of this (multiple of 8)")
    ap.add_argument("--token-budget", type=int, default=262144, help="max batch x context tokens in the KV cache")
    ap.add_argument("--quick", action="store_true", help="a coarser grid (decode-side rows at 14 batches x 4 contexts, against 16 x 5; see QUICK_BATCHES)")
    ap.add_argument("--out", default=None, help="CSV path (default traces/profiles/<hardware>-<model>.csv)")
    ap.add_argument("--no-engine", action="store_true",
                    help="skip the engine_* rows (steps timed inside the engine's body; need two GPUs)")
    ap.add_argument("--engine-spread", type=float, default=0.5,
                    help="engine decode rows: prompt lengths spread over context x [1 - s, 1 + s] (0: all equal)")
    ap.add_argument("--engine-processes", type=int, default=1,
                    help="time the engine_* rows in this many fresh processes and keep each row's median: a GPU's "
                         "speed moves 3.5-11%% from process to process, and each engine row's overhead over the "
                         "isolated step carries its process's; each process takes the engine rows' time again")
    ap.add_argument("--engine-only", action="store_true", help=argparse.SUPPRESS)  # the engine rows' own process
    ap.add_argument("--engine-json", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--engine-policy", default="pd", choices=("pd", "single"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.engine_processes < 1:
        ap.error(f"--engine-processes {args.engine_processes}: at least 1")
    if not torch.cuda.is_available():
        print("real.profile measures a GPU: no CUDA GPU is visible", file=sys.stderr)
        return 2
    from traces.profile import write_profile

    if args.engine_only:
        meta = {}
        rows = measure_engine(args.model, args.quick, meta, args.engine_spread, args.engine_policy)
        Path(args.engine_json).write_text(json.dumps(dict(rows=rows, **meta), default=float))
        return 0
    t0 = time.perf_counter()
    try:
        decode_id = decode_device(args.device_id, args.decode_device_id, torch.cuda.device_count())
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows, meta = profile(args.model, args.device_id, args.reps, args.split_step, args.token_budget, args.quick,
                         decode_device_id=decode_id)
    meta["free_gib_before_engine_rows"] = release_cuda_memory()
    print("free GPU memory for the engine rows' processes: "
          + ", ".join(f"GPU{i} {g} GiB" for i, g in enumerate(meta["free_gib_before_engine_rows"])), flush=True)
    if not args.no_engine and torch.cuda.device_count() > 1:
        rows += measure_engine_processes(args.model, args.quick, meta, args.engine_spread,
                                         processes=args.engine_processes)
    if not args.no_engine:  # single's one-GPU engine: GPU0, one GPU is enough
        rows += measure_engine_processes(args.model, args.quick, meta, args.engine_spread, policy="single",
                                         processes=args.engine_processes)
    out = Path(args.out or ROOT / "traces/profiles" / f"{meta['hardware']}-{args.model}.csv")
    meta["seconds"] = round(time.perf_counter() - t0, 1)
    write_profile(out, rows, meta)
    print(f"{len(rows)} rows in {meta['seconds']} s -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
