"""Policy parameters, the five presets, and YAML overrides.

A preset is a PolicyConfig; a YAML file overrides any field by section, e.g.
    scheduler: {max_decode_batch: 128}
    rebalancer: {min_gain: 0.03}
Unknown sections or keys are errors (a typo must not silently do nothing).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from .types import DP, PD, PIPELINE, SINGLE


@dataclass(slots=True)
class SchedulerConfig:
    block_size: int = 16  # tokens per paged-KV block
    prefill_token_budget: int = 8192  # tokens per prefill batch on a dedicated prefill GPU
    max_prefill_seqs: int = 64  # requests per prefill batch
    mixed_token_budget: int = 2048  # tokens per colocated step (decodes + prefill chunks), Sarathi-style
    max_decode_batch: int = 256  # sequences decoding at once on one GPU
    max_context_tokens: int = 0  # prompt + output limit; 0 = the model's max_position
    max_steps_per_schedule: int = 1  # decode steps one schedule may cover (the sim merges identical steps)
    transfer_retries: int = 2  # failed KV copies retried before the prefill is recomputed


@dataclass(slots=True)
class RebalancerConfig:
    enabled: bool = True  # False: keep `initial_split` (static pipeline)
    initial_attn_sms: int = 64  # start of the search (and the static split when disabled)
    microbatches: int = 2
    allow_no_split: bool = True  # "none" (sequential on all SMs) is a candidate
    min_gain: float = 0.02  # switch only for a measured gain above this (hysteresis)
    steps_per_candidate: int = 4  # a challenger's block of steps, judged against the reference's steps around it
    explore_max_steps: int = 2  # a body merging identical steps merges at most this many while measuring
    abandon_loss: float = 0.25  # the first splits slower than no split by more: stop searching this bucket
    initial_stride_sms: int = 32  # pattern-search stride, halved to the granularity
    max_explore_samples: int = 48  # bound on challenger steps per workload bucket while searching
    min_batch_for_split: int = 2  # fewer sequences cannot form two micro-batches
    fresh_samples: int = 16  # reference steps older than this many samples (any bucket) are not compared with
    recheck_samples: int = 256  # a settled bucket re-duels its runner-up after this many of its samples,
    # doubling (up to 16x) while the choice holds


@dataclass(slots=True)
class BackPressureConfig:
    enabled: bool = True
    kv_high: float = 0.90  # GPU1 KV used fraction that engages the throttle
    kv_low: float = 0.75  # ... and that releases it
    transfers_high: int = 16  # KV copies in flight or waiting for GPU1 blocks
    transfers_low: int = 8
    step_high_s: float = 0.0  # decode step time that engages (0 = off)
    step_low_s: float = 0.0


@dataclass(slots=True)
class FallbackConfig:
    enabled: bool = True
    probation_s: float = 30.0  # time in the lower mode before trying the higher one again
    max_probation_s: float = 600.0  # probation doubles after each failure, up to this
    slowdown_tolerance: float = 0.05  # pipeline slower than sequential by more than this ...
    slowdown_window: int = 50  # ... over this many decode samples -> pd
    min_link_bytes_per_s: float = 5e9  # measured KV bandwidth below this -> link degraded -> single
    min_link_sample_bytes: int = 16_000_000  # smaller copies are latency-bound: they do not measure bandwidth


@dataclass(slots=True)
class PolicyConfig:
    preset: str = "adaptive"
    mode: str = PIPELINE  # requested mode; the fallback controller may run a lower one
    attn_sms: int = 0  # static split for `pipeline` (0 = the rebalancer's initial split)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    rebalancer: RebalancerConfig = field(default_factory=RebalancerConfig)
    backpressure: BackPressureConfig = field(default_factory=BackPressureConfig)
    fallback: FallbackConfig = field(default_factory=FallbackConfig)

    def to_dict(self) -> dict:
        return asdict(self)


def _preset(name: str) -> PolicyConfig:
    if name == "single":
        return PolicyConfig(preset=name, mode=SINGLE, rebalancer=RebalancerConfig(enabled=False),
                            backpressure=BackPressureConfig(enabled=False), fallback=FallbackConfig(enabled=False))
    if name == "dp":
        return PolicyConfig(preset=name, mode=DP, rebalancer=RebalancerConfig(enabled=False),
                            backpressure=BackPressureConfig(enabled=False), fallback=FallbackConfig(enabled=False))
    if name == "pd":
        return PolicyConfig(preset=name, mode=PD, rebalancer=RebalancerConfig(enabled=False),
                            fallback=FallbackConfig(enabled=False))
    if name == "pipeline":
        return PolicyConfig(preset=name, mode=PIPELINE, rebalancer=RebalancerConfig(enabled=False),
                            fallback=FallbackConfig(enabled=False))
    if name == "adaptive":
        return PolicyConfig(preset=name)
    raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(PRESETS)}")


PRESETS = ("single", "dp", "pd", "pipeline", "adaptive")
_SECTIONS = {"scheduler": SchedulerConfig, "rebalancer": RebalancerConfig,
             "backpressure": BackPressureConfig, "fallback": FallbackConfig}


def apply_overrides(cfg: PolicyConfig, overrides: dict, source: str = "overrides") -> PolicyConfig:
    """Return `cfg` with `overrides` (nested dict by section) applied, type-checked."""
    top = {f.name for f in fields(PolicyConfig)} - set(_SECTIONS)
    changes = {}
    for key, value in (overrides or {}).items():
        if key in _SECTIONS:
            if not isinstance(value, dict):
                raise ValueError(f"{source}: section {key!r} must be a mapping")
            changes[key] = _override(getattr(cfg, key), value, f"{source}: {key}")
        elif key in top:
            changes[key] = _coerce(getattr(cfg, key), value, f"{source}: {key}")
        else:
            raise ValueError(f"{source}: unknown key {key!r}; known: {', '.join(sorted(top | set(_SECTIONS)))}")
    return replace(cfg, **changes)


def _override(section, values: dict, where: str):
    known = {f.name for f in fields(section)}
    for k in values:
        if k not in known:
            raise ValueError(f"{where}: unknown key {k!r}; known: {', '.join(sorted(known))}")
    return replace(section, **{k: _coerce(getattr(section, k), v, f"{where}.{k}") for k, v in values.items()})


def _coerce(current, value, where: str):
    kind = type(current)
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true/false, got {value!r}")
        return value
    if kind in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        if kind is int and value != int(value):
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        return kind(value)
    if not isinstance(value, kind):
        raise ValueError(f"{where}: expected {kind.__name__}, got {value!r}")
    return value


def load_policy_config(preset: str = "adaptive", yaml_path: str | Path | None = None,
                       overrides: dict | None = None) -> PolicyConfig:
    cfg = _preset(preset)
    if yaml_path is not None:
        import yaml

        path = Path(yaml_path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except OSError as e:
            raise ValueError(f"{path}: cannot read config ({e.strerror})") from None
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of sections at the top level")
        cfg = apply_overrides(cfg, data, str(path))
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    return cfg
