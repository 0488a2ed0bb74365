"""Continuous batching over one or two GPUs with paged KV accounting per GPU.

The scheduler owns every request's state; a body (sim or real engine) asks it what to run on a
device, runs it, and reports back. Each request has a prefill device and a decode device:
single and dp colocate both (chunked prefill mixed into decode steps, as vLLM/Sarathi do), pd
and pipeline prefill on gpu0 and decode on gpu1 with a KV transfer in between, for which gpu1
blocks are reserved before the copy starts.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from .blocks import BlockPool
from .config import SchedulerConfig
from .request import (FAILED, FINISHED, PENDING_TRANSFER, READY, REJECTED, RUNNING, TRANSFERRING, WAITING,
                      Request)
from .types import DP, GPU0, GPU1, PD, PIPELINE, SINGLE, DecisionRecord


@dataclass(slots=True)
class Batch:
    """What one device runs next: prefill chunks and/or decodes, for `num_steps` identical steps."""
    device: str
    prefill: list[tuple[Request, int]] = field(default_factory=list)  # (request, chunk tokens)
    decode: list[Request] = field(default_factory=list)
    num_steps: int = 1
    decode_kv_tokens: int = 0  # KV tokens the decodes attend over in the first step

    @property
    def prefill_tokens(self) -> int:
        return sum(c for _, c in self.prefill)

    @property
    def stage(self) -> str:
        if self.prefill and self.decode:
            return "mixed"
        return "prefill" if self.prefill else "decode"


class Scheduler:
    def __init__(self, cfg: SchedulerConfig, pools: dict[str, BlockPool], kv_bytes_per_token: int,
                 max_context_tokens: int, log: Callable[[DecisionRecord], None] | None = None):
        self.cfg = cfg
        self.pools = pools
        self.kv_bytes_per_token = kv_bytes_per_token
        self.max_context_tokens = max_context_tokens
        self.log = log or (lambda rec: None)
        self.mode = SINGLE
        self.waiting: dict[str, deque[Request]] = {d: deque() for d in pools}
        self.ready: dict[str, deque[Request]] = {d: deque() for d in pools}
        self.running: dict[str, list[Request]] = {d: [] for d in pools}
        self.pending_transfers: deque[Request] = deque()
        self.transferring: dict[int, Request] = {}
        self.prefill_paused = False  # back-pressure: no new prefills whose decode is elsewhere
        self.kv_watermark_blocks = {d: max(1, int(0.01 * p.num_blocks)) for d, p in pools.items()}

    # ---- admission -------------------------------------------------------------------------
    def add(self, req: Request, now: float) -> bool:
        """Route and queue a request, or reject it with a reason (False)."""
        req.mode = self.mode
        total = req.prompt_tokens + req.output_tokens
        reason = ""
        if total > self.max_context_tokens:
            reason = f"prompt+output {total} tokens exceeds the max context {self.max_context_tokens}"
        prefill_dev, decode_dev = self._route()
        for dev in {prefill_dev, decode_dev}:
            pool = self.pools[dev]
            if not reason and pool.blocks_for(total) > pool.num_blocks - self.kv_watermark_blocks[dev]:
                reason = f"needs {pool.blocks_for(total)} KV blocks, {dev} has {pool.num_blocks}"
        if reason:
            req.state, req.fail_reason, req.finish_s = REJECTED, reason, now
            self.log(DecisionRecord(now, "scheduler", "reject", str(req.request_id), "rejected", reason))
            return False
        req.prefill_device, req.decode_device = prefill_dev, decode_dev
        req.state = WAITING
        self.waiting[prefill_dev].append(req)
        return True

    def _route(self) -> tuple[str, str]:
        if self.mode in (PD, PIPELINE):
            return GPU0, GPU1
        if self.mode == DP:
            dev = min((GPU0, GPU1), key=self._load)
            return dev, dev
        return GPU0, GPU0

    def _load(self, dev: str) -> int:
        """Outstanding work on a device, in tokens: prompt still to prefill plus output still to decode."""
        return (sum(r.remaining_prefill + r.remaining_output for r in self.waiting[dev])
                + sum(r.remaining_output for r in self.ready[dev])
                + sum(r.remaining_output for r in self.running[dev]))

    # ---- a device asks for work ----------------------------------------------------------------
    def schedule(self, device: str, now: float, max_steps: int | None = None) -> Batch | None:
        cfg = self.cfg
        pool = self.pools[device]
        running, ready = self.running[device], self.ready[device]
        while ready and len(running) < cfg.max_decode_batch:
            r = ready.popleft()
            r.state = RUNNING
            running.append(r)
        batch = Batch(device)
        steps = self._grow_decodes(device, now, max_steps or cfg.max_steps_per_schedule)
        batch.decode = list(running)
        colocated = bool(running) or self.mode in (SINGLE, DP)
        budget = (cfg.mixed_token_budget - len(running)) if colocated else cfg.prefill_token_budget
        waiting = self.waiting[device]
        hosted = len(running) + len(ready)
        while waiting and budget > 0 and len(batch.prefill) < cfg.max_prefill_seqs:
            r = waiting[0]
            if r.prefilled == 0:  # starting a new request
                if r.decode_device != device and self.prefill_paused:
                    break
                if r.decode_device == device and hosted + len(batch.prefill) >= cfg.max_decode_batch:
                    break
            chunk = min(r.remaining_prefill, budget)
            if not pool.grow(r.blocks, r.prefilled + chunk):
                break  # out of KV memory: wait for decodes to finish or transfers to drain
            waiting.popleft()
            r.kv_device = device
            if r.prefilled == 0:
                r.prefill_start_s = now
            batch.prefill.append((r, chunk))
            budget -= chunk
        if not batch.prefill and not batch.decode:
            return None
        batch.num_steps = 1 if batch.prefill else steps
        batch.decode_kv_tokens = sum(r.kv_len for r in batch.decode) + len(batch.decode)
        return batch

    def _grow_decodes(self, device: str, now: float, max_steps: int) -> int:
        """Reserve KV for the next steps of every running decode; preempt when the GPU is full."""
        running = self.running[device]
        if not running:
            return 1
        pool = self.pools[device]
        steps = max(1, min(max_steps, min(r.output_tokens - r.generated for r in running)))
        while True:
            if all(pool.grow(r.blocks, r.kv_len + steps) for r in running):
                return steps
            if steps > 1:
                steps = 1
                continue
            victim = self.ready[device].pop() if self.ready[device] else running.pop()
            self._preempt(victim, now, f"{device} out of KV blocks ({pool.num_free} free)")
            if not running:
                return 1

    def _preempt(self, r: Request, now: float, reason: str) -> None:
        """Free the request's KV and queue it to be prefilled again (recompute)."""
        self.pools[r.kv_device].free(r.blocks)
        r.preemptions += 1
        r.prefill_target = r.prompt_tokens + r.generated
        r.prefilled = r.kv_len = 0
        r.kv_device = ""
        r.state = WAITING
        r.transfer_attempts = 0  # timestamps and retries describe the last attempt
        r.kv_transfer_start_s = r.kv_transfer_end_s = None
        # first in line, but behind chunked prefills already under way: they hold blocks, and a
        # victim that cannot get blocks in front of them would stall the GPU
        q = self.waiting[r.prefill_device]
        i = 0
        while i < len(q) and q[i].prefilled > 0:
            i += 1
        q.insert(i, r)
        self.log(DecisionRecord(now, "scheduler", "preempt", str(r.request_id), "recompute", reason))

    # ---- a device reports what it ran ----------------------------------------------------------
    def finish_batch(self, batch: Batch, now: float, steps_done: int | None = None,
                     stopped: dict[int, int] | None = None) -> list[Request]:
        """Advance every request of `batch`; returns the requests that ended. `stopped`: request id -> steps
        it really ran, for a decode that stopped (EOS) before the last of the batch's steps."""
        done: list[Request] = []
        device = batch.device
        unfinished = []
        for r, chunk in batch.prefill:
            r.prefilled += chunk
            r.kv_len = r.prefilled
            if r.prefilled < r.prefill_target:
                unfinished.append(r)
                continue
            r.generated += 1  # the prefill samples a token
            r.prefill_end_s = now
            if r.first_token_s is None:
                r.first_token_s = now
            if r.generated >= r.output_tokens or r.stop_requested:
                self._finish(r, now)
                done.append(r)
            elif r.decode_device == device:
                r.state = READY
                self.ready[device].append(r)
            else:
                r.state = PENDING_TRANSFER
                self.pending_transfers.append(r)
        self.waiting[device].extendleft(reversed(unfinished))
        steps = batch.num_steps if steps_done is None else steps_done
        ended = False
        for r in batch.decode:
            if r.state != RUNNING:
                continue
            ran = steps if stopped is None else stopped.get(r.request_id, steps)
            r.generated += ran
            r.kv_len += ran
            if r.generated >= r.output_tokens or r.stop_requested:
                self._finish(r, now)
                done.append(r)
                ended = True
        if ended:
            self.running[device] = [r for r in self.running[device] if r.state == RUNNING]
        return done

    def _finish(self, r: Request, now: float) -> None:
        r.state = FINISHED
        r.finish_s = now
        if r.kv_device:
            self.pools[r.kv_device].free(r.blocks)

    # ---- KV transfers ----------------------------------------------------------------------------
    def transfer_bytes(self, r: Request) -> int:
        """Only the request's used blocks cross the link."""
        return len(r.blocks) * self.pools[r.kv_device].block_size * self.kv_bytes_per_token

    def start_transfers(self, now: float) -> list[Request]:
        """Reserve decode-GPU blocks for pending transfers (FIFO) and hand them to the link."""
        started = []
        pending = self.pending_transfers
        while pending:
            r = pending[0]
            dst = self.pools[r.decode_device]
            need = dst.blocks_for(r.kv_len + 1)
            if dst.num_free - need < self.kv_watermark_blocks[r.decode_device]:
                break  # hold: the decode GPU is full; back-pressure will throttle prefill
            pending.popleft()
            r.dst_blocks = dst.allocate(need)
            r.state = TRANSFERRING
            r.transfer_attempts += 1
            if r.transfer_attempts == 1:
                r.kv_transfer_start_s = now
            self.transferring[r.request_id] = r
            started.append(r)
        return started

    def transfer_done(self, r: Request, now: float) -> None:
        del self.transferring[r.request_id]
        self.pools[r.kv_device].free(r.blocks)
        r.blocks, r.dst_blocks = r.dst_blocks, []
        r.kv_device = r.decode_device
        r.kv_transfer_end_s = now
        r.state = READY
        self.ready[r.decode_device].append(r)

    def transfer_failed(self, r: Request, now: float, reason: str) -> None:
        """Retry the copy, or decode where the KV already is; a request is never dropped here."""
        del self.transferring[r.request_id]
        self.pools[r.decode_device].free(r.dst_blocks)
        if self.mode in (PD, PIPELINE) and r.transfer_attempts <= self.cfg.transfer_retries:
            r.state = PENDING_TRANSFER
            self.pending_transfers.appendleft(r)
            self.log(DecisionRecord(now, "scheduler", "retry_transfer", str(r.request_id),
                                    f"attempt {r.transfer_attempts + 1}", reason))
            return
        self._colocate(r, now, f"{reason}; decoding on {r.kv_device} where the KV is")

    def _colocate(self, r: Request, now: float, reason: str) -> None:
        r.kv_transfer_start_s = r.kv_transfer_end_s = None  # no copy made it: failures are in steps/decisions
        r.decode_device = r.kv_device
        r.state = READY
        self.ready[r.kv_device].append(r)
        self.log(DecisionRecord(now, "scheduler", "colocate", str(r.request_id), r.kv_device, reason))

    # ---- mode changes --------------------------------------------------------------------------
    def set_mode(self, mode: str, now: float) -> None:
        """Route new requests for `mode`; requests that can no longer reach gpu1 stay on gpu0."""
        old, self.mode = self.mode, mode
        if old in (PD, PIPELINE) and mode not in (PD, PIPELINE):
            while self.pending_transfers:
                self._colocate(self.pending_transfers.popleft(), now, f"mode {old} -> {mode}")
            for r in self.waiting[GPU0]:
                r.decode_device = GPU0
        if mode == SINGLE and GPU1 in self.waiting:
            moved = self.waiting[GPU1]
            while moved:
                r = moved.popleft()
                if r.blocks:
                    self.pools[GPU1].free(r.blocks)
                r.prefilled = r.kv_len = 0
                r.kv_device = ""
                r.prefill_device = r.decode_device = GPU0
                self.waiting[GPU0].append(r)

    def fail_request(self, r: Request, now: float, reason: str) -> None:
        r.state, r.fail_reason, r.finish_s = FAILED, reason, now
        for blocks, dev in ((r.blocks, r.kv_device), (r.dst_blocks, r.decode_device)):
            if blocks and dev:
                self.pools[dev].free(blocks)

    # ---- what the policies observe ---------------------------------------------------------------
    def has_work(self) -> bool:
        return bool(self.pending_transfers or self.transferring
                    or any(self.waiting.values()) or any(self.ready.values()) or any(self.running.values()))

    def counts(self) -> dict:
        w, rd, rn = self.waiting, self.ready, self.running
        return dict(
            waiting_requests=sum(map(len, w.values())),
            ready_requests=sum(map(len, rd.values())),
            running_requests=sum(map(len, rn.values())),
            pending_transfers=len(self.pending_transfers),
            transfers_in_flight=len(self.transferring),
            transfer_bytes_in_flight=sum(map(self.transfer_bytes, self.transferring.values()))
            if self.transferring else 0,
        )
