#!/usr/bin/env bash
# The measurements still owed, one device call each (<= 10 min). Pass the block name; priority: onemachine, between, round2, tailplaced, tailab, heldout, profile, fidelity,
# kernel, pipeline, prefill (transfer and pd re-measure issue 4, resolved):
#   bash bench/next_gpu_session.sh kernel     # one GPU; the others on nvidia-h100-x2 (2 GPUs), carry the Azure trace as $T
# Results land in $OUT; commit them under bench/results/ (and traces/profiles/) with the GPU named.
# Session 26: only 1x H200 lent (2-GPU kinds withheld). Three 1x H200 `profile --no-engine` runs (the decode_tail rows
# now reach batches 192/256, the 224 knot; merged into the default's tail rows: pipeline's conv TPOT 1.5-1.7 points nearer
# on all six run sets), `between` at 128-256 (steps between buckets modelled within 1.9% with the 224 knot) and
# `pipereplay` (session 24's served pipelined steps replayed). Session 25's 2x H200 runs (the 224 knot's `onemachine`,
# `heldout` with its own profile, 2 machines) were lost with that checkout, never committed: owed again, first, with
# 2x H100 (none served since session 21) when a 2-GPU kind is lent. real.profile's engine rows now carry same-process
# isolated twins (engine_decode_isolated): `onemachine` measures pd's; read fidelity_diagnose's overhead_at_shape
# (pipeline's 129-256 steps: served extra vs modelled overhead, whose difference set its TPOT error's sign on six machines).
# Session 24: 2x H100 asked, 2x H200 served: `onemachine` (927 rows, 203 s) + `heldout` (all four), two machines. The freeze
# measured: no full collection in any serving process, longest pause 22.6 ms; single's conv error -2.4/-1.7% (own profile;
# was -15 to -18%), held-out pd's TTFT p99 +11.1% (was -8.9%). Owed: 2x H100 (`onemachine` + `heldout`), none since session 21.
# Session 22: three calls for 2x H100, all served as 2x H200: `onemachine` on two machines, `heldout` (pd single adaptive)
# on a third. run.json host_stalls showed the stall: one full garbage collection of 146-253 ms per serving process (held-out
# pd's slow prefill, adaptive's slow decode step, single's conv queue). real.run now freezes the start-up heap (not yet
# measured on a GPU). Owed first: `onemachine` + `heldout` with the freeze (read host_stalls: no pause over ~30 ms
# expected; single's conv error and held-out pd's TTFT p99 should move); 2x H100 still owed (none served since session 21).
# Session 21: 2x H200 `onemachine` (927 rows, 199 s) + `heldout`, one machine; then 2x H100 (the first since session 12)
# `onemachine`: its profile's engine rows were all skipped ("the batch never decoded whole": the parent process
# still held the decode GPU's 64 GB runner cache, so the engine processes' KV caches were too small on 80 GB; fixed:
# real.profile now frees it first) and the profile ran out of its 300 s, so single was not run. Owed first: 2x H100
# `onemachine` again (the H100 profile is session 9's), then `heldout` and `round2` there. Held-out pd's TTFT p99 is
# bimodal over machines (one GPU0 prefill stalls 150-200 ms early in some runs): read run.json host_stalls.
# Held-out single reads +10-13% with the default: its GPU0 decode steps are modelled 1.047x at their own shapes
# (bench/colocated_at_shape.py): the pooled engine_decode_single rows; more machines' engine rows would settle them.
# Session 20: 2x H200 `onemachine` (profile with decode/pipeline knots at 24 and 48: 843 rows in 218 s) + `between` + `round2`
# + `heldout`, one machine; then a second 2x H200: a profile with pipelined rows at batches 2/4/8 too (927 rows, 162 s,
# --engine-processes 1) + held-out pipeline. Knots: conv neutral, held-out pipeline/adaptive TPOT 3 points nearer;
# steps between buckets read 2-5% low off the knots (bench/step_between_buckets.py). Owed: H100; single's conv replicates 23% apart.
# Session 19: 2x H200 `onemachine` + `round2` (one machine, own profile: single +0.2/-0.1%, pipeline TPOT +8.0%); `tailplaced`
# (1x H200 of that machine): the pipelined tail between graph buckets follows halves of the padded batch (now modelled so).
# Owed: pipelined profile rows at buckets 24 and 48 (steps between buckets read 1.03-1.34x the replays); H100.
# Session 18: `tailab` twice (1x H200; bench/results/pipeline_tail_ab{,_longs}_NVIDIA_H200.json): the model's pipelined
# decode tail ran 0.64-1.16 of the real one (falling with the excess) where the sequential one read 0.83-1.11; the sim now
# scales pipelined tails by pipelined/sequential measured-over-modelled (decode_tail rows; real.profile times them at
# 3 long contexts). 2x H200 `onemachine` (its decode_tail rows at 5 reps were noisy: now reps x 4) + `heldout`, one machine.
# Owed: `onemachine` + `round2` with the 3-context decode_tail rows; H100 (none served since session 12).
# Session 17: 2x H200 `onemachine` (profile with the 160/192 knots and 4,096-token pipelined rows: 166 s, 603 rows) +
# `heldout` + `round2` + a round 3, one machine, own profile: pd/adaptive within 2% (means) on conv, pipeline TPOT
# +4.7% (its 65-128 steps modelled 1.065x), single +10/+7.5% after the signed engine overhead (sim/overhead.py); the
# default is now the median of seven profiles (conv means within 2.1% but single). The profile now also times
# engine_prefill_single rows (read single's mixed steps against them) and decode_prefill_gpu at 6 batches. Held-out:
# adaptive's 96:36 duels lost by 8-18% real, ~1.5% in the noise-free sim: its 96:36 steps with a long sequence ran
# ~10% over the model (n=8-10 a run, three machines). Owed first: `tailab` (one GPU, ~1-2 min: what mixed contexts
# add to the sequential and the pipelined step per split, the sim's microbatch_tail_s against it), then H100.
# Session 16: `tailorder` (1x H200): no start delay (last - first <= 0.009 ms a layer); the model's tail reads 4% under
# to 16% over the kernel's. `mixreplay` (1x H200): session 15's slow served steps, replayed alone, ran at or under the
# model, so that machine's single miss was not in the step's shape; 2x H200 `onemachine` + `round2` + a round 3 (one machine,
# with nvidia-smi logs): own profile, every mean within 3.2% and every p99 within 6.5%, rankings agree; single's big
# steps within 0.6 ms of the model. The quick grid now times batches 160 and 192 (steps of 129-191 sequences were
# modelled 0.95-0.98x on two machines; grafted from a 30 s knots run: 0.99-1.01x). Owed: `onemachine` with them, then
# `heldout` right after it on the same machine; H100.
# Session 15: 2x H200 `onemachine` (profile with the new knots: 192 s, 470 rows) + round 2 + held-out + round 3, one
# machine: pd/adaptive/pipeline TPOT within 3% (own profile), TTFT +4%; single saturated (TTFT 440/389/71 ms
# real vs 34 sim): its GPU0 steps of 129-256 sequences with a long sequence ran 2-5 ms over the model's tail.
# Owed first: `tailorder` (one GPU, 1 min: does a long sequence's grid position set the tail past ~1,000
# programs?), then more machines' profiles with the knots (pool them: traces.profile merge), H100. pd/adaptive
# TTFT +4%: served prefills after an idle GPU0 paid 0.10-0.42 ms over the isolated step, back-to-back ones
# 0.44-0.74, the busy rows (back-to-back fillers) charge 0.86 to all; the profile now also logs fillers after
# a 2 ms idle GPU0 (profile.json engine_rows.prefill_log, kind prefill_busy_after_idle): read them first.
# Session 14: 2x H200 `onemachine` (--engine-processes 2) + `round2` + a round 3 on one machine, `onemachine` on a
# second: same-machine replicates agree within 2-6% (TPOT means), yet the sim's TPOT ran 6-11% under on machine 1
# and +2% over (pd) on machine 2; the profiles' isolated decode steps differ 5% between the machines where the
# served steps differ 1.4% (bench/profile_pooling.py: own vs other machines' vs pooled profiles); per step
# (fidelity_diagnose.decode_at_shape) pd's steps are modelled 0.95-1.01x by machine, pipelined 0.95-0.97x on
# every machine (a pipelined-step mechanism, not yet found). The --quick grid now times batches 32, 96 and 128 too
# (the misses sat between its old knots 16-64-256): re-run `onemachine` and read decode_model_over_real. Owed: profile
# rows (not only engine rows) in several fresh processes; H100 (every call this session was served as H200).
# Session 13: 2x H200 `onemachine` + `heldout` (all four policies, same machine): conv pd/adaptive/pipeline TTFT
# means +4-5%, pipeline TPOT -7.1%, single -22/-17% (its run 5.9% slower than the profile at its own shapes);
# real runs of one policy on one machine differ by 18-21% (single) and 10-17% (pd TPOT) at x8. Owed first:
# `onemachine` then `round2` on the same warm machine (every policy twice; sim half: both archives, compared by
# the replicates' mean), on H200 and on H100; engine rows timed in several fresh processes (code first: each
# engine row is a difference of two one-process measurements, and session 13's read 0.54 ms at batch 1 against
# 0.28-0.39 in the other profiles).
# AT MOST 8 FILES come back from $OUT (a 9th and on are dropped silently: session 10 lost a profile so);
# pack logs and per-policy archives into one file. Session 12: one H200 `python bench/pipeline_bench.py --skip serving`
# (the pipeline vs its like-for-like ceiling in graphs: no gain to capture, ceiling 0.62-0.87), the same + engine_single on
# one H100 (18,137 tok/s), 2x H200 serving `--skip steps --pairs 2` (adaptive/pd 0.9985/0.9975/0.986), GPU tests.
# Issue 6: single's +8% was the pd engine's overhead charged to single's one-GPU engine; real.profile now times
# engine_decode_single rows, and a 2x H200 profile + single + pd call (bench/scratch-style: profile, then
# `fidelity_bench.py real --policies single pd`) read single +4.4 / +2.5% (TTFT / TPOT means), pd TPOT -5.9%.
# Owed: `onemachine` with all four policies on the new profile (H200 and H100); pd's TPOT -5.9% on that machine
# (-2.3% on session 11's); the held-out set on the same machine. Session 11: 2x H200 onemachine twice (compile, then Triton fusions)
# + held-out (pd single adaptive) + engine_single A/B; owed: H100 engine_single and onemachine with the Triton fusions.
# Session 10: 2x H200 `onemachine` with the new rows:
# every p99 within 8%, every mean within 3% but pd/adaptive TTFT (+4.0 / +4.4%: short prefills' engine
# overhead from the busy rows); the held-out runs (adaptive 134 s, single, pd, pipeline) were served but did
# not come back. Owed first: `heldout` on the machine of a fresh `onemachine` (H100 and H200); the engine
# prefill rows under a served-like load (open-loop arrivals beside a decode batch of 32-128).
# Session 9: 2x H100 `onemachine` (profile with every row on GPU0 + all four policies) and a held-out
# burst/long-prompt workload back to back; 2x H200 gpu_ab (GPU1 decodes 4-10% faster than GPU0, GPU0 moves
# up to 10% between processes); 2x H200 profile with the decode side on GPU1 (now real.profile's default) + pd:
# TPOT -0.9 / -1.5%. Owed: `onemachine` again (all four policies with the GPU1 decode rows, on H100 and H200),
# then `heldout` (adaptive too: give it more than 135 s). real.profile now also times `mixed` rows (colocated
# steps whole: single's composed mixed steps ran 12-18% over the served ones on the held-out workload),
# `decode_prefill_gpu` rows (GPU0's decode speed, for single/dp) and 4,096-token decode contexts: check each; prefill rows timed in 3 fresh GPU0 processes (TTFT
# +5..+10%: GPU0's process-to-process spread); decode rows at contexts past 2,048 (the held-out workload's
# long contexts; drop --quick's context cap) to settle the decode tail at small batches; finer prefill graph
# buckets timed A/B; the KV pull kernel on fewer SMs; H100 engine_single with the fused prefill graphs.
set -u
T=${T:-bench/scratch/AzureLLMInferenceTrace_conv.csv}
# GPU clocks, power and throttle reasons every 250 ms while serving ($1: the CSV; stopped on exit): single's big
# steps ran 16-29% over the model on one machine (session 15) and within 0.6 ms of it on another (session 16)
smi_log() {
  ( nvidia-smi --query-gpu=timestamp,index,clocks.sm,clocks.mem,power.draw,power.limit,temperature.gpu,clocks_event_reasons.active \
      --format=csv -lms 250 > "$1" 2>&1 || nvidia-smi --query-gpu=timestamp,index,clocks.sm,clocks.mem,power.draw,power.limit,temperature.gpu \
      --format=csv -lms 250 > "$1" 2>&1 ) &
  SMI=$!; trap 'pkill -P $SMI 2>/dev/null; kill $SMI 2>/dev/null' EXIT
}
case "${1:-}" in
transfer)  # issue 4 (resolved with pull): more interleaved TTFT runs per transport (each ~25 s a run)
  timeout 250 python3 -u -m pytest -q -p no:cacheprovider tests/test_transfer.py tests/test_gpu_engine.py > $OUT/pytest.log 2>&1
  tail -1 $OUT/pytest.log
  for m in pull push; do
    timeout 170 python3 bench/pd_bench.py --trace $T --requests 200 --rates 4 --transfer-only --ttft-pairs 2 \
      --kv-transport $m --out $OUT/pd_transfer_$m.json 2>&1 | tail -2
  done ;;
pd)  # issue 4: the whole single/dp/pd comparison (pd first: a time-out cuts dp's tail, not pd's)
  timeout 580 python3 bench/pd_bench.py --trace $T --requests 200 --rates 4 8 16 --ttft-pairs 2 --policies pd single dp \
    --out $OUT/pd.json 2>&1 | tail -22 ;;
prefill)  # issues 4/6: prefill CUDA graphs (on by default since session 6) against eager prefills, fresh processes
  # in the order A B B A after an untimed warm-up process; run folders packed into one file
  run() { name=$1; shift; timeout 100 python3 -m real.run --workload $T --num-requests 300 --rate-scale 8 --quiet \
    --out $OUT/runs/$name "$@" > $OUT/$name.log 2>&1; echo "$name rc $?"; grep -E "output \(tok/s\)|TTFT (p50|p99|mean)|TPOT (p50|mean)|load_s" \
    $OUT/$name.log | tr -s ' ' | paste -sd'|' ; }
  timeout 90 python3 -m real.run --workload $T --num-requests 40 --rate-scale 8 --policy pd --quiet --out /tmp/warm > /dev/null 2>&1
  run pd_eager --policy pd --no-prefill-graphs; run pd_graphs --policy pd; run single_graphs --policy single
  run single_eager --policy single --no-prefill-graphs; run pd_graphs2 --policy pd; run pd_eager2 --policy pd --no-prefill-graphs
  tar czf $OUT/prefill_runs.tgz -C $OUT runs && rm -rf $OUT/runs ;;
profile)  # issue 6: profiles with the engine rows, their spread and decode_program rows (2 GPUs), 0.6b then 8b;
  # read the "prefill N x T: step .. ms, period .. ms" lines: engine_prefill was 14 ms above real serving
  timeout 580 python3 -m real.profile --model ${MODEL:-qwen3-0.6b} --quick --token-budget 524288 \
    --out $OUT/profile.csv 2>&1 | tail -3 && python3 -m traces.profile $OUT/profile.csv | tail -5 ;;
onemachine)  # issue 6: the profile and all four policies in one call, so the sim's profile is the runs' machine
  smi_log $OUT/smi.csv
  S0=$(date +%s)  # the profile took 150-192 s on 2x H200 in sessions 15-16 (more with the 160/192 knots); runs ~70-80 s each
  # --engine-processes 2: each engine row the median over fresh processes (session 13's engine row put 0.54 ms of
  # overhead at batch 1, other profiles 0.28-0.39); read max_spread_between_processes in profile.json
  timeout 300 python3 -m real.profile --model qwen3-0.6b --quick --token-budget 524288 --engine-processes 2 --out $OUT/profile.csv \
    > $OUT/profile.log 2>&1; grep -E "rows in|rror" $OUT/profile.log | tail -3
  # the engine prefills' step vs period, alone and by the decode batch beside them (pd/adaptive TTFT +4%)
  python3 -c "import json; [print(e) for e in json.load(open('$OUT/profile.json'))['engine_rows']['prefill_log']]"
  python3 bench/fidelity_bench.py real --trace $T --num-requests 2000 --rate-scale 8 --split-step 32 \
    --policies pd adaptive pipeline single --no-warm-up --run-timeout-s 110 --budget-s $(( 580 - $(date +%s) + S0 )) \
    --out $OUT/fidelity_runs.tgz 2>&1 | tail -6 ;;
round2)  # issue 6: right after `onemachine`, same warm machine: every policy again, reversed order (folders
  # <policy>_r2); then `fidelity_bench.py sim fidelity_runs.tgz fidelity_runs_r2.tgz` compares with their mean
  smi_log $OUT/smi_r2.csv
  python3 bench/fidelity_bench.py real --trace $T --num-requests 2000 --rate-scale 8 --split-step 32 \
    --policies pd adaptive pipeline single --first-round 2 --no-warm-up --run-timeout-s 110 --budget-s 580 \
    --out $OUT/fidelity_runs_r2.tgz 2>&1 | tail -6 ;;
heldout)  # issue 6: the held-out workload (bursty arrivals, long prompts) after `onemachine`, same machine
  python3 bench/fidelity_bench.py real --trace bench/results/workload_heldout_burst_long.csv \
    --num-requests 1000 --rate-scale 1 --split-step 32 --policies adaptive single pd pipeline --no-warm-up \
    --run-timeout-s 160 --budget-s 580 --out $OUT/fidelity_heldout.tgz 2>&1 | tail -6 ;;
fidelity)  # issue 6: real runs on the current engine, all four policies
  # (the engine's KV transport must be the profile's: see its metadata's kv_transport)
  timeout 590 python3 bench/fidelity_bench.py real --trace $T --num-requests 2000 --rate-scale 8 --split-step 32 \
    --run-timeout-s 140 --out $OUT/fidelity_runs.tgz 2>&1 | tail -8 ;;
tailab)  # issue 6 (one GPU, ~1 min): uniform vs mixed contexts (7/8 at 1k, 1/8 at 3k/5k/8k) at batch 8-128,
  # sequential and pipelined on 32:100, 64:68, 96:36, in the engine's graphs; read against microbatch_tail_s
  # (bench/pipeline_diag.py --to-profile JSON OUT.csv makes decode_tail rows of it, for traces.profile extend)
  timeout 280 python3 bench/pipeline_diag.py --tail-only --tail-long 3072 5120 8192 --models qwen3-0.6b \
    --out $OUT/pipeline_tail_ab.json 2>&1 | grep -v Warning | tail -16 ;;
tailplaced)  # issue 6 (one GPU, ~1 min): tails between graph buckets, one 8,192-token sequence first / last / every 8th;
  # read with `python bench/tail_model_check.py $OUT/tail_placed_*.json`
  for p in first last every8; do timeout 170 python3 bench/pipeline_diag.py --tail-only --tail-long 8192 --tail-place $p \
    --tail-batches 20 33 40 48 65 100 --models qwen3-0.6b --out $OUT/tail_placed_$p.json 2>&1 | grep -v Warning | tail -7; done ;;
between)  # issue 6 (one GPU, ~1-2 min; on a 2-GPU machine after `onemachine`: its decode GPU, 1): sequential and pipelined
  # steps at and between graph buckets (20-128 sequences), read with `bench/step_between_buckets.py check OUT --profile P`
  timeout 200 python3 bench/step_between_buckets.py measure --device cuda:${DEV:-1} --out $OUT/step_between_buckets.json \
    2>&1 | grep -v Warning | tail -16 ;;
tailorder)  # issue 6 (one GPU, ~1 min): does a long sequence's place in a big decode batch set its tail (single's
  # GPU0 steps of 129-256 sequences ran 16-29% over the sim in session 15; the tail model holds to 128)
  timeout 200 python3 bench/decode_tail_order.py --out $OUT/decode_tail_order.json 2>&1 | tail -9
  timeout 150 python3 bench/decode_tail_order.py --long 8192 --out $OUT/decode_tail_order_8k.json 2>&1 | tail -8 ;;
pipereplay)  # issue 6 (one GPU, ~3 min): GPU1's served pipelined steps (exported on CPU: bench/decode_mix_replay.py export
  # RUNS.tar.xz --gpu1 --profile P --out MIXES.json) replayed on their split and sequentially: the step's shape vs the serving
  timeout 300 python3 bench/decode_mix_replay.py measure ${MIXES:?set MIXES to an exported --gpu1 mixes file} \
    --out $OUT/decode_mix_replay_gpu1.json 2>&1 | grep -v Warn | tail -12 ;;
mixreplay)  # issue 6 (one GPU, ~1 min): served single steps (exported on CPU: bench/decode_mix_replay.py export) replayed
  # alone in the engine, as served, on scattered blocks, longest first and uniform; set beside the served steps
  timeout 300 python3 bench/decode_mix_replay.py measure ${MIXES:-bench/results/decode_mixes_single_NVIDIA_H200_session15.json} \
    --out $OUT/decode_mix_replay.json 2>&1 | tail -12 ;;
kernel)  # issue 3 (one GPU): the single-GPU bench (decode steps 1 and 8) and where a decode step's time goes
  timeout 380 python3 bench/engine_single.py --out $OUT/engine_single.json 2>&1 | tail -12
  timeout 150 python3 bench/decode_breakdown.py --out $OUT/decode_breakdown.json 2>&1 | grep -E "^qwen|^prefill" ;;
splits)  # issue 3 (one GPU): decode splits by count and by length ("len xK", the tail case), timed in CUDA graphs
  timeout 220 python3 bench/decode_kernel_sweep.py --only-splits --out $OUT/splits.json | tail -40 ;;
pipeline)  # issue 5: adaptive vs every static configuration after the rebalancer changes
  # (each configuration in a fresh process; pd and adaptive twice, order alternated)
  nvidia-smi --query-gpu=name --format=csv,noheader
  timeout 560 python3 bench/pipeline_bench.py --skip steps --pairs 2 --trace $T --out $OUT/pipeline.json 2>&1 | tail -30 ;;
*) echo "usage: bash bench/next_gpu_session.sh between|tailplaced|tailab|tailorder|mixreplay|pipereplay|transfer|pd|prefill|profile|onemachine|round2|heldout|fidelity|kernel|splits|pipeline" >&2; exit 2 ;;
esac
