"""KV transfer between two KV caches: the hand-off of the prefill/decode split.

A transport moves one request's used blocks from the prefill cache to blocks the scheduler reserved
in the decode cache: one gather, one device-to-device copy and one scatter for all layers, K and V
(no Python loop over blocks or layers). `start` enqueues and returns; `poll` reports what finished,
so GPU0's next prefill overlaps the copy. On CUDA the copy runs on a dedicated copy stream per GPU:
it waits (by event) only for GPU0's work that wrote the KV, never for GPU1's decode, and neither
GPU's compute stream waits for it; the scheduler hands the blocks to GPU1's decode after `poll`. Another transport (NCCL send/recv, NIXL) can implement the
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
        cuda = src_cache.is_cuda and dst_cache.is_cuda
        self.streams = (torch.cuda.Stream(src_cache.device), torch.cuda.Stream(dst_cache.device)) if cuda else None

    def start(self, req: Request) -> None:
        """Copy req.blocks (source cache) into req.dst_blocks (destination cache), asynchronously on CUDA."""
        nbytes = len(req.blocks) * self.block_bytes
        if self.faults.get(req.request_id, 0) > 0:
            self.faults[req.request_id] -= 1
            self.in_flight.append(_InFlight(req, time.perf_counter(), nbytes, None, "copy failed (injected)"))
            return
        if self.streams is None:
            self._copy(req)
            self.in_flight.append(_InFlight(req, time.perf_counter(), nbytes, None, ""))
            return
        src_stream, dst_stream = self.streams
        written = torch.cuda.Event()
        written.record(torch.cuda.current_stream(self.src.device))  # the prefill that wrote this KV
        src_stream.wait_event(written)
        # a cross-device copy fences the CURRENT streams of both devices: make those the copy streams
        with torch.cuda.stream(src_stream), torch.cuda.stream(dst_stream):
            self._copy(req)
            event = torch.cuda.Event()
            event.record(dst_stream)
        self.in_flight.append(_InFlight(req, time.perf_counter(), nbytes, event, ""))

    def _copy(self, req: Request) -> None:
        """Gather the blocks on the source, one copy across, scatter into the reserved destination blocks."""
        from .runner import to_device

        src_idx = to_device(req.blocks, torch.long, self.src.device)
        # the decode side reserved room for the next token too: fill its first blocks
        dst_idx = to_device(req.dst_blocks[: len(req.blocks)], torch.long, self.dst.device)
        chunk = self.src.index_select(2, src_idx).to(self.dst.device, non_blocking=True)
        self.dst.index_copy_(2, dst_idx, chunk)

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
