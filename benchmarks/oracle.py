"""The oracle router: full knowledge of every simulated engine's cache and queue.

It runs in the fleet's process and reads the engines' state directly (GPU prefix cache,
LMCache CPU tier, the prefill lane's backlog), plus what it has itself dispatched but the
engine has not yet admitted or finished. For each request it predicts the time to first
token on every engine, ``queue + prefill(uncached tokens)`` with the engines' own cost
model, and sends the request to the minimum. It is the upper bound a real router (which
sees the cache only through LMCache lookups and its own counters) can approach.

The pure part (:func:`predict_ttft`, :func:`choose`) is separate from the state reading
(:class:`OracleRouter`) and from the HTTP relay (:class:`OracleProxy`).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

import attrs
import httpx
import trio

__all__ = ["EngineView", "OracleProxy", "OracleRouter", "choose", "predict_ttft"]

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


@attrs.frozen
class EngineView:
    """What the oracle knows about one engine for one prompt."""

    name: str
    backlog_s: float
    """Seconds until the engine's prefill lane is free for this request."""
    gpu_hit_tokens: int
    cpu_hit_tokens: int
    running: int = 0


@attrs.frozen
class CostRates:
    """The engines' prefill cost model at their speed (pixiu_kv.sim.costmodel)."""

    prefill_tokens_per_s: float
    gpu_hit_seconds_per_token: float
    load_tokens_per_s: float
    speed: float


def prefill_seconds(prompt_tokens: int, gpu_hit: int, cpu_hit: int, rates: CostRates) -> float:
    computed = max(0, prompt_tokens - gpu_hit - cpu_hit)
    seconds = (computed / rates.prefill_tokens_per_s + gpu_hit * rates.gpu_hit_seconds_per_token
               + cpu_hit / rates.load_tokens_per_s)
    return seconds / rates.speed


def predict_ttft(view: EngineView, prompt_tokens: int, rates: CostRates) -> float:
    return view.backlog_s + prefill_seconds(prompt_tokens, view.gpu_hit_tokens, view.cpu_hit_tokens, rates)


def choose(views: Sequence[EngineView], prompt_tokens: int, rates: CostRates) -> int:
    """Index of the engine with the lowest predicted TTFT (ties: fewer running, then order)."""
    if not views:
        raise ValueError("no engines to choose from")
    return min(range(len(views)),
               key=lambda i: (round(predict_ttft(views[i], prompt_tokens, rates), 9), views[i].running, i))


class _Pending:
    """Requests the oracle sent to one engine: their blocks and not-yet-admitted prefill."""

    __slots__ = ("blocks", "unadmitted_s")

    def __init__(self) -> None:
        self.blocks: Counter[int] = Counter()
        self.unadmitted_s = 0.0


class OracleRouter:
    """Reads in-process ``SimEngine`` objects (pixiu_kv.sim.engine) and picks one per prompt."""

    def __init__(self, engines: Sequence[Any]) -> None:
        if not engines:
            raise ValueError("the oracle needs at least one engine")
        self.engines = list(engines)
        config = self.engines[0].config
        self.rates = CostRates(config.prefill_tokens_per_s, config.gpu_hit_seconds_per_token,
                               config.load_tokens_per_s, config.speed)
        self._pending = [_Pending() for _ in self.engines]

    def prompt_ids(self, path: str, body: dict[str, Any]) -> list[int]:
        from pixiu_kv.sim.openai_api import parse_chat, parse_completion

        config = self.engines[0].config
        parse = parse_chat if path.endswith("chat/completions") else parse_completion
        return list(parse(body, config).prompt_ids)

    def views(self, prompt_ids: Sequence[int]) -> list[EngineView]:
        from pixiu_kv.sim.lmcache_link import chunk_keys
        from pixiu_kv.sim.prefix_cache import block_hashes

        now = trio.current_time()
        out: list[EngineView] = []
        for engine, pending in zip(self.engines, self._pending, strict=True):
            cfg = engine.config
            hashes = block_hashes(prompt_ids, cfg.block_size)
            cap = max(len(prompt_ids) - 1, 0) // cfg.block_size
            gpu_blocks = 0
            for h in hashes[:cap]:
                # Blocks of a request already sent here will be cached by the time ours runs.
                if h in engine.prefix_cache._refs or pending.blocks[h] > 0:
                    gpu_blocks += 1
                else:
                    break
            gpu_hit = gpu_blocks * cfg.block_size
            cpu_hit = 0
            tier = engine.cpu_tier
            if tier.enabled:
                chunks = 0
                for key in chunk_keys(prompt_ids, cfg.chunk_size):
                    if key not in tier:
                        break
                    chunks += 1
                tier_tokens = min(chunks * cfg.chunk_size, len(prompt_ids) - 1)
                cpu_hit = max(0, tier_tokens - gpu_hit)
            scheduler = engine.scheduler
            backlog = max(0.0, scheduler._prefill_free_at - now) + pending.unadmitted_s
            out.append(EngineView(cfg.instance_id, backlog, gpu_hit, cpu_hit, scheduler.running))
        return out

    def pick(self, prompt_ids: Sequence[int]) -> tuple[int, float]:
        """Chosen engine index and its predicted prefill seconds (reserved until admitted)."""
        views = self.views(prompt_ids)
        index = choose(views, len(prompt_ids), self.rates)
        view = views[index]
        return index, prefill_seconds(len(prompt_ids), view.gpu_hit_tokens, view.cpu_hit_tokens, self.rates)

    def dispatched(self, index: int, prompt_ids: Sequence[int], prefill_s: float) -> list[int]:
        from pixiu_kv.sim.prefix_cache import block_hashes

        blocks = block_hashes(prompt_ids, self.engines[index].config.block_size)
        pending = self._pending[index]
        pending.blocks.update(blocks)
        pending.unadmitted_s += prefill_s
        return blocks

    def admitted(self, index: int, prefill_s: float) -> None:
        pending = self._pending[index]
        pending.unadmitted_s = max(0.0, pending.unadmitted_s - prefill_s)

    def finished(self, index: int, blocks: Sequence[int]) -> None:
        pending = self._pending[index]
        pending.blocks.subtract(blocks)
        for h in set(blocks):
            if pending.blocks[h] <= 0:
                del pending.blocks[h]

    def stats(self) -> dict[str, dict[str, int]]:
        return {e.config.instance_id: {"requests": e.metrics.requests_finished,
                                       "prompt_tokens": e.metrics.prompt_tokens,
                                       "cached_tokens": e.metrics.prompt_tokens_cached}
                for e in self.engines}


_JSON = (b"content-type", b"application/json")


async def _respond(send: Send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [_JSON, (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _error(status: int, message: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": "BadRequestError" if status < 500
                                 else "ServiceUnavailableError", "param": None, "code": status}}).encode()


class OracleProxy:
    """Raw ASGI relay in front of the engines, choosing with :class:`OracleRouter`.

    Also serves ``GET /fleet/stats`` (per-engine request and token counters, read from the
    engines) so that targets without attribution headers can be measured.
    """

    MAX_BODY = 16 * 1024 * 1024

    def __init__(self, router: OracleRouter, urls: Sequence[str], client: httpx.AsyncClient) -> None:
        self.router = router
        self.urls = list(urls)
        self.client = client

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        path = scope["path"]
        if path == "/fleet/stats":
            await _respond(send, 200, json.dumps(self.router.stats()).encode())
            return
        if path == "/health":
            await _respond(send, 200, b"{}")
            return
        body = bytearray()
        while True:
            message = await receive()
            body += message.get("body", b"")
            if len(body) > self.MAX_BODY:
                await _respond(send, 413, _error(413, "body too large"))
                return
            if not message.get("more_body"):
                break
        if scope["method"] != "POST" or path not in ("/v1/completions", "/v1/chat/completions"):
            await self._relay(send, 0, scope["method"], path, bytes(body), None)
            return
        try:
            data = json.loads(body)
            prompt_ids = self.router.prompt_ids(path, data)
        except Exception as exc:  # the engine would reject it the same way: let it answer
            del exc
            await self._relay(send, 0, "POST", path, bytes(body), None)
            return
        index, prefill_s = self.router.pick(prompt_ids)
        blocks = self.router.dispatched(index, prompt_ids, prefill_s)
        try:
            await self._relay(send, index, "POST", path, bytes(body), prefill_s)
        finally:
            self.router.finished(index, blocks)

    async def _relay(self, send: Send, index: int, method: str, path: str, body: bytes,
                     prefill_s: float | None) -> None:
        admitted = prefill_s is None
        started = False
        try:
            async with self.client.stream(method, self.urls[index] + path, content=body,
                                          headers={"content-type": "application/json"}) as resp:
                if not admitted:
                    # The engine answers headers as it takes the request into its scheduler.
                    self.router.admitted(index, prefill_s or 0.0)
                    admitted = True
                headers = [(k.encode(), v.encode()) for k, v in resp.headers.items()
                           if k.lower() not in ("content-length", "transfer-encoding", "connection")]
                engine_id = self.router.engines[index].config.instance_id.encode()
                headers.append((b"x-pixiu-kv-endpoint", engine_id))
                headers.append((b"x-pixiu-kv-route", b"reason=oracle; used=yes; hinted=" + engine_id))
                await send({"type": "http.response.start", "status": resp.status_code, "headers": headers})
                started = True
                async for chunk in resp.aiter_raw():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except httpx.HTTPError as exc:
            if started:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            else:
                await _respond(send, 502, _error(502, f"engine unreachable: {type(exc).__name__}"))
        finally:
            if not admitted:
                self.router.admitted(index, prefill_s or 0.0)
