"""What the real engine's body adds to a step, beyond the isolated runner step the profile's
prefill/decode rows time.

Why: real/engine.py runs each GPU's steps from a launch thread of its own while the main thread runs
the policies and polls for completions, all in one Python process, and launches a GPU's next step only
once the previous step's tokens are back and reported. A step there costs the isolated step plus the
policy calls, the hand-off to the launch thread, the polling, the gap before the next launch, and host
work slowed by the interpreter the threads share (more so while the other GPU's launch thread works
too). In the 2x H200 fidelity runs (bench/fidelity_diagnose.py) decode steps took +0.4 ms at batch 1
to +4.5 ms (+35%) at batch 256 over the isolated profile, prefills +8..15 ms: the decode GPU then
saturates at a lower load than an isolated-profile simulation predicts, and TPOT grows.
`python -m real.profile` times steps inside the engine's body (ops engine_decode, engine_prefill, and
their *_busy twins measured with the other GPU's launch thread working); the overhead of a shape is
engine row - the calibrated isolated step at that shape, interpolated like the step rows (linear,
non-decreasing beyond the data, never negative).

A profile without engine rows (older ones) gives no overhead: the simulator then predicts an isolated
runner, as before, and `describe()` says so. A state measured alone stands in for the other.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence


@dataclass(slots=True)
class OverheadSurfaces:
    """Interpolated overhead (seconds) per stage and state of the other GPU; None = not measured."""
    decode_idle: object = None  # (batch, context per sequence) -> s
    decode_busy: object = None
    prefill_idle: object = None  # (sequences, new tokens in all) -> s
    prefill_busy: object = None


class EngineOverhead:
    """Per-step engine overhead from engine_* profile rows; see the module doc. `rows`: op -> its rows;
    the isolated-step functions are the calibrated model's; `surface`: its interpolator (sim.calibrated._Surface,
    passed in: calibrated imports this module)."""

    def __init__(self, rows: dict, decode_isolated_s: Callable[[int, int], float],
                 prefill_isolated_s: Callable[[Sequence[tuple[int, int]]], float], surface):
        self.counts = {op: len(df) for op, df in rows.items()}
        s = self.surfaces = OverheadSurfaces()

        def decode(df):
            pts = [(b, c, t - decode_isolated_s(int(b), int(b) * int(c)))
                   for b, c, t in zip(df["batch"], df["context"], df["seconds"])]
            return surface(pts) if pts else None

        def prefill(df):
            pts = [(n, t, sec - prefill_isolated_s(_even_chunks(int(n), int(t))))
                   for n, t, sec in zip(df["batch"], df["tokens"], df["seconds"])]
            return surface(pts) if pts else None

        s.decode_idle, s.decode_busy = decode(rows["engine_decode"]), decode(rows["engine_decode_busy"])
        s.prefill_idle, s.prefill_busy = prefill(rows["engine_prefill"]), prefill(rows["engine_prefill_busy"])
        self.measured = any(v is not None for v in (s.decode_idle, s.decode_busy, s.prefill_idle, s.prefill_busy))
        # the other GPU's state matters only where both states were measured
        self.depends_on_other_gpu = ((s.decode_idle is not None and s.decode_busy is not None)
                                     or (s.prefill_idle is not None and s.prefill_busy is not None))

    def _pick(self, idle, busy, other_busy: bool):
        first, second = (busy, idle) if other_busy else (idle, busy)
        return first if first is not None else second

    def decode_s(self, batch_size: int, kv_tokens: int, other_busy: bool = False) -> float:
        f = self._pick(self.surfaces.decode_idle, self.surfaces.decode_busy, other_busy)
        return f(batch_size, kv_tokens / batch_size) if f is not None and batch_size > 0 else 0.0

    def prefill_s(self, sequences: int, tokens: int, other_busy: bool = False) -> float:
        f = self._pick(self.surfaces.prefill_idle, self.surfaces.prefill_busy, other_busy)
        return f(sequences, tokens) if f is not None and sequences > 0 else 0.0

    def describe(self) -> str:
        if not self.measured:
            return ("none: no engine_* rows, steps cost the isolated runner step (the real engine's policy, "
                    "launch-thread hand-off, polling and shared interpreter are not modelled)")
        parts = [f"{op} {n}" for op, n in self.counts.items() if n]
        other = "by the other GPU's state" if self.depends_on_other_gpu else "one state measured, used for both"
        return f"engine row - isolated step, {', '.join(parts)} rows; {other}"


def _even_chunks(sequences: int, tokens: int) -> list[tuple[int, int]]:
    """`tokens` split over `sequences` as evenly as integers allow, no cached prefix (how real.profile packs)."""
    return [(tokens // sequences + (1 if j < tokens % sequences else 0), 0) for j in range(sequences)]
