"""LLMEngine: the real body. Wall clock, one ModelRunner per GPU, the shared policies.Controller.

Each tick: admit requests whose arrival time has come; on every device whose last step has ended,
ask the controller for a batch and launch it; report finished steps back. With two GPUs each
device's launches run on a worker thread of its own: an eager prefill costs milliseconds of host
time, and PyTorch releases the GIL inside every op, so GPU1's decode launches (graph replays) go on
while GPU0's prefill is being issued. All policy state (the Controller) stays on the calling thread;
a worker only turns one Batch into kernels. Writes the same rows as the simulator (traces/).
"""
from __future__ import annotations

import sys
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from policies import Capabilities, Controller, ErrorEvent, PolicyConfig, Request, StepSample, load_policy_config
from policies.specs import MODELS, HardwareSpec, ModelSpec, model_spec
from policies.types import GPU0, GPU1

from .config import EngineConfig
from .model_config import ModelConfig
from .runner import ModelRunner
from .green import GreenContextUnavailable, SmPartitions
from .transfer import BlockCopyTransport

REAL_POLICIES = ("single", "dp", "pd", "pipeline", "adaptive")


@dataclass(slots=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    max_tokens: int = 64
    ignore_eos: bool = False


def resolve_device(name: str) -> str:
    """'auto' -> cuda when a GPU is visible, else cpu."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is visible")
    if name not in ("cuda", "cpu"):
        raise ValueError(f"unknown device {name!r}; choose auto, cuda or cpu")
    return name


def resolve_model(name: str) -> tuple[ModelConfig, str | None]:
    """A preset name (random weights) or a local HF checkpoint directory."""
    path = Path(name)
    if path.is_dir():
        return ModelConfig.from_checkpoint(path), str(path)
    if name in MODELS:
        return ModelConfig.from_spec(model_spec(name)), None
    raise ValueError(f"unknown model {name!r}: not a preset ({', '.join(MODELS)}) and not a checkpoint directory")


def spec_of(cfg: ModelConfig, dtype_bytes: int) -> ModelSpec:
    return ModelSpec(cfg.name, cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
                     cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size, cfg.vocab_size,
                     cfg.max_position_embeddings, cfg.tie_word_embeddings, cfg.rope_theta, cfg.rms_norm_eps,
                     dtype_bytes)


def hardware_of(device: torch.device, num_gpus: int, split_step_sms: int = 0) -> HardwareSpec:
    """What the policies need to know of this node; splits are offered in steps of `split_step_sms`
    (a multiple of the green-context granularity, 8 SMs on Hopper; 0 = that granularity)."""
    step = max(8, -(-split_step_sms // 8) * 8)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 16
    step = min(step, max(8, sms // 2 // 8 * 8))  # at least one split must remain
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return HardwareSpec(f"{num_gpus}x{p.name}", p.name, num_gpus, p.multi_processor_count, p.total_memory,
                            0.0, 0.0, 0.0, 0.0, 1, step, 8)
    return HardwareSpec("cpu", "cpu", num_gpus, 16, 0, 0.0, 0.0, 0.0, 0.0, 1, step, 8)


class LLMEngine:
    def __init__(self, cfg: EngineConfig, policy: str = "single", policy_config: PolicyConfig | None = None,
                 log=print, device_ids: tuple[int, int] = (0, 1), transfer_faults: dict[int, int] | None = None,
                 green_ctx_fault_at_step: int | None = None):
        if policy not in REAL_POLICIES:
            raise ValueError(f"unknown policy {policy!r}; choose one of {', '.join(REAL_POLICIES)}")
        if cfg.decode_steps < 1:
            raise ValueError(f"decode_steps must be >= 1 (decode steps per schedule), got {cfg.decode_steps}")
        self.cfg = cfg
        self.policy = policy
        kind = resolve_device(cfg.device)
        visible = torch.cuda.device_count() if kind == "cuda" else 0
        if kind == "cpu" and cfg.device == "auto":
            log("no CUDA GPU visible: running on CPU (slow; use the tiny model)")
        wanted = 1 if policy == "single" else 2
        if kind == "cuda" and visible < wanted:
            if policy == "dp":
                raise ValueError(f"policy {policy} needs {wanted} GPUs, {visible} visible")
            wanted = 1  # pd on one GPU: the fallback controller runs single and logs why
        self.model_cfg, checkpoint = resolve_model(cfg.model)
        self.devices = [GPU0, GPU1][:wanted]
        self.runners = {d: ModelRunner(cfg, self.model_cfg,
                                       torch.device(f"cuda:{device_ids[i]}" if kind == "cuda" else "cpu"), checkpoint)
                        for i, d in enumerate(self.devices)}
        first = self.runners[GPU0]
        pcfg = policy_config or load_policy_config(policy)
        pcfg.scheduler.block_size = cfg.block_size
        pcfg.scheduler.max_decode_batch = cfg.max_num_seqs
        pcfg.scheduler.prefill_token_budget = cfg.max_num_batched_tokens
        pcfg.scheduler.max_context_tokens = first.max_model_len
        pcfg.scheduler.max_steps_per_schedule = cfg.decode_steps
        self.policy_config = pcfg
        self.model_spec = spec_of(self.model_cfg, first.dtype.itemsize)
        self.hardware = hardware_of(first.device, len(self.devices), cfg.split_step_sms)
        p2p = len(self.devices) == 2 and (kind == "cpu" or torch.cuda.can_device_access_peer(*device_ids))
        partitions = None
        if policy in ("pipeline", "adaptive") and len(self.devices) == 2:
            try:
                partitions = SmPartitions(self.runners[GPU1].device, self.hardware.allowed_splits())
            except GreenContextUnavailable as e:
                log(f"green contexts unavailable on GPU1 ({e}): the fallback controller will run pd")
        green = partitions is not None
        self.ctl = Controller(pcfg, self.model_spec, self.hardware,
                              {d: r.num_blocks for d, r in self.runners.items()},
                              Capabilities(num_gpus=len(self.devices), p2p=p2p, green_contexts=green))
        if partitions is not None:  # graphs for the splits the rebalancer may choose
            reb = self.ctl.rebalancer
            splits = reb.splits if pcfg.rebalancer.enabled else [reb.static]
            self.runners[GPU1].enable_pipeline(partitions, splits, pcfg.rebalancer.microbatches)
        self.green_ctx_fault_at_step = green_ctx_fault_at_step
        self._step_count = 0
        self._running: dict[str, tuple] = {}  # device -> (t_start, batch, split, Future of PendingStep)
        self._workers, self._switch_interval = None, None
        if len(self.devices) > 1 and cfg.threaded_launch:
            from concurrent.futures import ThreadPoolExecutor

            self._workers = {d: ThreadPoolExecutor(1, thread_name_prefix=f"launch-{d}") for d in self.devices}
            if cfg.gil_switch_interval_ms > 0:  # process-wide: a waiting launch thread gets the GIL sooner
                self._switch_interval = sys.getswitchinterval()  # restored by close()
                sys.setswitchinterval(cfg.gil_switch_interval_ms / 1e3)
        self.transport = (BlockCopyTransport(self.runners[GPU0].kv_cache, self.runners[GPU1].kv_cache, transfer_faults,
                                             mode=cfg.kv_transport) if len(self.devices) == 2 else None)
        self.temperatures: dict[int, float] = {}
        self.ignore_eos: dict[int, bool] = {}
        self.steps: list[tuple] = []
        self._t0 = time.perf_counter()

    def close(self) -> None:
        """Free every device's memory now (graphs, KV cache, weights)."""
        import gc

        for w in (self._workers or {}).values():
            w.shutdown(wait=True)
        if self._switch_interval is not None:  # process-wide: give the next engine (or the caller) its own
            sys.setswitchinterval(self._switch_interval)
            self._switch_interval = None
        for r in self.runners.values():
            r.close()
        self.runners, self.transport = {}, None
        gc.collect()  # reference cycles (graphs, compiled fns) otherwise keep the memory until later
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def clock(self) -> float:
        return time.perf_counter() - self._t0

    def reset_clock(self) -> None:
        self._t0 = time.perf_counter()

    # ---- requests ----------------------------------------------------------------------------------
    def add_request(self, request_id: int, prompt_ids: list[int], params: SamplingParams,
                    arrival_s: float | None = None) -> Request:
        now = self.clock()
        req = self.ctl.add_request(request_id, now if arrival_s is None else arrival_s, len(prompt_ids),
                                   params.max_tokens, now)
        req.token_ids = list(prompt_ids)
        self.temperatures[request_id] = params.temperature
        self.ignore_eos[request_id] = params.ignore_eos
        return req

    # ---- one tick of the asynchronous body -----------------------------------------------------------
    def step(self) -> list[Request] | None:
        """One tick: launch a step on every idle device that has work, start and poll KV copies, and
        report the steps that finished. Never waits on a GPU: each device's steps are launched as soon as
        its previous step has ended, whatever the other device is doing, so GPU0's prefill and GPU1's
        decode run at the same time and neither paces the other. Returns the requests that ended ([] if
        work is still in flight), None when nothing ran, is running, or moved."""
        now = self.clock()
        for dev in self.devices:
            if dev not in self._running:
                self._launch(dev, now)
        active = bool(self._running)
        moved = self._transfers()
        done: list[Request] = []
        for dev in list(self._running):
            launched = self._running[dev][3]
            if launched.done() and launched.result().ready():
                t_start, batch, split, _ = self._running.pop(dev)
                done.extend(self._finish(dev, t_start, batch, split, launched.result()))
        return done if active or moved else None

    def _launch(self, dev: str, now: float) -> None:
        batch = self.ctl.next_batch(dev, now)
        if batch is None:
            return
        self._step_count += 1
        if self._step_count == self.green_ctx_fault_at_step:
            self.ctl.report_error(ErrorEvent(now, "green_ctx", GPU1, "injected"))
        split = self.ctl.decode_split(batch, now) if dev == GPU1 and not batch.prefill else None
        args = (batch, self.temperatures, split.split if split else None, split.microbatches if split else 1)
        if self._workers is None:
            launched = Future()
            launched.set_result(self.runners[dev].launch(*args))
        else:
            launched = self._workers[dev].submit(self.runners[dev].launch, *args)
        self._running[dev] = (now, batch, split, launched)

    def _finish(self, dev: str, t_start: float, batch, split, pending) -> list[Request]:
        sampled, tokens = self.runners[dev].collect(pending)
        eos = self.model_cfg.eos_token_id
        k, n = pending.steps, len(sampled)
        stopped = {}  # request id -> tokens it keeps, when EOS came before the last of k steps
        for i, r in enumerate(sampled):
            ignore = self.ignore_eos.get(r.request_id, True)
            for j in range(k):
                tok = tokens[j * n + i]
                r.token_ids.append(tok)
                if tok == eos and not ignore:
                    r.stop_requested = True  # the scheduler ends it with this token
                    if j + 1 < k:
                        stopped[r.request_id] = j + 1
                    break
        t_end = self.clock()
        sample = None
        kv = sum(c + r.prefilled for r, c in batch.prefill) + batch.decode_kv_tokens
        size, tokens_run = len(batch.prefill) + len(batch.decode), batch.prefill_tokens + len(batch.decode) * k
        if split is not None and split.split is not None:
            a, f = split.split
            attn_s, ffn_s = pending.timer.totals() if pending.timer is not None else (0.0, 0.0)
            sample = StepSample(split.split, split.microbatches, len(batch.decode), batch.decode_kv_tokens,
                                t_end - t_start, attn_s, ffn_s)
            if pending.timer is not None:  # profiled (eager) pipeline: stage busy times are known
                for stage, busy in (("attn", attn_s), ("ffn", ffn_s)):
                    self.steps.append((t_start, t_end, dev, stage, size, tokens_run, kv, a, f, -1, self.ctl.mode, 1,
                                       min(busy, t_end - t_start), 0))
            else:  # one CUDA graph over both partitions: the step, on its split
                self.steps.append((t_start, t_end, dev, "decode", size, tokens_run, kv, a, f, -1, self.ctl.mode, 1,
                                   t_end - t_start, 0))
        else:
            if batch.decode and not batch.prefill:
                sample = StepSample(None, 1, len(batch.decode), batch.decode_kv_tokens, (t_end - t_start) / k, 0.0,
                                    0.0, k)
            self.steps.append((t_start, t_end, dev, batch.stage, size, tokens_run, kv, 0, 0, -1, self.ctl.mode, k,
                               t_end - t_start, 0))
        return self.ctl.finish_batch(batch, t_end, k, sample, stopped or None)

    def _transfers(self) -> bool:
        """Start the KV copies the scheduler has reserved decode blocks for; report finished ones."""
        if self.transport is None:
            return False
        for r in self.ctl.start_transfers(self.clock()):
            self.transport.start(r)
        finished = self.transport.poll()
        for t in finished:
            now = self.clock()
            r = t.request
            self.steps.append((max(0.0, now - t.seconds), now, "link", "transfer", 1, r.kv_len, r.kv_len, 0, 0, -1,
                               self.ctl.mode, 1, t.seconds, t.kv_bytes if t.ok else 0))
            if t.ok:
                self.ctl.transfer_done(r, now, t.seconds, t.kv_bytes)
            else:
                self.ctl.transfer_failed(r, now, t.reason)
        return bool(finished) or bool(self.transport.in_flight)

    def has_work(self) -> bool:
        return self.ctl.scheduler.has_work()

    def run_until_done(self, pending: list[tuple[float, int, list[int], SamplingParams]] | None = None,
                       on_done=None) -> None:
        """Serve `pending` (arrival_s, request_id, prompt_ids, params), sorted by arrival, in wall-clock time."""
        pending = pending or []
        i = 0
        while i < len(pending) or self.has_work() or self._running:
            now = self.clock()
            while i < len(pending) and pending[i][0] <= now:
                arrival, rid, ids, params = pending[i]
                req = self.add_request(rid, ids, params, arrival)
                if req.finish_s is not None and on_done:
                    on_done([req])
                i += 1
            done = self.step()
            if done is None:  # nothing could run: wait for the next arrival, or give up on a stall
                if i < len(pending):
                    time.sleep(max(0.0, min(0.005, pending[i][0] - self.clock())))
                elif self.has_work():
                    self._fail_stalled()
                    return
            elif done and on_done:
                on_done(done)
            elif not done and self._workers is not None:
                time.sleep(20e-6)  # work in flight: let the launch threads have the GIL

    def _fail_stalled(self) -> None:
        now = self.clock()
        for r in self.ctl.requests:
            if r.finish_s is None:
                self.ctl.scheduler.fail_request(r, now, "engine stalled: no device could schedule the request")


def synthetic_prompt(request_id: int, length: int, vocab_size: int, seed: int) -> list[int]:
    """Exactly `length` token ids for trace replay (traces carry lengths, not text)."""
    rng = np.random.default_rng([seed, request_id])
    return rng.integers(0, vocab_size, size=length).tolist()
