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
non-decreasing beyond the data).

A decode overhead keeps its sign. The engine rows and the isolated rows are timed in different processes
(the engine ones in fresh processes), and a GPU's speed moves from process to process, so an engine row can
come in under the isolated step of its own shape: engine_decode_single rows did in all three 2x H200 profiles
read in session 17 (-0.05 to -0.88 ms: GPU0's isolated step is GPU1's decode row x the decode_prefill_gpu
ratio, timed in the profiling process). Floored at zero, the simulated step at a row's own shape exceeded the
row by 3-11%, and single's served decode steps were modelled 0.997-1.065x (sessions 16-17, own profiles).
Signed, the simulator charges each engine row exactly at its shape. A prefill overhead stays >= 0: the busy
prefill rows of 7-17 sequences are single fillers at 16,384 tokens whose (negative) differences would be held
flat over tokens and taken off short prefills of as many sequences.

Policy single runs a one-GPU engine (no launch thread, nothing else in the process), whose host loop costs
less: in 2x H200 serving its GPU0 decode steps had a 23-53 us launch gap against pd's 96-114 us, and charged
pd's overhead the simulated single run landed +8..+12% on TTFT and TPOT. Its steps take their decode overhead
from engine_decode_single rows (timed on GPU0, so less GPU0's isolated step) and its prefill overhead (a
prefill, or the prefill side of a mixed step) from engine_prefill_single rows, where the profile has them.

Where the profile has an engine decode row's isolated twin (engine_decode_isolated, engine_decode_single_isolated:
the runner step at the row's shape, timed in the engine rows' own process), the overhead is the row less its twin,
not less the profile's isolated step: the profiling process's speed then stays out of the overhead. Without twins
(profiles before session 26), pd's overhead at batch 256 read 0.2-2.0 ms over six 2x H200 profiles where served
steps of 129-256 sequences ran 0.4-1.0 ms over the isolated model on every machine.

A profile without engine rows (older ones) gives no overhead: the simulator then predicts an isolated
runner, as before, and `describe()` says so. A state measured alone stands in for the other.

Rows with spread columns (quantiles of the periods over their mean) also give each shape's step-time
spread (sim/variability.py), interpolated knot by knot like the overhead, held flat beyond the rows (a
spread is a shape, not a trend to extrapolate); rows without them give none: steps take their mean.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from traces.profile import SPREAD_COLUMNS

from .variability import KNOT_U, StepSpread


@dataclass(slots=True)
class OverheadSurfaces:
    """Per stage and state of the other GPU, a function of the step's shape (the overhead in seconds, or
    the StepSpread); None = not measured."""
    decode_idle: object = None  # (batch, context per sequence) -> s
    decode_busy: object = None
    prefill_idle: object = None  # (sequences, new tokens in all) -> s
    prefill_busy: object = None
    decode_single: object = None  # a one-GPU engine's (policy single) decode steps: (batch, context) -> s
    prefill_single: object = None  # its prefills: (sequences, new tokens in all) -> s


class _SpreadSurface:
    """A StepSpread over a shape (x, y): one held surface per knot of the measured spreads. Looked up at y
    rounded to Y_STEP and cached (a spread changes over thousands of tokens; the sim asks at every step)."""
    Y_STEP = 16

    def __init__(self, points: list[tuple[float, float, StepSpread]], surface):
        self.knots = [surface([(x, y, sp.knots[i]) for x, y, sp in points], hold=True) for i in range(len(KNOT_U))]
        self._cache: dict[tuple[float, int], StepSpread] = {}

    def __call__(self, x: float, y: float) -> StepSpread:
        key = (x, int(y) // self.Y_STEP)
        got = self._cache.get(key)
        if got is None:
            y = (key[1] + 0.5) * self.Y_STEP
            got = self._cache[key] = StepSpread(tuple(f(x, y) for f in self.knots))
        return got


class EngineOverhead:
    """Per-step engine overhead from engine_* profile rows; see the module doc. `rows`: op -> its rows;
    the isolated-step functions are the calibrated model's; `surface`: its interpolator (sim.calibrated._Surface,
    passed in: calibrated imports this module)."""

    def __init__(self, rows: dict, decode_isolated_s: Callable[[int, int], float],
                 prefill_isolated_s: Callable[[Sequence[tuple[int, int]]], float], surface,
                 gpu0_decode_isolated_s: Callable[[int, int], float] | None = None):
        self.counts = {op: len(df) for op, df in rows.items() if not op.endswith("_isolated")}
        self.twinned = 0  # engine decode rows read against their same-process isolated twin
        s = self.surfaces = OverheadSurfaces()

        def decode(df, isolated=decode_isolated_s, twins=None):
            twin: dict[int, list[tuple[float, float]]] = {}  # batch -> (context, seconds) of its twins
            for b, c, t in (zip(twins["batch"], twins["context"], twins["seconds"]) if twins is not None else ()):
                twin.setdefault(int(b), []).append((float(c), float(t)))
            pts = []
            for b, c, t in zip(df["batch"], df["context"], df["seconds"]):
                same = [u for cc, u in twin.get(int(b), ()) if abs(cc - c) <= 0.01 * c]
                self.twinned += bool(same)
                pts.append((b, c, t - (same[0] if same else isolated(int(b), int(b) * int(c)))))
            return surface(pts, floor=None) if pts else None  # signed: see the module doc

        def prefill(df):
            pts = [(n, t, sec - prefill_isolated_s(_even_chunks(int(n), int(t))))
                   for n, t, sec in zip(df["batch"], df["tokens"], df["seconds"])]
            return surface(pts) if pts else None  # never negative: see the module doc

        twins = rows.get("engine_decode_isolated")
        s.decode_idle = decode(rows["engine_decode"], twins=twins)
        s.decode_busy = decode(rows["engine_decode_busy"], twins=twins)
        s.prefill_idle, s.prefill_busy = prefill(rows["engine_prefill"]), prefill(rows["engine_prefill_busy"])
        single = rows.get("engine_decode_single")  # timed on GPU0: over GPU0's isolated step, as the sim charges it
        s.decode_single = (decode(single, gpu0_decode_isolated_s or decode_isolated_s,
                                  rows.get("engine_decode_single_isolated")) if single is not None else None)
        single_prefill = rows.get("engine_prefill_single")  # timed on GPU0, where the prefill rows are too
        s.prefill_single = prefill(single_prefill) if single_prefill is not None else None
        self.measured = any(v is not None for v in (s.decode_idle, s.decode_busy, s.prefill_idle, s.prefill_busy))
        # the other GPU's state matters only where both states were measured
        self.depends_on_other_gpu = ((s.decode_idle is not None and s.decode_busy is not None)
                                     or (s.prefill_idle is not None and s.prefill_busy is not None))

        def spread(op, shape):
            df = rows[op]
            if not set(SPREAD_COLUMNS) <= set(df.columns):  # a DataFrame in the legacy columns
                return None
            pts = [(x, y, StepSpread.from_quantiles(*q)) for x, y, *q in zip(
                df["batch"], df[shape], *(df[c] for c in SPREAD_COLUMNS)) if all(v == v for v in q)]  # not NaN
            self.spread_counts[op] = len(pts)
            return _SpreadSurface(pts, surface) if pts else None

        self.spread_counts: dict[str, int] = {}
        p = self.spreads = OverheadSurfaces()
        p.decode_idle, p.decode_busy = spread("engine_decode", "context"), spread("engine_decode_busy", "context")
        p.prefill_idle, p.prefill_busy = spread("engine_prefill", "tokens"), spread("engine_prefill_busy", "tokens")
        p.decode_single = spread("engine_decode_single", "context") if single is not None else None
        p.prefill_single = spread("engine_prefill_single", "tokens") if single_prefill is not None else None
        self.has_spread = any(v is not None for v in (p.decode_idle, p.decode_busy, p.prefill_idle, p.prefill_busy))

    def _pick(self, idle, busy, other_busy: bool):
        first, second = (busy, idle) if other_busy else (idle, busy)
        return first if first is not None else second

    def decode_s(self, batch_size: int, kv_tokens: int, other_busy: bool = False, colocated: bool = False) -> float:
        """`colocated`: a one-GPU engine's step (policy single), from its own rows where the profile has them."""
        f = self._pick(self.surfaces.decode_idle, self.surfaces.decode_busy, other_busy)
        if colocated and self.surfaces.decode_single is not None:
            f = self.surfaces.decode_single
        return f(batch_size, kv_tokens / batch_size) if f is not None and batch_size > 0 else 0.0

    def prefill_s(self, sequences: int, tokens: int, other_busy: bool = False, colocated: bool = False) -> float:
        """`colocated`: a one-GPU engine's prefill (policy single), from its own rows where the profile has them."""
        f = self._pick(self.surfaces.prefill_idle, self.surfaces.prefill_busy, other_busy)
        if colocated and self.surfaces.prefill_single is not None:
            f = self.surfaces.prefill_single
        return f(sequences, tokens) if f is not None and sequences > 0 else 0.0

    def decode_spread(self, batch_size: int, kv_tokens: int, other_busy: bool = False,
                      colocated: bool = False) -> StepSpread | None:
        """The step-time spread of a decode step of this shape; None where no row measured one."""
        f = self._pick(self.spreads.decode_idle, self.spreads.decode_busy, other_busy)
        if colocated and self.spreads.decode_single is not None:
            f = self.spreads.decode_single
        return f(batch_size, kv_tokens / batch_size) if f is not None and batch_size > 0 else None

    def prefill_spread(self, sequences: int, tokens: int, other_busy: bool = False,
                       colocated: bool = False) -> StepSpread | None:
        f = self._pick(self.spreads.prefill_idle, self.spreads.prefill_busy, other_busy)
        if colocated and self.spreads.prefill_single is not None:
            f = self.spreads.prefill_single
        return f(sequences, tokens) if f is not None and sequences > 0 else None

    def describe(self) -> str:
        if not self.measured:
            return ("none: no engine_* rows, steps cost the isolated runner step (the real engine's policy, "
                    "launch-thread hand-off, polling and shared interpreter are not modelled)")
        parts = [f"{op} {n}" for op, n in self.counts.items() if n]
        other = "by the other GPU's state" if self.depends_on_other_gpu else "one state measured, used for both"
        singles = (("decode steps", "engine_decode_single", self.surfaces.decode_single),
                   ("prefills", "engine_prefill_single", self.surfaces.prefill_single))
        own = [what for what, _, f in singles if f is not None]
        missing = [(what, op) for what, op, f in singles if f is None]
        if own:
            other += f"; single's {' and '.join(own)} from its own (one-GPU engine) rows"
        if missing:
            other += (f"; single's {' and '.join(w for w, _ in missing)} from pd's rows "
                      f"(no {', '.join(op for _, op in missing)} rows)")
        spread = (f"step-time spread from {sum(self.spread_counts.values())} rows' quantiles (drawn per step, seeded)"
                  if self.has_spread else "no spread columns: every step takes its mean")
        twins = (f"{self.twinned} decode rows less their isolated twin timed in the same process, the rest less the "
                 "profile's isolated step" if self.twinned else "isolated step: the profile's")
        return f"engine row - isolated step, {', '.join(parts)} rows; {other}; {twins}; {spread}"


def _even_chunks(sequences: int, tokens: int) -> list[tuple[int, int]]:
    """`tokens` split over `sequences` as evenly as integers allow, no cached prefix (how real.profile packs)."""
    return [(tokens // sequences + (1 if j < tokens % sequences else 0), 0) for j in range(sequences)]
