"""The LLM: one Llama-family decoder (``model``) and its config (``config``)."""
from vsrllm_jax.models.llm.config import NO_WINDOW, LlmConfig
from vsrllm_jax.models.llm.model import CACHE_AXES, LlamaModel, init_cache

__all__ = ["CACHE_AXES", "NO_WINDOW", "LlamaModel", "LlmConfig", "init_cache"]
