"""How much CPU one simulated engine spends per request, on each of its HTTP servers.

``python -m benchmarks.sim_capacity [--requests 500] [--rounds 3] [--speed 1] [--keep-alive 4]
[--max-tokens 16]``

One engine runs in its own process (``pixiu-kv sim --engines 1 --no-controller``), once
per server (``lean``, ``hypercorn``). A raw-socket load generator (``--requests``
connections opened at once, so the requests are concurrent) runs rounds of: bare
``GET /health``, a JSON completion and a stream with usage and ``[DONE]`` (``--max-tokens``
tokens each, 16 by default; one token separates a request's own cost from its tokens');
first with one request per connection, then with ``--keep-alive`` requests one after the
other on each connection (as a gateway's connection pool sends them).
The engine's CPU time (user + system, psutil) over a round divided by the number of
requests is its CPU per request; every request must complete with a 200 and a full body.
Reported: the median over rounds, the most streams open at once, and the round's wall time.
Bounded: every round has a deadline and a fixed request count.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from typing import Any

import psutil
import trio

from ._process import stop_popen

SERVERS = ("lean", "hypercorn")
_ROUND_DEADLINE_S = 120.0


def _start_engine(server: str, speed: float, requests: int) -> tuple[subprocess.Popen[str], str]:
    command = [sys.executable, "-m", "pixiu_kv.sim", "--engines", "1", "--no-controller", "--json",
               "--speed", str(speed), "--server", server, "--max-num-seqs", str(max(requests, 256)),
               "--cpu-tier-tokens", "0"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line:
        process.kill()
        raise RuntimeError("the engine did not start")
    return process, json.loads(line)["engines"][0]["url"]


def _request(kind: str, index: int, host: str, max_tokens: int = 16) -> bytes:
    if kind == "health":
        return f"GET /health HTTP/1.1\r\nhost: {host}\r\n\r\n".encode()
    # A distinct short prompt per request: no prefix-cache hits, a short prefill lane.
    body: dict[str, Any] = {"prompt": f"request {index} asks about item {index * 7919}",
                            "max_tokens": max_tokens}
    if kind == "stream":
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    data = json.dumps(body).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(data)}\r\n\r\n").encode()
    return head + data


class _Round:
    def __init__(self) -> None:
        self.open_streams = 0
        self.max_open_streams = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.failures: list[str] = []


async def _worker(address: tuple[str, int], payloads: list[bytes], kind: str, state: _Round) -> None:
    stream = await trio.open_tcp_stream(*address)
    async with stream:
        for payload in payloads:
            state.in_flight += 1
            state.max_in_flight = max(state.max_in_flight, state.in_flight)
            await _one(stream, payload, kind, state)
            state.in_flight -= 1


async def _one(stream: trio.SocketStream, payload: bytes, kind: str, state: _Round) -> None:
    await stream.send_all(payload)
    received = b""
    counted = False
    while True:
        data = await stream.receive_some(65536)
        if not data:
            state.failures.append("connection closed early")
            break
        received += data
        head_end = received.find(b"\r\n\r\n")
        if head_end < 0:
            continue
        if not counted:
            counted = True
            state.open_streams += 1
            state.max_open_streams = max(state.max_open_streams, state.open_streams)
        if not received.startswith(b"HTTP/1.1 200"):
            state.failures.append(received[:40].decode(errors="replace"))
            break
        head = received[:head_end].lower()
        if b"content-length:" in head:
            length = int(head.split(b"content-length:")[1].split(b"\r\n")[0])
            if len(received) - head_end - 4 >= length:
                break
        elif received.endswith(b"0\r\n\r\n"):
            if kind == "stream" and b"data: [DONE]" not in received:
                state.failures.append("stream without [DONE]")
            break
    if counted:
        state.open_streams -= 1


async def _round(url: str, kind: str, connections: int, per_connection: int,
                 max_tokens: int = 16) -> tuple[_Round, float]:
    host_port = url.removeprefix("http://")
    host, port = host_port.rsplit(":", 1)
    payloads = [[_request(kind, index * per_connection + turn, host_port, max_tokens)
                 for turn in range(per_connection)] for index in range(connections)]
    state = _Round()
    started = time.perf_counter()
    with trio.fail_after(_ROUND_DEADLINE_S):
        async with trio.open_nursery() as nursery:
            for batch in payloads:
                nursery.start_soon(_worker, (host, int(port)), batch, kind, state)
    return state, time.perf_counter() - started


def _cpu_s(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


async def _measure(server: str, args: argparse.Namespace) -> dict[str, Any]:
    process, url = _start_engine(server, args.speed, args.requests)
    try:
        engine = psutil.Process(process.pid)
        results: dict[str, Any] = {}
        for per_connection in sorted({1, args.keep_alive}):
            for kind in ("health", "json", "stream"):
                await _round(url, kind, args.requests, 1, args.max_tokens)  # warm-up: memo tables, allocator
                total = args.requests * per_connection
                per_request: list[float] = []
                walls: list[float] = []
                most_open = most_in_flight = 0
                for _ in range(args.rounds):
                    before = _cpu_s(engine)
                    state, wall = await _round(url, kind, args.requests, per_connection, args.max_tokens)
                    spent = _cpu_s(engine) - before
                    if state.failures:
                        raise RuntimeError(f"{server} {kind}: {len(state.failures)} failed: "
                                           f"{state.failures[:3]}")
                    per_request.append(spent / total * 1000)
                    walls.append(wall)
                    most_open = max(most_open, state.max_open_streams)
                    most_in_flight = max(most_in_flight, state.max_in_flight)
                results[f"{kind}/{per_connection}"] = {
                    "cpu_ms_per_request": round(statistics.median(per_request), 3),
                    "cpu_ms_rounds": [round(v, 3) for v in per_request],
                    "max_in_flight": most_in_flight, "max_open_streams": most_open,
                    "wall_s": round(statistics.median(walls), 2)}
        return results
    finally:
        stop_popen(process)


async def _main(args: argparse.Namespace) -> None:
    report: dict[str, Any] = {"requests": args.requests, "rounds": args.rounds, "speed": args.speed,
                              "max_tokens": args.max_tokens,
                              "load_average": [round(v, 1) for v in psutil.getloadavg()]}
    for server in args.servers:
        report[server] = await _measure(server, args)
    print(json.dumps(report, indent=2))
    if "lean" in report and "hypercorn" in report:
        for key in report["lean"]:
            lean = report["lean"][key]["cpu_ms_per_request"]
            old = report["hypercorn"][key]["cpu_ms_per_request"]
            print(f"{key:9s} lean {lean:6.3f} ms  hypercorn {old:6.3f} ms  ratio {old / lean:4.1f}x")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sim_capacity", description=__doc__)
    parser.add_argument("--requests", type=int, default=500, help="concurrent requests per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--speed", type=float, default=1.0)
    parser.add_argument("--keep-alive", type=int, default=4, help="requests per connection, second pass")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens per generation request")
    parser.add_argument("--servers", nargs="+", choices=SERVERS, default=list(SERVERS))
    args = parser.parse_args(argv)
    if args.requests < 1 or args.rounds < 1 or args.keep_alive < 1 or args.max_tokens < 1:
        parser.error("--requests, --rounds, --keep-alive and --max-tokens must be at least 1")
    trio.run(_main, args)


if __name__ == "__main__":
    main()
