"""The one brain a body drives: scheduler + rebalancer + back-pressure + fallback, one decision log.

A body (sim/ or real/) calls these methods at the moments of design.md's table, with its own clock:
    add_request      a request arrives             -> admitted or rejected
    next_batch       a GPU is free                 -> what to run (prefill chunks, decodes, how many steps)
    decode_split     GPU1 step boundary            -> SM split and micro-batches
    finish_batch     a step (run of steps) ended   -> requests that ended; measured times feed the policies
    start_transfers  after a prefill / on a tick   -> KV copies to start (GPU1 blocks reserved)
    transfer_done / transfer_failed / report_error
Before each batch the controller builds an Observation and lets back-pressure and the fallback
controller decide; every change lands in `decisions` (decisions.csv).
"""
from __future__ import annotations

from .backpressure import BackPressure
from .blocks import BlockPool
from .config import PolicyConfig
from .fallback import FallbackController
from .rebalancer import SmRebalancer
from .request import Request
from .scheduler import Batch, Scheduler
from .specs import HardwareSpec, ModelSpec
from .types import (GPU0, GPU1, NO_SPLIT, PIPELINE, Capabilities, DecisionRecord, ErrorEvent, Observation,
                    SplitDecision, StepSample, split_name)

_EWMA = 0.2


class Controller:
    def __init__(self, cfg: PolicyConfig, model: ModelSpec, hardware: HardwareSpec, kv_blocks: dict[str, int],
                 capabilities: Capabilities | None = None, record_observations: bool = False, t_s: float = 0.0):
        self.cfg = cfg
        self.capabilities = capabilities or Capabilities(num_gpus=hardware.num_gpus)
        self.decisions: list[DecisionRecord] = []
        self.requests: list[Request] = []
        pools = {d: BlockPool(d, n, cfg.scheduler.block_size) for d, n in kv_blocks.items()}
        max_ctx = cfg.scheduler.max_context_tokens or model.max_position
        self.scheduler = Scheduler(cfg.scheduler, pools, model.kv_bytes_per_token, max_ctx, self.decisions.append)
        self.backpressure = BackPressure(cfg.backpressure)
        self.rebalancer = SmRebalancer(cfg.rebalancer, hardware, cfg.attn_sms)
        self.fallback = FallbackController(cfg.fallback, cfg.mode, self.capabilities)
        self.observations: list[Observation] | None = [] if record_observations else None
        self.split: tuple[int, int] | None = NO_SPLIT
        self._logged_split = "none"
        self._errors: list[ErrorEvent] = []
        self._last_step: StepSample | None = None
        self._last_ratio: float | None = None
        self._decode_step_s = 0.0
        self._link_bytes_per_s = 0.0
        self.scheduler.set_mode(self.fallback.mode, t_s)
        if self.fallback.start_reason:
            self._log(t_s, "fallback", "mode", cfg.mode, self.fallback.mode, self.fallback.start_reason)

    @property
    def mode(self) -> str:
        return self.scheduler.mode

    def _log(self, t_s: float, policy: str, decision: str, old: str, new: str, reason: str) -> None:
        self.decisions.append(DecisionRecord(t_s, policy, decision, old, new, reason))

    # ---- moments --------------------------------------------------------------------------------
    def add_request(self, request_id: int, arrival_s: float, prompt_tokens: int, output_tokens: int,
                    now: float | None = None) -> Request:
        req = Request(request_id, arrival_s, prompt_tokens, output_tokens)
        self.requests.append(req)
        self.scheduler.add(req, arrival_s if now is None else now)
        return req

    def next_batch(self, device: str, now: float, max_steps: int | None = None) -> Batch | None:
        self.tick(now)
        return self.scheduler.schedule(device, now, max_steps)

    def decode_split(self, batch: Batch, now: float) -> SplitDecision:
        """SM split for a pure decode batch on the decode GPU; no split outside pipeline mode."""
        if self.mode != PIPELINE or batch.prefill or batch.device != GPU1:
            decision = SplitDecision(NO_SPLIT, 1, f"mode {self.mode}")
        else:
            decision = self.rebalancer.decide(len(batch.decode), batch.decode_kv_tokens)
            if decision.exploring:  # measure candidates on short runs: a bad one costs little
                batch.num_steps = min(batch.num_steps, self.cfg.rebalancer.explore_max_steps)
            name = split_name(decision.split)
            if name != self._logged_split and not decision.reason.startswith("batch "):
                self._log(now, "rebalancer", "split", self._logged_split, name, decision.reason)
                self._logged_split = name
        self.split = decision.split
        return decision

    def finish_batch(self, batch: Batch, now: float, steps_done: int | None = None,
                     sample: StepSample | None = None, stopped: dict[int, int] | None = None) -> list[Request]:
        done = self.scheduler.finish_batch(batch, now, steps_done, stopped)
        if sample is not None:
            self._last_step = sample
            self._decode_step_s += _EWMA * (sample.step_s - self._decode_step_s) if self._decode_step_s else sample.step_s
            if self.mode == PIPELINE:
                self.rebalancer.record(sample)
                self._last_ratio = self.rebalancer.sequential_ratio(sample)
        return done

    def start_transfers(self, now: float) -> list[Request]:
        return self.scheduler.start_transfers(now)

    def transfer_bytes(self, req: Request) -> int:
        return self.scheduler.transfer_bytes(req)

    def transfer_done(self, req: Request, now: float, seconds: float, kv_bytes: int) -> None:
        if seconds > 0 and kv_bytes >= self.cfg.fallback.min_link_sample_bytes:
            bw = kv_bytes / seconds
            self._link_bytes_per_s += _EWMA * (bw - self._link_bytes_per_s) if self._link_bytes_per_s else bw
        self.scheduler.transfer_done(req, now)

    def transfer_failed(self, req: Request, now: float, reason: str) -> None:
        self._errors.append(ErrorEvent(now, "transfer", GPU1, reason))
        self.scheduler.transfer_failed(req, now, reason)

    def report_error(self, error: ErrorEvent) -> None:
        self._errors.append(error)

    # ---- the policies -----------------------------------------------------------------------------
    def observe(self, now: float) -> Observation:
        s = self.scheduler
        pools = s.pools
        g0, g1 = pools.get(GPU0), pools.get(GPU1)
        obs = Observation(
            t_s=now, mode=s.mode, **s.counts(),
            gpu0_kv_blocks_free=g0.num_free if g0 else 0, gpu0_kv_blocks_total=g0.num_blocks if g0 else 0,
            gpu1_kv_blocks_free=g1.num_free if g1 else 0, gpu1_kv_blocks_total=g1.num_blocks if g1 else 0,
            decode_step_s=self._decode_step_s, link_bytes_per_s=self._link_bytes_per_s,
            last_step=self._last_step, errors=tuple(self._errors), capabilities=self.capabilities)
        self._errors.clear()
        if self.observations is not None:
            self.observations.append(obs)
        return obs

    def tick(self, now: float) -> None:
        """Build an observation and let the fallback controller and back-pressure decide."""
        obs = self.observe(now)
        ratio, self._last_ratio = self._last_ratio, None
        mode = self.fallback.decide(obs, ratio)
        if mode is not None and mode.mode != self.mode:
            self._log(now, "fallback", "mode", self.mode, mode.mode, mode.reason)
            self.scheduler.set_mode(mode.mode, now)
            if mode.mode != PIPELINE and self._logged_split != "none":
                self._log(now, "rebalancer", "split", self._logged_split, "none", f"mode {mode.mode}")
                self._logged_split = "none"
        throttle = self.backpressure.decide(obs)
        if throttle is not None:
            self.scheduler.prefill_paused = throttle.throttled
            self._log(now, "backpressure", "throttle", str(not throttle.throttled).lower(),
                      str(throttle.throttled).lower(), throttle.reason)
