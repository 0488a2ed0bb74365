"""ModelRunner: one model on one device, its paged KV cache, and how a scheduled batch becomes tensors.

The scheduler (policies/) decides what runs; the runner turns a Batch into packed input ids,
positions, slot mappings and block tables, runs the model (decode through the CUDA graphs of
real/graphs.py), and samples. Mixed batches (colocated chunked prefill + decodes) run as a decode
pass and a prefill pass in the same step.
"""
from __future__ import annotations

import sys
from contextlib import nullcontext as _nothing
from dataclasses import dataclass

import numpy as np
import torch

from policies import Batch, Request

from .attention import pick_backend
from .config import FUSED_KERNELS, EngineConfig
from .context import AttnMetadata, slots_at
from .graphs import DecodeGraphs, PrefillGraphs
from .pipeline import StageTimer, pipelined_decode
from .model import Fused, Qwen3ForCausalLM
from .model_config import ModelConfig
from .sampler import Sampler
from .weights import init_random_weights, load_checkpoint


class OutOfKVMemory(RuntimeError):
    pass


def to_device(array, dtype, device: torch.device) -> torch.Tensor:
    """Host data to `device` WITHOUT blocking the host: through (cached) pinned memory. A pageable
    copy, or torch.tensor(..., device=cuda), waits for the device's queued work, and a host that
    waits on one GPU's prefill cannot launch the other GPU's decode."""
    t = torch.as_tensor(np.asarray(array), dtype=dtype)
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose auto, bfloat16, float16 or float32") from None


class ModelRunner:
    def __init__(self, cfg: EngineConfig, model_cfg: ModelConfig, device: torch.device, checkpoint: str | None):
        if cfg.fused_kernels not in FUSED_KERNELS:
            raise ValueError(f"unknown fused_kernels {cfg.fused_kernels!r}; choose {' or '.join(FUSED_KERNELS)}")
        self.cfg = cfg
        self.model_cfg = model_cfg
        self.device = device
        self.dtype = resolve_dtype(cfg.dtype, device)
        self.block_size = cfg.block_size
        self.backend = pick_backend(device) if cfg.attention_backend == "auto" else cfg.attention_backend
        if device.type == "cuda":
            torch.cuda.set_device(device)
        Fused.enabled, Fused.kernels = cfg.compile, cfg.fused_kernels
        with torch.device(device):
            self.model = Qwen3ForCausalLM(model_cfg, self.backend).to(self.dtype)
        if checkpoint:
            load_checkpoint(self.model, checkpoint)
        else:
            init_random_weights(self.model, cfg.seed)
        self.model.eval().requires_grad_(False)
        self.sampler = Sampler(device, cfg.seed)
        self.max_model_len = cfg.max_model_len or min(model_cfg.max_position_embeddings, 32768)
        self.max_blocks_per_seq = -(-self.max_model_len // self.block_size)
        self.num_blocks = self._size_kv_cache()
        shape = (2, model_cfg.num_hidden_layers, self.num_blocks, self.block_size, model_cfg.num_key_value_heads,
                 model_cfg.head_dim)
        self.kv_cache = torch.zeros(shape, dtype=self.dtype, device=device)
        self.model.set_kv_cache(self.kv_cache)
        self.graphs: DecodeGraphs | None = None
        self.partitions = None  # SmPartitions on the decode GPU in pipeline/adaptive modes
        self.pipeline_microbatches = 2
        self._token_host: torch.Tensor | None = None
        if device.type == "cuda":
            self._warm_up_prefill()
        if device.type == "cuda" and not cfg.enforce_eager and self.backend != "torch":
            self.graphs = DecodeGraphs(self.model, cfg.max_num_seqs, self.max_blocks_per_seq, model_cfg.hidden_size,
                                       self.dtype, device, self.block_size)
            try:
                self.graphs.capture()
            except RuntimeError as e:  # keep serving, eagerly, and say why
                self.graphs = None
                torch.cuda.synchronize(device)
                print(f"warning: {device}: CUDA graph capture failed ({str(e).splitlines()[0]}); decoding eagerly",
                      file=sys.stderr)
        self.prefill_graphs = None
        if self.graphs is not None and cfg.prefill_graphs:
            self.prefill_graphs = PrefillGraphs(self.model, cfg.max_num_batched_tokens, 64, self.block_size,
                                                model_cfg.hidden_size, self.dtype, device, self.max_blocks_per_seq,
                                                paged=self.backend == "triton")
            try:
                self.prefill_graphs.capture()
            except RuntimeError as e:
                self.prefill_graphs = None
                torch.cuda.synchronize(device)
                print(f"warning: {device}: prefill graph capture failed ({str(e).splitlines()[0]}); prefilling "
                      f"eagerly", file=sys.stderr)

    def close(self) -> None:
        """Free the graphs, the KV cache and the weights (a process may build several engines)."""
        self.graphs = self.prefill_graphs = None
        self.model.set_kv_cache(torch.zeros((2, self.model_cfg.num_hidden_layers, 0, self.block_size,
                                             self.model_cfg.num_key_value_heads, self.model_cfg.head_dim),
                                            dtype=self.dtype, device=self.device))
        self.kv_cache = None
        self.model = None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()

    # ---- KV cache --------------------------------------------------------------------------------
    @property
    def block_bytes(self) -> int:
        m = self.model_cfg
        return 2 * m.num_hidden_layers * self.block_size * m.num_key_value_heads * m.head_dim * self.dtype.itemsize

    def _size_kv_cache(self) -> int:
        """KV blocks that fit: free memory minus the activations of the largest step."""
        need = -(-self.max_model_len // self.block_size)
        if self.cfg.num_kv_blocks:
            blocks, where = self.cfg.num_kv_blocks, "num_kv_blocks"
        elif self.device.type != "cuda":
            blocks, where = int(self.cfg.cpu_kv_cache_gb * 1e9) // self.block_bytes, "cpu_kv_cache_gb"
        else:
            free, total = torch.cuda.mem_get_info(self.device)
            m = self.model_cfg
            tokens = self.cfg.max_num_batched_tokens
            activations = tokens * (4 * m.intermediate_size + 8 * m.hidden_size) * 4 \
                + self.cfg.max_num_seqs * m.vocab_size * 4 * 3
            blocks = int((free - total * (1 - self.cfg.gpu_memory_utilization) - activations) // self.block_bytes)
            where = (f"free memory ({free / 2**30:.1f} GiB free after the weights; lower max_num_batched_tokens "
                     f"or raise gpu_memory_utilization)")
        if blocks < need:
            raise OutOfKVMemory(f"{self.device}: room for {max(blocks, 0)} KV blocks of {self.block_size} tokens from "
                                f"{where}, but one {self.max_model_len}-token sequence needs {need}; lower "
                                f"max_model_len or give the KV cache more memory")
        return blocks

    # ---- inputs ------------------------------------------------------------------------------------
    def _slots(self, r: Request, start: int, end: int) -> np.ndarray:
        pos = np.arange(start, end)
        return np.asarray(r.blocks, dtype=np.int64)[pos // self.block_size] * self.block_size + pos % self.block_size

    def _block_table(self, reqs: list[Request]) -> np.ndarray:
        width = max(len(r.blocks) for r in reqs)
        table = np.full((len(reqs), width), -1, dtype=np.int32)
        for i, r in enumerate(reqs):
            table[i, : len(r.blocks)] = r.blocks
        return table

    def _tensor(self, array, dtype) -> torch.Tensor:
        return to_device(array, dtype, self.device)

    def prepare_prefill(self, chunks: list[tuple[Request, int]]):
        ids, pos, slots, cu_q, cu_k, sample_rows = [], [], [], [0], [0], []
        has_prefix = False
        for r, chunk in chunks:
            start, end = r.prefilled, r.prefilled + chunk
            ids.extend(r.token_ids[start:end])
            pos.append(np.arange(start, end))
            slots.append(self._slots(r, start, end))
            cu_q.append(cu_q[-1] + chunk)
            cu_k.append(cu_k[-1] + end)
            has_prefix |= start > 0
            if end == r.prefill_target:
                sample_rows.append(cu_q[-1] - 1)
        meta = AttnMetadata(
            is_prefill=True, slot_mapping=self._tensor(np.concatenate(slots), torch.int64),
            cu_seqlens_q=self._tensor(cu_q, torch.int32), cu_seqlens_k=self._tensor(cu_k, torch.int32),
            cu_seqlens_q_host=cu_q, cu_seqlens_k_host=cu_k,
            max_seqlen_q=max(c for _, c in chunks), max_seqlen_k=max(r.prefilled + c for r, c in chunks),
            has_prefix=has_prefix,
            block_tables=self._tensor(self._block_table([r for r, _ in chunks]), torch.int32) if has_prefix else None)
        return self._tensor(ids, torch.int64), self._tensor(np.concatenate(pos), torch.int64), meta, sample_rows

    def prepare_decode(self, reqs: list[Request]):
        bs = self.block_size
        ids = [r.token_ids[-1] for r in reqs]
        pos = [r.kv_len for r in reqs]
        slots = [r.blocks[p // bs] * bs + p % bs for r, p in zip(reqs, pos)]
        lens = [p + 1 for p in pos]
        return ids, pos, slots, lens, self._block_table(reqs)

    # ---- running -----------------------------------------------------------------------------------
    def run(self, batch: Batch, temperatures: dict[int, float], split: tuple[int, int] | None = None,
            microbatches: int = 1) -> tuple[list[Request], list[int]]:
        """Execute one scheduled step; returns the requests that sampled a token, and their tokens."""
        return self.collect(self.launch(batch, temperatures, split, microbatches))

    @torch.inference_mode()
    def launch(self, batch: Batch, temperatures: dict[int, float], split: tuple[int, int] | None = None,
               microbatches: int = 1) -> "PendingStep":
        """Enqueue one step on this device and return at once: the tokens come back through a pinned
        buffer and an event, so a body driving two GPUs launches both before waiting on either.
        `split`: decode as an attention/FFN pipeline of `microbatches` on these SM partitions."""
        with torch.cuda.device(self.device) if self.device.type == "cuda" else _nothing():
            if batch.decode and not batch.prefill and split is None and batch.num_steps > 1:
                steps = batch.num_steps
                tokens = self._decode_steps(batch.decode, [temperatures.get(r.request_id, 0.0) for r in batch.decode],
                                            steps)
                return self._pending(list(batch.decode), tokens, None, steps)
            sampled: list[Request] = []
            hidden = []
            timer = None
            if batch.decode and split is not None and not batch.prefill:
                graphed = (self.graphs is not None and microbatches == self.pipeline_microbatches
                           and self.graphs.bucket(len(batch.decode), split) is not None)
                if self.cfg.pipeline_profiling or not graphed:  # eager, with stage timers
                    timer = StageTimer(self.device.type == "cuda")
                hidden.extend(self._pipelined_hidden(batch.decode, split, microbatches, timer))
                sampled.extend(batch.decode)
            elif batch.decode:
                hidden.append(self._decode_hidden(batch.decode))
                sampled.extend(batch.decode)
            graph = self.prefill_graphs.fits(batch.prefill) if batch.prefill and self.prefill_graphs else None
            if graph is not None:
                out = self.prefill_graphs.run(batch.prefill, graph)
                if out.shape[0]:
                    hidden.append(out)
                    sampled.extend(r for r, c in batch.prefill if r.prefilled + c == r.prefill_target)
            elif batch.prefill:
                ids, pos, meta, rows = self.prepare_prefill(batch.prefill)
                out = self.model(ids, pos, meta)
                if rows:
                    hidden.append(out[self._tensor(rows, torch.int64)])
                    by_row = {cu: r for (r, c), cu in zip(batch.prefill, _ends(batch.prefill))}
                    sampled.extend(by_row[row] for row in rows)
            if not sampled:  # a prefill chunk that ends no prompt: still an event, so the step's end is its GPU end
                done = None
                if self.device.type == "cuda":
                    done = torch.cuda.Event()
                    done.record()
                return PendingStep([], None, done, timer)
            logits = self.model.compute_logits(torch.cat(hidden) if len(hidden) > 1 else hidden[0])
            tokens = self.sampler(logits, [temperatures.get(r.request_id, 0.0) for r in sampled])
            return self._pending(sampled, tokens, timer)

    def _pending(self, sampled: list[Request], tokens: torch.Tensor, timer, steps: int = 1) -> "PendingStep":
        """Start the sampled tokens' copy to the host and return without waiting for it."""
        if self.device.type != "cuda":
            return PendingStep(sampled, tokens.reshape(-1), None, timer, steps)
        n = tokens.numel()
        if self._token_host is None or self._token_host.numel() < n:
            self._token_host = torch.empty(max(n, self.cfg.max_num_seqs + 1024), dtype=torch.int64, pin_memory=True)
        host = self._token_host[:n]
        host.copy_(tokens.reshape(-1), non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return PendingStep(sampled, host, done, timer, steps)

    def _decode_steps(self, reqs: list[Request], temps: list[float], steps: int) -> torch.Tensor:
        """`steps` decode steps of the same requests back to back, each step's sampled tokens feeding the next
        on the device: one host staging and one token copy for all of them (the host's per-step cost, half a
        millisecond or more at batch 256, is paid once). The scheduler reserved KV blocks for every step and
        no request reaches its length limit before the last; one that samples EOS early is cut by the
        engine. Returns the tokens [steps, n]."""
        n, bs = len(reqs), self.block_size
        out = torch.empty((steps, n), dtype=torch.int64, device=self.device)
        ids, pos, slots, lens, table = self.prepare_decode(reqs)
        hidden = self.graphs.run(ids, pos, slots, lens, table) if self.graphs else None
        if hidden is not None:
            for j in range(steps):
                out[j] = self.sampler(self.model.compute_logits(hidden), temps)
                if j + 1 < steps:
                    hidden = self.graphs.advance(n, out[j])
            return out
        ids_t, pos_t = self._tensor(ids, torch.int64), self._tensor(pos, torch.int64)
        lens_t, table_t = self._tensor(lens, torch.int32), self._tensor(table, torch.int32)
        for j in range(steps):
            meta = AttnMetadata(is_prefill=False, slot_mapping=slots_at(table_t, pos_t, bs), block_tables=table_t,
                                context_lens=lens_t)
            out[j] = self.sampler(self.model.compute_logits(self.model(ids_t, pos_t, meta)), temps)
            ids_t, pos_t, lens_t = out[j], pos_t + 1, lens_t + 1
        return out

    @staticmethod
    def collect(pending: "PendingStep") -> tuple[list[Request], list[int]]:
        """The sampled requests and their tokens; a step of k decode steps gives k x n tokens, step-major."""
        if pending.done is not None:
            pending.done.synchronize()
        return pending.sampled, ([] if pending.tokens is None else pending.tokens.tolist())

    def enable_pipeline(self, partitions, splits: list[tuple[int, int]], microbatches: int = 2) -> None:
        """Keep GPU1's SM partitions and capture one pipelined-step graph per (split, bucket) on them."""
        self.partitions = partitions
        self.pipeline_microbatches = microbatches
        if self.graphs is None or self.cfg.pipeline_profiling:
            return
        try:
            self.graphs.capture_pipeline(partitions, splits, microbatches)
        except RuntimeError as e:  # keep pipelining, eagerly, and say why
            self.graphs.pipeline_graphs.clear()
            torch.cuda.synchronize(self.device)
            print(f"warning: {self.device}: pipeline graph capture failed ({str(e).splitlines()[0]}); "
                  f"pipelined steps run eagerly", file=sys.stderr)

    def _pipelined_hidden(self, reqs: list[Request], split: tuple[int, int], microbatches: int,
                          timer: StageTimer | None) -> list[torch.Tensor]:
        """The pipelined step: without a timer, its CUDA graph (the caller checked one was captured for
        (split, bucket)); with one, eagerly over contiguous micro-batches, timing each stage."""
        if timer is None:
            return [self.graphs.run(*self.prepare_decode(reqs), split=split)]
        m = max(1, min(microbatches, len(reqs)))
        bounds = [len(reqs) * i // m for i in range(m + 1)]
        micro = []
        for a, b in zip(bounds, bounds[1:]):
            ids, pos, slots, lens, table = self.prepare_decode(reqs[a:b])
            meta = AttnMetadata(is_prefill=False, slot_mapping=self._tensor(slots, torch.int64),
                                block_tables=self._tensor(table, torch.int32), context_lens=self._tensor(lens, torch.int32))
            micro.append((self._tensor(ids, torch.int64), self._tensor(pos, torch.int64), meta))
        attn_stream, ffn_stream = self.partitions.get(split) if self.partitions is not None else (None, None)
        return pipelined_decode(self.model, micro, attn_stream, ffn_stream, timer, split)

    def _decode_hidden(self, reqs: list[Request]) -> torch.Tensor:
        ids, pos, slots, lens, table = self.prepare_decode(reqs)
        hidden = self.graphs.run(ids, pos, slots, lens, table) if self.graphs else None
        if hidden is not None:
            return hidden
        meta = AttnMetadata(is_prefill=False, slot_mapping=self._tensor(slots, torch.int64),
                            block_tables=self._tensor(table, torch.int32), context_lens=self._tensor(lens, torch.int32))
        return self.model(self._tensor(ids, torch.int64), self._tensor(pos, torch.int64), meta)

    @torch.inference_mode()
    def _warm_up_prefill(self) -> None:
        """Compile the fused ops for prefill shapes now, not inside the first requests' TTFT (a prefill of
        Fused.eager_min_tokens tokens runs the compiled fusions)."""
        shapes = [[7], [33, 5]] + ([[Fused.eager_min_tokens]] if Fused.eager_min_tokens <= self.cfg.max_num_batched_tokens
                                   else [])
        for lens in shapes:
            n = sum(lens)
            cu = [0]
            for length in lens:
                cu.append(cu[-1] + length)
            meta = AttnMetadata(is_prefill=True, slot_mapping=torch.full((n,), -1, dtype=torch.int64, device=self.device),
                                cu_seqlens_q=self._tensor(cu, torch.int32), cu_seqlens_k=self._tensor(cu, torch.int32),
                                cu_seqlens_q_host=cu, cu_seqlens_k_host=cu, max_seqlen_q=max(lens),
                                max_seqlen_k=max(lens))
            ids = torch.zeros(n, dtype=torch.int64, device=self.device)
            pos = torch.cat([torch.arange(length, device=self.device) for length in lens])
            self.model.compute_logits(self.model(ids, pos, meta)[-1:])
        torch.cuda.synchronize(self.device)


@dataclass(slots=True)
class PendingStep:
    sampled: list[Request]
    tokens: torch.Tensor | None  # sampled token ids; on CUDA a pinned host buffer being filled
    done: "torch.cuda.Event | None"  # recorded after the copy to the host
    timer: StageTimer | None = None  # attention / FFN stage times of a profiled (eager) pipelined step
    steps: int = 1  # decode steps run back to back (tokens holds steps x len(sampled), step-major)

    def ready(self) -> bool:
        """True once the step's tokens are on the host (never blocks)."""
        return self.done is None or self.done.query()


def _ends(chunks: list[tuple[Request, int]]) -> list[int]:
    """Row of each chunk's last token in the packed prefill batch."""
    out, total = [], 0
    for _, c in chunks:
        total += c
        out.append(total - 1)
    return out
