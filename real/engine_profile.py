"""Steps timed inside the real engine's body: the engine_* rows of a profile (traces/profile.py).

real.profile's prefill/decode rows time one runner step alone. The engine (real/engine.py) runs the
same steps from a launch thread per GPU while its main thread runs the policies and polls for
completions, in one process, and launches a GPU's next step only after the previous one is reported.
In the 2x H200 fidelity runs its decode steps took from +0.4 ms (batch 1) to +4.5 ms (batch 256, +35%)
over the isolated rows and its prefills +8..15 ms, which the simulator missed (sim/overhead.py). This
measures those steps with the engine itself (LLMEngine.run_until_done: its loop, threads and sleeps),
on closed synthetic workloads under policy pd:
  engine_decode        `batch` sequences decoding on GPU1, GPU0 idle;
  engine_decode_busy   the same while GPU0 prefills filler requests back to back;
  engine_prefill       prefills of one shape, one after another, GPU1 idle;
  engine_prefill_busy  the fillers' prefills in the busy decode runs;
  engine_decode_single `batch` sequences decoding under policy single (single_engine_rows): a one-GPU
                       engine, no launch thread, so its host loop is not pd's (on 2x H200 serving, single's
                       GPU0 decode steps had 23-53 us from a step's end to the next launch, pd's GPU1 ones 96-114);
  engine_prefill_single prefills of one shape under policy single on GPU0, nothing decoding (single_engine_rows).
A decode row is the MEAN period (launch to next launch) over the steps of one shape: the period includes
the gap before the next launch, and the mean keeps the engine's occasional slow steps, which set its
throughput (the isolated rows are medians of steps that do not have them). A prefill row is the mean STEP
(launch to the tokens reported) plus the engine's launch gap, the median time from a step's end to the
next launch while work is queued, taken from the decode runs in the same state of the other GPU. Why not
the prefill's own period: the next group of a prefill point is submitted only once the last one is
reported (queued together they would be batched into one step), so its period also holds that
turnaround, which serving does not pay: on 2x H200 the busy rows' 1 x 512 period sat 1.2 ms over the
isolated step where pd's served prefills of <= 512 tokens took 0.1-0.5 ms over it, and the simulator
over-predicted short prompts' TTFT by 15-25%. `prefill_cost="period"` keeps the old rows. Decode prompts spread
uniformly over context x [1 - spread, 1 + spread] (served batches mix lengths); `context` is the mean.
A row also gives the spread of its periods, the p10/p50/p90/p99 of period / mean (traces/profile.py):
real steps have a heavy tail (beside a prefill some decode steps take 2-4x the mean), which the mean
hides and which the simulator draws from (sim/variability.py). A decode run's contexts grow by a token a
step, so its periods are taken over their trend (a robust line through them), not their plain mean: the
growth is the cost model's to predict, not noise. With ~128 periods a shape, p99 is near the largest.
"""
from __future__ import annotations

import contextlib
import math
import statistics
from dataclasses import dataclass, field

from traces.profile import SPREAD_COLUMNS, SPREAD_PERCENTILES

MIN_SPREAD_PERIODS = 5  # fewer periods give the mean alone

DECODE_GRID = ((1, 1024), (4, 1024), (16, 1024), (64, 1024), (128, 1024), (256, 1024), (16, 2048), (64, 2048),
               (256, 2048))
DECODE_GRID_QUICK = ((1, 1024), (16, 1024), (64, 1024), (256, 1024), (64, 2048))
PREFILL_GRID = ((1, 128), (1, 512), (1, 1024), (1, 2048), (1, 4096), (1, 8192), (4, 1024), (8, 1024), (16, 1024))
FILLERS = ((1, 512), (1, 2048), (4, 1024), (1, 8192))  # (sequences, tokens each) prefilled while GPU1 decodes
SINGLE_PREFILL = ((1, 128), (1, 512), (1, 2048), (1, 8192), (4, 1024))  # under policy single: its prefill overhead


@dataclass(slots=True)
class EngineProfileConfig:
    decode: tuple = DECODE_GRID  # (batch, mean context)
    prefill: tuple = PREFILL_GRID  # (sequences, tokens each)
    fillers: tuple = FILLERS  # GPU0's work in the busy runs, cycled
    single_prefill: tuple = SINGLE_PREFILL  # (sequences, tokens each) prefilled alone under policy single
    decode_steps: int = 128  # steps measured at full batch per point (enough for a p99 of their spread)
    prefill_reps: int = 20  # prefills measured per shape (after one warm-up)
    spread: float = 0.5  # decode prompt lengths: context x [1 - spread, 1 + spread]
    extra_steps: int = 64  # first guess of the decode steps a batch takes to form (its prefills and copies)
    max_extra_steps: int = 2048  # a retry gives as many as the last try took to form the batch, up to this
    tries: int = 3
    prefill_cost: str = "step"  # a prefill row's seconds: "step" (mean step + launch gap) or "period"
    # one more busy run per shape here with GPU0 idle `filler_pause_s` before each filler group (after its
    # last one is reported), logged as kind "prefill_busy_after_idle" and not made into rows: served prefills
    # mostly land on an idle GPU0, and on 2x H200 (session 15) those paid 0.10-0.42 ms over the isolated
    # step where back-to-back ones paid 0.44-0.74 and the busy rows (back to back) say 0.86
    # (bench/fidelity_diagnose.py prefill_extra_by_idle_before)
    after_idle: tuple = ((64, 1024),)
    filler_pause_s: float = 0.002
    log: object = field(default=print)
    # what each prefill point took, for the profile's metadata (not rows the simulator reads): the step
    # (launch to its end) beside the period (launch to next launch), and in the busy runs by the decode
    # batch running beside it. pd's served prefills of <= 512 tokens on 2x H200 paid ~0.2 ms over the
    # isolated step where the pooled busy periods say 1.2 ms: the log shows where the difference sits
    prefill_log: list = field(default_factory=list)
    launch_gap_s: dict = field(default_factory=dict)  # "idle"/"busy" -> the median launch gap (engine_rows sets it)
    # each idle decode row's isolated twin (op + "_isolated"): the runner step at the row's shape, timed in this
    # process as real.profile times its decode rows (median of `isolated_reps`; 0: none). Why: the simulator's
    # overhead is the engine row less an isolated step, and the profile's isolated rows are another process,
    # 3.5-11% apart in speed: at batch 256 (a ~10 ms step) the six 2x H200 profiles of sessions 19-24 put pd's
    # overhead at 0.2-2.0 ms, where served pipelined steps of 129-256 sequences ran 0.4-1.0 ms over the isolated
    # model on every machine, and pipeline's conv TPOT error (-7.3 .. +15.0%) rose with that difference, in its order
    isolated_reps: int = 20

    def __post_init__(self):
        if self.prefill_cost not in ("step", "period"):
            raise ValueError(f"prefill_cost {self.prefill_cost!r}: one of 'step', 'period'")


class _Bench:
    """One LLMEngine (pd, or `policy`) and helpers to serve closed workloads on it and read its step rows."""

    def __init__(self, model: str, device: str, cfg: EngineProfileConfig, max_batch: int, max_len: int,
                 policy: str = "pd"):
        from .config import EngineConfig
        from .engine import LLMEngine, SamplingParams, synthetic_prompt

        self.cfg, self.SamplingParams, self.prompt = cfg, SamplingParams, synthetic_prompt
        self.engine = LLMEngine(EngineConfig(model=model, device=device, seed=0, max_num_seqs=max_batch,
                                             max_model_len=max_len), policy, log=cfg.log)
        self.vocab = self.engine.model_cfg.vocab_size
        self.next_id = 0

    @property
    def two_gpus(self) -> bool:
        return len(self.engine.devices) == 2

    def request(self, length: int, max_tokens: int, arrival: bool = True):
        rid, self.next_id = self.next_id, self.next_id + 1
        params = self.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        ids = self.prompt(rid, length, self.vocab, 0)
        return (self.engine.clock(), rid, ids, params) if arrival else (rid, ids, params)

    def serve(self, pending, on_done=None) -> list[tuple]:
        """Serve `pending` to the end; the step rows (real/engine.py tuples) written meanwhile."""
        first = len(self.engine.steps)
        self.engine.run_until_done(pending, on_done)
        return self.engine.steps[first:]


def _periods(rows: list[tuple], device: str, keep) -> list[tuple[float, tuple]]:
    """(launch-to-next-launch period, row) of consecutive steps on `device` that both satisfy `keep`."""
    rows = sorted((r for r in rows if r[2] == device), key=lambda r: r[0])
    return [(b[0] - a[0], a) for a, b in zip(rows, rows[1:]) if keep(a) and keep(b)]


def spread_columns(periods: list[float], detrend: bool = False) -> dict:
    """The p10/p50/p90/p99_over_mean columns of a row: percentiles of period / mean ({} with too few
    periods). detrend: each period over a Theil-Sen line through them in launch order (same mean),
    which keeps a run's steady growth out of its spread."""
    n = len(periods)
    if n < MIN_SPREAD_PERIODS:
        return {}
    mean = statistics.fmean(periods)
    slope = 0.0
    if detrend:  # the median of pairwise slopes: one slow step does not tilt it
        slope = statistics.median((periods[j] - periods[i]) / (j - i) for i in range(n) for j in range(i + 1, n))
    mid = (n - 1) / 2
    ratios = [p / max(mean + slope * (i - mid), 1e-3 * mean) for i, p in enumerate(periods)]
    cuts = statistics.quantiles(ratios, n=100, method="inclusive")  # linear between order statistics
    return {c: cuts[q - 1] for q, c in zip(SPREAD_PERCENTILES, SPREAD_COLUMNS)}


def prompt_lengths(cfg: EngineProfileConfig, batch: int, context: int) -> list[int]:
    """The decode batch's prompt lengths: spread evenly over context x [1 - spread, 1 + spread]."""
    lo, hi = context * (1 - cfg.spread), context * (1 + cfg.spread)
    return [max(1, round(lo + (hi - lo) * (i + 0.5) / batch)) for i in range(batch)]


def isolated_row(bench: _Bench, row: dict, device: str = "gpu1") -> dict | None:
    """The isolated twin of decode row `row` (op + "_isolated"): `device`'s runner step on a batch of the row's
    spread of prompt lengths shifted to its mean context (the served steps' contexts grow by one a step),
    timed in this process as real.profile times its decode rows (real.profile.median_s over cfg.isolated_reps,
    input staging and the CUDA graph replay included). None with isolated_reps 0."""
    cfg = bench.cfg
    if cfg.isolated_reps <= 0:
        return None
    import torch

    from .profile import median_s
    from .testing import fake_decode_batch

    runner = bench.engine.runners[device]
    lengths = prompt_lengths(cfg, row["batch"], row["context"])
    shift = row["context"] - statistics.fmean(lengths)
    batch = fake_decode_batch(runner, row["batch"], [max(1, round(n + shift)) for n in lengths])
    on_device = torch.cuda.device(runner.device) if runner.device.type == "cuda" else contextlib.nullcontext()
    try:
        with torch.inference_mode(), on_device:
            seconds = median_s(lambda: runner.run(batch, {}), runner.device, cfg.isolated_reps)
    except RuntimeError as e:  # the row stands without its twin (the simulator then reads the profile's step)
        cfg.log(f"  batch {row['batch']} x {row['context']}: no isolated twin ({e})")
        return None
    return dict(op=row["op"] + "_isolated", batch=row["batch"], context=row["context"], seconds=seconds)


def decode_point(bench: _Bench, batch: int, context: int, busy: bool, device: str = "gpu1",
                 op: str | None = None, pause_s: float = 0.0) -> tuple[dict, dict, list[float]] | None:
    """The engine_decode(_busy) row (or `op`) of one (batch, context) decoding on `device`, in a busy run the
    fillers' (period, step) by (sequences, tokens), and the launch gaps (a step's end to the next launch) of
    the full-batch steps. pause_s > 0: each filler group arrives pause_s after the last is reported (GPU0
    idles between them), and the fillers are logged as "prefill_busy_after_idle"."""
    cfg = bench.cfg
    lengths = prompt_lengths(cfg, batch, context)
    extra = cfg.extra_steps
    for attempt in range(cfg.tries):
        pending = [bench.request(n, cfg.decode_steps + extra) for n in lengths]
        decoding = {p[1] for p in pending}
        fillers: set[int] = set()
        groups = [0]

        def add_fillers(at: float | None = None):  # the next filler shape, all its prompts at once (one prefill
            seqs, tokens = cfg.fillers[groups[0] % len(cfg.fillers)]  # step); `at`: arriving then, not now
            groups[0] += 1
            for _ in range(seqs):
                rid, ids, params = bench.request(tokens, 1, arrival=False)
                fillers.add(rid)
                if at is None:
                    bench.engine.add_request(rid, ids, params)
                else:  # run_until_done reads `pending` by index: a later arrival appended keeps it sorted
                    pending.append((at, rid, ids, params))

        def on_done(done):  # GPU0 prefills fillers back to back (or pause_s apart) while GPU1 decodes the batch
            decoding.difference_update(r.request_id for r in done)
            fillers.difference_update(r.request_id for r in done)
            if busy and decoding and not fillers:
                add_fillers(bench.engine.clock() + pause_s if pause_s > 0 else None)

        if busy:
            add_fillers()  # GPU0 starts on it; the next fillers queue behind the batch's own prompts
        rows = bench.serve(pending, on_done)
        timed = _periods(rows, device, lambda r: r[3] == "decode" and r[4] == batch)
        periods = [p for p, _ in timed]
        enough = max(1, cfg.decode_steps // 2) if attempt < cfg.tries - 1 else min(cfg.decode_steps, 3)
        fillers_by_shape = _filler_steps(rows) if busy and periods else {}
        if periods and pause_s > 0 and not fillers_by_shape and attempt < cfg.tries - 1:
            # the batch finished before a paused filler group launched beside it (its steps were shorter
            # than the pause): decode long enough for about four pauses
            extra = min(cfg.max_extra_steps, extra + math.ceil(4 * pause_s / statistics.median(periods)) + 16)
            cfg.log(f"  batch {batch} x {context}: no filler launched beside it after a "
                    f"{1e3 * pause_s:g} ms pause; retrying, {extra} extra steps")
            continue
        if len(periods) >= enough:
            full = [r for r in rows if r[2] == device and r[3] == "decode" and r[4] == batch]
            ctx = round(statistics.fmean(r[6] / batch for r in full))
            op = op or ("engine_decode_busy" if busy else "engine_decode")
            row = dict(op=op, batch=batch, context=ctx, seconds=statistics.fmean(periods),
                       **spread_columns(periods, detrend=True))
            for (seqs, tokens), got in sorted(fillers_by_shape.items()):
                where = dict(decode_batch=batch, decode_context=ctx) | (dict(pause_s=pause_s) if pause_s > 0 else {})
                cfg.prefill_log.append(_step_summary("prefill_busy_after_idle" if pause_s > 0 else "prefill_busy",
                                                     seqs, tokens, got, **where))
            gaps = [max(0.0, p - (r[1] - r[0])) for p, r in timed]  # the next step was queued: served-like
            return row, fillers_by_shape, gaps
        extra = min(cfg.max_extra_steps, _forming_steps(rows, batch, device) + 16)
        cfg.log(f"  batch {batch} x {context}: {len(periods)} steps at full batch; retrying, {extra} to form it")
    cfg.log(f"  batch {batch} x {context}: the batch never decoded whole for {cfg.decode_steps} steps; skipped"
            + kv_shortfall(bench, lengths, cfg.decode_steps + extra, device))
    return None


def kv_shortfall(bench: _Bench, lengths: list[int], max_tokens: int, device: str) -> str:
    """Why a batch may never form: '' when the engine's KV cache on `device` holds it at its last step, else
    a sentence saying how short it is (the engine sizes its cache from the GPU memory free when it starts)."""
    runner = getattr(bench.engine, "runners", {}).get(device)
    if runner is None:
        return ""
    size = runner.block_size
    need = sum(-(-(n + max_tokens) // size) for n in lengths)
    if need <= runner.num_blocks:
        return ""
    return (f" (the engine's KV cache on {device} has {runner.num_blocks} blocks of {size} tokens, the batch needs "
            f"{need} at its last step: is another process holding that GPU's memory?)")


def _forming_steps(rows: list[tuple], batch: int, device: str = "gpu1") -> int:
    """Steps that decoded on `device` before the whole batch did (all of them, twice, if it never did): decode
    steps, and a colocated engine's mixed ones (its early requests decode beside the later prompts' chunks)."""
    dec = sorted((r for r in rows if r[2] == device and r[3] in ("decode", "mixed")), key=lambda r: r[0])
    whole = next((i for i, r in enumerate(dec) if r[4] == batch), None)
    return whole if whole is not None else 2 * len(dec)


def _filler_steps(rows: list[tuple]) -> dict[tuple[int, int], list[tuple[float, float]]]:
    """(period, step) of consecutive GPU0 prefills launched while GPU1 decodes, by (sequences, tokens) (the
    period holds any pause before the next group)."""
    by_shape: dict[tuple[int, int], list[tuple[float, float]]] = {}
    gpu1 = sorted((r[0], r[1]) for r in rows if r[2] == "gpu1")
    for period, r in _periods(rows, "gpu0", lambda r: r[3] == "prefill"):
        if any(s <= r[0] < e for s, e in gpu1):  # GPU1 was decoding when this prefill launched
            by_shape.setdefault((r[4], r[5]), []).append((period, r[1] - r[0]))
    return by_shape


def _step_summary(kind: str, seqs: int, tokens: int, timed: list[tuple[float, float]], **where) -> dict:
    """One prefill_log entry: how many, the mean and median period and the mean and median step (seconds)."""
    periods, steps = [p for p, _ in timed], [s for _, s in timed]
    return dict(kind=kind, seqs=seqs, tokens=tokens, **where, n=len(timed), mean_period_s=statistics.fmean(periods),
                median_period_s=statistics.median(periods), mean_step_s=statistics.fmean(steps),
                median_step_s=statistics.median(steps))


def prefill_row(op: str, seqs: int, tokens: int, timed: list[tuple[float, float]], gap: float | None) -> dict:
    """An engine_prefill(_busy) row from its (period, step) pairs: each step plus the launch gap (`gap`
    None: the periods themselves, as before; see the module doc)."""
    costs = [p for p, _ in timed] if gap is None else [s + gap for _, s in timed]
    return dict(op=op, batch=seqs, tokens=tokens, seconds=statistics.fmean(costs), **spread_columns(costs))


def launch_gap(gaps: list[float]) -> float | None:
    """The engine's launch gap: the median of back-to-back steps' gaps (None without any)."""
    return statistics.median(gaps) if gaps else None


def _prefill_rows(cfg: EngineProfileConfig, alone: dict, busy: dict, gaps: dict) -> list[dict]:
    """The engine_prefill rows (GPU1 idle) and the pooled engine_prefill_busy rows, each prefill's step plus
    the launch gap of its state (that state's decode runs; the other state's if it has none; the periods
    where neither has any or cfg.prefill_cost is "period")."""
    found = {k: launch_gap(v) for k, v in gaps.items()}
    cfg.launch_gap_s = {k: v for k, v in found.items() if v is not None}
    either = found["idle"] if found["idle"] is not None else found["busy"]
    use = {k: None if cfg.prefill_cost == "period" else (v if v is not None else either) for k, v in found.items()}
    if cfg.prefill_cost == "step" and either is None:
        cfg.log("  no back-to-back decode steps to time the launch gap: prefill rows are the periods")
    cfg.log("  launch gap (a step's end to the next launch, queued work): "
            + ", ".join(f"{k} {1e3 * v:.3f} ms" for k, v in cfg.launch_gap_s.items()))
    rows = [prefill_row("engine_prefill", b, t, timed, use["idle"]) for (b, t), timed in alone.items()]
    return rows + [prefill_row("engine_prefill_busy", b, t, timed, use["busy"])
                   for (b, t), timed in sorted(busy.items()) if len(timed) >= 2]


def prefill_point(bench: _Bench, seqs: int, tokens: int, kind: str = "prefill") -> list[tuple[float, float]] | None:
    """(period, step) of the prefills of `seqs` prompts of `tokens` each, GPU1 idle (or none: policy single): one
    group after another. `kind`: its prefill_log entry's."""
    cfg = bench.cfg
    groups = cfg.prefill_reps + 2  # a warm-up group, and one more so the last measured has a next launch
    left = [groups - 1]

    def on_done(done):
        if left[0] > 0 and not bench.engine.has_work():
            left[0] -= 1
            for _ in range(seqs):
                bench.engine.add_request(*bench.request(tokens, 1, arrival=False))

    rows = bench.serve([bench.request(tokens, 1) for _ in range(seqs)], on_done)
    shape = lambda r: r[3] == "prefill" and r[4] == seqs and r[5] == seqs * tokens  # noqa: E731
    timed = _periods(rows, "gpu0", shape)[1:]  # the first group warms the shape up
    periods = [p for p, _ in timed]
    if not periods:
        cfg.log(f"  prefill {seqs} x {tokens}: no consecutive prefills of this shape; skipped")
        return None
    # the step itself vs launch to next launch: in the 2x H200 profile the period (54 ms for 1 x 1024) was
    # 14 ms above the prefill steps of real serving (35-41 ms); this line says where the difference sits
    cfg.log(f"  prefill {seqs} x {tokens}: step {1e3 * statistics.median(r[1] - r[0] for _, r in timed):.1f} ms, "
            f"period {1e3 * statistics.median(periods):.1f} ms (medians)")
    pairs = [(p, r[1] - r[0]) for p, r in timed]
    cfg.prefill_log.append(_step_summary(kind, seqs, seqs * tokens, pairs))
    return pairs


def engine_rows(model: str, device: str = "cuda", cfg: EngineProfileConfig | None = None) -> list[dict]:
    """Every engine_* row on this node (two GPUs needed; [] otherwise, with a line saying why)."""
    cfg = cfg or EngineProfileConfig()
    max_batch = max(b for b, _ in cfg.decode)
    longest_decode = int(max(c for _, c in cfg.decode) * (1 + cfg.spread))
    max_len = longest_decode + cfg.decode_steps + max(cfg.extra_steps, cfg.max_extra_steps)
    max_len = max(max_len, max(t for _, t in cfg.prefill + cfg.fillers) + 16)
    bench = _Bench(model, device, cfg, max_batch, max_len)
    try:
        if not bench.two_gpus:
            cfg.log("engine rows need two GPUs (policy pd): skipped")
            return []
        rows: list[dict] = []
        cfg.log(f"engine steps: prefill alone ({len(cfg.prefill)} shapes)")
        alone = {}
        for seqs, tokens in cfg.prefill:
            timed = prefill_point(bench, seqs, tokens)
            if timed:
                alone[(seqs, seqs * tokens)] = timed
        cfg.log(f"engine steps: decode alone and beside prefills ({len(cfg.decode)} shapes)")
        busy_prefills: dict[tuple[int, int], list[tuple[float, float]]] = {}  # fillers recur in every busy run: pooled
        gaps: dict[str, list[float]] = {"idle": [], "busy": []}
        for batch, context in cfg.decode:
            for busy in (False, True):
                got = decode_point(bench, batch, context, busy)
                if got:
                    rows.append(got[0])
                    twin = None if busy else isolated_row(bench, got[0])
                    if twin:
                        rows.append(twin)
                    for shape, timed in got[1].items():
                        busy_prefills.setdefault(shape, []).extend(timed)
                    gaps["busy" if busy else "idle"].extend(got[2])
        if cfg.after_idle and cfg.filler_pause_s > 0:
            cfg.log(f"engine steps: prefills beside a decode batch after GPU0 idled {1e3 * cfg.filler_pause_s:g} ms "
                    f"({len(cfg.after_idle)} shapes; logged, not rows)")
            for batch, context in cfg.after_idle:
                decode_point(bench, batch, context, True, pause_s=cfg.filler_pause_s)  # its decode row: not served-like
        return rows + _prefill_rows(cfg, alone, busy_prefills, gaps)
    finally:
        bench.engine.close()


def single_engine_rows(model: str, device: str = "cuda", cfg: EngineProfileConfig | None = None) -> list[dict]:
    """The engine_decode_single rows: decode steps of a one-GPU engine (policy single, GPU0) at cfg.decode's
    shapes, timed as engine_decode's are, and the engine_prefill_single rows: prefills alone at cfg.single_prefill's
    shapes, each step plus the one-GPU engine's launch gap (as _prefill_rows does for pd). The simulator adds their
    overhead to single's steps instead of pd's (sim/overhead.py). Why the prefill rows: single's colocated mixed
    steps took pd's engine_prefill overhead, the only prefill rows there were, and were modelled 1.015-1.036x
    (1.065-1.077x with at most 4 decodes) in session 17's three rounds, where its decode steps, on their own rows,
    read 0.98-1.02x. Its launch gap goes to cfg.launch_gap_s["single"]."""
    cfg = cfg or EngineProfileConfig()
    max_batch = max(b for b, _ in cfg.decode)
    max_len = int(max(c for _, c in cfg.decode) * (1 + cfg.spread)) + cfg.decode_steps + cfg.max_extra_steps
    max_len = max(max_len, max((t for _, t in cfg.single_prefill), default=0) + 16)
    bench = _Bench(model, device, cfg, max_batch, max_len, policy="single")
    try:
        rows, gaps = [], []
        cfg.log(f"engine steps: decode under policy single on GPU0 ({len(cfg.decode)} shapes)")
        for batch, context in cfg.decode:
            got = decode_point(bench, batch, context, False, device="gpu0", op="engine_decode_single")
            if got:
                rows.append(got[0])
                twin = isolated_row(bench, got[0], device="gpu0")
                if twin:
                    rows.append(twin)
                gaps.extend(got[2])
        gap = launch_gap(gaps)
        if gap is not None:
            cfg.launch_gap_s["single"] = gap
            cfg.log(f"  launch gap under policy single: {1e3 * gap:.3f} ms")
        if cfg.single_prefill:
            cfg.log(f"engine steps: prefill alone under policy single on GPU0 ({len(cfg.single_prefill)} shapes)")
        for seqs, tokens in cfg.single_prefill:
            timed = prefill_point(bench, seqs, tokens, kind="prefill_single")
            if timed:  # each step + the one-GPU engine's launch gap (None, untimed: the periods themselves)
                rows.append(prefill_row("engine_prefill_single", seqs, seqs * tokens, timed,
                                        None if cfg.prefill_cost == "period" else gap))
        return rows
    finally:
        bench.engine.close()
