"""pixiu-kv: a KV-cache-aware, OpenAI-compatible gateway for LLM inference, on trio."""

__version__ = "0.1.0"

__all__ = ["__version__"]
