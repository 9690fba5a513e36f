"""Fleet sizing and load level from a workload's shape and the sim's cost model. Pure.

* Cache capacity: the fleet's combined GPU KV capacity holds ``cache_fraction`` (70%) of the
  workload's distinct reusable prefix tokens, so placement decides what hits; each engine
  still fits a few requests at once (a floor), and the LMCache CPU tier is sized relative
  to the GPU (``cpu_tier_ratio``).
* Rate: the request rate that keeps the engines ``busy`` (70%) under round robin: what
  their GPU sustains, prefill (with the expected round-robin hit ratio: an engine of an
  evenly spread fleet holds its share of the prefixes) and decode sharing it, with as many
  requests at once as the GPU KV capacity holds (requests hold their blocks while they
  decode).
* Speed: the sim's speed factor that keeps the SSE event rate and the request rate within
  what the gateway and the load generator can carry on a small machine without starving
  the simulated engines.
"""

from __future__ import annotations

import math

import attrs

from .workloads import WorkloadSpec, distinct_prefix_tokens

__all__ = ["CostProfile", "FleetPlan", "cost_profile", "plan_fleet"]

# Sim defaults (pixiu_kv.sim.engine_config.EngineConfig), at speed 1.
PREFILL_TOKENS_PER_S = 10_000.0
GPU_HIT_S_PER_TOKEN = 2e-6
CPU_LOAD_TOKENS_PER_S = 50_000.0
DECODE_INTERVAL_S = 0.015
DECODE_BATCH_SLOPE = 0.002
BLOCK = 16
CHUNK = 256
_CHAT_OVERHEAD = 16  # template tokens per message


@attrs.frozen
class CostProfile:
    """Mean prompt / reusable / output tokens per request and the largest request."""

    mean_prompt: float
    mean_reusable: float
    mean_output: float
    max_request_tokens: int
    requests: int


def cost_profile(spec: WorkloadSpec) -> CostProfile:
    """Expected token counts from the spec (chat template overhead included roughly)."""
    overhead = _CHAT_OVERHEAD * 2 if spec.api == "chat" else 1
    per_turn = spec.question_tokens + spec.output_tokens
    base = spec.system_tokens + spec.context_tokens + spec.question_tokens + overhead
    prompts: list[float] = []
    reusable: list[float] = []
    for r in range(spec.rounds):
        history = r * (per_turn + (2 * _CHAT_OVERHEAD if spec.api == "chat" else 0))
        prompts.append(base + history)
        shared = spec.system_tokens + spec.context_tokens
        if spec.name == "no-reuse":
            shared = 0
        elif spec.name == "multi-turn":
            shared = spec.system_tokens + spec.context_tokens + history if r else spec.system_tokens
        reusable.append(shared)
    largest = int(max(prompts)) + spec.output_tokens
    n = spec.groups * spec.per_group * spec.rounds
    return CostProfile(mean_prompt=sum(prompts) / len(prompts), mean_reusable=sum(reusable) / len(reusable),
                       mean_output=float(spec.output_tokens), max_request_tokens=largest, requests=n)


@attrs.frozen
class FleetPlan:
    engines: int
    gpu_kv_tokens: int
    cpu_tier_tokens: int
    max_model_len: int
    cache_fraction: float
    """Combined GPU capacity over distinct prefix tokens (after the per-engine floor)."""
    rr_hit_estimate: float
    rate: float
    """Requests per second for the target busy level, at ``speed``."""
    speed: float


def _round_up(value: float, multiple: int) -> int:
    return int(math.ceil(value / multiple) * multiple)


def plan_fleet(spec: WorkloadSpec, *, engines: int = 4, cache_fraction: float = 0.7,
               cpu_tier_ratio: float = 1.0, busy: float = 0.7, min_requests_per_engine: int = 4,
               speed: float | None = None, max_events_per_s: float = 1200.0,
               max_requests_per_s: float = 30.0, shared_gpu: bool = True) -> FleetPlan:
    """Capacity, rate and speed for ``engines`` engines serving ``spec``."""
    profile = cost_profile(spec)
    distinct = distinct_prefix_tokens(spec)
    max_len = _round_up(profile.max_request_tokens + 64, BLOCK)
    floor = max_len * min_requests_per_engine
    gpu = max(_round_up(cache_fraction * distinct / engines, BLOCK), floor)
    cpu = _round_up(gpu * cpu_tier_ratio, CHUNK) if cpu_tier_ratio > 0 else 0
    per_engine_cache = max(gpu, cpu)
    # Round robin spreads every prefix over every engine: each keeps its most recent share.
    rr_hit_of_reusable = 1.0 if distinct == 0 else min(1.0, per_engine_cache / distinct)
    hit_tokens = profile.mean_reusable * rr_hit_of_reusable
    computed = max(1.0, profile.mean_prompt - hit_tokens)
    prefill_s = computed / PREFILL_TOKENS_PER_S + hit_tokens * GPU_HIT_S_PER_TOKEN
    # GPU KV capacity also bounds the load: a request holds its prompt and output blocks for
    # its whole decode, so an engine runs at most ``slots`` requests at once.
    slots = max(1, gpu // max(1, int(profile.mean_prompt + profile.mean_output)))
    decode_s = profile.mean_output * DECODE_INTERVAL_S * (1.0 + DECODE_BATCH_SLOPE * slots)
    # Prefill and decode share the GPU (the sim's chunked prefill): every second of prefill
    # is a second the batch does not decode, so ``slots`` requests at once finish at
    # ``slots / (slots x prefill_s + decode_s)`` per second (a prefill lane of its own:
    # ``slots / (prefill_s + decode_s)``).
    kv_rate = slots / ((slots if shared_gpu else 1) * prefill_s + decode_s)
    rate_at_1 = busy * engines * min(1.0 / prefill_s, kv_rate)
    if speed is None:
        # Slower (or faster) engines change every duration alike, so ratios between routers
        # hold; the point is to stay within what the machine's CPUs can drive.
        speed = min(max_requests_per_s / rate_at_1,
                    max_events_per_s / max(1.0, rate_at_1 * profile.mean_output))
    return FleetPlan(engines=engines, gpu_kv_tokens=gpu, cpu_tier_tokens=cpu, max_model_len=max_len,
                     cache_fraction=round(engines * gpu / distinct, 3) if distinct else 0.0,
                     rr_hit_estimate=round(hit_tokens / profile.mean_prompt, 3),
                     rate=round(rate_at_1 * speed, 3), speed=round(speed, 4))
