"""The SimPy model: arrivals, one worker per GPU, copy engines on the NVLink link, injected faults.

The mechanics live here, the decisions in `policies.Controller` (called at the same moments the
real engine calls it) and the time of each stage in a `CostModel`. One event per stage: identical
decode steps between two events are merged into one run whose time is summed analytically (step
time is linear in the KV tokens read, so the sum of a run is exact for the analytic model); a run
is cut short at the next step boundary when new work arrives for its GPU.

As in the real engine's body (real/engine.py), a GPU's next step starts when its previous one has
ended, and each step also pays the engine's per-step overhead (`CostModel.engine_overhead_s`: policy,
launch thread, polling, the gap before the next launch, the interpreter shared with the other GPU's
launch thread). That overhead depends on whether the other GPU is running a step when this one starts
(where the profile measured both states), so a merged decode run is cut at the next step boundary when
the other GPU goes busy or idle (back-to-back steps keep it busy and cut nothing).

Where the profile measured the spread of those steps (sim/variability.py), each step's time (isolated
step + overhead) is multiplied by a ratio drawn independently per step from it, with a generator seeded
by SimConfig.seed: the same seed gives the same run. A merged run draws one ratio per step, so it is the
same in distribution as its steps run one by one, a cut lands on a drawn step boundary, and the run's
StepSample (what the rebalancer judges splits on) is the mean of its drawn steps.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field, replace

import numpy as np
import simpy

from policies import Batch, Capabilities, Controller, ErrorEvent, PolicyConfig, StepSample
from policies.specs import HardwareSpec, ModelSpec
from policies.types import GPU0, GPU1, LINK
from traces.workload import RequestSpec

from .cost_model import microbatch_tail_s
from .variability import StepNoise


@dataclass(slots=True)
class Fault:
    """An injected failure: green_ctx (pipeline unusable), link (copies fail for duration_s),
    transfer (the next copy fails)."""
    t_s: float
    kind: str
    duration_s: float = 0.0


@dataclass(slots=True)
class SimConfig:
    gpu_memory_utilization: float = 0.90  # share of HBM the engine may use (weights + KV + activations)
    activation_reserve_bytes: float = 2e9  # workspace kept out of the KV cache
    max_merged_steps: int = 128  # identical decode steps merged into one event (policies see each run; a run also
    # ends at new work, the other GPU going busy or idle, a request's last token and a measuring split)
    kv_blocks: int = 0  # KV blocks per GPU; 0 = sized from memory (kv_blocks_per_gpu); a real run records its own
    capabilities: Capabilities = field(default_factory=Capabilities)
    faults: list[Fault] = field(default_factory=list)
    seed: int = 0  # seeds the step-time draws (sim.run --seed): same seed, same run
    step_variability: bool = True  # draw step times from the profile's measured spread (none measured: no effect)


def kv_blocks_per_gpu(hw: HardwareSpec, model: ModelSpec, block_size: int, cfg: SimConfig) -> int:
    """KV blocks that fit beside the weights, as an engine sizing its cache from free memory would."""
    free = hw.hbm_bytes * cfg.gpu_memory_utilization - model.weight_bytes - cfg.activation_reserve_bytes
    blocks = int(free // (block_size * model.kv_bytes_per_token))
    if blocks < 1:
        raise ValueError(f"{model.name} does not fit on {hw.gpu_name}: no memory left for the KV cache")
    return blocks


class Simulation:
    def __init__(self, requests: list[RequestSpec], policy: PolicyConfig, cost_model, hardware: HardwareSpec,
                 model: ModelSpec, cfg: SimConfig | None = None, progress=None):
        self.cfg = cfg or SimConfig()
        self.requests = requests
        self.cost = cost_model
        self.hardware = hardware
        self.env = simpy.Environment()
        devices = [GPU0, GPU1][: max(1, min(2, self.cfg.capabilities.num_gpus))]
        blocks = self.cfg.kv_blocks or kv_blocks_per_gpu(hardware, model, policy.scheduler.block_size, self.cfg)
        policy = replace(policy, scheduler=replace(policy.scheduler, max_steps_per_schedule=self.cfg.max_merged_steps))
        self.ctl = Controller(policy, model, hardware, {d: blocks for d in devices}, self.cfg.capabilities)
        self.devices = devices
        self.steps: list[tuple] = []
        self._idle: dict[str, simpy.Event | None] = {d: None for d in devices}
        self._in_run = {d: False for d in devices}
        self._stepping = {d: False for d in devices}  # a step (or merged run) in progress
        self._busy_s = {d: 0.0 for d in devices}  # stepping time so far (up to _busy_since while stepping)
        self._busy_since = {d: 0.0 for d in devices}
        self._copy_debt = {d: 0.0 for d in devices}  # what overlapped KV copies added, paid by the next decode
        self._copy_cost = getattr(cost_model, "copy_interference_s", None)
        self._overhead = getattr(cost_model, "engine_overhead_s", None)
        # policy single runs a one-GPU engine (real/engine.py: no launch thread), whose host loop is not the
        # two-GPU engines': its decode steps take their overhead from engine_decode_single rows where measured
        self._colocated = policy.mode == "single"
        self._cut_on_other = bool(getattr(cost_model, "overhead_depends_on_other_gpu", False)) and len(devices) > 1
        varies = self.cfg.step_variability and getattr(cost_model, "has_step_spread", False)
        self._noise = StepNoise(self.cfg.seed) if varies else None
        self._procs: dict[str, simpy.Process] = {}
        self._copy_queue: deque = deque()
        self._copy_idle: list[simpy.Event] = []
        self._link_down_until = -1.0
        self._fail_next_copies = 0
        self._progress = progress
        self._ended = 0

    @property
    def draws_step_times(self) -> bool:
        """Are step times drawn from a measured spread (else each step takes its mean)?"""
        return self._noise is not None

    # ---- running ---------------------------------------------------------------------------------
    def run(self) -> "Simulation":
        env = self.env
        env.process(self._arrivals())
        for d in self.devices:
            self._procs[d] = env.process(self._worker(d))
        for _ in range(max(1, self.hardware.copy_engines)):
            env.process(self._copy_engine())
        for f in self.cfg.faults:
            env.process(self._fault(f))
        env.run()
        for r in self.ctl.requests:  # a stall would leave requests behind: never lose one silently
            if r.finish_s is None:
                self.ctl.scheduler.fail_request(r, env.now, "simulation ended before the request finished")
        return self

    def _wake(self, device: str, interrupt: bool = False) -> None:
        ev = self._idle.get(device)
        if ev is not None and not ev.triggered:
            ev.succeed()
        elif interrupt and self._in_run.get(device):
            self._in_run[device] = False
            self._procs[device].interrupt()

    def _set_stepping(self, dev: str, stepping: bool) -> None:
        """Mark a GPU busy or free; a merged run on the other GPU ends at its next step boundary so that
        its next steps are costed with this GPU's new state."""
        if stepping == self._stepping[dev]:
            return
        if stepping:
            self._busy_since[dev] = self.env.now
        else:
            self._busy_s[dev] += self.env.now - self._busy_since[dev]
        self._stepping[dev] = stepping
        if self._cut_on_other:
            for other in self.devices:
                if other != dev and self._in_run[other]:
                    self._in_run[other] = False
                    self._procs[other].interrupt()

    def _busy_until_now(self, dev: str) -> float:
        """Seconds `dev` has spent stepping since the start."""
        return self._busy_s[dev] + (self.env.now - self._busy_since[dev] if self._stepping[dev] else 0.0)

    def _other_busy(self, dev: str) -> bool:
        return any(self._stepping[d] for d in self.devices if d != dev)

    def _overhead_s(self, dev: str, stage: str, batch_size: int, tokens: int) -> float:
        if self._overhead is None or batch_size <= 0:
            return 0.0
        return self._overhead(stage, batch_size, tokens, self._other_busy(dev), self._colocated)

    def _spread(self, dev: str, stage: str, batch_size: int, tokens: int):
        """The measured spread of this step's time (None: it takes its mean), by the other GPU's state."""
        if self._noise is None or batch_size <= 0:
            return None
        return self.cost.engine_step_spread(stage, batch_size, tokens, self._other_busy(dev), self._colocated)

    def _wake_idle_with_work(self) -> None:
        s = self.ctl.scheduler
        for d in self.devices:
            if self._idle[d] is not None and (s.waiting[d] or s.ready[d] or s.running[d]):
                self._wake(d)

    def _count_ended(self, n: int) -> None:
        self._ended += n
        if self._progress is not None and n:
            self._progress.update(n)

    def _arrivals(self):
        env, ctl = self.env, self.ctl
        for spec in self.requests:
            delay = spec.arrival_s - env.now
            if delay > 0:
                yield env.timeout(delay)
            req = ctl.add_request(spec.request_id, spec.arrival_s, spec.prompt_tokens, spec.output_tokens, env.now)
            if req.finish_s is not None:  # rejected
                self._count_ended(1)
            else:
                self._wake(req.prefill_device, interrupt=req.prefill_device == req.decode_device)

    # ---- a GPU ---------------------------------------------------------------------------------------
    def _worker(self, dev: str):
        env, ctl = self.env, self.ctl
        while True:
            mode_before = ctl.mode
            batch = ctl.next_batch(dev, env.now)
            if ctl.mode != mode_before:
                self._wake_idle_with_work()
            if batch is None:
                self._set_stepping(dev, False)
                ev = self._idle[dev] = env.event()
                yield ev
                self._idle[dev] = None
                continue
            self._set_stepping(dev, True)
            if batch.prefill:
                yield from self._run_forward(dev, batch)
            else:
                yield from self._run_decode(dev, batch)
            # stays stepping while it takes its next batch at once: the other GPU's run is cut only when
            # this one goes idle (or starts from idle), not at every boundary of back-to-back steps
            if ctl.scheduler.pending_transfers:
                self._kick_link()
            self._wake_idle_with_work()

    def _run_forward(self, dev: str, batch: Batch):
        """Prefill chunks, with decodes mixed in when colocated: one forward pass, one step."""
        env, ctl = self.env, self.ctl
        t0 = env.now
        chunks = [(c, r.prefilled) for r, c in batch.prefill]
        kv = sum(c + ctx for c, ctx in chunks) + batch.decode_kv_tokens
        shape = ("prefill", len(chunks), batch.prefill_tokens)
        overhead = self._overhead_s(dev, *shape)
        if batch.decode:  # a mixed step: one engine step, the larger of its two passes' overheads (and its spread)
            dec = ("decode", len(batch.decode), batch.decode_kv_tokens)
            dec_overhead = self._overhead_s(dev, *dec)
            shape, overhead = (dec, dec_overhead) if dec_overhead > overhead else (shape, overhead)
        step = self.cost.forward_s(chunks, len(batch.decode), batch.decode_kv_tokens) + overhead
        if batch.decode:  # the decode pass waits for its longest context as a decode step does (the decode tail)
            step += microbatch_tail_s(self.cost, [r.kv_len for r in batch.decode])
        spread = self._spread(dev, *shape)
        yield env.timeout(step * self._noise.ratio(spread) if spread is not None else step)
        t1 = env.now
        self.steps.append((t0, t1, dev, batch.stage, len(batch.prefill) + len(batch.decode),
                           batch.prefill_tokens + len(batch.decode), kv, 0, 0, -1, ctl.mode, 1, t1 - t0, 0))
        self._count_ended(len(ctl.finish_batch(batch, t1)))

    def _run_decode(self, dev: str, batch: Batch):
        env, ctl, cost = self.env, self.ctl, self.cost
        t0 = env.now
        split = ctl.decode_split(batch, t0)  # first: a measuring split shortens the run (batch.num_steps)
        size, kv0, k = len(batch.decode), batch.decode_kv_tokens, batch.num_steps
        debt, self._copy_debt[dev] = self._copy_debt[dev], 0.0
        if debt > 0:  # KV copies that ran beside the last steps slowed them: this run's first step pays it
            yield env.timeout(debt)
        t_run = env.now
        first = cost.decode_step(size, kv0, split.split, split.microbatches)
        last = cost.decode_step(size, kv0 + size * (k - 1), split.split, split.microbatches) if k > 1 else first
        gpu = cost.decode_device_factor(dev, size)  # this GPU's speed over the one the decode rows timed
        slope = gpu * (last.step_s - first.step_s) / (k - 1) if k > 1 else 0.0
        # every context grows by one a step: the excess over the mean stays
        tail = microbatch_tail_s(cost, [r.kv_len for r in batch.decode], split.microbatches, split.split)
        step0 = gpu * first.step_s + tail + self._overhead_s(dev, "decode", size, kv0)  # the run's first step
        spread = self._spread(dev, "decode", size, kv0)
        done = k
        if k == 1:
            yield env.timeout(step0 * self._noise.ratio(spread) if spread is not None else step0)
        else:
            ends = self._noise.run_ends(spread, step0, slope, k) if spread is not None else None
            self._in_run[dev] = True
            try:
                yield env.timeout(float(ends[-1]) if ends is not None else k * step0 + slope * k * (k - 1) / 2)
            except simpy.Interrupt:  # new work for this GPU: stop at the end of the current step
                elapsed = env.now - t_run
                if ends is not None:  # the drawn step running now
                    done = min(k, int(np.searchsorted(ends, elapsed - 1e-12)) + 1)
                    rest = float(ends[done - 1]) - elapsed
                else:
                    done = _steps_started(elapsed, step0, slope, k)
                    rest = done * step0 + slope * done * (done - 1) / 2 - elapsed
                if rest > 0:
                    yield env.timeout(rest)
            self._in_run[dev] = False
        t1 = env.now
        frac = (done - 1) / (k - 1) if k > 1 else 0.0  # cost at the run's middle step, as a share of the way
        attn = first.attn_busy_s + (last.attn_busy_s - first.attn_busy_s) * frac / 2
        ffn = first.ffn_busy_s + (last.ffn_busy_s - first.ffn_busy_s) * frac / 2
        mode = ctl.mode
        if split.split is None:
            self.steps.append((t0, t1, dev, "decode", size, size * done, kv0, 0, 0, -1, mode, done, t1 - t0, 0))
        else:
            a, f = split.split
            self.steps.append((t0, t1, dev, "attn", size, size * done, kv0, a, f, -1, mode, done,
                               min(t1 - t0, attn * done), 0))
            self.steps.append((t0, t1, dev, "ffn", size, size * done, kv0, a, f, -1, mode, done,
                               min(t1 - t0, ffn * done), 0))
        sample = StepSample(split.split, split.microbatches, size, kv0, (t1 - t0) / done, attn, ffn, done)
        self._count_ended(len(ctl.finish_batch(batch, t1, done, sample)))

    # ---- the link ------------------------------------------------------------------------------------
    def _kick_link(self) -> None:
        started = self.ctl.start_transfers(self.env.now)
        if started:
            self._copy_queue.extend(started)
            while self._copy_idle:
                ev = self._copy_idle.pop()
                if not ev.triggered:
                    ev.succeed()

    def _copy_engine(self):
        env, ctl = self.env, self.ctl
        while True:
            if not self._copy_queue:
                ev = env.event()
                self._copy_idle.append(ev)
                yield ev
                continue
            r = self._copy_queue.popleft()
            t0 = env.now
            busy0 = self._busy_until_now(r.decode_device)
            nbytes = ctl.transfer_bytes(r)
            failure = ""
            if t0 < self._link_down_until:
                failure = "link down (injected)"
            elif self._fail_next_copies:
                self._fail_next_copies -= 1
                failure = "copy failed (injected)"
            seconds = self.cost.transfer_s(nbytes) if not failure else self.cost.transfer_s(0)
            yield env.timeout(seconds)
            t1 = env.now
            self.steps.append((t0, t1, LINK, "transfer", 1, r.kv_len, r.kv_len, 0, 0, -1, ctl.mode, 1, t1 - t0,
                               0 if failure else nbytes))
            if failure:
                ctl.transfer_failed(r, t1, failure)
            else:
                self._charge_copy(r.decode_device, nbytes, busy0, t1 - t0)
                ctl.transfer_done(r, t1, seconds, nbytes)
            self._wake(r.decode_device, interrupt=True)
            self._kick_link()

    def _charge_copy(self, dev: str, nbytes: int, busy0: float, seconds: float) -> None:
        """A KV copy's kernel runs on the decode GPU (the pull transport): the decode steps it overlapped pay
        the measured interference (decode_copy rows), in the share of the copy that `dev` spent stepping."""
        if self._copy_cost is None or seconds <= 0:
            return
        overlap = min(1.0, (self._busy_until_now(dev) - busy0) / seconds)
        batch = len(self.ctl.scheduler.running[dev])
        if overlap > 0 and batch:
            self._copy_debt[dev] += overlap * self._copy_cost(nbytes, batch)

    def _fault(self, f: Fault):
        yield self.env.timeout(f.t_s)
        if f.kind == "transfer":
            self._fail_next_copies += 1
            return
        if f.kind == "link":
            self._link_down_until = self.env.now + f.duration_s
        self.ctl.report_error(ErrorEvent(self.env.now, f.kind, GPU1, "injected"))
        self._wake_idle_with_work()


def _steps_started(elapsed: float, t_first: float, slope: float, k: int) -> int:
    """How many steps of a run have started (the last one possibly unfinished) after `elapsed`.
    Step i (1-based) ends at S(i) = i*t_first + slope*i*(i-1)/2."""
    if slope == 0.0:
        i = math.ceil(elapsed / t_first - 1e-12) if t_first > 0 else 1
    else:
        a, b = slope / 2, t_first - slope / 2
        disc = max(0.0, b * b + 4 * a * elapsed)
        i = math.ceil((-b + math.sqrt(disc)) / (2 * a) - 1e-9)
    return max(1, min(k, i))
