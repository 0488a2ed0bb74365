"""Where an eager prefill spends its time: prefill wall vs host launch time at 32/512/4096 tokens, then a
torch.profiler table of a 32-token prefill. Run on a GPU node: python bench/prefill_host_diag.py
(bench/results/prefill_host_diag_NVIDIA_H200.txt: measured at commit 3522112, fused ops torch.compiled in eager)."""
import sys, time, torch
sys.path.insert(0, ".")
from policies.specs import model_spec
from real.config import EngineConfig
from real.model_config import ModelConfig
from real.runner import ModelRunner
from real.profile import prefill_batch, median_s
dev = torch.device("cuda:0")
r = ModelRunner(EngineConfig(model="qwen3-0.6b", device="cuda", max_num_seqs=64, max_model_len=8192, num_kv_blocks=4096),
                ModelConfig.from_spec(model_spec("qwen3-0.6b")), dev, None)
for n in (32, 512, 4096):
    b = prefill_batch(r, [n])
    t = median_s(lambda: r.run(b, {}), dev, 5)
    t0 = time.perf_counter(); p = r.launch(b, {}); host = time.perf_counter() - t0; r.collect(p)
    print(f"prefill {n}: {t*1e3:.2f} ms, launch (host) {host*1e3:.2f} ms", flush=True)
b = prefill_batch(r, [32])
from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    for _ in range(3):
        r.run(b, {})
print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25))
