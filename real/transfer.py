"""KV transfer between two KV caches: the hand-off of the prefill/decode split.

A transport moves one request's used blocks from the prefill cache to blocks the scheduler reserved
in the decode cache. "pull" (the engine's default on two GPUs with peer access and Triton, through "auto")
and "push": one Triton kernel copies every (block, layer, K/V) piece straight between the caches over
NVLink, no staging buffer, one launch per request; pull runs it on GPU1 (leaving GPU0's SMs to the next
prefill; ~0.3 ms of GPU1 per 1k-token request), push on GPU0. "copy": a gather, a copy-engine transfer and
a scatter per group of layers (about 128 MB each) pipelined on their own streams. H200 pair, 8192-token
request against a plain 1 GB copy (bench/results/kv_transfer_NVIDIA_H200.json, pd_NVIDIA_H200.json): pull
0.89-0.90, push 0.89, copy 0.72-0.77 (32 MB groups: 0.53-0.59, host-bound). TTFT with the copy over the
same run with transport "none" (no byte moves, same decode load): pull p50 0.99x (2 runs: 1.03, 0.95),
copy 1.07x (3 runs: 0.90-1.34). Over a prefill-only run (no decode on GPU1 either) every mode reads
1.15-1.25x, pull included: that part is GPU1's decode beside the prefill, not the copy (push was judged on
that baseline alone, pd_transfer_NVIDIA_H200.json, so its own cost is not separated). `start`
enqueues and returns; `poll` reports what finished, so GPU0's next prefill overlaps the copy. The
streams are the transport's own: it waits for no GPU work (or, if given, an event after the prefill
that wrote the KV), never for GPU1's decode, and neither GPU's compute stream waits for it; the
scheduler hands the blocks to GPU1's decode after `poll`. Another transport (NCCL send/recv, NIXL) can implement the same two
methods for a multi-node split.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from policies import Request

from .pipeline import record_event


def enable_peer_access(a: torch.device, b: torch.device) -> bool:
    """Map each GPU's memory into the other's address space (both directions), so one kernel on either GPU can
    read and write both caches over NVLink. False where the pair has no peer access or cuda-bindings is missing."""
    if a.type != "cuda" or b.type != "cuda" or not torch.cuda.can_device_access_peer(a.index, b.index):
        return False
    try:
        from cuda.bindings import driver
    except ImportError:
        return False
    torch.cuda.init()
    ctxs = {}
    for d in (a, b):
        torch.cuda.synchronize(d)  # makes sure torch created the primary context
        err, dev = driver.cuDeviceGet(d.index)
        err, ctxs[d.index] = driver.cuDevicePrimaryCtxRetain(dev)
        if err != driver.CUresult.CUDA_SUCCESS:
            return False
    ok = True
    for d, peer in ((a, b), (b, a)):
        driver.cuCtxPushCurrent(ctxs[d.index])
        (err,) = driver.cuCtxEnablePeerAccess(ctxs[peer.index], 0)
        driver.cuCtxPopCurrent()
        ok &= err in (driver.CUresult.CUDA_SUCCESS, driver.CUresult.CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED)
    return ok


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
    mode: "copy" (copy engines), "push" (one kernel on GPU0 writing GPU1's cache), "pull" (one kernel on
    GPU1 reading GPU0's cache; push and pull are errors without peer access and Triton), "auto" (pull where
    possible, else copy) or "none", a timing control for benchmarks: no byte moves and the transfer
    completes at the next poll, so a run keeps the scheduling and GPU1 decode load of a real one and differs
    only by the copy (its outputs are wrong: GPU1 decodes over whatever its blocks held).
    """

    MODES = ("copy", "push", "pull", "auto", "none")

    def __init__(self, src_cache: torch.Tensor, dst_cache: torch.Tensor, faults: dict[int, int] | None = None,
                 chunk_bytes: int = 128 << 20, mode: str = "copy", max_programs: int = 0):
        self.src, self.dst = src_cache, dst_cache
        self.faults = dict(faults or {})
        self.block_bytes = src_cache[:, :, 0].numel() * src_cache.element_size()
        self.layers = src_cache.shape[1]
        self.chunk_bytes = chunk_bytes
        self.in_flight: list[_InFlight] = []
        self.max_programs = max_programs
        cuda = src_cache.is_cuda and dst_cache.is_cuda
        if mode not in self.MODES:
            raise ValueError(f"unknown KV transport mode {mode!r}; choose one of {', '.join(self.MODES)}")
        self.mode = "none" if mode == "none" else "copy"
        if cuda and mode not in ("copy", "none"):
            from .triton_kernels import triton

            if triton is not None and src_cache.is_contiguous() and dst_cache.is_contiguous() \
                    and enable_peer_access(src_cache.device, dst_cache.device):
                self.mode = "pull" if mode == "auto" else mode
        if mode in ("push", "pull") and self.mode != mode:
            raise RuntimeError(f"the {mode} KV transport needs two GPUs with peer access, and Triton")
        if self.mode in ("push", "pull"):
            self.kernel_device = src_cache.device if self.mode == "push" else dst_cache.device
            self.streams = dict(kernel=torch.cuda.Stream(self.kernel_device))
            self._warm_up()
            return
        # gather (src), link copy (src, fenced with a dst stream of its own), scatter (dst): three stages
        # that overlap across layer groups, so the link is busy while the ends gather and scatter
        self.streams = None
        if cuda:
            s, d = src_cache.device, dst_cache.device
            self.streams = dict(gather=torch.cuda.Stream(s), link=torch.cuda.Stream(s), link_dst=torch.cuda.Stream(d),
                                scatter=torch.cuda.Stream(d))

    def layer_groups(self, num_blocks: int) -> list[tuple[int, int]]:
        """Layer ranges copied as one piece each: about `chunk_bytes` per piece, at most one per layer."""
        n = max(1, min(self.layers, num_blocks * self.block_bytes // max(1, self.chunk_bytes)))
        bounds = [self.layers * i // n for i in range(n + 1)]
        return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]

    def start(self, req: Request, after: "torch.cuda.Event | None" = None) -> None:
        """Copy req.blocks (source cache) into req.dst_blocks (destination cache), asynchronously on CUDA.

        The request's KV must be written when the copy runs: either the host has seen the prefill that wrote
        it finish (the engine starts transfers only then, so nothing waits) or `after` is an event recorded
        after that prefill. An event recorded "now" on GPU0's stream (as before) can land behind the NEXT
        prefill, which the engine launches first in its tick, and the copy then waits for it (real runs
        before the change: ~6 ms a request, 51-60 GB/s effective)."""
        nbytes = len(req.blocks) * self.block_bytes
        if self.faults.get(req.request_id, 0) > 0:
            self.faults[req.request_id] -= 1
            self.in_flight.append(_InFlight(req, time.perf_counter(), nbytes, None, "copy failed (injected)"))
            return
        if self.mode == "none":
            self.in_flight.append(_InFlight(req, time.perf_counter(), nbytes, None, ""))
            return
        from .runner import to_device

        groups = self.layer_groups(len(req.blocks))
        dst_blocks = req.dst_blocks[: len(req.blocks)]  # the decode side also reserved room for the next token
        if self.streams is None:
            src_idx = to_device(req.blocks, torch.long, self.src.device)
            dst_idx = to_device(dst_blocks, torch.long, self.dst.device)
            for a, b in groups:
                self.dst[:, a:b].index_copy_(2, dst_idx, self.src[:, a:b].index_select(2, src_idx))
            self.in_flight.append(_InFlight(req, time.perf_counter(), nbytes, None, ""))
            return
        if self.mode in ("push", "pull"):
            self._copy_kernel(req, dst_blocks, nbytes, after)
            return
        st = self.streams
        if after is not None:
            st["gather"].wait_event(after)
        with torch.cuda.stream(st["gather"]):  # block ids travel on the streams that use them
            src_idx = to_device(req.blocks, torch.long, self.src.device)
        with torch.cuda.stream(st["scatter"]):
            dst_idx = to_device(dst_blocks, torch.long, self.dst.device)
        for a, b in groups:
            with torch.cuda.stream(st["gather"]):
                piece = self.src[:, a:b].index_select(2, src_idx)
                gathered = record_event()
            st["link"].wait_event(gathered)
            piece.record_stream(st["link"])
            # a cross-device copy fences the CURRENT streams of both devices: make those the link's own
            with torch.cuda.stream(st["link"]), torch.cuda.stream(st["link_dst"]):
                moved = piece.to(self.dst.device, non_blocking=True)
                arrived = record_event()
            st["scatter"].wait_event(arrived)
            moved.record_stream(st["scatter"])
            with torch.cuda.stream(st["scatter"]):
                self.dst[:, a:b].index_copy_(2, dst_idx, moved)
        done = torch.cuda.Event()
        done.record(st["scatter"])
        self.in_flight.append(_InFlight(req, time.perf_counter(), nbytes, done, ""))

    def _warm_up(self) -> None:
        """Compile the copy kernel now, not in the first request's transfer: block 0 onto block 0 (start-up, the
        caches hold no request yet)."""
        from .triton_kernels import copy_blocks_triton

        zero = torch.zeros(1, dtype=torch.int32, device=self.kernel_device)
        copy_blocks_triton(self.src, self.dst, zero, zero, self.kernel_device)
        torch.cuda.synchronize(self.kernel_device)

    def _copy_kernel(self, req: Request, dst_blocks: list[int], nbytes: int, after) -> None:
        """One kernel (on GPU0 for push, GPU1 for pull) on the transport's stream."""
        from .runner import to_device
        from .triton_kernels import copy_blocks_triton

        stream = self.streams["kernel"]
        if after is not None:
            stream.wait_event(after)
        with torch.cuda.stream(stream):
            ids = to_device([req.blocks, dst_blocks], torch.int32, self.kernel_device)  # one host-to-device copy
            copy_blocks_triton(self.src, self.dst, ids[0], ids[1], self.kernel_device, max_programs=self.max_programs)
            done = record_event()
        self.in_flight.append(_InFlight(req, time.perf_counter(), nbytes, done, ""))

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

