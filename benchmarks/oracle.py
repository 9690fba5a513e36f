"""The oracle router: full knowledge of every simulated engine's cache and queue.

It runs in the fleet's process and reads the engines' state directly (GPU prefix cache,
LMCache CPU tier, the prefill lane's backlog), plus what it has itself dispatched but the
engine has not yet admitted or finished. For each request it predicts the time to first
token on every engine, ``queue + prefill(uncached tokens)`` with the engines' own cost
model, and sends the request to the minimum. It is the upper bound a real router (which
sees the cache only through LMCache lookups and its own counters) can approach.

The pure part (:func:`predict_ttft`, :func:`choose`) is separate from the state reading
(:class:`OracleRouter`) and from the ASGI front (:class:`OracleApp`) that hands each
request to the chosen engine's app in-process.
"""

from __future__ import annotations

import json
from collections import Counter, deque
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

import attrs
import trio

from pixiu_kv._asgi import BodyTooLarge, receive_body, serve_lifespan

__all__ = [
    "CostRates",
    "EngineView",
    "OracleApp",
    "OracleRouter",
    "Ticket",
    "choose",
    "predict_ttft",
    "prefill_seconds",
]

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


class _Entry:
    """One dispatched request's place in an engine's not-yet-admitted queue (compared by identity)."""

    __slots__ = ("seconds", "tokens")

    def __init__(self, tokens: int, seconds: float) -> None:
        self.tokens = tokens
        self.seconds = seconds


class _Pending:
    """What the oracle sent to one engine and the engine has not yet taken in."""

    __slots__ = ("admitted_seen", "blocks", "queue")

    def __init__(self) -> None:
        self.blocks: Counter[int] = Counter()
        """Blocks of requests in flight: cached by the time a later request prefills."""
        self.queue: deque[_Entry] = deque()
        """(prompt tokens, predicted prefill seconds) not yet admitted, in dispatch order."""
        self.admitted_seen = 0


@attrs.frozen
class Ticket:
    index: int
    blocks: tuple[int, ...]
    entry: _Entry


class OracleRouter:
    """Reads in-process ``SimEngine`` objects (pixiu_kv.sim.engine) and picks one per prompt.

    A request sent to an engine is "unadmitted" until the engine's scheduler plans it; the
    engine's own counter of planned prompt tokens (``metrics.prefix_queries``) tells how
    many of the oracle's dispatched requests it has taken in (it admits in arrival order).
    Their predicted prefill time counts in the engine's backlog until then.
    """

    def __init__(self, engines: Sequence[Any]) -> None:
        if not engines:
            raise ValueError("the oracle needs at least one engine")
        self.engines = list(engines)
        config = self.engines[0].config
        self.rates = CostRates(config.prefill_tokens_per_s, config.gpu_hit_seconds_per_token,
                               config.load_tokens_per_s, config.speed)
        self._pending = [_Pending() for _ in self.engines]

    def _unadmitted_s(self, index: int) -> float:
        pending = self._pending[index]
        planned = self.engines[index].metrics.prefix_queries
        newly = planned - pending.admitted_seen
        pending.admitted_seen = planned
        while pending.queue and newly >= pending.queue[0].tokens:
            newly -= pending.queue.popleft().tokens
        return sum(entry.seconds for entry in pending.queue)

    def views(self, tokens: Sequence[int]) -> list[EngineView]:
        from pixiu_kv.sim.lmcache_link import chunk_keys
        from pixiu_kv.sim.prefix_cache import block_hashes

        now = trio.current_time()
        out: list[EngineView] = []
        keys: list[int] | None = None
        hashes: list[int] | None = None
        for index, (engine, pending) in enumerate(zip(self.engines, self._pending, strict=True)):
            cfg = engine.config
            if hashes is None:
                hashes = block_hashes(tokens, cfg.block_size)
            cap = max(len(tokens) - 1, 0) // cfg.block_size
            gpu_blocks = 0
            refs = engine.prefix_cache._refs
            for h in hashes[:cap]:
                # Blocks of a request already sent here will be cached by the time ours runs.
                if h in refs or pending.blocks[h] > 0:
                    gpu_blocks += 1
                else:
                    break
            gpu_hit = gpu_blocks * cfg.block_size
            cpu_hit = 0
            tier = engine.cpu_tier
            if tier.enabled:
                if keys is None:
                    keys = chunk_keys(tokens, cfg.chunk_size)
                tier_tokens = min(tier.held_prefix(keys) * cfg.chunk_size, len(tokens) - 1)
                cpu_hit = max(0, tier_tokens - gpu_hit)
            scheduler = engine.scheduler
            backlog = max(0.0, scheduler._prefill_free_at - now) + self._unadmitted_s(index)
            out.append(EngineView(cfg.instance_id, backlog, gpu_hit, cpu_hit, scheduler.running))
        return out

    def pick(self, tokens: Sequence[int]) -> Ticket:
        """Choose an engine for ``tokens`` and reserve it until :meth:`done`."""
        from pixiu_kv.sim.prefix_cache import block_hashes

        views = self.views(tokens)
        index = choose(views, len(tokens), self.rates)
        view = views[index]
        seconds = prefill_seconds(len(tokens), view.gpu_hit_tokens, view.cpu_hit_tokens, self.rates)
        pending = self._pending[index]
        entry = _Entry(len(tokens), seconds)
        pending.queue.append(entry)
        blocks = tuple(block_hashes(tokens, self.engines[index].config.block_size))
        pending.blocks.update(blocks)
        return Ticket(index, blocks, entry)

    def done(self, ticket: Ticket) -> None:
        """The request's prompt is in the engine's cache (first token) or it failed."""
        pending = self._pending[ticket.index]
        # Account for what the engine admitted so far; a request still queued here when it
        # ends was refused before planning (e.g. the engine's queue was full): drop it, or
        # its prefill would count in the backlog forever.
        self._unadmitted_s(ticket.index)
        if ticket.entry in pending.queue:
            pending.queue.remove(ticket.entry)
        pending.blocks.subtract(ticket.blocks)
        for h in set(ticket.blocks):
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


class OracleApp:
    """Raw ASGI front of the fleet that dispatches in-process to the chosen engine.

    The request is parsed and tokenized as the engine will (the sim tokenizer memoizes, so
    the engine's own pass is cheap), the oracle picks the engine, and the engine's ASGI app
    is called with this connection's ``send``: no relay hop, no second HTTP request, and the
    reply carries ``x-pixiu-kv-endpoint`` / ``x-pixiu-kv-route`` like a gateway's.
    ``GET /fleet/stats`` gives per-engine request and token counters (for targets that send
    no endpoint header).
    """

    MAX_BODY = 16 * 1024 * 1024

    def __init__(self, router: OracleRouter) -> None:
        self.router = router

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await serve_lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path = scope["path"]
        if path == "/fleet/stats":
            await _respond(send, 200, json.dumps(self.router.stats()).encode())
            return
        if path == "/health":
            await _respond(send, 200, b"")
            return
        try:
            body = await receive_body(receive, self.MAX_BODY)
        except BodyTooLarge as exc:
            await _respond(send, 413, _error(413, str(exc)))
            return
        if body is None:
            return  # the client left
        ticket: Ticket | None = None
        index = 0
        if scope["method"] == "POST" and path in ("/v1/completions", "/v1/chat/completions"):
            tokens = self._tokens(path, body)
            if tokens:
                ticket = self.router.pick(tokens)
                index = ticket.index
        engine = self.router.engines[index]
        engine_id = engine.config.instance_id.encode()
        replayed = False

        async def replay() -> MutableMapping[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        async def tagged(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.append((b"x-pixiu-kv-endpoint", engine_id))
                if ticket is not None:
                    verdict = b"reason=oracle; hinted=" + engine_id + b"; used=yes"
                    headers.append((b"x-pixiu-kv-route", verdict))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await engine(scope, replay, tagged)
        finally:
            if ticket is not None:
                self.router.done(ticket)

    def _tokens(self, path: str, body: bytes) -> list[int]:
        from pixiu_kv.sim.openai_api import parse_chat, parse_completion

        try:
            data = json.loads(body)
            parse = parse_chat if path.endswith("chat/completions") else parse_completion
            return list(parse(data, self.router.engines[0].config).prompt_ids)
        except Exception:  # the engine will reject it the same way and answer the client
            return []


def _error(status: int, message: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": "BadRequestError" if status < 500
                                 else "ServiceUnavailableError", "param": None, "code": status}}).encode()
