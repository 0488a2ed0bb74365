"""Back-pressure: GPU0 stops starting prefills while GPU1 (or the link) cannot take more.

Without it GPU0 keeps prefilling into a full GPU1, transfers queue up holding GPU0 blocks,
and GPU1 preempts (recomputes) what it already decodes. High/low watermarks give hysteresis.
"""
from __future__ import annotations

from .config import BackPressureConfig
from .types import Observation, ThrottleDecision


class BackPressure:
    def __init__(self, cfg: BackPressureConfig):
        self.cfg = cfg
        self.throttled = False

    def decide(self, obs: Observation) -> ThrottleDecision | None:
        """A decision only when the throttle state changes."""
        cfg = self.cfg
        if not cfg.enabled:
            return None
        kv = obs.gpu1_kv_used_fraction
        transfers = obs.pending_transfers + obs.transfers_in_flight
        step = obs.decode_step_s
        if not self.throttled:
            why = []
            if kv >= cfg.kv_high:
                why.append(f"GPU1 KV {kv:.0%} >= {cfg.kv_high:.0%}")
            if transfers >= cfg.transfers_high:
                why.append(f"{transfers} transfers queued >= {cfg.transfers_high}")
            if cfg.step_high_s > 0 and step >= cfg.step_high_s:
                why.append(f"decode step {step * 1e3:.1f} ms >= {cfg.step_high_s * 1e3:.1f} ms")
            if why:
                self.throttled = True
                return ThrottleDecision(True, "; ".join(why))
            return None
        if kv <= cfg.kv_low and transfers <= cfg.transfers_low and (cfg.step_low_s <= 0 or step <= cfg.step_low_s):
            self.throttled = False
            return ThrottleDecision(False, f"GPU1 KV {kv:.0%} <= {cfg.kv_low:.0%}, {transfers} transfers "
                                           f"<= {cfg.transfers_low}" + (f", step {step * 1e3:.1f} ms" if cfg.step_low_s > 0 else ""))
        return None
