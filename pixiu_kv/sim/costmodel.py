"""How long a simulated engine takes: prefill by cache source, decode by batch size."""

from __future__ import annotations

import attrs

from .engine_config import EngineConfig

__all__ = ["CostModel", "PrefillPlan"]


@attrs.frozen
class PrefillPlan:
    """Where a prompt's tokens come from, and what prefilling it costs (scaled seconds).

    ``gpu_hit_tokens`` and ``cpu_hit_tokens`` do not overlap: the CPU tier serves only
    the part of the prompt beyond the GPU prefix hit.
    """

    prompt_tokens: int
    gpu_hit_tokens: int
    cpu_hit_tokens: int
    cpu_compressed_tokens: int
    seconds: float

    @property
    def cached_tokens(self) -> int:
        return self.gpu_hit_tokens + self.cpu_hit_tokens

    @property
    def computed_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens


class CostModel:
    __slots__ = ("_config", "_scale")

    def __init__(self, config: EngineConfig) -> None:
        self._config = config
        self._scale = 1.0 / config.speed

    def plan_prefill(
        self, prompt_tokens: int, gpu_hit_tokens: int, cpu_hit_tokens: int, cpu_compressed_tokens: int
    ) -> PrefillPlan:
        c = self._config
        computed = prompt_tokens - gpu_hit_tokens - cpu_hit_tokens
        seconds = (
            computed / c.prefill_tokens_per_s
            + gpu_hit_tokens * c.gpu_hit_seconds_per_token
            + cpu_hit_tokens / c.load_tokens_per_s
            + cpu_compressed_tokens / c.decompress_tokens_per_s
        )
        return PrefillPlan(prompt_tokens, gpu_hit_tokens, cpu_hit_tokens, cpu_compressed_tokens,
                           seconds * self._scale)

    def decode_interval(self, running: int) -> float:
        c = self._config
        return c.decode_interval_s * (1.0 + c.decode_batch_slope * running) * self._scale
