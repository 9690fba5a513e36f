"""A simulated vLLM OpenAI server with an LMCache CPU tier, as a lean raw ASGI app.

No framework: one engine process serves hundreds of concurrent streams. The wire
format lives in :mod:`openai_api`, the timing in :mod:`scheduler`; this module is I/O.
A client that goes away cancels its request (and frees its KV blocks), like vLLM's
abort on disconnect.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import trio

from .._asgi import BodyTooLarge, receive_body, serve_lifespan
from ._http_server import CANCEL_ON_DISCONNECT, SEND_NOWAIT, SendNowait
from .costmodel import PrefillPlan
from .cpu_tier import CpuTier
from .engine_config import EngineConfig
from .faults import FaultInjector, faults_to_json
from .lmcache_link import LOCATION, ChunkSink, WorkerControl
from .metrics import EngineMetrics
from .openai_api import (
    ApiError,
    GenerationRequest,
    StreamRenderer,
    error_json,
    parse_chat,
    parse_completion,
    parse_json,
    parse_tokenize,
    render_final,
)
from .prefix_cache import PrefixCache
from .scheduler import EngineOverloaded, Scheduler
from .tokenizer import detokenize

__all__ = ["SimEngine"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
_Handler = Callable[[Scope, Receive, Send, bytes], Awaitable[None]]

_JSON = (b"content-type", b"application/json")
_SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]
_PROMETHEUS = (b"content-type", b"text/plain; version=0.0.4; charset=utf-8")
_DONE = b"data: [DONE]\n\n"
_dumps = json.JSONEncoder(separators=(",", ":")).encode
VLLM_VERSION = "0.33.0"


class _StreamCut(Exception):
    """The drop fault fired: end the ASGI call without finishing the body."""


async def _respond(send: Send, status: int, body: bytes = b"",
                   content_type: tuple[bytes, bytes] | None = _JSON,
                   extra: list[tuple[bytes, bytes]] | None = None) -> None:
    headers = [(b"content-length", str(len(body)).encode())]
    if content_type is not None and body:
        headers.append(content_type)
    if extra:
        headers.extend(extra)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _send_nowait(scope: Scope) -> SendNowait | None:
    extensions = scope.get("extensions")
    send_nowait: SendNowait | None = extensions.get(SEND_NOWAIT) if extensions else None
    return send_nowait


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None


class SimEngine:
    """One simulated engine. Call it as an ASGI app; read its state directly in tests."""

    def __init__(self, config: EngineConfig, *, chunk_sink: ChunkSink | None = None) -> None:
        self.config = config
        self.metrics = EngineMetrics()
        self.prefix_cache = PrefixCache(config.gpu_kv_tokens, config.block_size)
        self.cpu_tier = CpuTier(config.cpu_tier_tokens, chunk_sink, chunk_size=config.chunk_size,
                                compression_ratio=config.compression_ratio)
        self.scheduler = Scheduler(config, self.prefix_cache, self.cpu_tier, self.metrics)
        self.faults = FaultInjector(config.faults, config.instance_id)
        self.cpu_tier.error_code = 1 if config.faults.dead else 0
        self._inflight = 0
        self._generating = 0
        self._created = int(time.time())
        self._routes: dict[str, dict[str, _Handler]] = {
            "/v1/completions": {"POST": self._completions},
            "/v1/chat/completions": {"POST": self._chat},
            "/tokenize": {"POST": self._tokenize},
            "/detokenize": {"POST": self._detokenize},
            "/v1/models": {"GET": self._models},
            "/health": {"GET": self._health},
            "/load": {"GET": self._load},
            "/get_load": {"GET": self._get_load},
            "/metrics": {"GET": self._metrics},
            "/reset_prefix_cache": {"POST": self._reset_prefix_cache},
            "/server_info": {"GET": self._server_info},
            "/get_server_info": {"GET": self._server_info},
            "/model_info": {"GET": self._model_info},
            "/get_model_info": {"GET": self._model_info},
            "/version": {"GET": self._version},
            "/sim/faults": {"GET": self._get_faults, "POST": self._set_faults},
            "/sim/state": {"GET": self._state},
            "/sim/reset_caches": {"POST": self._reset_caches},
        }

    @property
    def instance_id(self) -> str:
        return self.config.instance_id

    @property
    def in_flight(self) -> int:
        """HTTP requests being handled (any route)."""
        return self._inflight

    @property
    def worker_control(self) -> WorkerControl:
        """What a controller drives: this engine's LMCache CPU tier."""
        return self.cpu_tier

    def attach_chunk_sink(self, sink: ChunkSink) -> None:
        """Report CPU-tier admissions and evictions to ``sink`` (it learns current chunks first)."""
        self.cpu_tier.attach_sink(sink)

    def set_faults(self, **changes: Any) -> None:
        """Change fault knobs at runtime (same fields as ``POST /sim/faults``)."""
        self.faults.update(changes)
        self.cpu_tier.error_code = 1 if self.faults.config.dead else 0

    # -- ASGI ----------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await serve_lifespan(receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        methods = self._routes.get(scope["path"])
        if methods is None:
            await _respond(send, 404, b'{"detail":"Not Found"}')
            return
        handler = methods.get(scope["method"])
        if handler is None:
            allow = ", ".join(methods).encode()
            await _respond(send, 405, b'{"detail":"Method Not Allowed"}', extra=[(b"allow", allow)])
            return
        if self._inflight >= self.config.max_concurrent_requests:
            await _respond(send, 503, error_json("The server is at its request limit",
                                                 "ServiceUnavailableError", 503))
            return
        if self.faults.config.dead and not scope["path"].startswith("/sim/"):
            body = b"" if scope["path"] == "/health" else error_json(
                "The engine is dead", "ServiceUnavailableError", 503)
            await _respond(send, 503, body)
            return
        self._inflight += 1
        try:
            request_body = await self._read_body(receive)
            if request_body is None:
                return
            await handler(scope, receive, send, request_body)
        except ApiError as error:
            await _respond(send, error.status, error.body())
        finally:
            self._inflight -= 1

    async def _read_body(self, receive: Receive) -> bytes | None:
        limit = self.config.max_body_bytes
        try:
            return await receive_body(receive, limit)
        except BodyTooLarge:
            raise ApiError(413, f"Request body larger than {limit} bytes", "BadRequestError") from None

    async def _watched(self, scope: Scope, receive: Receive, work: Callable[[], Awaitable[None]]) -> None:
        """Run ``work``; a client disconnect before it finishes cancels it: by the server
        itself where it offers that (no task per request), else by a task waiting on
        ``receive`` for ``http.disconnect``."""
        extensions = scope.get("extensions")
        cancel_on_disconnect = extensions.get(CANCEL_ON_DISCONNECT) if extensions else None
        if cancel_on_disconnect is not None:
            cancel_on_disconnect()
            await work()
            return
        finished = False
        async with trio.open_nursery() as nursery:
            async def watch() -> None:
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        if not finished:
                            nursery.cancel_scope.cancel()
                        return

            nursery.start_soon(watch)
            try:
                await work()
            finally:
                finished = True
                nursery.cancel_scope.cancel()

    async def _apply_faults(self, send: Send) -> bool:
        """Latency, hang and error faults; True when the request was answered with an error."""
        faults = self.faults.config
        if faults.added_latency_s:
            await trio.sleep(faults.added_latency_s)
        if faults.hang:
            await trio.sleep_forever()
        if self.faults.should_fail():
            await _respond(send, 500, error_json("Simulated engine failure", "InternalServerError", 500))
            return True
        return False

    # -- generation ---------------------------------------------------------------------

    async def _completions(self, scope: Scope, receive: Receive, send: Send, body: bytes) -> None:
        req = parse_completion(parse_json(_header(scope, b"content-type"), body), self.config)
        await self._watched(scope, receive, lambda: self._serve(req, send, "cmpl-", _send_nowait(scope)))

    async def _chat(self, scope: Scope, receive: Receive, send: Send, body: bytes) -> None:
        req = parse_chat(parse_json(_header(scope, b"content-type"), body), self.config)
        await self._watched(scope, receive, lambda: self._serve(req, send, "chatcmpl-", _send_nowait(scope)))

    async def _serve(self, req: GenerationRequest, send: Send, id_prefix: str,
                     send_nowait: SendNowait | None) -> None:
        if await self._apply_faults(send):
            return
        scheduler = self.scheduler
        if scheduler.waiting >= self.config.max_waiting and (
            scheduler.waiting or scheduler.running >= self.config.max_num_seqs
        ):
            await _respond(send, 503, error_json("The engine's waiting queue is full",
                                                 "ServiceUnavailableError", 503))
            return
        request_id = id_prefix + os.urandom(16).hex()
        created = int(time.time())
        self._generating += 1
        try:
            if req.stream:
                await self._serve_stream(req, send, request_id, created, send_nowait)
            else:
                await self._serve_unary(req, send, request_id, created)
        finally:
            self._generating -= 1

    async def _serve_unary(self, req: GenerationRequest, send: Send, request_id: str, created: int) -> None:
        try:
            gen = await self.scheduler.generate(
                req.prompt_ids, req.max_tokens, n=req.n, seed=req.seed,
                extra_token_delay=self.faults.config.slow_stream_s,
            )
        except EngineOverloaded:
            await _respond(send, 503, error_json("The engine's waiting queue is full",
                                                 "ServiceUnavailableError", 503))
            return
        body = render_final(req, gen, request_id, created)
        if self.faults.config.drop_after_chunks is not None:
            headers = [(b"content-length", str(len(body)).encode()), _JSON]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": body[: len(body) // 2], "more_body": True})
            return  # the server closes the connection mid-body
        await _respond(send, 200, body)

    async def _serve_stream(self, req: GenerationRequest, send: Send, request_id: str, created: int,
                            send_nowait: SendNowait | None) -> None:
        """Stream events, one body write per decode step; the last step, the usage chunk,
        ``[DONE]`` and the end of the body go out in one write. With the server's
        ``send_nowait`` the decode steps after the first are written by the batch's step
        timer (no task switch per token); this task runs again only for the end of the
        stream, or to flush a write the socket did not take."""
        renderer = StreamRenderer(req, request_id, created)
        drop_after = self.faults.config.drop_after_chunks
        pending: list[bytes] = []
        sent = 0

        async def flush(more_body: bool) -> None:
            nonlocal sent
            if drop_after is not None and sent + len(pending) > drop_after:
                allowed = pending[: drop_after - sent]
                if allowed:
                    await send({"type": "http.response.body", "body": b"".join(allowed), "more_body": True})
                raise _StreamCut
            body = b"".join(pending)
            sent += len(pending)
            pending.clear()
            await send({"type": "http.response.body", "body": body, "more_body": more_body})

        interval = self.config.stream_interval
        unsent: list[list[int]] = [[] for _ in range(req.n)]

        def render(step: int, ids: list[int], plan: PrefillPlan) -> bool:
            """Add the step's events to ``pending``; True when they should be written now."""
            if step == 0:
                pending.extend(renderer.role_events())
            for held, token in zip(unsent, ids, strict=True):
                held.append(token)
            last = step == req.max_tokens - 1
            # vLLM's --stream-interval: the first token at once, then every ``interval`` tokens.
            if step == 0 or last or len(unsent[0]) >= interval:
                pending.extend(renderer.token_events(unsent, last, plan.cached_tokens))
                for held in unsent:
                    held.clear()
            return bool(pending) and not last

        async def on_step(step: int, ids: list[int], plan: PrefillPlan) -> None:
            if step < 0 or render(step, ids, plan):  # step -1: flush what deliver left
                await flush(True)

        one_token = renderer.one_token if renderer.one_token_ok and interval == 1 else None
        last_step = req.max_tokens - 1

        def deliver(step: int, ids: list[int], plan: PrefillPlan) -> bool:
            assert send_nowait is not None
            if one_token is not None and step != last_step:  # the common event, pre-rendered
                return send_nowait(one_token(ids[0]))
            if not render(step, ids, plan):
                return True
            body = b"".join(pending)
            pending.clear()
            return send_nowait(body)

        await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
        try:
            try:
                gen = await self.scheduler.generate(
                    req.prompt_ids, req.max_tokens, n=req.n, seed=req.seed, on_step=on_step,
                    deliver=deliver if send_nowait is not None and drop_after is None else None,
                    extra_token_delay=self.faults.config.slow_stream_s,
                )
            except EngineOverloaded:
                pending.append(b"data: " + error_json("The engine's waiting queue is full",
                                                      "ServiceUnavailableError", 503) + b"\n\n")
            else:
                if req.include_usage:
                    pending.append(renderer.usage_event(gen.plan.cached_tokens))
            pending.append(_DONE)
            await flush(False)
        except _StreamCut:
            return  # no final body message: hypercorn closes the connection mid-stream

    # -- other vLLM routes ------------------------------------------------------------------

    async def _tokenize(self, scope: Scope, receive: Receive, send: Send, body: bytes) -> None:
        data = parse_json(_header(scope, b"content-type"), body)
        ids = parse_tokenize(data, self.config)
        token_strs = [detokenize((t,)) for t in ids] if data.get("return_token_strs") is True else None

        async def work() -> None:
            if await self._apply_faults(send):
                return
            reply = {"count": len(ids), "max_model_len": self.config.max_model_len,
                     "tokens": ids, "token_strs": token_strs}
            await _respond(send, 200, _dumps(reply).encode())

        await self._watched(scope, receive, work)

    async def _detokenize(self, scope: Scope, receive: Receive, send: Send, body: bytes) -> None:
        data = parse_json(_header(scope, b"content-type"), body)
        tokens = data.get("tokens")
        if not isinstance(tokens, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in tokens
        ):
            raise ApiError(400, "'tokens' must be a list of integers", param="tokens")
        await _respond(send, 200, _dumps({"prompt": detokenize(tokens)}).encode())

    async def _models(self, scope: Scope, receive: Receive, send: Send, body: bytes) -> None:
        c = self.config
        card = {"id": c.model, "object": "model", "created": self._created, "owned_by": "vllm",
                "root": c.model, "parent": None, "max_model_len": c.max_model_len, "permission": []}
        await _respond(send, 200, _dumps({"object": "list", "data": [card]}).encode())

    async def _health(self, scope: Scope, receive: Receive, send: Send, body: bytes) -> None:
        await _respond(send, 200)

    async def _load(self, scope: Scope, receive: Receive, send: Send, body: bytes) -> None:
        await _respond(send, 200, _dumps({"server_load": self._generating}).encode())

    async def _get_load(self, scope: Scope, receive: Receive, send: Send, body: bytes) -> None:
        s = self.scheduler
        reply = {"load": s.running + s.waiting, "num_reqs": s.running, "num_waiting_reqs": s.waiting,
                 "num_tokens": self.prefix_cache.used_blocks * self.config.block_size}
        await _respond(send, 200, _dumps(reply).encode())

    async def _metrics(self, scope: Scope, receive: Receive, send: Send, body: bytes) -> None:
        text = self.metrics.render(
            model=self.config.model, engine=self.config.engine_index, running=self.scheduler.running,
            waiting=self.scheduler.waiting, kv_usage=self.prefix_cache.usage(),
        )
        await _respond(send, 200, text.encode(), _PROMETHEUS)

    async def _reset_prefix_cache(self, scope: Scope, receive: Receive, send: Send, body: bytes) -> None:
        self.prefix_cache.reset()
        await _respond(send, 200)

    async def _server_info(self, scope: Scope, receive: Receive, send: Send, body: bytes) -> None:
        c = self.config
        info = {"version": VLLM_VERSION, "served_model_name": c.model, "max_model_len": c.max_model_len,
                "max_num_seqs": c.max_num_seqs, "block_size": c.block_size,
                "num_gpu_blocks": self.prefix_cache.num_blocks, "enable_prefix_caching": True,
                "kv_connector": "LMCacheConnectorV1" if self.cpu_tier.enabled else None,
                "lmcache_instance_id": c.instance_id, "simulated": True}
        await _respond(send, 200, _dumps(info).encode())

    async def _model_info(self, scope: Scope, receive: Receive, send: Send, body: bytes) -> None:
        # No model or tokenizer path: a router must not try to download a tokenizer.
        info = {"model_name": self.config.model, "is_generation": True,
                "max_model_len": self.config.max_model_len}
        await _respond(send, 200, _dumps(info).encode())

    async def _version(self, scope: Scope, receive: Receive, send: Send, body: bytes) -> None:
        await _respond(send, 200, _dumps({"version": VLLM_VERSION}).encode())

    async def _get_faults(self, scope: Scope, receive: Receive, send: Send, body: bytes) -> None:
        await _respond(send, 200, _dumps(faults_to_json(self.faults.config)).encode())

    async def _set_faults(self, scope: Scope, receive: Receive, send: Send, body: bytes) -> None:
        data = parse_json(_header(scope, b"content-type"), body)
        try:
            self.set_faults(**data)
        except (ValueError, TypeError) as error:
            raise ApiError(400, str(error)) from None
        await _respond(send, 200, _dumps(faults_to_json(self.faults.config)).encode())

    async def _reset_caches(self, scope: Scope, receive: Receive, send: Send, body: bytes) -> None:
        """Empty both cache tiers between benchmark runs (the controller is told of the
        CPU tier's evictions). 409 while requests run: their blocks cannot be dropped."""
        if not self.prefix_cache.reset():
            raise ApiError(409, "Requests are running; the GPU prefix cache cannot be reset",
                           "ConflictError")
        dropped = self.cpu_tier.clear(LOCATION)
        await _respond(send, 200, _dumps({"cpu_tier_tokens_dropped": dropped}).encode())

    async def _state(self, scope: Scope, receive: Receive, send: Send, body: bytes) -> None:
        pc, tier = self.prefix_cache, self.cpu_tier
        state = {
            "instance_id": self.config.instance_id, "running": self.scheduler.running,
            "waiting": self.scheduler.waiting, "gpu_blocks_total": pc.num_blocks,
            "gpu_blocks_used": pc.used_blocks, "gpu_blocks_cached": pc.cached_blocks,
            "gpu_blocks_evicted": pc.evicted_blocks, "cpu_tier_chunks": len(tier),
            "cpu_tier_used_tokens": tier.used_tokens, "cpu_tier_capacity_tokens": tier.capacity_tokens,
        }
        await _respond(send, 200, _dumps(state).encode())
