"""A real stack for fault tests: simulated fleet + LMCache controller emulator + gateway.

Everything runs on loopback in the test's process. The cluster's engines are
``engine-0 .. engine-{n-1}``; one more engine serves only ``/tokenize`` (the kvcache
filter's ``vllm_endpoint``), so tokenizer faults and engine faults can be set apart.
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from functools import partial
from typing import Any
from urllib.parse import urlsplit

import attrs
import httpx
import hypercorn.config
import hypercorn.trio
import psutil
import trio

# Re-exported for the fault tests that start processes of their own.
from benchmarks._process import process_starter as partial_process  # noqa: F401
from benchmarks._process import (
    read_line,  # noqa: F401
    sim_fleet_process,
)
from pixiu_kv.app import RunningGateway, open_gateway
from pixiu_kv.cluster import Cluster
from pixiu_kv.config import GatewayConfig, loads_config
from pixiu_kv.filters.kvcache import KvCache, KvCacheFilter
from pixiu_kv.sim.controller import ControllerEmulator
from pixiu_kv.sim.engine import SimEngine
from pixiu_kv.sim.engine_config import EngineConfig
from pixiu_kv.sim.fleet import Fleet, open_fleet

MODEL = "sim-llama-8b"
# speed=100 makes the cost model 100x faster than a GPU: streams of a few tokens take ms.
ENGINE = EngineConfig(speed=100.0, max_num_seqs=1024, max_waiting=4096)
LONG_PROMPT = "the quick brown fox jumps over the lazy dog " * 70  # > 2 LMCache chunks


def prompt(tag: str) -> str:
    """A distinct long prompt (its own LMCache chunks) per tag."""
    return f"[{tag}] " + LONG_PROMPT


def chat(text: str, *, stream: bool = True, max_tokens: int = 8) -> dict[str, Any]:
    body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": text}],
                            "max_tokens": max_tokens, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


@attrs.frozen
class StreamResult:
    status: int
    headers: httpx.Headers
    events: tuple[str, ...]

    @property
    def done(self) -> bool:
        return bool(self.events) and self.events[-1] == "[DONE]"

    @property
    def errors(self) -> list[dict[str, Any]]:
        out = []
        for event in self.events:
            if event.startswith("{") and '"error"' in event:
                out.append(json.loads(event)["error"])
        return out

    @property
    def route(self) -> dict[str, str]:
        """``x-pixiu-kv-route`` as a dict (``reason``, ``hinted``, ``used``, ``matched``...)."""
        raw = self.headers.get("x-pixiu-kv-route", "")
        return dict(part.strip().split("=", 1) for part in raw.split(";") if "=" in part)


def parse_sse(data: bytes) -> tuple[str, ...]:
    events = []
    for block in data.decode().split("\n\n"):
        for line in block.splitlines():
            if line.startswith("data: "):
                events.append(line[len("data: "):])
    return tuple(events)


async def stream_chat(client: httpx.AsyncClient, body: dict[str, Any], **kwargs: Any) -> StreamResult:
    async with client.stream("POST", "/v1/chat/completions", json=body, **kwargs) as response:
        data = b"".join([chunk async for chunk in response.aiter_bytes()])
    return StreamResult(response.status_code, response.headers, parse_sse(data))


async def wait_until(predicate: Callable[[], bool], limit: float = 20.0) -> None:
    """Wait for a condition of the running system, bounded by ``limit`` seconds.

    The states waited on are plain counters of several components (no event to wait on),
    so they are polled; the test fails if the condition is not reached in time.
    """
    with trio.fail_after(limit):
        while True:
            if predicate():
                return
            await trio.sleep(0.005)


def gateway_toml(endpoints: Sequence[tuple[str, str]], *, tokenizer_url: str, lmcache_url: str,
                 kvcache: bool = True, proxy: dict[str, str] | None = None, cluster: str = "",
                 kv: dict[str, str] | None = None, listener: str = "") -> str:
    proxy_fields = {"max_connections_per_endpoint": "2048", "first_byte_timeout": '"5s"',
                    "idle_timeout": '"5s"', **(proxy or {})}
    proxy_text = "\n".join(f"{k} = {v}" for k, v in proxy_fields.items())
    kv_fields = {"lookup_routing_timeout": '"50ms"', "request_timeout": '"300ms"', **(kv or {})}
    kv_text = "\n".join(f"{k} = {v}" for k, v in kv_fields.items())
    eps = "\n".join(
        f'[[clusters.endpoints]]\nid = "{eid}"\naddress = "{url}"\nmax_in_flight = 2048\n'
        for eid, url in endpoints)
    return f"""
[listener]
max_concurrent_requests = 4096
graceful_timeout = "5s"
{listener}

[[clusters]]
name = "fleet"
{cluster}
[clusters.health_check]
interval = "50ms"
timeout = "500ms"
unhealthy_threshold = 2
healthy_threshold = 1
[clusters.retry]
policy = "count"
max_attempts = 2
base_backoff = "1ms"
{eps}

[[http_filters]]
name = "kvcache"
[http_filters.config]
enabled = {"true" if kvcache else "false"}
vllm_endpoint = "{tokenizer_url}"
lmcache_endpoint = "{lmcache_url}"
default_model = "{MODEL}"
{kv_text}
[http_filters.config.token_cache]
enabled = true
[http_filters.config.retry]
max_attempts = 1
[http_filters.config.circuit_breaker]
failure_threshold = 3
recovery_timeout = "30s"

[[http_filters]]
name = "llm_proxy"
[http_filters.config]
{proxy_text}
"""


@attrs.define
class Stack:
    fleet: Fleet
    config: GatewayConfig
    gateway: RunningGateway
    client: httpx.AsyncClient
    engine_count: int

    @property
    def url(self) -> str:
        return self.gateway.url

    @property
    def controller(self) -> ControllerEmulator:
        controller: ControllerEmulator = self.fleet.controller
        return controller

    def engine(self, index: int) -> SimEngine:
        return self.fleet.engines[index].engine

    @property
    def tokenizer(self) -> SimEngine:
        return self.fleet.engines[self.engine_count].engine

    @property
    def cluster(self) -> Cluster:
        runtime = self.gateway.app.runtime
        assert runtime is not None
        return runtime.clusters["fleet"]

    @property
    def kv(self) -> KvCache:
        runtime = self.gateway.app.runtime
        assert runtime is not None
        for f in runtime.decode_filters:
            if isinstance(f, KvCacheFilter):
                return f.kv
        raise LookupError("the kvcache filter is not enabled")

    def engine_ports(self) -> set[int]:
        return {int(e.url.rsplit(":", 1)[1]) for e in self.fleet.engines}

    def idle(self) -> bool:
        """No request in flight anywhere: gateway endpoints, engines, background jobs."""
        gateway_idle = all(e.in_flight == 0 for e in self.cluster.endpoints)
        engines_idle = all(e.engine._inflight == 0 for e in self.fleet.engines)
        return gateway_idle and engines_idle and self.kv.stats.background_running == 0

    async def warm(self, text: str) -> StreamResult:
        """Send ``text`` until the gateway routes it by its cached prefix (tokens learnt,
        KV stored in an engine's LMCache tier), then return that routed result."""
        for _ in range(20):
            result = await stream_chat(self.client, chat(text))
            assert result.status == 200 and result.done
            await wait_until(self.idle)
            if result.route.get("reason") == "kv_prefix":
                return result
        raise AssertionError("the prompt was never routed by its cached prefix")


async def serve_asgi(nursery: trio.Nursery, app: Any) -> str:
    """Serve ``app`` on an ephemeral loopback port inside ``nursery``; returns its base URL."""
    config = hypercorn.config.Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.errorlog = None
    stop = trio.Event()
    binds = await nursery.start(partial(hypercorn.trio.serve, app, config, shutdown_trigger=stop.wait))
    return str(binds[0])


def closed_port_url() -> str:
    """The URL of a loopback port nothing listens on (connections are refused)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"http://127.0.0.1:{port}"


def gateway_upstream_sockets(engine_ports: set[int]) -> int:
    """ESTABLISHED TCP connections of this process *to* an engine port (client side)."""
    count = 0
    for conn in psutil.Process().net_connections(kind="tcp"):
        if conn.status != psutil.CONN_ESTABLISHED or not conn.raddr:
            continue
        if conn.raddr.port in engine_ports and conn.laddr.port not in engine_ports:
            count += 1
    return count


@attrs.frozen
class RawResult:
    status: int
    body: bytes
    # The client closed the connection on purpose after the first event.
    left_early: bool

    @property
    def done(self) -> bool:
        return b"data: [DONE]" in self.body


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out += rest[:size]
        data = rest[size + 2:]
    return bytes(out)


async def raw_stream(url: str, body: dict[str, Any], *, leave_after_first_event: bool = False,
                     path: str = "/v1/chat/completions") -> RawResult:
    """A minimal HTTP/1.1 client (one request per connection): cheap enough to run a
    thousand at once in the test process, and able to hang up at a precise point."""
    parts = urlsplit(url)
    payload = json.dumps(body).encode()
    conn = await trio.open_tcp_stream(parts.hostname or "127.0.0.1", parts.port or 80)
    try:
        await conn.send_all(b"POST " + path.encode() + b" HTTP/1.1\r\nhost: gw\r\nconnection: close\r\n"
                            b"content-type: application/json\r\ncontent-length: "
                            + str(len(payload)).encode() + b"\r\n\r\n" + payload)
        received = bytearray()
        while True:
            chunk = await conn.receive_some(65536)
            if not chunk:
                break
            received += chunk
            if leave_after_first_event and b"\ndata: " in received:
                break
    finally:
        await conn.aclose()
    head, _, rest = bytes(received).partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else 0
    chunked = b"transfer-encoding: chunked" in head.lower()
    return RawResult(status, _dechunk(rest) if chunked and not leave_after_first_event else rest,
                     leave_after_first_event)


def stack_config(fleet: Fleet, engines: int, *, lmcache_url: str | None = None,
                 endpoints: Callable[[Fleet], list[tuple[str, str]]] | None = None,
                 **toml: Any) -> GatewayConfig:
    cluster_endpoints = (endpoints(fleet) if endpoints is not None
                         else [(e.instance_id, e.url) for e in fleet.engines[:engines]])
    assert fleet.controller_url is not None
    return loads_config(gateway_toml(cluster_endpoints, tokenizer_url=fleet.engines[engines].url,
                                     lmcache_url=lmcache_url or fleet.controller_url, **toml))


@asynccontextmanager
async def open_stack(engines: int = 2, *, engine_config: EngineConfig = ENGINE,
                     endpoints: Callable[[Fleet], list[tuple[str, str]]] | None = None,
                     client_limits: httpx.Limits | None = None, lmcache_url: str | None = None,
                     **toml: Any) -> AsyncIterator[Stack]:
    async with open_fleet(engines + 1, engine_config) as fleet:
        config = stack_config(fleet, engines, lmcache_url=lmcache_url, endpoints=endpoints, **toml)
        async with open_gateway(config) as gateway, httpx.AsyncClient(
                base_url=gateway.url, timeout=httpx.Timeout(30.0),
                limits=client_limits or httpx.Limits(max_connections=100)) as client:
            yield Stack(fleet, config, gateway, client, engines)


class RecordingHandler(logging.Handler):
    """Collects the gateway's access-log records (one per request)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        fields = getattr(record, "pixiu_fields", None)
        if record.getMessage() == "request" and isinstance(fields, dict):
            self.records.append(dict(fields))


@asynccontextmanager
async def access_log() -> AsyncIterator[RecordingHandler]:
    logger = logging.getLogger("pixiu_kv.access")
    handler = RecordingHandler()
    old_level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


# -- processes of their own -----------------------------------------------------------------

@attrs.frozen
class RemoteFleet:
    engines: tuple[tuple[str, str], ...]
    controller_url: str

    @property
    def ports(self) -> set[int]:
        return {int(url.rsplit(":", 1)[1]) for _, url in self.engines}




@asynccontextmanager
async def run_fleet() -> AsyncIterator[RemoteFleet]:
    async with sim_fleet_process(3, max_num_seqs=2048, startup_timeout=30) as described:
        yield RemoteFleet(tuple((e["instance_id"], e["url"]) for e in described["engines"]),
                          described["controller_url"])


