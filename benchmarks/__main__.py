"""``python -m benchmarks`` (or ``pixiu-kv bench``): routing comparison on simulated fleets.

For each workload and target, a fresh fleet with identical settings is started, the
workload is replayed against the target, and the results are written to ``--out``:
``results.json``, ``runs/<workload>__<target>.json``, ``summary.md`` and PNG plots.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio

from .metrics import aggregate, hit_ratio_timeline, merge_engine_stats
from .report import render_summary, write_plots
from .runner import LoadSettings, Progress, run_load
from .sizing import FleetPlan, plan_fleet
from .targets import TARGET_NAMES, FleetSettings, TargetHandle, TargetUnavailable, open_target
from .workloads import WORKLOAD_NAMES, Workload, build_workload, default_spec, distinct_prefix_tokens

__all__ = ["build_parser", "main", "run_benchmarks"]

DEFAULT_TARGETS = ("direct", "round-robin", "least-request", "seed", "pixiu-kv", "oracle", "sglang")


def _names(value: str, allowed: tuple[str, ...], what: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    for name in names:
        if name not in allowed:
            raise argparse.ArgumentTypeError(f"unknown {what} {name!r}; choose from {', '.join(allowed)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Compare routing targets (round robin, least request, the seed filter, pixiu-kv, "
                    "an oracle, SGLang's cache_aware router) on simulated vLLM fleets.")
    p.add_argument("--quick", action="store_true", help="small workloads; seconds per run")
    p.add_argument("--out", type=Path, default=Path("bench-results"), help="output directory")
    p.add_argument("--workloads", type=lambda v: _names(v, WORKLOAD_NAMES, "workload"),
                   default=list(WORKLOAD_NAMES), help="comma-separated: " + ", ".join(WORKLOAD_NAMES))
    p.add_argument("--targets", type=lambda v: _names(v, TARGET_NAMES, "target"),
                   default=None, help="comma-separated: " + ", ".join(TARGET_NAMES)
                   + " (default: all but external, plus external when --external-url is given)")
    p.add_argument("--mode", choices=("open", "closed"), default="open",
                   help="open loop (Poisson arrivals at --rate) or closed loop (--concurrency clients)")
    p.add_argument("--rate", type=float, default=None,
                   help="requests/s (default: ~70%% busy engines under round robin, from the cost model)")
    p.add_argument("--concurrency", type=int, default=16, help="clients in closed-loop mode")
    p.add_argument("--duration", type=float, default=None,
                   help="stop starting sessions after this many seconds (default 300, quick 30)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--max-sessions", type=int, default=None,
                   help="use only the first N sessions of each workload (smoke runs)")
    p.add_argument("--engines", type=int, default=4)
    p.add_argument("--speed", type=float, default=None,
                   help="sim speed factor (default: what keeps the machine's CPUs out of the way)")
    p.add_argument("--cache-fraction", type=float, default=0.7,
                   help="combined GPU KV capacity over the workload's distinct prefix tokens")
    p.add_argument("--cpu-tier-ratio", type=float, default=1.0,
                   help="LMCache CPU tier size per engine relative to its GPU KV capacity")
    p.add_argument("--api", choices=("chat", "completion"), default=None,
                   help="force one API for every workload (default: per workload)")
    p.add_argument("--no-stream", action="store_true", help="non-streaming requests")
    p.add_argument("--external-url", default=None, help="base URL of an external OpenAI-compatible router")
    p.add_argument("--external-model", default="", help="model name for --external-url")
    p.add_argument("--smg", default=None, help="path of the smg executable (sglang-router)")
    p.add_argument("--no-plots", action="store_true")
    return p


@attrs.frozen
class _Options:
    quick: bool
    out: Path
    workloads: tuple[str, ...]
    targets: tuple[str, ...]
    mode: str
    rate: float | None
    concurrency: int
    duration: float
    seed: int
    engines: int
    speed: float | None
    cache_fraction: float
    cpu_tier_ratio: float
    api: str | None
    stream: bool
    external_url: str | None
    external_model: str
    smg: str | None
    plots: bool
    max_sessions: int | None
    command: str


def _options(args: argparse.Namespace, argv: list[str]) -> _Options:
    targets = args.targets
    if targets is None:
        targets = list(DEFAULT_TARGETS) + (["external"] if args.external_url else [])
    duration = args.duration if args.duration is not None else (30.0 if args.quick else 300.0)
    return _Options(
        quick=args.quick, out=args.out, workloads=tuple(args.workloads), targets=tuple(targets),
        mode=args.mode, rate=args.rate, concurrency=args.concurrency, duration=duration, seed=args.seed,
        engines=args.engines, speed=args.speed, cache_fraction=args.cache_fraction,
        cpu_tier_ratio=args.cpu_tier_ratio, api=args.api, stream=not args.no_stream,
        external_url=args.external_url, external_model=args.external_model, smg=args.smg,
        plots=not args.no_plots, max_sessions=args.max_sessions,
        command="python -m benchmarks " + shlex.join(argv))


def _plan(opts: _Options, workload: Workload) -> FleetPlan:
    return plan_fleet(workload.spec, engines=opts.engines, cache_fraction=opts.cache_fraction,
                      cpu_tier_ratio=opts.cpu_tier_ratio, speed=opts.speed,
                      min_requests_per_engine=2 if opts.quick else 4)


async def _fleet_stats(url: str | None) -> dict[str, dict[str, int]]:
    if not url:
        return {}
    try:
        async with httpx.AsyncClient(timeout=5.0) as client:
            resp = await client.get(url)
            data = resp.json()
    except (httpx.HTTPError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


async def _sample_rss(handle: TargetHandle, stop: trio.Event) -> None:
    meter = handle.meter
    if meter is None:
        return
    while not stop.is_set():
        try:
            meter.sample()
        except Exception:  # the process may be gone at the very end
            return
        with trio.move_on_after(0.5):
            await stop.wait()


async def _one_run(opts: _Options, workload: Workload, plan: FleetPlan, target: str,
                   workload_info: dict[str, Any]) -> dict[str, Any]:
    engine_fields = {"speed": plan.speed, "gpu_kv_tokens": plan.gpu_kv_tokens,
                     "cpu_tier_tokens": plan.cpu_tier_tokens, "max_model_len": plan.max_model_len}
    fleet = FleetSettings(engines=opts.engines, engine=engine_fields)
    rate = opts.rate if opts.rate is not None else plan.rate
    if target == "direct":
        # One engine: give it its share of the load, so it runs as busy as each fleet engine.
        rate = rate / opts.engines
    settings = LoadSettings(
        mode="closed" if opts.mode == "closed" else "open", rate=rate, concurrency=opts.concurrency,
        duration_s=opts.duration, drain_s=30.0 if opts.quick else 120.0,
        request_timeout_s=60.0 if opts.quick else 300.0, stream=opts.stream, seed=opts.seed)
    record: dict[str, Any] = {"workload": workload.name, "target": target, "workload_info": workload_info}
    log_dir = opts.out / "logs" / f"{workload.name}__{target}"
    t0 = time.monotonic()
    try:
        async with open_target(target, fleet, log_dir=log_dir, external_url=opts.external_url,
                               external_model=opts.external_model, smg=opts.smg) as handle:
            t1 = time.monotonic()
            settings = attrs.evolve(settings, model=handle.model)
            progress = Progress(workload.request_count, f"{workload.name}/{target}")
            if handle.meter is not None:
                handle.meter.reset()
            stop = trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_sample_rss, handle, stop)
                result = await run_load(handle.base_url, workload, settings,
                                        default_endpoint=handle.default_endpoint, progress=progress)
                stop.set()
            metrics = aggregate(result.samples, engines=handle.engines, wall_s=result.wall_s,
                                routing_expected=handle.routing_expected)
            merge_engine_stats(metrics, await _fleet_stats(handle.stats_url))
            metrics["not_started"] = result.not_started
            if handle.meter is not None and result.samples:
                metrics["gateway_cpu_ms_per_req"] = round(
                    handle.meter.cpu_seconds() * 1000.0 / len(result.samples), 3)
                metrics["gateway_peak_rss_mb"] = round(handle.meter.peak_rss_bytes() / 2**20, 1)
            else:
                metrics["gateway_cpu_ms_per_req"] = None
                metrics["gateway_peak_rss_mb"] = None
            record.update({
                "description": handle.description,
                "settings": {"mode": settings.mode, "rate": round(settings.rate, 3),
                             "concurrency": settings.concurrency, "stream": settings.stream,
                             "engines": 1 if target == "direct" else opts.engines, **engine_fields},
                "metrics": metrics,
                "ttft_s": [round(t, 6) for s in result.samples if s.ok and (t := s.ttft_s) is not None],
                # About 8 requests per point at least, so a point is a ratio, not one request.
                "timeline": hit_ratio_timeline(result.samples,
                                               bins=min(20, max(3, len(result.samples) // 8))),
            })
            t2 = time.monotonic()
        record["timing_s"] = {"startup": round(t1 - t0, 2), "run": round(t2 - t1, 2),
                              "teardown": round(time.monotonic() - t2, 2)}
    except TargetUnavailable as exc:
        record["unavailable"] = str(exc)
    except Exception as exc:  # one broken target must not lose the others' results
        record["unavailable"] = f"failed: {type(exc).__name__}: {exc}"
    if "unavailable" in record:
        print(f"{workload.name}/{target}: unavailable: {record['unavailable']}", file=sys.stderr)
    return record


async def run_benchmarks(opts: _Options) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    runs_dir = opts.out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    for name in opts.workloads:
        spec = default_spec(name, quick=opts.quick)
        workload = build_workload(spec, seed=opts.seed, api=opts.api)  # type: ignore[arg-type]
        if opts.max_sessions is not None:
            workload = attrs.evolve(workload, sessions=workload.sessions[: max(1, opts.max_sessions)])
        plan = _plan(opts, workload)
        info = {"sessions": len(workload.sessions), "requests": workload.request_count,
                "distinct_prefix_tokens": distinct_prefix_tokens(spec), "api": workload.sessions[0].api,
                "cache_fraction": plan.cache_fraction, "rr_hit_estimate": plan.rr_hit_estimate,
                "speed": plan.speed, "planned_rate": plan.rate}
        for target in opts.targets:
            record = await _one_run(opts, workload, plan, target, info)
            records.append(record)
            path = runs_dir / f"{name}__{target}.json"
            await trio.to_thread.run_sync(path.write_text, json.dumps(record, indent=1))
    return records


def _write_outputs(opts: _Options, records: list[dict[str, Any]]) -> None:
    runs = [{"workload": r["workload"], "target": r["target"], "metrics": r["metrics"]}
            for r in records if "metrics" in r]
    (opts.out / "results.json").write_text(json.dumps({"runs": runs}, indent=1))
    settings = {"quick": opts.quick, "engines": opts.engines, "mode": opts.mode,
                "rate": opts.rate if opts.rate is not None else "auto",
                "speed": opts.speed if opts.speed is not None else "auto", "seed": opts.seed,
                "cache_fraction": opts.cache_fraction, "cpu_tier_ratio": opts.cpu_tier_ratio,
                "duration_s": opts.duration, "stream": opts.stream}
    (opts.out / "summary.md").write_text(render_summary(records, command=opts.command, settings=settings))
    if opts.plots:
        write_plots(records, opts.out / "plots")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    opts = _options(args, argv)
    opts.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    records = trio.run(run_benchmarks, opts)
    _write_outputs(opts, records)
    measured = sum(1 for r in records if "metrics" in r)
    print(f"{measured} runs measured, {len(records) - measured} unavailable, "
          f"{time.monotonic() - started:.0f}s; results in {opts.out}", file=sys.stderr)
    return 0 if measured else 1


if __name__ == "__main__":
    sys.exit(main())
