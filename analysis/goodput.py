"""DistServe goodput: the highest request rate at which >= 90% of requests meet both SLOs.

The search only calls back `attainment_at(rate_scale)` (typically: run the simulator with the
workload's arrival rate scaled by rate_scale, return `slo_attainment`), so it knows nothing of
the simulator. It assumes attainment falls as the rate rises. When it does not (noise, a
policy that switches mode), the bracket may miss the true edge; the answer is still a rate
that was actually measured to meet the target: the highest such evaluated rate.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable


@dataclass(slots=True)
class GoodputResult:
    """rate_scale: goodput (0 when even the lowest tried rate misses); attainment measured there."""
    rate_scale: float
    attainment: float
    evaluations: list[tuple[float, float]] = field(default_factory=list)  # (rate_scale, attainment) in call order


def find_goodput(attainment_at: Callable[[float], float], *, lo: float, hi: float, target: float = 0.9,
                 rel_tol: float = 0.02, max_iters: int = 20, max_doublings: int = 8,
                 max_halvings: int = 4) -> GoodputResult:
    """Bracket then bisect (geometrically) the rate where attainment drops below `target`.

    1. If `lo` misses, halve it up to max_halvings times; still missing -> goodput 0.
    2. While `hi` meets, double it (up to max_doublings times; if the last one still meets,
       that rate is reported: a lower bound on goodput).
    3. Bisect at sqrt(lo * hi) until hi / lo <= 1 + rel_tol or after max_iters bisection steps.
    NaN attainment (nothing to measure) counts as a miss.
    """
    if not 0 < lo < hi:
        raise ValueError(f"need 0 < lo < hi, got lo={lo}, hi={hi}")
    evaluations: list[tuple[float, float]] = []
    measured: dict[float, float] = {}  # a rate already tried (lo halved to hi) is not rerun

    def meets(rate: float) -> bool:
        if rate not in measured:
            measured[rate] = float(attainment_at(rate))
            evaluations.append((rate, measured[rate]))
        return measured[rate] >= target  # False for NaN

    def result() -> GoodputResult:
        meeting = [(r, a) for r, a in evaluations if a >= target]
        if not meeting:
            return GoodputResult(0.0, min(evaluations)[1], evaluations)
        rate, attainment = max(meeting)
        return GoodputResult(rate, attainment, evaluations)

    for _ in range(max_halvings + 1):
        if meets(lo):
            break
        hi, lo = lo, lo / 2
    else:
        return result()  # even the lowest rate misses: goodput 0
    for _ in range(max_doublings + 1):
        if not meets(hi):
            break
        lo, hi = hi, hi * 2
    else:
        return result()  # still meeting at the growth limit
    for _ in range(max_iters):
        if hi / lo <= 1 + rel_tol:
            break
        mid = math.sqrt(lo * hi)
        if meets(mid):
            lo = mid
        else:
            hi = mid
    return result()
