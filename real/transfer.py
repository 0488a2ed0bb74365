"""KV transfer between two KV caches: the hand-off of the prefill/decode split.

A transport moves one request's used blocks from the prefill cache to blocks the scheduler reserved
in the decode cache: one gather, one device-to-device copy and one scatter for all layers, K and V
(no Python loop over blocks or layers). `start` enqueues and returns; `poll` reports what finished,
so GPU0's next prefill overlaps the copy. Another transport (NCCL send/recv, NIXL) can implement the
same two methods for a multi-node split.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from policies import Request


@dataclass(slots=True)
class TransferDone:
    request: Request
    ok: bool
    seconds: float
    kv_bytes: int
    reason: str = ""


@dataclass(slots=True)
class _InFlight:
    request: Request
    started: float
    kv_bytes: int
    event: "torch.cuda.Event | None"
    failure: str


class BlockCopyTransport:
    """Peer-to-peer (or CPU) copy of whole blocks between two caches of shape
    [2, layers, blocks, block_size, kv_heads, head_dim].

    `faults` injects failures for tests: request_id -> how many attempts of that request fail.
    """

    def __init__(self, src_cache: torch.Tensor, dst_cache: torch.Tensor, faults: dict[int, int] | None = None):
        self.src, self.dst = src_cache, dst_cache
        self.faults = dict(faults or {})
        self.block_bytes = src_cache[:, :, 0].numel() * src_cache.element_size()
        self.in_flight: list[_InFlight] = []

    def start(self, req: Request) -> None:
        """Copy req.blocks (source cache) into req.dst_blocks (destination cache), asynchronously on CUDA."""
        nbytes = len(req.blocks) * self.block_bytes
        if self.faults.get(req.request_id, 0) > 0:
            self.faults[req.request_id] -= 1
            self.in_flight.append(_InFlight(req, time.perf_counter(), nbytes, None, "copy failed (injected)"))
            return
        src_idx = torch.as_tensor(req.blocks, dtype=torch.long).to(self.src.device, non_blocking=True)
        # the decode side reserved room for the next token too: fill its first blocks
        dst_idx = torch.as_tensor(req.dst_blocks[: len(req.blocks)], dtype=torch.long).to(self.dst.device,
                                                                                             non_blocking=True)
        chunk = self.src.index_select(2, src_idx).to(self.dst.device, non_blocking=True)
        self.dst.index_copy_(2, dst_idx, chunk)
        event = None
        if self.dst.is_cuda:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.dst.device))
        self.in_flight.append(_InFlight(req, time.perf_counter(), nbytes, event, ""))

    def poll(self) -> list[TransferDone]:
        """Transfers that have completed (or failed) since the last poll, oldest first."""
        done, still = [], []
        for t in self.in_flight:
            if t.event is not None and not t.event.query():
                still.append(t)
                continue
            done.append(TransferDone(t.request, not t.failure, time.perf_counter() - t.started, t.kv_bytes, t.failure))
        self.in_flight = still
        return done
