"""Observations in, Decisions out: the records that cross between a body and the policies.

Every field is a plain number or string so an observation sequence can be logged by one
body and replayed into a fresh policy by a test (same observations -> same decisions).
"""
from __future__ import annotations

from dataclasses import dataclass, field

SINGLE, DP, PD, PIPELINE = "single", "dp", "pd", "pipeline"
MODES = (SINGLE, DP, PD, PIPELINE)
GPU0, GPU1, LINK = "gpu0", "gpu1", "link"

NO_SPLIT: tuple[int, int] | None = None  # decode on all SMs of GPU1, sequential attention then FFN


def split_name(split: tuple[int, int] | None) -> str:
    return "none" if split is None else f"{split[0]}:{split[1]}"


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What the hardware under a body can do; missing ones force a lower mode."""
    num_gpus: int = 2
    p2p: bool = True
    green_contexts: bool = True

    def supports(self, mode: str) -> bool:
        if mode == SINGLE:
            return self.num_gpus >= 1
        if mode == DP:
            return self.num_gpus >= 2
        if mode == PD:
            return self.num_gpus >= 2 and self.p2p
        return self.num_gpus >= 2 and self.p2p and self.green_contexts

    def missing_for(self, mode: str) -> str:
        need = []
        if mode != SINGLE and self.num_gpus < 2:
            need.append(f"2 GPUs (have {self.num_gpus})")
        if mode in (PD, PIPELINE) and not self.p2p:
            need.append("GPU0->GPU1 peer access")
        if mode == PIPELINE and not self.green_contexts:
            need.append("green contexts")
        return ", ".join(need)


@dataclass(frozen=True, slots=True)
class ErrorEvent:
    """A runtime failure a body reports: kind is green_ctx | link | transfer | device."""
    t_s: float
    kind: str
    device: str = GPU1
    detail: str = ""


@dataclass(frozen=True, slots=True)
class StepSample:
    """One measured GPU1 decode step (or the mean of a run of identical steps)."""
    split: tuple[int, int] | None
    microbatches: int
    batch_size: int
    kv_tokens: int
    step_s: float
    attn_s: float
    ffn_s: float
    num_steps: int = 1


@dataclass(slots=True)  # not frozen: built at every decision point, and frozen __init__ is slow
class Observation:
    """The state the policies see at a decision point."""
    t_s: float
    mode: str
    waiting_requests: int = 0
    ready_requests: int = 0  # KV on the decode GPU, waiting for a decode slot
    running_requests: int = 0
    pending_transfers: int = 0  # prefilled, waiting for decode-GPU blocks
    transfers_in_flight: int = 0
    transfer_bytes_in_flight: int = 0
    gpu0_kv_blocks_free: int = 0
    gpu0_kv_blocks_total: int = 0
    gpu1_kv_blocks_free: int = 0
    gpu1_kv_blocks_total: int = 0
    decode_step_s: float = 0.0  # recent decode step time on the decode GPU (EWMA)
    link_bytes_per_s: float = 0.0  # recent measured KV transfer bandwidth (EWMA); 0 = none yet
    last_step: StepSample | None = None
    errors: tuple[ErrorEvent, ...] = ()
    capabilities: Capabilities = field(default_factory=Capabilities)

    @property
    def gpu1_kv_used_fraction(self) -> float:
        total = self.gpu1_kv_blocks_total
        return 0.0 if total == 0 else 1.0 - self.gpu1_kv_blocks_free / total


@dataclass(frozen=True, slots=True)
class SplitDecision:
    split: tuple[int, int] | None
    microbatches: int
    reason: str = ""
    exploring: bool = False  # a measurement of a candidate, not the settled choice


@dataclass(frozen=True, slots=True)
class ModeDecision:
    mode: str
    reason: str = ""


@dataclass(frozen=True, slots=True)
class ThrottleDecision:
    throttled: bool
    reason: str = ""


@dataclass(slots=True)
class DecisionRecord:
    """One row of decisions.csv."""
    t_s: float
    policy: str
    decision: str
    old: str
    new: str
    reason: str

    def as_row(self) -> tuple:
        return (self.t_s, self.policy, self.decision, self.old, self.new, self.reason)
