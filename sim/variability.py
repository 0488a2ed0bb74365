"""Step-time variability: each simulated engine step drawn from the spread real.profile measured.

Why: the real engine's steps have a heavy tail (2x H200, Azure conv x12: at batch 256 the mean period is
~4.6 ms above the isolated step, its p99 ~10 ms above; beside a prefill some steps take 2-4x the mean).
A simulator that gives every step its mean under-predicts p99 latencies, and the adaptive rebalancer,
which judges splits on measured step times, reacts to that noise in the real engine and not in a
noise-free sim. A profile's engine_* rows carry the quantiles of their periods over the mean (p10, p50,
p90, p99: traces/profile.py); the simulator multiplies each step's mean time (isolated step + engine
overhead) by a ratio drawn from them, independently per step, with a seeded generator (SimConfig.seed).

The ratio's distribution is the piecewise-linear quantile function through the measured quantiles:
below p10 it extends the p10..p50 slope to u = 0 (not below 0); above p99 its last knot is placed so
that the mean is exactly 1, so a step's expected time is the profile's mean and the measured quantiles
are the drawn ones (the top 1% carries whatever of the mean the body does not: the rare slow steps).
Where straight lines between the quantiles already average above 1 (a right-skewed body is convex
between them, as in most measured H200 shapes), the top knot stays at p99 and each segment between
p10..p99 bends down at its middle, all by the same share of the most it can (to its lower end), until
the mean is 1: the measured quantiles stay exact. Only if even that is not enough is the whole function
scaled to mean 1. Interpolating the knots of two shapes linearly keeps mean 1 and order (a mix of
non-decreasing functions of mean 1).
"""
from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field

import numpy as np

KNOT_U = (0.0, 0.10, 0.30, 0.50, 0.70, 0.90, 0.945, 0.99, 1.0)  # where the quantile function's knots sit
_U = np.array(KNOT_U)
_MEASURED = (1, 3, 5, 7)  # the knots at p10, p50, p90, p99; 2, 4, 6 are the middles of the segments between


@dataclass(slots=True, frozen=True)
class StepSpread:
    """A step period's ratio to its mean as a quantile function: the ratio at each of KNOT_U."""
    knots: tuple[float, ...]
    array: np.ndarray = field(init=False, repr=False, compare=False)  # the knots for numpy (drawn at every step)

    def __post_init__(self):
        object.__setattr__(self, "array", np.array(self.knots, dtype=float))

    @classmethod
    def from_quantiles(cls, p10: float, p50: float, p90: float, p99: float) -> "StepSpread":
        """Knots from the measured quantiles of period / mean (see the module doc)."""
        u = KNOT_U
        low = max(0.0, p10 - (p50 - p10) * (u[1] - u[0]) / (u[3] - u[1]))
        measured = (p10, p50, p90, p99)
        segments = list(zip(measured, measured[1:]))
        chord = [(a + b) / 2 for a, b in segments]  # the middles on straight lines

        def knots(bend: float, top: float) -> tuple[float, ...]:
            mids = [m - bend * (m - a) for m, (a, _) in zip(chord, segments)]
            return (low, p10, mids[0], p50, mids[1], p90, mids[2], p99, top)

        straight = cls(knots(0.0, p99))
        top = p99 + 2 * (1.0 - straight.mean()) / (u[-1] - u[-2])  # the last segment completes the mean to 1
        if top >= p99:
            return cls(knots(0.0, top))
        most = cls(knots(1.0, p99))  # every middle down to its segment's lower end
        if most.mean() <= 1.0:
            bend = (straight.mean() - 1.0) / (straight.mean() - most.mean())
            return cls(knots(bend, p99))
        return cls(tuple(q / most.mean() for q in most.knots))

    def mean(self) -> float:
        q = self.knots
        return sum((u1 - u0) * (q[i] + q[i + 1]) / 2 for i, (u0, u1) in enumerate(zip(KNOT_U, KNOT_U[1:])))

    def quantile(self, u):
        """The ratio at probability u (a float or an array)."""
        return np.interp(u, KNOT_U, self.knots)

    def variance(self) -> float:
        """Exact variance of the ratio (each segment uniform in u, linear in value)."""
        q, m = self.knots, self.mean()
        second = sum((u1 - u0) * (q[i] ** 2 + q[i] * q[i + 1] + q[i + 1] ** 2) / 3
                     for i, (u0, u1) in enumerate(zip(KNOT_U, KNOT_U[1:])))
        return second - m * m


class StepNoise:
    """Seeded draws of step ratios; one generator per simulation, consumed in event order (deterministic)."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self._step_index = np.arange(64, dtype=float)  # 0, 1, 2, ...: a run's steps, grown on demand

    def ratio(self, spread: StepSpread) -> float:
        u = self.rng.random()
        i = min(bisect_right(KNOT_U, u), len(KNOT_U) - 1)  # u < 1: the segment [KNOT_U[i-1], KNOT_U[i])
        q, u0, u1 = spread.knots, KNOT_U[i - 1], KNOT_U[i]
        return q[i - 1] + (q[i] - q[i - 1]) * (u - u0) / (u1 - u0)

    def ratios(self, spread: StepSpread, k: int) -> np.ndarray:
        """k independent ratios, one per step of a merged run."""
        return np.interp(self.rng.random(k), _U, spread.array)

    def run_ends(self, spread: StepSpread, t_first: float, slope: float, k: int) -> np.ndarray:
        """End times, from a run's start, of its k steps whose mean times are t_first + slope * i (i from
        0), each scaled by a ratio of its own."""
        steps = self.ratios(spread, k)
        steps *= t_first + slope * self._index(k)
        return steps.cumsum()

    def _index(self, k: int) -> np.ndarray:
        if len(self._step_index) < k:
            self._step_index = np.arange(max(k, 2 * len(self._step_index)), dtype=float)
        return self._step_index[:k]
