"""The Python API, for people coming from nano-vllm:

    from real import LLM, SamplingParams
    llm = LLM("qwen3-0.6b")                      # or a local HF checkpoint directory
    outs = llm.generate(["Hello"], SamplingParams(temperature=0.6, max_tokens=32))
    outs[0]["text"], outs[0]["token_ids"]
"""
from __future__ import annotations

from pathlib import Path

from .config import EngineConfig
from .engine import LLMEngine, SamplingParams


class LLM:
    def __init__(self, model: str = "qwen3-0.6b", policy: str = "single", policy_overrides: dict | None = None,
                 enable_two_gpu_pd: bool = False, prefill_device_id: int = 0, decode_device_id: int = 1,
                 enable_decode_pipeline: bool = False, decode_attention_sm: int = 0, decode_ffn_sm: int = 0,
                 decode_pipeline_profiling: bool = False, **config):
        """`config`: EngineConfig fields; `policy_overrides`: policy parameters by section, as in a --config YAML.
        The prototype's switches still work: enable_two_gpu_pd=True means policy "pd" on the two device ids;
        enable_decode_pipeline=True means "pipeline" (static decode_attention_sm, the FFN gets the rest;
        decode_ffn_sm is checked against that); stage times are always measured (decode_pipeline_profiling
        is accepted for compatibility), see llm.decode_runner.print_pipeline_statistics()."""
        from policies import load_policy_config

        if enable_two_gpu_pd:
            policy = "pd"
        if enable_decode_pipeline:
            policy = "pipeline"
        if decode_attention_sm:
            policy_overrides = dict(policy_overrides or {}, attn_sms=decode_attention_sm)
        self.config = EngineConfig.from_kwargs(model, **config)
        from .engine import REAL_POLICIES

        pcfg = load_policy_config(policy, overrides=policy_overrides) if policy in REAL_POLICIES else None
        self.engine = LLMEngine(self.config, policy, pcfg, log=lambda *_: None,
                                device_ids=(prefill_device_id, decode_device_id))
        if decode_attention_sm and decode_ffn_sm and decode_attention_sm + decode_ffn_sm > self.engine.hardware.sms:
            raise ValueError(f"decode_attention_sm + decode_ffn_sm = {decode_attention_sm + decode_ffn_sm} exceeds "
                             f"the GPU's {self.engine.hardware.sms} SMs")
        self.tokenizer = _load_tokenizer(model)

    @property
    def decode_runner(self) -> "LLM":
        """The prototype's handle for pipeline statistics (this object provides them)."""
        return self

    def pipeline_statistics(self) -> dict:
        """Per-stage times, overlap achieved, current split and switches of the GPU1 decode pipeline."""
        steps = [s for s in self.engine.steps if s[2] == "gpu1" and s[3] in ("attn", "ffn", "decode")]
        attn = sum(s[12] for s in steps if s[3] == "attn")
        ffn = sum(s[12] for s in steps if s[3] == "ffn")
        piped = {(s[0], s[1]) for s in steps if s[3] == "attn"}
        wall = sum(b - a for a, b in piped)
        switches = [d for d in self.engine.ctl.decisions if d.decision == "split"]
        return dict(pipelined_steps=len(piped), sequential_steps=sum(1 for s in steps if s[3] == "decode"),
                    attn_busy_s=attn, ffn_busy_s=ffn, pipelined_wall_s=wall,
                    overlap_fraction=(attn + ffn - wall) / min(attn, ffn) if piped and min(attn, ffn) > 0 else 0.0,
                    current_split=self.engine.ctl.rebalancer.current, mode=self.engine.ctl.mode,
                    split_switches=len(switches))

    def print_pipeline_statistics(self) -> None:
        for k, v in self.pipeline_statistics().items():
            print(f"  {k:18s} {v:.4f}" if isinstance(v, float) else f"  {k:18s} {v}")

    def close(self) -> None:
        """Free the GPU memory now (to build another LLM in the same process)."""
        self.engine.close()

    def encode(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"{self.config.model} has no tokenizer (random-weight preset): pass token-id lists")
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[dict]:
        """Closed loop: every prompt is admitted now, served to completion; outputs in prompt order."""
        params = sampling_params or SamplingParams()
        params = params if isinstance(params, list) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        base = len(self.engine.ctl.requests)
        now = self.engine.clock()
        pending = [(now, base + i, self.encode(p), sp) for i, (p, sp) in enumerate(zip(prompts, params))]
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(prompts), unit="req", desc="generate")
        self.engine.run_until_done(pending, on_done=(lambda done: bar.update(len(done))) if bar else None)
        if bar is not None:
            bar.close()
        reqs = {r.request_id: r for r in self.engine.ctl.requests[base:]}
        outs = []
        for _, rid, ids, _ in pending:
            r = reqs[rid]
            gen = r.token_ids[len(ids):] if r.token_ids else []
            text = self.tokenizer.decode(gen) if self.tokenizer is not None else None
            outs.append({"request_id": rid, "token_ids": gen, "text": text, "status": r.state,
                         "fail_reason": r.fail_reason or None})
        return outs


def _load_tokenizer(model: str):
    path = Path(model)
    if not path.is_dir() or not any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
