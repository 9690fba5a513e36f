"""Per-request samples and their aggregation into a run's metrics. Pure: no I/O, no clocks."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs

__all__ = [
    "Sample",
    "aggregate",
    "classify_route",
    "coefficient_of_variation",
    "hit_ratio_timeline",
    "merge_engine_stats",
    "percentile",
]


@attrs.frozen
class Sample:
    """What one request did. Times are seconds from the start of the run.

    ``endpoint`` is the engine that served it ('' when unknown), ``route`` the gateway's
    routing verdict header ('' when the target sends none).
    """

    session_id: str
    turn: int
    start_s: float
    end_s: float
    ok: bool
    first_token_s: float | None = None
    itl_s: tuple[float, ...] = ()
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    usage_seen: bool = False
    endpoint: str = ""
    route: str = ""
    error: str = ""
    status: int = 0

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.start_s

    @property
    def e2e_s(self) -> float:
        return self.end_s - self.start_s


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) with linear interpolation between closest ranks."""
    if not values:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside [0, 100]")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = math.ceil(pos)
    if lo == hi:
        return ordered[lo]
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def coefficient_of_variation(values: Sequence[float]) -> float | None:
    """Population standard deviation over the mean; 0 for a perfectly even spread."""
    if not values:
        return None
    mean = sum(values) / len(values)
    if mean == 0:
        return 0.0
    var = sum((v - mean) ** 2 for v in values) / len(values)
    return math.sqrt(var) / mean


_FALLBACK_WORDS = ("fallback", "miss", "balanc", "none", "default", "skip")


def classify_route(value: str) -> str:
    """'routed' / 'fallback' / '' from a gateway's routing verdict header value.

    pixiu-kv sends ``reason=...; hinted=<id>|-; used=yes|no; matched=<tokens>; ...``: routed
    means a hint was given, the request went to the hinted engine, and the hint rested on a
    cached prefix (``matched`` > 0 when given). Other values are read by keyword.
    """
    v = value.strip().lower()
    if not v:
        return ""
    fields = dict(part.strip().partition("=")[::2] for part in v.split(";"))
    if "used" in fields:
        hinted = fields["used"] == "yes" and fields.get("hinted", "-") not in ("", "-")
        # A pick made on load alone (nothing of the prompt cached anywhere) is balancing,
        # not cache-aware routing.
        on_cache = fields.get("matched", "1") not in ("0", "")
        return "routed" if hinted and on_cache else "fallback"
    if any(w in v for w in _FALLBACK_WORDS):
        return "fallback"
    return "routed"


def route_outcomes(samples: Iterable[Sample]) -> dict[str, int]:
    """How a router's expectation met the engine's report, per request: the ``matched``
    tokens of pixiu-kv's route header against the ``cached_tokens`` the engine reported.

    ``held``: a match was expected and the engine had at least half of it; ``short``: it
    had less than half (the prefix was evicted, or the index was wrong); ``unexpected``:
    nothing was expected and the engine had some; ``cold``: neither. Requests without a
    ``matched`` field (other routers) are not counted.
    """
    out = {"held": 0, "short": 0, "unexpected": 0, "cold": 0}
    for s in samples:
        if not (s.ok and s.usage_seen and s.route):
            continue
        fields = dict(part.strip().partition("=")[::2] for part in s.route.lower().split(";"))
        matched = fields.get("matched", "")
        if not matched.isdigit():
            continue
        expected = int(matched)
        if expected:
            out["held" if s.cached_tokens * 2 >= expected else "short"] += 1
        else:
            out["unexpected" if s.cached_tokens else "cold"] += 1
    return out


def _r(value: float | None, digits: int = 6) -> float | None:
    return None if value is None else round(value, digits)


def aggregate(samples: Sequence[Sample], *, engines: Sequence[str] = (),
              wall_s: float | None = None, routing_expected: bool = False) -> dict[str, Any]:
    """The metrics of one run.

    ``engines`` lists every engine of the fleet so that idle ones count in the spread;
    ``wall_s`` is the run's duration (default: first start to last end). With
    ``routing_expected`` (a cache-aware gateway) a request without a verdict header counts
    as a fallback: the router gave no hint for it.
    """
    ok = [s for s in samples if s.ok]
    ttfts = [t for s in ok if (t := s.ttft_s) is not None]
    e2es = [s.e2e_s for s in ok]
    itls = [g for s in ok for g in s.itl_s]
    if wall_s is None:
        wall_s = (max(s.end_s for s in samples) - min(s.start_s for s in samples)) if samples else 0.0
    prompt = sum(s.prompt_tokens for s in ok if s.usage_seen)
    cached = sum(s.cached_tokens for s in ok if s.usage_seen)
    output = sum(s.completion_tokens for s in ok)

    per_engine: dict[str, dict[str, Any]] = {e: {"requests": 0, "prompt_tokens": 0, "cached_tokens": 0}
                                             for e in engines}
    for s in ok:
        if not s.endpoint:
            continue
        row = per_engine.setdefault(s.endpoint, {"requests": 0, "prompt_tokens": 0, "cached_tokens": 0})
        row["requests"] += 1
        row["prompt_tokens"] += s.prompt_tokens
        row["cached_tokens"] += s.cached_tokens
    for row in per_engine.values():
        row["hit_ratio"] = _r(row["cached_tokens"] / row["prompt_tokens"]) if row["prompt_tokens"] else None
    attributed = sum(r["requests"] for r in per_engine.values())
    load_cv = (coefficient_of_variation([r["requests"] for r in per_engine.values()])
               if attributed else None)
    prompt_cv = (coefficient_of_variation([r["prompt_tokens"] for r in per_engine.values()])
                 if attributed else None)

    verdicts = Counter(classify_route(s.route) or ("fallback" if routing_expected else "") for s in ok)
    errors = Counter(s.error or f"status {s.status}" for s in samples if not s.ok)
    return {
        "requests": len(samples),
        "completed": len(ok),
        "errors": len(samples) - len(ok),
        "error_kinds": dict(errors.most_common(10)),
        "hit_ratio": _r(cached / prompt) if prompt else None,
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "output_tokens": output,
        "ttft_p50_s": _r(percentile(ttfts, 50)),
        "ttft_p90_s": _r(percentile(ttfts, 90)),
        "ttft_p95_s": _r(percentile(ttfts, 95)),
        "ttft_p99_s": _r(percentile(ttfts, 99)),
        "ttft_mean_s": _r(sum(ttfts) / len(ttfts)) if ttfts else None,
        "e2e_p50_s": _r(percentile(e2es, 50)),
        "e2e_p99_s": _r(percentile(e2es, 99)),
        "itl_p50_s": _r(percentile(itls, 50)),
        "itl_p99_s": _r(percentile(itls, 99)),
        "wall_s": _r(wall_s, 3),
        "throughput_rps": _r(len(ok) / wall_s, 4) if wall_s > 0 else None,
        "output_tps": _r(output / wall_s, 3) if wall_s > 0 else None,
        "load_cv": _r(load_cv, 4),
        "prompt_tokens_cv": _r(prompt_cv, 4),
        "routed": verdicts.get("routed", 0),
        "fallback": verdicts.get("fallback", 0),
        "route_values": dict(Counter(s.route for s in ok if s.route).most_common(10)),
        "route_outcomes": route_outcomes(ok),
        "per_engine": per_engine,
        "unattributed": len(ok) - attributed,
    }


def hit_ratio_timeline(samples: Iterable[Sample], *, bins: int = 20) -> list[dict[str, float]]:
    """Cache hit ratio of the requests finishing in each of ``bins`` equal time windows."""
    done = sorted((s for s in samples if s.ok and s.usage_seen), key=lambda s: s.end_s)
    if not done:
        return []
    t0 = min(s.start_s for s in done)
    t1 = max(s.end_s for s in done)
    width = max((t1 - t0) / bins, 1e-9)
    acc: dict[int, list[int]] = {}
    for s in done:
        i = min(bins - 1, int((s.end_s - t0) / width))
        cell = acc.setdefault(i, [0, 0])
        cell[0] += s.cached_tokens
        cell[1] += s.prompt_tokens
    return [{"t_s": round(t0 + (i + 1) * width, 3), "hit_ratio": round(c / p, 4) if p else 0.0,
             "requests_tokens": p}
            for i, (c, p) in sorted(acc.items())]


def merge_engine_stats(metrics: dict[str, Any], engine_counts: Mapping[str, Mapping[str, int]]) -> None:
    """Fill per-engine rows from engine-side counters when responses carried no endpoint."""
    if metrics.get("unattributed", 0) == 0 or not engine_counts:
        return
    rows = {e: {"requests": int(c.get("requests", 0)), "prompt_tokens": int(c.get("prompt_tokens", 0)),
                "cached_tokens": int(c.get("cached_tokens", 0))} for e, c in engine_counts.items()}
    for row in rows.values():
        row_hit = row["cached_tokens"] / row["prompt_tokens"] if row["prompt_tokens"] else None
        row["hit_ratio"] = _r(row_hit)  # type: ignore[assignment]
    metrics["per_engine"] = rows
    metrics["per_engine_source"] = "engine counters"
    metrics["load_cv"] = _r(coefficient_of_variation([r["requests"] for r in rows.values()]), 4)
    metrics["prompt_tokens_cv"] = _r(coefficient_of_variation([r["prompt_tokens"] for r in rows.values()]), 4)
