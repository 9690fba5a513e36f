"""What the gateway itself costs: the same requests sent direct to an engine and through it.

``python -m benchmarks.overhead [--quick]``

A trivial engine (answers at once: a small JSON completion, or an SSE stream of a few
events) runs in its own process, and the gateway (``pixiu-kv serve``) in another, so the
gateway's CPU time is read from its own process (psutil) and nothing else is counted in it.
For each scenario (non-streaming / streaming x concurrency 1 / 32) the load generator runs
direct first, then through the gateway, in the same run: reported numbers are the added
latency (p50/p99, ms), the latency ratio, and gateway CPU milliseconds per request.
Every run is bounded in request count and in time.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import httpx
import psutil
import trio

from ._process import stop_popen

__all__ = ["main"]

STREAM_EVENTS = 8
COMPLETION = json.dumps({
    "id": "cmpl-bench", "object": "text_completion", "created": 0, "model": "bench",
    "choices": [{"index": 0, "text": "hello world", "logprobs": None, "finish_reason": "stop",
                 "stop_reason": None}],
    "usage": {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6},
}).encode()
EVENT = b"data: " + json.dumps({
    "id": "cmpl-bench", "object": "text_completion", "created": 0, "model": "bench",
    "choices": [{"index": 0, "text": "tok", "logprobs": None, "finish_reason": None}],
}).encode() + b"\n\n"


# -- the engine (runs in its own process) ------------------------------------------------------

async def _engine_app(scope: dict[str, Any], receive: Callable[[], Awaitable[dict[str, Any]]],
                      send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if scope["path"] == "/health":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})
        return
    if b'"stream": true' in body or b'"stream":true' in body:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        for _ in range(STREAM_EVENTS):
            await send({"type": "http.response.body", "body": EVENT, "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(COMPLETION)).encode())]})
    await send({"type": "http.response.body", "body": COMPLETION})


def _serve_engine(port: int) -> None:
    from hypercorn.config import Config
    from hypercorn.trio import serve

    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    config.errorlog = None
    config.keep_alive_max_requests = sys.maxsize
    config.backlog = 1024
    trio.run(partial(serve, _engine_app, config))  # type: ignore[arg-type]


# -- processes -----------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _gateway_config(engine_url: str, log_level: str) -> str:
    return f"""
[log]
level = "{log_level}"
[listener]
graceful_timeout = "1s"
[[clusters]]
name = "bench"
health_check.interval = "5s"
[[clusters.endpoints]]
id = "engine-0"
address = "{engine_url}"
"""


async def _wait_ready(url: str, process: subprocess.Popen[bytes], path: str) -> None:
    async with httpx.AsyncClient(timeout=1.0) as http:
        with trio.fail_after(30):
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"{process.args!r} exited with {process.returncode}")
                try:
                    if (await http.get(url + path)).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await trio.sleep(0.05)


# -- load ------------------------------------------------------------------------------------

@attrs.frozen
class Scenario:
    stream: bool
    concurrency: int
    requests: int

    @property
    def name(self) -> str:
        return f"{'stream' if self.stream else 'json'} c={self.concurrency}"


@attrs.frozen
class RunResult:
    latencies: tuple[float, ...]
    errors: int
    wall: float

    def pct(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def _load(url: str, scenario: Scenario, time_limit: float) -> RunResult:
    body = {"model": "bench", "prompt": "hello", "max_tokens": 2, "stream": scenario.stream}
    latencies: list[float] = []
    errors = 0
    remaining = scenario.requests
    limits = httpx.Limits(max_connections=scenario.concurrency,
                          max_keepalive_connections=scenario.concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=30.0, limits=limits) as http:
        # Warm the connections so connection setup is not measured.
        async with trio.open_nursery() as nursery:
            for _ in range(scenario.concurrency):
                nursery.start_soon(partial(http.post, "/v1/completions", json={**body, "stream": False}))

        async def worker() -> None:
            nonlocal remaining, errors
            while remaining > 0:
                remaining -= 1
                start = time.perf_counter()
                async with http.stream("POST", "/v1/completions", json=body) as r:
                    async for _ in r.aiter_raw():
                        pass
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - start)
                else:
                    errors += 1

        began = time.perf_counter()
        with trio.move_on_after(time_limit):
            async with trio.open_nursery() as nursery:
                for _ in range(scenario.concurrency):
                    nursery.start_soon(worker)
    return RunResult(tuple(latencies), errors, time.perf_counter() - began)


def _cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


@attrs.frozen
class Processes:
    engine: subprocess.Popen[bytes]
    gateway: subprocess.Popen[bytes]
    engine_url: str
    gateway_url: str


def _start(tmp: Path, log_level: str) -> Processes:
    engine_port, gateway_port = _free_port(), _free_port()
    engine_url, gateway_url = f"http://127.0.0.1:{engine_port}", f"http://127.0.0.1:{gateway_port}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    engine = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.overhead", "--serve-engine", str(engine_port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    config_path = tmp / "gateway.toml"
    config_path.write_text(_gateway_config(engine_url, log_level))
    gateway = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pixiu_kv.cli import main; sys.exit(main())",
         "serve", "--config", str(config_path), "--port", str(gateway_port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return Processes(engine, gateway, engine_url, gateway_url)


async def _run(args: argparse.Namespace, procs: Processes) -> dict[str, Any]:
    scale = 1 if args.quick else 4
    scenarios = [Scenario(False, 1, 300 * scale), Scenario(True, 1, 300 * scale),
                 Scenario(False, 32, 1000 * scale), Scenario(True, 32, 1000 * scale)]
    await _wait_ready(procs.engine_url, procs.engine, "/health")
    await _wait_ready(procs.gateway_url, procs.gateway, "/ready")
    gw = psutil.Process(procs.gateway.pid)
    rows = []
    for scenario in scenarios:
        direct = await _load(procs.engine_url, scenario, args.time_limit)
        cpu_before = _cpu_seconds(gw)
        via = await _load(procs.gateway_url, scenario, args.time_limit)
        cpu = _cpu_seconds(gw) - cpu_before
        # Includes the warm-up requests, which also went through the gateway.
        handled = len(via.latencies) + via.errors + scenario.concurrency
        rows.append({
            "scenario": scenario.name,
            "requests": len(via.latencies),
            "errors": direct.errors + via.errors,
            "direct_p50_ms": direct.pct(0.5) * 1e3,
            "direct_p99_ms": direct.pct(0.99) * 1e3,
            "gateway_p50_ms": via.pct(0.5) * 1e3,
            "gateway_p99_ms": via.pct(0.99) * 1e3,
            "added_p50_ms": (via.pct(0.5) - direct.pct(0.5)) * 1e3,
            "added_p99_ms": (via.pct(0.99) - direct.pct(0.99)) * 1e3,
            "p50_ratio": via.pct(0.5) / direct.pct(0.5),
            "direct_rps": len(direct.latencies) / direct.wall,
            "gateway_rps": len(via.latencies) / via.wall,
            "gateway_cpu_ms_per_request": cpu / handled * 1e3,
        })
    return {"cores": psutil.cpu_count(), "log_level": args.log_level, "scenarios": rows}


def _table(result: dict[str, Any]) -> str:
    head = ("scenario", "n", "direct p50", "gw p50", "added p50", "direct p99", "gw p99", "added p99",
            "p50 ratio", "gw CPU/req")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in result["scenarios"]:
        lines.append(" | ".join([
            r["scenario"], str(r["requests"]),
            f"{r['direct_p50_ms']:.2f} ms", f"{r['gateway_p50_ms']:.2f} ms", f"{r['added_p50_ms']:+.2f} ms",
            f"{r['direct_p99_ms']:.2f} ms", f"{r['gateway_p99_ms']:.2f} ms", f"{r['added_p99_ms']:+.2f} ms",
            f"{r['p50_ratio']:.2f}x", f"{r['gateway_cpu_ms_per_request']:.2f} ms",
        ]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.overhead",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests (about a minute)")
    parser.add_argument("--time-limit", type=float, default=60.0, help="seconds per run at most")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                        help="gateway log level (info logs one access line per request)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--serve-engine", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_engine:
        _serve_engine(args.serve_engine)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        procs = _start(Path(tmp), args.log_level)
        try:
            result = trio.run(_run, args, procs)
        finally:
            stop_popen(procs.gateway)
            stop_popen(procs.engine)
    print(json.dumps(result, indent=2) if args.json else _table(result))
    errors = sum(r["errors"] for r in result["scenarios"])
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
