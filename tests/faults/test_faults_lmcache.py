"""Cache-side failures (LMCache controller, tokenizer) never reach the client.

Each test first teaches the gateway a prompt (tokens cached, KV stored on an engine), so
the routing lookup really runs, then breaks the cache side and checks that every request
still streams to completion, that the route header says why the hint was missing, and
that the lookup breaker opens so later requests stop paying for the broken controller.
"""

from __future__ import annotations

import pytest
from faults_support import Stack, chat, closed_port_url, open_stack, prompt, stream_chat, wait_until

from pixiu_kv.sim.controller import Faults


async def send_all(stack: Stack, text: str, count: int) -> list[str]:
    """Send ``count`` streamed requests one by one; all must succeed. Returns route reasons."""
    reasons = []
    for _ in range(count):
        result = await stream_chat(stack.client, chat(text))
        assert result.status == 200, result
        assert result.done and not result.errors, result.events[-3:]
        reasons.append(result.route["reason"])
        await wait_until(stack.idle)
    return reasons


def assert_breaker_opened(reasons: list[str], failure: str) -> None:
    """The first lookups fail with ``failure`` until the breaker (threshold 3) opens."""
    assert reasons[:3] == [failure] * 3, reasons
    assert set(reasons[3:]) == {"breaker_open"}, reasons


@pytest.mark.parametrize("faults, failure", [
    (Faults(latency=0.5), "timeout"),
    (Faults(error_rate=1.0), "error"),
    (Faults(garbage=True), "error"),
    (Faults(hang=True, hang_limit=30.0), "timeout"),
], ids=["slow", "500", "garbage", "hanging"])
async def test_lmcache_failures_only_cost_the_hint(stack: Stack, faults: Faults, failure: str) -> None:
    text = prompt("lmcache-" + failure)
    routed = await stack.warm(text)
    assert routed.route["used"] == "yes"
    stack.controller.faults = faults
    reasons = await send_all(stack, text, 6)
    assert_breaker_opened(reasons, failure)
    assert stack.kv.stats.breakers["lookup_routing"] == "open"
    stack.controller.faults = Faults()  # also releases held requests
    await wait_until(stack.idle)


async def test_lmcache_down_only_costs_the_hint() -> None:
    async with open_stack(lmcache_url=closed_port_url()) as stack:
        text = prompt("lmcache-down")
        # First sight: no tokens yet; the background tokenize fills the token cache and
        # its LMCache lookup fails quietly.
        first = await stream_chat(stack.client, chat(text))
        assert first.status == 200 and first.done
        assert first.route["reason"] == "no_tokens"
        await wait_until(stack.idle)
        reasons = await send_all(stack, text, 5)
        assert_breaker_opened(reasons, "error")
        assert stack.kv.stats.background_lookups_failed >= 1


@pytest.mark.parametrize("fault", [{"added_latency_s": 1.0}, {"dead": True}], ids=["slow", "down"])
async def test_tokenizer_failures_only_cost_the_hint(stack: Stack, fault: dict[str, object]) -> None:
    stack.tokenizer.set_faults(**fault)
    text = prompt("tokenizer")
    for _ in range(3):
        result = await stream_chat(stack.client, chat(text))
        assert result.status == 200 and result.done and not result.errors
        # Without tokens there is nothing to look up: the request is balanced normally.
        assert result.route["reason"] == "no_tokens"
        await wait_until(stack.idle)
    stats = stack.kv.stats
    assert stats.tokenize_failures >= 1
    assert stats.token_cache_size == 0
    stack.tokenizer.set_faults(added_latency_s=0.0, dead=False)
    # Once the tokenizer is back (its breaker may still be open for a while), requests
    # keep succeeding; nothing on the client side ever saw the outage.
    result = await stream_chat(stack.client, chat(text))
    assert result.status == 200 and result.done
