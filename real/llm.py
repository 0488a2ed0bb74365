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
                 **config):
        """`config`: EngineConfig fields; `policy_overrides`: policy parameters by section, as in a --config YAML.
        The prototype's switches still work: enable_two_gpu_pd=True means policy "pd" on the two device ids."""
        from policies import load_policy_config

        if enable_two_gpu_pd:
            policy = "pd"
        self.config = EngineConfig.from_kwargs(model, **config)
        pcfg = load_policy_config(policy, overrides=policy_overrides) if policy in ("single", "dp", "pd") else None
        self.engine = LLMEngine(self.config, policy, pcfg, log=lambda *_: None,
                                device_ids=(prefill_device_id, decode_device_id))
        self.tokenizer = _load_tokenizer(model)

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
