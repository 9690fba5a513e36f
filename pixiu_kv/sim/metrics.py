"""Counters of one simulated engine, rendered in vLLM's Prometheus names."""

from __future__ import annotations

import bisect

__all__ = ["TTFT_BUCKETS", "EngineMetrics"]

TTFT_BUCKETS: tuple[float, ...] = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)


class EngineMetrics:
    """Fixed set of counters and one fixed-bucket histogram: bounded whatever the traffic."""

    __slots__ = (
        "external_hits",
        "external_queries",
        "generation_tokens",
        "prefix_hits",
        "prefix_queries",
        "prompt_tokens",
        "prompt_tokens_cached",
        "requests_aborted",
        "requests_finished",
        "ttft_buckets",
        "ttft_count",
        "ttft_sum",
    )

    def __init__(self) -> None:
        self.prefix_queries = 0
        self.prefix_hits = 0
        self.external_queries = 0
        self.external_hits = 0
        self.prompt_tokens = 0
        self.prompt_tokens_cached = 0
        self.generation_tokens = 0
        self.requests_finished = 0
        self.requests_aborted = 0
        self.ttft_buckets = [0] * (len(TTFT_BUCKETS) + 1)
        self.ttft_count = 0
        self.ttft_sum = 0.0

    def observe_ttft(self, seconds: float) -> None:
        self.ttft_buckets[bisect.bisect_left(TTFT_BUCKETS, seconds)] += 1
        self.ttft_count += 1
        self.ttft_sum += seconds

    def render(self, *, model: str, engine: int, running: int, waiting: int, kv_usage: float) -> str:
        labels = f'engine="{engine}",model_name="{_escape(model)}"'
        hit_rate = self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0
        lines: list[str] = []

        def metric(name: str, kind: str, help_text: str, value: float, extra: str = "") -> None:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")
            lines.append(f"{name}{{{labels}{extra}}} {_num(value)}")

        metric("vllm:num_requests_running", "gauge", "Number of requests in model execution batches.",
               running)
        metric("vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed.", waiting)
        metric("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.", kv_usage)
        metric("vllm:gpu_cache_usage_perc", "gauge", "GPU KV-cache usage (deprecated name).", kv_usage)
        metric("vllm:gpu_prefix_cache_hit_rate", "gauge", "GPU prefix cache hit rate (deprecated name).",
               hit_rate)
        metric("vllm:prefix_cache_queries_total", "counter",
               "Prefix cache queries, in terms of number of queried tokens.", self.prefix_queries)
        metric("vllm:prefix_cache_hits_total", "counter",
               "Prefix cache hits, in terms of number of cached tokens.", self.prefix_hits)
        metric("vllm:external_prefix_cache_queries_total", "counter",
               "External prefix cache (KV connector) queries, in tokens.", self.external_queries)
        metric("vllm:external_prefix_cache_hits_total", "counter",
               "External prefix cache (KV connector) hits, in tokens.", self.external_hits)
        metric("vllm:prompt_tokens_cached_total", "counter",
               "Prompt tokens served from a cache (local or external).", self.prompt_tokens_cached)
        metric("vllm:prompt_tokens_total", "counter", "Number of prefill tokens processed.",
               self.prompt_tokens)
        metric("vllm:generation_tokens_total", "counter", "Number of generation tokens processed.",
               self.generation_tokens)
        metric("vllm:request_success_total", "counter", "Count of successfully processed requests.",
               self.requests_finished, ',finished_reason="length"')
        metric("vllm:request_aborted_total", "counter", "Requests aborted before they finished.",
               self.requests_aborted)

        name = "vllm:time_to_first_token_seconds"
        lines.append(f"# HELP {name} Histogram of time to first token in seconds.")
        lines.append(f"# TYPE {name} histogram")
        cumulative = 0
        for bound, count in zip(TTFT_BUCKETS, self.ttft_buckets, strict=False):
            cumulative += count
            lines.append(f'{name}_bucket{{{labels},le="{bound}"}} {cumulative}')
        lines.append(f'{name}_bucket{{{labels},le="+Inf"}} {self.ttft_count}')
        lines.append(f"{name}_sum{{{labels}}} {_num(self.ttft_sum)}")
        lines.append(f"{name}_count{{{labels}}} {self.ttft_count}")
        lines.append("")
        return "\n".join(lines)


def _num(value: float) -> str:
    return repr(float(value))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
