"""What may stall the engine's host for a while during serving: Python's garbage collector and PyTorch's CUDA
allocator, recorded so a slow step in steps.csv can be matched to a cause.

Why: on the held-out workload pd's real TTFT p99 is bimodal across 2x H200 machines (185-186 ms on three, 214-245
on four) because one GPU0 prefill step in the run's first 7 s took 150-200 ms more than the same shape elsewhere in
the run (session 21: 5 prompts / 16,384 tokens in 250 ms where adaptive's took 85-94 ms). The simulator has no such
one-off stalls. A full collection over a large heap, or the allocator freeing its cache and retrying a failed
cudaMalloc (which synchronises the device), are the usual suspects; this says whether either happened, and when.

Session 22 read it (2x H200, held-out pd): the run's one full (generation 2) collection took 183 ms at 0.85 s, inside
the GPU0 prefill that ran 253 ms (0.665-0.918 s) for 3 prompts, and the 8 requests queued behind it are the run's
slowest TTFTs (225 ms p99); adaptive's full collection (253 ms) fell at 9.9 s. So the stall is the collector walking
the start-up heap (model, graphs, compiled code), and `freeze_startup_heap` now moves that heap out of its reach.
"""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field


def freeze_startup_heap() -> int:
    """Collect once, then freeze every object alive (gc.freeze), so collections while serving walk only what serving
    made, not the start-up heap that a full collection otherwise walks mid-run (183-253 ms on 2x H200). vLLM does
    the same after start-up. Returns the number of objects frozen (gc.get_freeze_count())."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


@dataclass(slots=True)
class StallWatch:
    """Times every garbage collection between start() and stop() (gc.callbacks) and reads the CUDA allocator's
    retry and OOM counters of `devices` at both ends. `clock` gives the run's time (the engine's clock), so the
    long pauses carry times comparable with steps.csv."""
    clock: object = time.perf_counter
    devices: tuple = ()  # torch.device of each CUDA GPU the engine uses (none on CPU)
    long_ms: float = 5.0  # pauses at least this long are listed one by one
    collections: list = field(default_factory=lambda: [0, 0, 0])  # by generation
    total_s: float = 0.0
    longest_s: float = 0.0
    long_pauses: list = field(default_factory=list)  # (run time s, generation, ms)
    _t0: float | None = None
    _alloc0: dict = field(default_factory=dict)

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        elif self._t0 is not None:
            took = time.perf_counter() - self._t0
            self._t0 = None
            gen = int(info.get("generation", 0))
            self.collections[min(gen, 2)] += 1
            self.total_s += took
            self.longest_s = max(self.longest_s, took)
            if took * 1e3 >= self.long_ms:
                self.long_pauses.append((round(self.clock(), 6), gen, round(took * 1e3, 3)))

    def _allocator(self) -> dict:
        if not self.devices:
            return {}
        import torch

        out = {}
        for d in self.devices:
            stats = torch.cuda.memory_stats(d)
            out[str(d)] = {k: int(stats.get(k, 0)) for k in ("num_alloc_retries", "num_ooms", "num_device_alloc",
                                                             "num_device_free")}
        return out

    def start(self) -> "StallWatch":
        self._alloc0 = self._allocator()
        if self._on_gc not in gc.callbacks:
            gc.callbacks.append(self._on_gc)
        return self

    def stop(self) -> dict:
        """Stop watching; the record for run.json: collections by generation, their total and longest time, the
        long ones with their run time, and what the allocator did meanwhile (counter differences per GPU)."""
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)
        end = self._allocator()
        alloc = {d: {k: v - self._alloc0.get(d, {}).get(k, 0) for k, v in c.items()} for d, c in end.items()}
        return dict(gc=dict(collections_by_generation=list(self.collections), total_ms=round(self.total_s * 1e3, 3),
                            longest_ms=round(self.longest_s * 1e3, 3), long_ms=self.long_ms,
                            long_pauses=[list(p) for p in self.long_pauses]),
                    cuda_allocator=alloc)
