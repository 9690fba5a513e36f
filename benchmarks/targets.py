"""Benchmark targets: what the load generator talks to, each on a fresh fleet.

* ``direct``: one engine, no router (reference).
* ``round-robin`` / ``least-request``: the gateway with the kvcache filter off.
* ``seed``: the gateway with the kvcache filter configured like the Pixiu reference (token
  cache on, LMCache lookups, routing only on a token-cache hit, no cache actions).
* ``pixiu-kv``: the gateway with every improvement on (best available settings).
* ``oracle``: :mod:`benchmarks.oracle`, full knowledge of the engines' state.
* ``sglang``: SGLang Model Gateway (``smg``, PyPI ``sglang-router``) with ``cache_aware``.
* ``external``: any OpenAI-compatible URL (``--external-url``); no fleet is started.

The fleet runs in one subprocess (engines, controller emulator, oracle), the gateway in
another, the load generator in the calling process, so that on a small machine the three
do not share one event loop, and the gateway's CPU time and memory are its own.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any, BinaryIO

import attrs
import httpx
import trio

from .sizing import CPU_LOAD_TOKENS_PER_S, PREFILL_TOKENS_PER_S

__all__ = [
    "TARGET_NAMES",
    "FleetInfo",
    "FleetSettings",
    "ProcessMeter",
    "TargetHandle",
    "TargetUnavailable",
    "find_smg",
    "gateway_config",
    "open_fleet_process",
    "open_target",
    "routing_settings",
]

TARGET_NAMES = ("direct", "round-robin", "least-request", "seed", "pixiu-kv", "oracle", "sglang", "external")
GATEWAY_TARGETS = ("round-robin", "least-request", "seed", "pixiu-kv")
STARTUP_TIMEOUT_S = 60.0


class TargetUnavailable(Exception):
    """The target cannot run here; the message says why."""


@attrs.frozen
class FleetSettings:
    engines: int = 4
    engine: dict[str, Any] = attrs.field(factory=dict)
    """EngineConfig fields (speed, gpu_kv_tokens, cpu_tier_tokens, max_model_len, ...)."""


@attrs.frozen
class FleetInfo:
    engines: tuple[tuple[str, str], ...]
    """(instance id, base URL) per engine."""
    controller_url: str
    oracle_url: str
    model: str
    pid: int


@attrs.frozen
class TargetHandle:
    name: str
    base_url: str
    model: str
    engines: tuple[str, ...]
    default_endpoint: str = ""
    """Endpoint to attribute every request to when the reply names none (``direct``)."""
    stats_url: str | None = None
    """``GET`` gives per-engine counters (the fleet's), for targets that send no endpoint header."""
    meter: ProcessMeter | None = None
    routing_expected: bool = False
    description: str = ""


class ProcessMeter:
    """CPU time and peak resident memory of a router process, via psutil."""

    def __init__(self, pid: int) -> None:
        import psutil

        self.pid = pid
        self._proc = psutil.Process(pid)
        self._cpu0 = self._cpu()
        self._peak_sampled = 0

    def _cpu(self) -> float:
        t = self._proc.cpu_times()
        return float(t.user + t.system)

    def reset(self) -> None:
        self._cpu0 = self._cpu()

    def cpu_seconds(self) -> float:
        return self._cpu() - self._cpu0

    def sample(self) -> None:
        self._peak_sampled = max(self._peak_sampled, int(self._proc.memory_info().rss))

    def peak_rss_bytes(self) -> int:
        """Kernel's high-water mark (VmHWM) when readable, else the largest sample."""
        try:
            with open(f"/proc/{self.pid}/status", encoding="ascii") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return max(int(line.split()[1]) * 1024, self._peak_sampled)
        except OSError:
            pass
        self.sample()
        return self._peak_sampled


# -- configuration -------------------------------------------------------------------------

def _kvcache_has_routing() -> bool:
    try:
        from pixiu_kv.config import KvCacheConfig
    except ImportError:
        return False
    return any(f.name == "routing" for f in attrs.fields(KvCacheConfig))


def routing_settings(model: str, engine: dict[str, Any]) -> dict[str, Any]:
    """The ``routing`` table of the kvcache filter for the ``pixiu-kv`` target.

    The router on, every capability at its recommended default, and the facts an operator
    knows about their engines: the model's tokenizer (the simulator's), each engine's cache
    size (the larger of its GPU cache and its LMCache tier: LMCache writes every chunk
    through to the CPU tier, so the two hold mostly the same prefixes and their sum would
    overstate what an engine keeps), its GPU KV size (what it admits running requests
    into), the tier's load bandwidth, and the cost priors at the fleet's speed (the
    simulated hardware runs ``speed`` times faster than the defaults assume). Reused
    prefixes are compressed where they are cached once an engine's cache is full.
    """
    speed = float(engine.get("speed", 1.0))
    return {
        "enabled": True,
        "engine_cache_tokens": max(int(engine.get("gpu_kv_tokens", 0)),
                                   int(engine.get("cpu_tier_tokens", 0))),
        "engine_kv_tokens": int(engine.get("gpu_kv_tokens", 0)),
        "prefill_tokens_per_second": PREFILL_TOKENS_PER_S * speed,
        # Cached tokens mostly come from the LMCache CPU tier (the GPU holds little beyond
        # the running requests): loading them runs at the tier's bandwidth.
        "cached_tokens_per_second": CPU_LOAD_TOKENS_PER_S * speed,
        "base_latency": f"{20.0 / speed:.3f}ms",
        # The overload guard's queue limit is a time too: the default 5 s, at the fleet's speed.
        "overload_queue_time": f"{5.0 / speed:.3f}s",
        "running_request_cost": f"{2.0 / speed:.3f}ms",
        "compress_when_full": True,
        "tokenizers": [{"model": model, "path": "builtin:sim"}],
    }


def gateway_config(target: str, engines: Sequence[tuple[str, str]], controller_url: str, *,
                   model: str = "", routing: dict[str, Any] | None = None) -> dict[str, Any]:
    """The gateway configuration (decoded-TOML form) of a gateway target.

    ``routing`` is the kvcache filter's ``routing`` table for ``pixiu-kv`` (see
    :func:`routing_settings`); it is left out when the configuration does not know it.
    """
    if target not in GATEWAY_TARGETS:
        raise ValueError(f"{target!r} is not a gateway target")
    lb = "least_request" if target in ("least-request", "pixiu-kv") else "round_robin"
    cluster = {
        "name": "engines",
        "lb_policy": lb,
        "endpoints": [{"id": eid, "address": url, "max_in_flight": 1024} for eid, url in engines],
        "health_check": {"enabled": True, "interval": "2s", "timeout": "1s"},
    }
    filters: list[dict[str, Any]] = []
    if target in ("seed", "pixiu-kv"):
        kv: dict[str, Any] = {
            "enabled": True,
            "vllm_endpoint": engines[0][1],
            "lmcache_endpoint": controller_url,
            "default_model": model,
            "token_cache": {"enabled": True, "max_size": 100_000},
            "lookup_routing_timeout": "50ms",
        }
        if target == "pixiu-kv" and routing is not None and _kvcache_has_routing():
            kv["routing"] = routing
        filters.append({"name": "dgp.filter.ai.kvcache", "config": kv})
    # A saturated benchmark fleet can keep a stream silent (waiting for KV room) or its head
    # unsent for minutes at slow --speed: the gateway waits as long as the load generator.
    filters.append({"name": "dgp.filter.llm.proxy",
                    "config": {"first_byte_timeout": "900s", "idle_timeout": "900s"}})
    return {
        "listener": {"host": "127.0.0.1", "port": 0, "max_concurrent_requests": 8192},
        "log": {"level": "warning"},
        "clusters": [cluster],
        "http_filters": filters,
    }


def find_smg(explicit: str | None = None) -> str | None:
    """The ``smg`` executable: given, ``$PIXIU_KV_SMG``, next to this Python, or on PATH."""
    for candidate in (explicit, os.environ.get("PIXIU_KV_SMG"),
                      str(Path(sys.executable).with_name("smg")), shutil.which("smg")):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- processes -------------------------------------------------------------------------------

async def _read_line(proc: trio.Process, deadline_s: float, what: str, log_path: Path | None) -> str:
    assert proc.stdout is not None
    buf = bytearray()
    with trio.move_on_after(deadline_s):
        while b"\n" not in buf:
            chunk = await proc.stdout.receive_some(65536)
            if not chunk:
                break
            buf += chunk
    line = bytes(buf).split(b"\n", 1)[0].decode("utf-8", "replace").strip()
    if not line:
        tail = await trio.to_thread.run_sync(_log_tail, log_path)
        raise TargetUnavailable(f"{what} did not start within {deadline_s:g}s: {tail.strip()}")
    return line


def _log_tail(log_path: Path | None) -> str:
    if log_path is None or not log_path.exists():
        return ""
    return log_path.read_text(errors="replace")[-600:]


async def _stop(proc: trio.Process, *, stdin_eof: bool = True) -> None:
    """End a child: our children exit when their stdin closes; others get SIGTERM, then SIGKILL."""
    if proc.stdin is not None:
        with trio.move_on_after(1.0):
            await proc.stdin.aclose()
    if stdin_eof:
        with trio.move_on_after(5.0):
            await proc.wait()
            return
    proc.terminate()
    with trio.move_on_after(3.0):
        await proc.wait()
        return
    proc.kill()
    await proc.wait()


async def _stop_shielded(proc: trio.Process) -> None:
    with trio.CancelScope(shield=True):
        await _stop(proc)


@asynccontextmanager
async def _child(argv: list[str], what: str, log_path: Path | None, *,
                 stdout_to_log: bool = False, stdin_eof: bool = True) -> AsyncIterator[trio.Process]:
    """A child process with stderr (and, for chatty programs, stdout) in ``log_path``.

    An unread stdout pipe would fill up and block the child, so only children that report
    on stdout (one line, read at once) keep it as a pipe.
    """
    log: BinaryIO | int = subprocess.DEVNULL
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log = await trio.to_thread.run_sync(open, log_path, "ab")
    try:
        try:
            proc = await trio.lowlevel.open_process(
                argv, stdin=subprocess.PIPE, stdout=log if stdout_to_log else subprocess.PIPE, stderr=log)
        except OSError as exc:
            raise TargetUnavailable(f"{what} could not be started: {exc}") from None
        try:
            yield proc
        finally:
            with trio.CancelScope(shield=True):
                await _stop(proc, stdin_eof=stdin_eof)
    finally:
        if not isinstance(log, int):
            log.close()


@asynccontextmanager
async def open_fleet_process(settings: FleetSettings, *, log_dir: Path | None = None
                             ) -> AsyncIterator[FleetInfo]:
    payload = json.dumps({"engines": settings.engines, "engine": settings.engine})
    log_path = log_dir / "fleet.log" if log_dir else None
    argv = [sys.executable, "-m", "benchmarks._fleet", payload]
    async with _child(argv, "the sim fleet", log_path) as proc:
        info = json.loads(await _read_line(proc, STARTUP_TIMEOUT_S, "the sim fleet", log_path))
        yield FleetInfo(engines=tuple((e["id"], e["url"]) for e in info["engines"]),
                        controller_url=info["controller_url"] or "", oracle_url=info["oracle_url"],
                        model=info["model"], pid=proc.pid)


def _smg_workers_ready(expected: int, model: str) -> Callable[[httpx.Response], bool]:
    """All workers registered, healthy, and serving ``model``.

    A worker whose model smg could not read at registration ("unknown") never serves
    requests, so it does not count as ready.
    """
    def check(resp: httpx.Response) -> bool:
        try:
            workers = resp.json().get("workers") or []
        except (ValueError, AttributeError):
            return False
        ready = [w for w in workers if isinstance(w, dict) and w.get("is_healthy")
                 and w.get("model_id") == model]
        return len(ready) >= expected
    return check


async def _wait_ready(url: str, deadline_s: float, what: str,
                      accept: Callable[[httpx.Response], bool] | None = None) -> None:
    async with httpx.AsyncClient(timeout=2.0) as client:
        with trio.move_on_after(deadline_s):
            while True:
                try:
                    resp = await client.get(url)
                    if resp.status_code < 300 and (accept is None or accept(resp)):
                        return
                except httpx.HTTPError:
                    pass
                await trio.sleep(0.2)  # a child process's readiness: poll it
    raise TargetUnavailable(f"{what} did not become ready at {url} within {deadline_s:g}s")


async def _start_smg(stack: AsyncExitStack, smg_path: str, info: FleetInfo,
                     log_dir: Path | None) -> tuple[trio.Process, str]:
    """Launch smg with ``cache_aware`` over the fleet; retried once if its workers never get ready."""
    last: TargetUnavailable | None = None
    for attempt in range(2):
        port, prom = _free_port(), _free_port()
        argv = [smg_path, "launch", "--host", "127.0.0.1", "--port", str(port),
                "--worker-urls", *[url for _, url in info.engines], "--policy", "cache_aware",
                "--prometheus-host", "127.0.0.1", "--prometheus-port", str(prom), "--log-level", "warn"]
        log_path = log_dir / f"smg-{attempt}.log" if log_dir else None
        child = AsyncExitStack()
        proc = await child.enter_async_context(_child(argv, "smg", log_path, stdout_to_log=True,
                                                      stdin_eof=False))
        url = f"http://127.0.0.1:{port}"
        try:
            # smg answers /health before its workers are registered: wait for all of them.
            await _wait_ready(url + "/workers", STARTUP_TIMEOUT_S / 3, "smg's workers",
                              _smg_workers_ready(len(info.engines), info.model))
        except TargetUnavailable as exc:
            last = exc
            await child.aclose()
            continue
        stack.push_async_exit(child)
        return proc, url
    assert last is not None
    raise last


def _gateway_available() -> str | None:
    import importlib

    try:
        importlib.import_module("pixiu_kv.app")
    except ImportError as exc:
        return f"the gateway is not importable ({exc})"
    return None


@asynccontextmanager
async def open_target(name: str, fleet: FleetSettings, *, log_dir: Path | None = None,
                      external_url: str | None = None, external_model: str = "",
                      smg: str | None = None) -> AsyncIterator[TargetHandle]:
    """Start ``name`` on a fresh fleet; raises :class:`TargetUnavailable` with a reason."""
    if name not in TARGET_NAMES:
        raise TargetUnavailable(f"unknown target {name!r}")
    if name == "external":
        if not external_url:
            raise TargetUnavailable("no --external-url given")
        yield TargetHandle(name, external_url.rstrip("/"), external_model or "default", (),
                           description=f"external URL {external_url}")
        return
    if name in GATEWAY_TARGETS and (reason := _gateway_available()):
        raise TargetUnavailable(reason)
    smg_path = find_smg(smg) if name == "sglang" else None
    if name == "sglang" and smg_path is None:
        raise TargetUnavailable("smg (PyPI sglang-router) is not installed; pip install sglang-router "
                                "or pass --smg PATH")
    settings = attrs.evolve(fleet, engines=1) if name == "direct" else fleet
    async with AsyncExitStack() as stack:
        gateway: trio.Process | None = None
        gateway_log = log_dir / f"gateway-{name}.log" if log_dir else None
        if name in GATEWAY_TARGETS:
            # Started first: its imports run while the fleet starts; the configuration
            # (which needs the fleet's URLs) follows on its stdin.
            gateway = await stack.enter_async_context(
                _child([sys.executable, "-m", "benchmarks._gateway"], "the gateway", gateway_log))
        info = await stack.enter_async_context(open_fleet_process(settings, log_dir=log_dir))
        if gateway is not None:
            # Stop the gateway before the fleet: its pooled connections would otherwise hold
            # every engine's graceful shutdown open.
            stack.push_async_callback(_stop_shielded, gateway)
        ids = tuple(eid for eid, _ in info.engines)
        stats_url = info.oracle_url + "/fleet/stats"
        if name == "direct":
            eid, url = info.engines[0]
            yield TargetHandle(name, url, info.model, ids, default_endpoint=eid, stats_url=stats_url,
                               description="one engine, no router")
        elif name == "oracle":
            yield TargetHandle(name, info.oracle_url, info.model, ids, stats_url=stats_url,
                               description="min predicted TTFT from the engines' own state")
        elif name == "sglang":
            assert smg_path is not None
            proc, url = await _start_smg(stack, smg_path, info, log_dir)
            yield TargetHandle(name, url, info.model, ids, stats_url=stats_url, meter=ProcessMeter(proc.pid),
                               description="SGLang Model Gateway, policy cache_aware")
        else:
            config = gateway_config(name, info.engines, info.controller_url, model=info.model,
                                    routing=routing_settings(info.model, fleet.engine))
            assert gateway is not None and gateway.stdin is not None
            await gateway.stdin.send_all(json.dumps(config).encode() + b"\n")
            proc = gateway
            url = json.loads(await _read_line(proc, STARTUP_TIMEOUT_S, "the gateway", gateway_log))["url"]
            await _wait_ready(url + "/ready", STARTUP_TIMEOUT_S, "the gateway")
            yield TargetHandle(name, url, info.model, ids, stats_url=stats_url, meter=ProcessMeter(proc.pid),
                               routing_expected=name in ("seed", "pixiu-kv"),
                               description=f"pixiu-kv gateway, {config['clusters'][0]['lb_policy']}"
                               + (", kvcache filter" if len(config["http_filters"]) > 1 else ""))
