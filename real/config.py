"""Engine configuration: what `LLM(model, **config)` and `python -m real.run` accept."""
from __future__ import annotations

from dataclasses import dataclass, fields

FUSED_KERNELS = ("triton", "compile")  # EngineConfig.fused_kernels: how the elementwise ops are fused on CUDA


@dataclass(slots=True)
class EngineConfig:
    model: str = "qwen3-0.6b"  # a preset name (random weights) or a local HF checkpoint directory
    device: str = "auto"  # auto | cuda | cpu
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bfloat16 | float16 | float32
    seed: int = 0  # random weights and sampling
    max_num_seqs: int = 256  # sequences decoding at once
    max_num_batched_tokens: int = 16384  # prefill token budget per step
    max_model_len: int = 0  # prompt + output limit; 0 = the model's max position (capped at 32768)
    block_size: int = 16
    gpu_memory_utilization: float = 0.90
    num_kv_blocks: int = 0  # 0 = size the KV cache from free memory (GPU) or cpu_kv_cache_gb (CPU)
    cpu_kv_cache_gb: float = 1.0
    enforce_eager: bool = False  # True: no CUDA graphs
    compile: bool = True  # fuse the elementwise ops on CUDA inside graphs (and eager steps of >= 4096 tokens)
    # how: "triton" (hand-written kernels; torch.compile where there is none, or without triton) or "compile"
    fused_kernels: str = "triton"
    attention_backend: str = "auto"  # auto | flash | triton | torch
    num_gpus: int = 0  # 0 = all visible (dp uses 2)
    split_step_sms: int = 16  # GPU1 splits offered to the rebalancer in steps of this many SMs (0 = the green-context
    # granularity, 8); each split costs one pipelined-step CUDA graph per batch bucket at start-up (~0.1 s each on H200, from start-up times)
    prefill_graphs: bool = True  # CUDA graphs for prefills, per token bucket (CUDA only; chunks after a cached prefix
    # through the Triton paged-prefill kernel): pd's TTFT p50 70 -> 14 ms on 2x H200 (Azure conv x8); False = eager
    threaded_launch: bool = True  # two GPUs: each device's launches on a worker thread (False: all on one)
    gil_switch_interval_ms: float = 0.5  # threaded launch: sys.setswitchinterval for the process (Python's default
    # 5 ms let a thread in an eager prefill's Python hold GPU1's launches: bench/results/engine_host_overhead_cpu.txt);
    # 0 = leave it
    kv_transport: str = "auto"  # pd: auto (pull where two GPUs have peer access and Triton, else copy) | pull (a
    # peer-access Triton kernel on GPU1: 0.90 of a plain copy, TTFT p50 0.99x of the same run without the copy, H200
    # pair) | copy (copy engines: 0.72-0.77, TTFT 1.07x) | push (the kernel on GPU0: 0.89; takes GPU0's
    # SMs from the next prefill, its own TTFT cost not yet separated) | none (a benchmark's timing control: no
    # byte moves, so GPU1 decodes garbage; bench/pd_bench.py's TTFT A/B). real/transfer.py has the measurements.
    decode_steps: int = 1  # decode steps one schedule may cover, run back to back on the GPU with the sampled tokens
    # fed on the device (one host round trip for all: the host's per-step cost is paid once); a request that
    # arrives meanwhile waits up to that many steps to be admitted. 1 = a schedule per step (serving's default)
    pipeline_profiling: bool = False  # True: pipelined steps run eagerly with per-stage CUDA-event timers

    @classmethod
    def from_kwargs(cls, model: str, **kwargs) -> "EngineConfig":
        """Keep only the keyword arguments that are config fields (as nano-vllm does); others are errors."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown engine option(s) {unknown}; known: {', '.join(sorted(known))}")
        return cls(model=model, **kwargs)
