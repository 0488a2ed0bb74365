"""SmRebalancer: which attention:FFN SM split (or none) GPU1 decodes with, from measured steps.

The best split moves with batch size and context length (the facts file measured a 12% loss to
a 32% gain), so the rebalancer keeps one search per workload bucket (log2 batch size, log2
context per sequence). In a bucket it first measures `none` (sequential on all SMs), which also
gives the attention and FFN stage times; the search starts at the split that balances them
(attention SMs ~ attention share of the time). If that balanced split and its first neighbours
are all slower than `none` by more than `abandon_loss`, pipelining cannot pay here and the bucket
settles on `none`. Otherwise
a pattern search walks the allowed splits (stride halved down to the green-context granularity),
each candidate judged on `steps_per_candidate` measured steps, at most `max_explore_samples`
samples per bucket. A new bucket starts from its nearest settled neighbour's best split; when an
adjacent bucket settled on `none` and that split loses here too, the bucket settles at once (each
search costs slow steps: the real adaptive run lost 2% to pd exploring buckets one by one). Once settled
it moves only for a measured gain above `min_gain` (hysteresis), and only against costs measured in
the bucket's last `fresh_samples` samples: a bucket's cost drifts as its contexts grow and as the
other GPU's load changes, and a comparison with a split measured long ago made the real engine
flip-flop (146 split changes in 40 s, Azure conv x12 on 2x H200). When the chosen split's cost has
drifted up by `recheck_drift` since it was settled, the runner-up is re-measured now, side by side.
Cost of a sample = step time per sequence, comparable within a bucket at about the same time.
"""
from __future__ import annotations

import math

from .config import RebalancerConfig
from .specs import HardwareSpec
from .types import SplitDecision, StepSample, split_name

Split = tuple[int, int] | None
_NO_RECHECK = "none-pending"  # (None is a split: sequential on all SMs)


class _BucketSearch:
    __slots__ = ("cost", "count", "todo", "center", "stride", "samples", "choice", "done", "seen", "settled_cost",
                 "recheck", "neighbour_chose_none")

    def __init__(self, start: Split, stride: int, with_none: bool, neighbour_chose_none: bool = False):
        self.cost: dict[Split, float] = {}  # EWMA cost per split
        self.count: dict[Split, int] = {}  # measured steps per split
        self.todo: list[Split] = [None] if with_none else [start]  # start is re-aimed once none is measured
        self.center = start
        self.stride = stride
        self.samples = 0
        self.choice = start
        self.done = False
        self.seen: dict[Split, int] = {}  # sample number of each split's last measurement
        self.settled_cost = math.inf  # the choice's cost when it was (re)settled
        self.recheck: Split | str = _NO_RECHECK  # a split being re-measured against the choice
        self.neighbour_chose_none = neighbour_chose_none  # an adjacent settled bucket found no split that pays


class SmRebalancer:
    def __init__(self, cfg: RebalancerConfig, hardware: HardwareSpec, static_attn_sms: int = 0):
        self.cfg = cfg
        self.splits = hardware.allowed_splits()
        self.granularity = hardware.sm_granularity
        self.sms = hardware.sms
        self._attn_values = [a for a, _ in self.splits]
        self.static = self._snap(static_attn_sms or cfg.initial_attn_sms)
        self.buckets: dict[tuple[int, int], _BucketSearch] = {}
        self.current: Split = self.static

    def _snap(self, attn_sms: int) -> tuple[int, int]:
        return min(self.splits, key=lambda s: abs(s[0] - attn_sms))

    @staticmethod
    def bucket(batch_size: int, kv_tokens: int) -> tuple[int, int]:
        ctx = kv_tokens / max(1, batch_size)
        return (int(math.log2(max(1, batch_size))), int(math.log2(max(1.0, ctx))))

    def _search(self, key: tuple[int, int]) -> _BucketSearch:
        s = self.buckets.get(key)
        if s is None:
            near = min(self.buckets.items(), key=lambda kv: abs(kv[0][0] - key[0]) + abs(kv[0][1] - key[1]),
                       default=None)
            best = None
            if near is not None and near[1].done:
                best = min((c for c in near[1].cost if c is not None), key=near[1].cost.get, default=None)
            if best is not None:
                adjacent = abs(near[0][0] - key[0]) + abs(near[0][1] - key[1]) <= 1
                s = _BucketSearch(best, max(self.granularity, self.cfg.initial_stride_sms // 2), self.cfg.allow_no_split,
                                  adjacent and near[1].choice is None)
            else:
                s = _BucketSearch(self.static, self.cfg.initial_stride_sms, self.cfg.allow_no_split)
            self.buckets[key] = s
        return s

    def decide(self, batch_size: int, kv_tokens: int) -> SplitDecision:
        """The split for the next decode step of this shape."""
        cfg = self.cfg
        if batch_size < max(cfg.min_batch_for_split, cfg.microbatches):
            return self._to(None, f"batch {batch_size} too small for {cfg.microbatches} micro-batches")
        if not cfg.enabled:
            return self._to(self.static, "static split")
        key = self.bucket(batch_size, kv_tokens)
        s = self._search(key)
        if s.todo:
            return self._to(s.todo[0], f"exploring batch~2^{key[0]} context~2^{key[1]}", exploring=True)
        if s.recheck != _NO_RECHECK:
            return self._to(s.recheck, f"re-measuring the runner-up for batch~2^{key[0]} context~2^{key[1]}",
                            exploring=True)
        return self._to(s.choice, f"best measured for batch~2^{key[0]} context~2^{key[1]}")

    def _to(self, split: Split, reason: str, exploring: bool = False) -> SplitDecision:
        self.current = split
        return SplitDecision(split, 1 if split is None else self.cfg.microbatches, reason, exploring)

    def record(self, sample: StepSample) -> None:
        """Feed one measured step (or run of steps) back."""
        if not self.cfg.enabled or sample.batch_size < max(self.cfg.min_batch_for_split, self.cfg.microbatches):
            return
        s = self._search(self.bucket(sample.batch_size, sample.kv_tokens))
        split = sample.split
        cost = sample.step_s / sample.batch_size
        a = self.cfg.ewma_alpha
        old = s.cost.get(split)
        s.cost[split] = cost if old is None else old + a * (cost - old)
        s.count[split] = s.count.get(split, 0) + sample.num_steps
        s.samples += 1
        s.seen[split] = s.samples
        if s.done:
            self._keep_or_switch(s, split)
            return
        if s.todo and s.todo[0] == split and s.count[split] >= self.cfg.steps_per_candidate:
            s.todo.pop(0)
            if split is None and len(s.cost) == 1:
                self._aim(s, sample)
            if not s.todo:
                self._next_candidates(s)
        if s.samples >= self.cfg.max_explore_samples and not s.done:
            s.todo.clear()
            self._finish(s)

    def _aim(self, s: _BucketSearch, sequential: StepSample) -> None:
        """Start the split search where the measured attention and FFN times would balance."""
        if s.center == self.static and sequential.attn_s > 0 and sequential.ffn_s > 0:
            share = sequential.attn_s / (sequential.attn_s + sequential.ffn_s)
            s.center = self._snap(round(share * self.sms))
        s.todo.append(s.center)

    def _next_candidates(self, s: _BucketSearch) -> None:
        """Pattern search: move to a better neighbour, or halve the stride; stop below the granularity."""
        measured = {k: v for k, v in s.cost.items() if k is not None}
        if not measured or (len(measured) >= 2 and None in s.cost
                            and min(measured.values()) > s.cost[None] * (1 + self.cfg.abandon_loss)):
            self._finish(s)  # the balanced split and its neighbours lose badly: pipelining cannot pay here
            return
        if s.neighbour_chose_none and None in s.cost and min(measured.values()) > s.cost[None] * (1 + self.cfg.min_gain):
            self._finish(s)  # the adjacent bucket's best split loses here too, as it lost there: stop exploring
            return
        best = min(measured, key=measured.get)
        if s.center not in measured or measured[best] < measured[s.center] * (1 - self.cfg.min_gain):
            s.center = best
        while s.stride >= self.granularity:
            a = s.center[0]
            fresh = [sp for sp in (self._exact(a - s.stride), self._exact(a + s.stride)) if sp and sp not in s.cost]
            if fresh:
                s.todo.extend(fresh)
                return
            s.stride //= 2
        self._finish(s)

    def _exact(self, attn_sms: int) -> tuple[int, int] | None:
        return next((sp for sp in self.splits if sp[0] == attn_sms), None)

    def _finish(self, s: _BucketSearch) -> None:
        s.done = True
        s.choice = min(s.cost, key=s.cost.get)
        s.settled_cost = s.cost[s.choice]

    def _keep_or_switch(self, s: _BucketSearch, measured: Split) -> None:
        """Settled: switch only to a split measured recently and cheaper by min_gain; re-measure the runner-up
        when the choice has drifted up."""
        cfg = self.cfg
        fresh = {k: v for k, v in s.cost.items() if s.seen.get(k, 0) > s.samples - cfg.fresh_samples}
        if s.recheck != _NO_RECHECK:
            if measured != s.recheck or s.count[measured] < cfg.steps_per_candidate:
                return
            s.recheck = _NO_RECHECK  # the runner-up has fresh samples: judge it below, then settle again
        best = min(fresh, key=fresh.get)
        if best != s.choice and s.choice in fresh and fresh[best] < fresh[s.choice] * (1 - cfg.min_gain):
            s.choice = best
            s.settled_cost = s.cost[best]
            return
        if s.choice in fresh and s.cost[s.choice] > s.settled_cost * (1 + cfg.recheck_drift):
            others = [k for k in s.cost if k != s.choice]
            if not others:
                s.settled_cost = s.cost[s.choice]
                return
            runner_up = min(others, key=s.cost.get)
            s.recheck = runner_up
            s.count[runner_up] = 0
            del s.cost[runner_up]  # its old cost is not comparable any more: the first fresh sample replaces it
            s.settled_cost = s.cost[s.choice]

    def sequential_ratio(self, sample: StepSample) -> float | None:
        """Measured cost of this (split) sample over the bucket's no-split cost; None if unknown."""
        if sample.split is None or sample.batch_size < 1:
            return None
        s = self.buckets.get(self.bucket(sample.batch_size, sample.kv_tokens))
        if s is None or not s.done or sample.split != s.choice:
            return None  # exploration and re-measuring samples are meant to be slow sometimes
        ref = s.cost.get(None)
        return None if not ref else (sample.step_s / sample.batch_size) / ref

    def describe(self) -> str:
        done = sum(1 for s in self.buckets.values() if s.done)
        return f"{len(self.buckets)} buckets ({done} converged), current split {split_name(self.current)}"
