"""The engine's own host cost per step, with a null GPU (runs anywhere; CPU is the point).

    python bench/engine_host_overhead.py [--policy pd] [--batch 256] [--prefill-host-ms 30]

Every runner's launch is replaced by its input staging alone (prepare_decode, no forward), and KV copies
are skipped, so a step's time is the policy + engine body + staging + the launch-thread hand-off: what
a real step adds to its GPU time. Decode-only requests fill the batch; with --prefill-host-ms, a stream of 1-token requests
keeps GPU0 "prefilling", each prefill holding the GIL that long in pure Python (a pessimistic stand-in
for an eager prefill's host time: real PyTorch ops release the GIL while they dispatch). Prints decode
step times at batch >= 200 with GPU0 idle and busy.
"""
from __future__ import annotations

import argparse
import statistics as st
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", default="pd", choices=["single", "pd"])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--prefill-host-ms", type=float, default=0.0)
    ap.add_argument("--switch-interval-ms", type=float, default=5.0,
                    help="EngineConfig.gil_switch_interval_ms (Python's own default: 5 ms; the engine's: 0.5 ms)")
    args = ap.parse_args()
    from real.config import EngineConfig
    from real.engine import LLMEngine, SamplingParams
    from real.runner import PendingStep

    b = args.batch
    eng = LLMEngine(EngineConfig(model="tiny", device="cpu", max_num_seqs=b, num_kv_blocks=b * 80 + 64,
                                 gil_switch_interval_ms=args.switch_interval_ms), args.policy, log=lambda *_: None)
    sys.setswitchinterval(args.switch_interval_ms / 1e3)  # single has no launch threads: set it here too
    hold_s = args.prefill_host_ms / 1e3

    def null_launch(self, batch, temperatures, split=None, microbatches=1):
        if batch.decode:
            self.prepare_decode(batch.decode)
        if batch.prefill and hold_s:
            end = time.perf_counter() + hold_s
            while time.perf_counter() < end:
                pass
        sampled = list(batch.decode) + [r for r, c in batch.prefill if r.prefilled + c == r.prefill_target]
        return PendingStep(sampled, torch.zeros(len(sampled), dtype=torch.int64), None, None)

    for r in eng.runners.values():
        r.launch = null_launch.__get__(r)
    if eng.transport is not None:  # on CPU the copy runs synchronously on the main thread: take it out too
        from real.transfer import _InFlight

        eng.transport.start = lambda req, after=None: eng.transport.in_flight.append(
            _InFlight(req, time.perf_counter(), 0, None, ""))
    greedy = dict(temperature=0.0, ignore_eos=True)
    pending = [(0.0, i, list(range(1, 1001)), SamplingParams(max_tokens=600, **greedy)) for i in range(b - 8)]
    pending += [(0.3 + 0.035 * j, 10**4 + j, list(range(1, 1001)), SamplingParams(max_tokens=1, **greedy))
                for j in range(60)]
    eng.run_until_done(pending)
    gpu0 = [(s[0], s[1]) for s in eng.steps if s[2] == "gpu0"]
    decode = [s for s in eng.steps if s[3] == "decode" and s[4] >= 200]
    print(f"policy {args.policy}, batch {b}, prefill host {args.prefill_host_ms:g} ms, switch interval "
          f"{args.switch_interval_ms:g} ms")
    if args.policy == "single":  # one GPU: prefill and decode share it
        gpu0 = []
    for label, busy in (("GPU0 idle", False), ("GPU0 busy", True)):
        times = [s[1] - s[0] for s in decode if any(a < s[1] and e > s[0] for a, e in gpu0) == busy]
        if times:
            print(f"  {label}: {len(times)} decode steps, median {st.median(times) * 1e3:.2f} ms, "
                  f"mean {st.mean(times) * 1e3:.2f} ms, p90 {sorted(times)[int(0.9 * len(times))] * 1e3:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
