"""pdlab's real engine: Qwen3 in PyTorch with a paged KV cache, driven by the shared policies."""
from .config import EngineConfig
from .engine import LLMEngine, SamplingParams
from .llm import LLM

__all__ = ["LLM", "SamplingParams", "EngineConfig", "LLMEngine"]
