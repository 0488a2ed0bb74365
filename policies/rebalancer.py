"""SmRebalancer: which attention:FFN SM split (or none) GPU1 decodes with, from measured steps.

The best split moves with batch size and context length (the facts file measured a 12% loss to a 32%
gain), so the rebalancer keeps one choice per workload bucket (log2 batch size, log2 context per
sequence).

Every judgement is a side-by-side duel. The bucket runs its choice (the reference); a challenger runs
a short block of `steps_per_candidate` steps; the reference runs again. The challenger's cost per
sequence is compared with the reference's steps just before and just after its block. So a cost measured
long ago, at the other end of the bucket's 2x batch span, or on one lucky step never decides anything
(comparing each split's own running cost ran 47% of a simulated run on losing splits), and a drift of
the bucket's cost (contexts grow, the other GPU gets busy) cancels to first order. All steps of a duel
have the duel's batch size (within 1/16 of it; steps at other sizes are not used, and a duel whose batch
stays away is started again): a bucket spans 2x in batch, and at batch 2-3 a step costs about the same
whatever the batch, so costs per sequence of neighbouring steps at batch 2 and 3 differed by 1.5x and
settled a simulated bucket on a split 40% slower than none. Only challenger steps cost anything: the reference steps run anyway. A challenger losing
by more than `abandon_loss` halfway through its block is judged there.

Search. A new bucket's reference is `none` (sequential on all SMs); its steps give the attention and FFN
stage times, and the first challenger is the split that balances them (attention SMs ~ attention share
of the time). A bucket near a settled one starts from that bucket's best split at half the stride, and
when that bucket chose `none` and the split loses here too, settles at once: each search costs slow
steps, and a short real run lost 4.5% to pd exploring bucket after bucket. A challenger beating the
choice by more than `min_gain` becomes the choice; a pattern search walks the allowed splits around the
choice, stride halved down to the green-context granularity. When the first split and its neighbours all
lose by more than `abandon_loss`, pipelining cannot pay in this bucket: it settles on `none`.

Settled buckets re-duel their runner-up after `recheck_samples` of their samples, the interval doubling
(up to 16x) each time the choice holds, so a workload whose best split moves is followed at a bounded
cost.
"""
from __future__ import annotations

import math

from .config import RebalancerConfig
from .specs import HardwareSpec
from .types import SplitDecision, StepSample, split_name

Split = tuple[int, int] | None
_IDLE, _BLOCK, _AFTER = 0, 1, 2  # duel phases: none running, challenger's block, reference after it
_KEEP = 16  # reference samples kept per bucket
Sample = tuple[int, float, int, int]  # (sample index, cost per sequence, steps, batch size)


def _mean(samples: list[Sample], steps: int | None = None) -> float:
    """Step-weighted mean cost of the newest samples covering `steps` steps (None: all of them)."""
    total = cost = 0.0
    for _, c, n, _ in reversed(samples):
        cost += c * n
        total += n
        if steps is not None and total >= steps:
            break
    return cost / total


class _Bucket:
    __slots__ = ("choice", "rel", "todo", "center", "stride", "done", "aimed", "near_chose_none", "recent",
                 "challenger", "phase", "block", "after", "before", "batch", "touched", "explored", "samples",
                 "next_check", "check_every")

    def __init__(self, choice: Split, center: Split, stride: int, near_chose_none: bool):
        self.choice = choice  # the reference: what runs between measurements
        self.rel: dict[Split, float] = {choice: 1.0}  # measured cost relative to the bucket's first reference
        self.todo: list[Split] = []  # challengers to duel, in order
        self.center = center  # where the search starts (re-aimed from the first stage times if not seeded)
        self.stride = stride
        self.done = False
        self.aimed = False
        self.near_chose_none = near_chose_none  # a nearby settled bucket found no split that pays
        self.recent: list[Sample] = []  # the reference's latest samples
        self.challenger: Split = None
        self.phase = _IDLE
        self.block: list[Sample] = []
        self.after: list[Sample] = []
        self.before = 0.0
        self.batch = 0  # the duel's batch size
        self.touched = 0  # sample index of the duel's last step
        self.explored = 0  # challenger steps spent in this bucket
        self.samples = 0
        self.next_check = 0
        self.check_every = 0


class SmRebalancer:
    def __init__(self, cfg: RebalancerConfig, hardware: HardwareSpec, static_attn_sms: int = 0):
        self.cfg = cfg
        self.splits = hardware.allowed_splits()
        self.granularity = hardware.sm_granularity
        self.sms = hardware.sms
        self.static = self._snap(static_attn_sms or cfg.initial_attn_sms)
        self.buckets: dict[tuple[int, int], _Bucket] = {}
        self.current: Split = self.static
        self.samples = 0  # all samples recorded, the clock of "recent"

    def _snap(self, attn_sms: int) -> tuple[int, int]:
        return min(self.splits, key=lambda s: abs(s[0] - attn_sms))

    @staticmethod
    def bucket(batch_size: int, kv_tokens: int) -> tuple[int, int]:
        ctx = kv_tokens / max(1, batch_size)
        return (int(math.log2(max(1, batch_size))), int(math.log2(max(1.0, ctx))))

    def _get(self, key: tuple[int, int]) -> _Bucket:
        b = self.buckets.get(key)
        if b is not None:
            return b
        reference = None if self.cfg.allow_no_split else self.static
        settled = [(abs(k[0] - key[0]) + abs(k[1] - key[1]), k, v) for k, v in self.buckets.items() if v.done]
        near = min(settled, key=lambda x: x[:2], default=None)
        best = None
        if near is not None:
            measured = {k: v for k, v in near[2].rel.items() if k is not None}
            best = min(measured, key=measured.get, default=None)
        if best is not None:
            b = _Bucket(reference, best, max(self.granularity, self.cfg.initial_stride_sms // 2),
                        near[0] <= 2 and near[2].choice is None)
        else:
            b = _Bucket(reference, self.static, self.cfg.initial_stride_sms, False)
        b.aimed = best is not None or reference is not None  # else aimed by the first sequential step
        self.buckets[key] = b
        if b.aimed:
            if b.center != reference:
                b.todo.append(b.center)
            else:
                self._plan(b)
        return b

    def decide(self, batch_size: int, kv_tokens: int) -> SplitDecision:
        """The split for the next decode step of this shape."""
        cfg = self.cfg
        if batch_size < max(cfg.min_batch_for_split, cfg.microbatches):
            return self._to(None, f"batch {batch_size} too small for {cfg.microbatches} micro-batches")
        if not cfg.enabled:
            return self._to(self.static, "static split")
        key = self.bucket(batch_size, kv_tokens)
        b = self._get(key)
        where = f"batch~2^{key[0]} context~2^{key[1]}"
        if b.phase != _IDLE and self.samples - b.touched > cfg.fresh_samples:
            self._restart(b)  # the bucket, or the duel's batch size, was left mid-duel: its steps are stale
        if b.phase == _IDLE:
            self._maybe_start(b, batch_size)
        if b.phase == _BLOCK:
            what = "re-measuring the runner-up" if b.done else "exploring"
            return self._to(b.challenger, f"{what} for {where}", exploring=True)
        if b.phase == _AFTER:  # the reference again, in short runs, to close the duel
            return self._to(b.choice, f"best measured for {where}", exploring=True)
        return self._to(b.choice, f"best measured for {where}")

    def _to(self, split: Split, reason: str, exploring: bool = False) -> SplitDecision:
        self.current = split
        return SplitDecision(split, 1 if split is None else self.cfg.microbatches, reason, exploring)

    @staticmethod
    def _same_batch(batch_size: int, duel_batch: int) -> bool:
        return abs(batch_size - duel_batch) <= duel_batch // 16

    def _restart(self, b: _Bucket) -> None:
        """Drop the running duel (its steps went stale): its challenger goes first again."""
        b.phase = _IDLE
        b.todo.insert(0, b.challenger)

    def _maybe_start(self, b: _Bucket, batch_size: int) -> None:
        """Start a duel when a challenger waits and the reference has enough recent steps at this batch size."""
        if b.done and not b.todo and b.samples >= b.next_check:
            others = {k: v for k, v in b.rel.items() if k != b.choice}
            if others:
                b.todo.append(min(others, key=others.get))
            else:
                b.next_check = b.samples + b.check_every
        if not b.todo or not b.aimed:
            return
        fresh = [r for r in b.recent
                 if r[0] > self.samples - self.cfg.fresh_samples and self._same_batch(r[3], batch_size)]
        if sum(r[2] for r in fresh) < self.cfg.steps_per_candidate:
            return
        b.before = _mean(fresh, self.cfg.steps_per_candidate)
        b.challenger = b.todo.pop(0)
        b.phase, b.block, b.after, b.touched, b.batch = _BLOCK, [], [], self.samples, batch_size

    def record(self, sample: StepSample) -> None:
        """Feed one measured step (or run of steps) back."""
        cfg = self.cfg
        if not cfg.enabled or sample.batch_size < max(cfg.min_batch_for_split, cfg.microbatches):
            return
        b = self._get(self.bucket(sample.batch_size, sample.kv_tokens))
        self.samples += 1
        b.samples += 1
        entry = (self.samples, sample.step_s / sample.batch_size, max(1, sample.num_steps), sample.batch_size)
        n = cfg.steps_per_candidate
        matched = b.phase == _IDLE or self._same_batch(sample.batch_size, b.batch)  # else not comparable:
        if matched and b.phase != _IDLE:  # unused, and a duel whose batch stays away goes stale (decide)
            b.touched = self.samples
        if b.phase == _BLOCK and sample.split == b.challenger:
            b.explored += entry[2]
            if not matched:
                return
            b.block.append(entry)
            steps = sum(r[2] for r in b.block)
            cost = _mean(b.block)
            if steps >= n:
                b.phase = _AFTER
            elif 2 * steps >= n and cost > b.before * (1 + self._abort_loss(b)):
                self._judge(b, cost / b.before)  # losing halfway through: no need for the rest
            return
        if sample.split != b.choice:
            return  # a step decided before the last switch, or of a split no longer measured
        b.recent = (b.recent + [entry])[-_KEEP:]
        if not b.aimed:
            self._aim(b, sample)
        if b.phase == _AFTER and matched:
            b.after.append(entry)
            if sum(r[2] for r in b.after) >= n:
                self._judge(b, _mean(b.block) / ((b.before + _mean(b.after, n)) / 2))

    def _abort_loss(self, b: _Bucket) -> float:
        """A challenger expected to lose (a re-check, or the split a nearby bucket rejected) is judged
        halfway once it loses by min_gain; one the search hopes for, only once it loses by abandon_loss."""
        return self.cfg.min_gain if b.done or b.near_chose_none else self.cfg.abandon_loss

    def _aim(self, b: _Bucket, sequential: StepSample) -> None:
        """Start the split search where the measured attention and FFN times would balance."""
        b.aimed = True
        if sequential.attn_s > 0 and sequential.ffn_s > 0:
            share = sequential.attn_s / (sequential.attn_s + sequential.ffn_s)
            b.center = self._snap(round(share * self.sms))
        b.todo = [b.center]

    def _judge(self, b: _Bucket, ratio: float) -> None:
        """The challenger cost `ratio` times the reference, measured side by side."""
        challenger, old = b.challenger, b.choice
        b.rel[challenger] = ratio * b.rel[old]
        b.phase = _IDLE
        won = ratio < 1 - self.cfg.min_gain
        if won:  # the challenger's block is the new reference's most recent measurement
            b.choice, b.recent = challenger, list(b.block)
        if b.done:  # a re-check: back off while the choice holds
            base = self.cfg.recheck_samples
            b.check_every = base if won else min(2 * b.check_every, 16 * base)
            b.next_check = b.samples + b.check_every
        else:
            self._plan(b)

    def _plan(self, b: _Bucket) -> None:
        """Queue the next challenger of the search, or settle."""
        cfg = self.cfg
        splits = {k: v for k, v in b.rel.items() if k is not None}
        none = b.rel.get(None)
        if b.explored >= cfg.max_explore_samples:
            return self._settle(b)
        if none is not None and splits:
            lowest = min(splits.values())
            if b.near_chose_none and lowest > none * (1 + cfg.min_gain):
                return self._settle(b)  # the nearby bucket's best split loses here too, as it lost there
            if len(splits) >= 3 and lowest > none * (1 + cfg.abandon_loss):
                return self._settle(b)  # the balanced split and its neighbours lose badly: cannot pay here
        if b.todo:
            return  # the rest of this round of the pattern search
        if b.choice is not None:
            b.center = b.choice
        elif splits:
            b.center = min(splits, key=splits.get)
        while b.stride >= self.granularity:
            a = b.center[0]
            fresh = [s for s in (self._exact(a - b.stride), self._exact(a + b.stride)) if s and s not in b.rel]
            if fresh:
                b.todo.extend(fresh)
                return
            b.stride //= 2
        self._settle(b)

    def _exact(self, attn_sms: int) -> tuple[int, int] | None:
        return next((sp for sp in self.splits if sp[0] == attn_sms), None)

    def _settle(self, b: _Bucket) -> None:
        b.done = True
        b.todo.clear()
        b.check_every = self.cfg.recheck_samples
        b.next_check = b.samples + b.check_every

    def sequential_ratio(self, sample: StepSample) -> float | None:
        """The settled split's cost over no split's in this bucket, as its duels measured; None if unknown."""
        if sample.split is None or sample.batch_size < 1:
            return None
        b = self.buckets.get(self.bucket(sample.batch_size, sample.kv_tokens))
        if b is None or not b.done or sample.split != b.choice or None not in b.rel:
            return None  # exploration samples are meant to be slow sometimes
        return b.rel[b.choice] / b.rel[None]

    def describe(self) -> str:
        done = sum(1 for b in self.buckets.values() if b.done)
        return f"{len(self.buckets)} buckets ({done} converged), current split {split_name(self.current)}"
