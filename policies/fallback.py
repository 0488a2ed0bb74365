"""FallbackController: which serving mode runs, pipeline -> pd -> single (dp -> single), and back.

Downgrades on a missing capability (at start), a runtime error, or a measured slowdown versus
the lower mode; after a probation period without errors it tries the next higher mode again.
Each failure doubles the probation (up to a cap) so a flaky feature does not flap.
"""
from __future__ import annotations

from collections import deque

from .config import FallbackConfig
from .types import DP, PD, PIPELINE, SINGLE, Capabilities, ModeDecision, Observation

_LOWER = {PIPELINE: PD, PD: SINGLE, DP: SINGLE, SINGLE: SINGLE}
_ERROR_TARGET = {"green_ctx": PD, "link": SINGLE, "device": SINGLE}  # worst mode an error allows
_RANK = {SINGLE: 0, DP: 1, PD: 1, PIPELINE: 2}
TRANSFER_ERRORS_FOR_LINK_DOWN = 3  # failed copies within 10 s that mean the link, not one copy, is bad


class FallbackController:
    def __init__(self, cfg: FallbackConfig, requested: str, capabilities: Capabilities):
        self.cfg = cfg
        self.requested = requested
        self.capabilities = capabilities
        self.mode = requested
        self.start_reason = ""
        while not capabilities.supports(self.mode):
            lower = _LOWER[self.mode]
            self.start_reason += (f"{self.mode} needs {capabilities.missing_for(self.mode)}; "
                                  if not self.start_reason else "")
            self.mode = lower
        if self.start_reason:
            self.start_reason += f"running {self.mode}"
        self.failures = 0
        self.probation_until: float | None = None
        self.slow = deque(maxlen=max(1, cfg.slowdown_window))
        self.transfer_errors: deque[float] = deque()

    def decide(self, obs: Observation, sequential_ratio: float | None = None) -> ModeDecision | None:
        """A decision only when the mode changes. `sequential_ratio`: measured pipelined step
        cost over the sequential (no split) cost for the same workload bucket."""
        cfg = self.cfg
        for err in obs.errors:
            target = _ERROR_TARGET.get(err.kind)
            if err.kind == "transfer":
                self.transfer_errors.append(err.t_s)
                while self.transfer_errors and self.transfer_errors[0] < err.t_s - 10.0:
                    self.transfer_errors.popleft()
                if len(self.transfer_errors) >= TRANSFER_ERRORS_FOR_LINK_DOWN:
                    target = SINGLE
            if err.kind in ("link", "transfer") and self.mode not in (PD, PIPELINE):
                continue  # nothing crosses the link in single or dp
            if target is not None and _RANK[self.mode] > _RANK[target]:
                return self._down(obs.t_s, target, f"{err.kind} error on {err.device}: {err.detail}".rstrip(": "))
        if not cfg.enabled:
            return None
        if self.mode == PIPELINE and sequential_ratio is not None:
            self.slow.append(sequential_ratio)
            if len(self.slow) == self.slow.maxlen:
                mean = sum(self.slow) / len(self.slow)
                if mean > 1 + cfg.slowdown_tolerance:
                    return self._down(obs.t_s, PD, f"pipeline measured {mean - 1:.1%} slower than sequential "
                                                   f"over {len(self.slow)} decode samples")
        if self.mode in (PD, PIPELINE) and 0 < obs.link_bytes_per_s < cfg.min_link_bytes_per_s:
            return self._down(obs.t_s, SINGLE, f"KV link measured {obs.link_bytes_per_s / 1e9:.1f} GB/s "
                                               f"< {cfg.min_link_bytes_per_s / 1e9:.1f} GB/s")
        if self.probation_until is not None and obs.t_s >= self.probation_until and self.mode != self.requested:
            up = self._next_up()
            if up and obs.capabilities.supports(up):
                old, self.mode = self.mode, up
                self.probation_until = None if up == self.requested else obs.t_s + self._probation()
                self.slow.clear()
                return ModeDecision(up, f"probation passed without errors: {old} -> {up}")
        return None

    def _next_up(self) -> str | None:
        ladder = [SINGLE, PD, PIPELINE] if self.requested in (PD, PIPELINE) else [SINGLE, DP]
        if self.requested not in ladder or self.mode not in ladder:
            return None
        i = ladder.index(self.mode)
        return ladder[i + 1] if ladder.index(self.requested) > i else None

    def _probation(self) -> float:
        return min(self.cfg.max_probation_s, self.cfg.probation_s * 2 ** max(0, self.failures - 1))

    def _down(self, t_s: float, target: str, reason: str) -> ModeDecision:
        self.failures += 1
        self.mode = target
        self.slow.clear()
        self.probation_until = t_s + self._probation() if self.cfg.enabled else None
        return ModeDecision(target, reason + (f"; retry after {self._probation():.0f} s probation"
                                              if self.probation_until is not None else ""))
