"""SIGTERM: the real ``pixiu-kv serve`` process stops accepting, lets the stream in flight
finish within the grace period, and exits 0."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from subprocess import PIPE
from urllib.parse import urlsplit

import httpx
import pytest
import trio
from faults_support import RemoteFleet, gateway_toml, partial_process, raw_stream, read_line, run_fleet


async def wait_for_generation(fleet: RemoteFleet) -> None:
    async with httpx.AsyncClient(timeout=10.0) as client:
        with trio.fail_after(20):
            while True:
                states = [(await client.get(url + "/sim/state")).json() for _, url in fleet.engines]
                if any(state["running"] for state in states):
                    return
                await trio.sleep(0.02)


# The harness configures listener.graceful_timeout = 5s; tokens come every 0.5 s.
@pytest.mark.parametrize("tokens, finishes", [(6, True), (40, False)], ids=["within-grace", "beyond-grace"])
async def test_sigterm_lets_streams_finish_and_exits_zero(tmp_path: Path, tokens: int,
                                                         finishes: bool) -> None:
    with trio.fail_after(60):
        async with run_fleet() as fleet, trio.open_nursery() as nursery:
            async with httpx.AsyncClient(timeout=10.0) as client:
                for _, url in fleet.engines:
                    (await client.post(url + "/sim/faults", json={"slow_stream_s": 0.5})).raise_for_status()
            path = tmp_path / "gateway.toml"
            path.write_text(gateway_toml(fleet.engines[:2], tokenizer_url=fleet.engines[2][1],
                                         lmcache_url=fleet.controller_url,
                                         listener="port = 0"), encoding="utf-8")
            gateway: trio.Process = await nursery.start(partial_process(
                [sys.executable, "-c", "import sys; from pixiu_kv.cli import main; sys.exit(main())",
                 "serve", "--config", str(path)], stdout=PIPE))
            assert gateway.stdout is not None
            buffer = bytearray()
            line = await read_line(gateway.stdout, buffer)
            while "listening on" not in line:
                line = await read_line(gateway.stdout, buffer)
            url = line.rsplit(" ", 1)[1]
            results = []

            async def stream() -> None:
                body = {"model": "sim-llama-8b", "max_tokens": tokens, "stream": True,
                        "messages": [{"role": "user", "content": "a stream in flight at SIGTERM"}]}
                results.append(await raw_stream(url, body))

            async with trio.open_nursery() as streams:
                streams.start_soon(stream)
                # Once an engine is generating it, ask the gateway to stop.
                await wait_for_generation(fleet)
                gateway.send_signal(signal.SIGTERM)
                # New connections are refused soon after; the stream in flight goes on.
                parts = urlsplit(url)
                with trio.fail_after(10):
                    while True:
                        try:
                            conn = await trio.open_tcp_stream(parts.hostname or "", parts.port or 0)
                        except OSError:
                            break
                        await conn.aclose()
                        await trio.sleep(0.05)
            assert results and results[0].status == 200
            # Within the grace period the stream ends normally; beyond it, it is cut.
            assert results[0].done is finishes, results[0].body[-200:]
            with trio.fail_after(30):
                assert await gateway.wait() == 0
