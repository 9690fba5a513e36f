"""The per-request hook between the kvcache filter and the proxy."""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import trio
import trio.testing

from pixiu_kv.context import BackgroundScope, RequestContext
from pixiu_kv.routing import Router, RoutingConfig, RoutingInput
from pixiu_kv.routing.hook import RoutingHook


@attrs.define
class _Endpoint:
    id: str
    in_flight: int = 0
    max_in_flight: int = 64
    weight: int = 1
    up: bool = True
    healthy: bool = True
    draining: bool = False

    def available(self, now: float) -> bool:
        return self.up


def _ctx(nursery: trio.Nursery, stream: bool) -> RequestContext:
    return RequestContext(request_id="r1", method="POST", path="/v1/completions", headers=[], body=b"",
                          json={"stream": stream}, cluster_name="main", background=BackgroundScope(nursery))


USAGE = b'data: {"choices":[],"usage":{"prompt_tokens":2000,"prompt_tokens_details":{"cached_tokens":0}}}\n\n'


async def test_a_stream_first_token_is_its_first_body_chunk_not_its_head(nursery: trio.Nursery) -> None:
    router = Router(RoutingConfig(hot_spread=False))
    ctx = _ctx(nursery, stream=True)
    hook = RoutingHook(router, RoutingInput(tokens=list(range(2000))), ctx)
    endpoints = [_Endpoint("e0"), _Endpoint("e1", up=False)]
    d = hook.choose(endpoints, trio.current_time())
    assert d.endpoint_id == "e0" and ctx.preferred_endpoint_id == "e0"
    assert ctx.route_hint is not None and ctx.route_hint.reason == "load"
    assert hook.choose(endpoints, trio.current_time()) is d  # one decision per request
    queued = {e.endpoint_id: e.queued_seconds for e in router.stats().endpoints}
    hook.first_byte("e0", trio.current_time())  # the head: no token yet
    assert {e.endpoint_id: e.queued_seconds for e in router.stats().endpoints} == queued
    hook.feed(b'data: {"choices":[{"text":"a"}]}\n\n')  # the first token
    assert all(e.queued_seconds == 0 for e in router.stats().endpoints)
    hook.feed(USAGE)
    hook.done("e0", trio.current_time())
    stats = router.stats()
    assert stats.pending == 0
    assert [e.samples for e in stats.endpoints if e.endpoint_id == "e0"] == [1]


async def test_a_request_ending_without_done_is_released_by_the_watcher(nursery: trio.Nursery) -> None:
    router = Router()
    hook = RoutingHook(router, RoutingInput(), _ctx(nursery, stream=False))
    async with trio.open_nursery() as request_scope:
        request_scope.start_soon(hook.watch)
        await trio.testing.wait_all_tasks_blocked()
        hook.choose([_Endpoint("e0")], trio.current_time())
        assert router.stats().pending == 1
        request_scope.cancel_scope.cancel()  # the client went away
    assert router.stats().pending == 0


async def test_done_ends_the_watcher(nursery: trio.Nursery) -> None:
    router = Router()
    hook = RoutingHook(router, RoutingInput(), _ctx(nursery, stream=False))
    async with trio.open_nursery() as request_scope:
        request_scope.start_soon(hook.watch)
        await trio.testing.wait_all_tasks_blocked()
        hook.choose([_Endpoint("e0")], trio.current_time())
        hook.done("e0", trio.current_time())
    # The nursery closed on its own: the watcher was cancelled by done().
    assert router.stats().pending == 0


async def test_a_decision_to_compress_calls_the_compressor_in_the_background(nursery: trio.Nursery) -> None:
    router = Router(RoutingConfig(hot_spread=False, session_affinity=False, compress_when_full=True,
                                  engine_cache_tokens=1000))
    prefix = list(range(5000, 5600))
    assert router.index is not None
    router.index.record("e0", list(range(9000, 11000)))  # 2000 tokens computed: e0 is full
    calls: list[tuple[list[int], str]] = []

    async def compressor(ids: Sequence[int], instance_id: str) -> None:
        calls.append((list(ids), instance_id))

    hook = RoutingHook(router, RoutingInput(tokens=[*prefix, 1, 2, 3], lookup={"e0": 600}),
                       _ctx(nursery, stream=False), compressor)
    async with trio.open_nursery() as request_scope:
        request_scope.start_soon(hook.watch)
        await trio.testing.wait_all_tasks_blocked()
        d = hook.choose([_Endpoint("e0"), _Endpoint("e1")], trio.current_time())
        assert (d.endpoint_id, d.compress_tokens) == ("e0", 512)
        await trio.testing.wait_all_tasks_blocked()
        hook.done("e0", trio.current_time())
    assert calls == [(prefix[:512], "e0")]
