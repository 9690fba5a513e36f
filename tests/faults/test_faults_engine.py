"""Engine failures: before the first byte they are retried or failed over; after it, the
client gets a clean end of stream with an error event; a hang ends in a 504."""

from __future__ import annotations

from faults_support import Stack, chat, closed_port_url, open_stack, prompt, stream_chat, wait_until

from pixiu_kv.sim.fleet import Fleet


async def test_preferred_engine_down_fails_over_and_says_so(stack: Stack) -> None:
    text = prompt("engine-down")
    routed = await stack.warm(text)
    preferred = routed.route["hinted"]
    index = int(preferred.rsplit("-", 1)[1])
    stack.engine(index).set_faults(dead=True)
    for _ in range(3):
        result = await stream_chat(stack.client, chat(text))
        assert result.status == 200 and result.done and not result.errors
        assert result.headers["x-pixiu-kv-endpoint"] != preferred
        assert result.route["hinted"] in (preferred, "-")
        assert result.route["used"] == "no"
    # The health checker takes the dead engine out; its revival brings it back.
    await wait_until(lambda: not stack.cluster.endpoint(preferred).healthy)  # type: ignore[union-attr]
    stack.engine(index).set_faults(dead=False)
    await wait_until(lambda: stack.cluster.endpoint(preferred).healthy)  # type: ignore[union-attr]


def with_refusing_endpoint(fleet: Fleet) -> list[tuple[str, str]]:
    return [("refusing", closed_port_url()), (fleet.engines[0].instance_id, fleet.engines[0].url)]


async def test_refused_connections_fail_over() -> None:
    async with open_stack(1, endpoints=with_refusing_endpoint) as stack:
        for i in range(4):
            result = await stream_chat(stack.client, chat(prompt(f"refused-{i}")))
            assert result.status == 200 and result.done
            assert result.headers["x-pixiu-kv-endpoint"] == "engine-0"


async def test_engine_5xx_before_first_byte(stack: Stack) -> None:
    stack.engine(0).set_faults(error_rate=1.0)
    served = set()
    for i in range(6):
        result = await stream_chat(stack.client, chat(prompt(f"5xx-{i}")))
        endpoint = result.headers["x-pixiu-kv-endpoint"]
        served.add(endpoint)
        if endpoint == "engine-0":
            # A 500 is the engine's answer to this request, passed on in its OpenAI shape
            # (it is not one of the retryable 429/502/503/504).
            assert result.status == 500
        else:
            assert result.status == 200 and result.done
    assert "engine-1" in served
    # Both engines overloaded (503): retried, failed over, then the last answer is passed on.
    stack.engine(0).set_faults(error_rate=0.0, dead=True)
    stack.engine(1).set_faults(dead=True)
    response = await stack.client.post("/v1/chat/completions", json=chat("x", stream=False))
    assert response.status_code == 503
    assert set(response.json()["error"]) >= {"message", "type", "code"}
    stack.engine(0).set_faults(dead=False)
    stack.engine(1).set_faults(dead=False)
    await wait_until(stack.idle)


async def test_engine_dies_after_the_first_byte(stack: Stack) -> None:
    for index in (0, 1):
        stack.engine(index).set_faults(drop_after_chunks=2)
    result = await stream_chat(stack.client, chat(prompt("cut"), max_tokens=50))
    assert result.status == 200
    # The stream ends cleanly for an SSE client: an error event, then [DONE].
    assert result.done
    assert result.errors and result.errors[-1]["code"] == "upstream_stream_cut"
    for index in (0, 1):
        stack.engine(index).set_faults(drop_after_chunks=None)
    await wait_until(stack.idle)
    again = await stream_chat(stack.client, chat(prompt("cut")))
    assert again.status == 200 and again.done and not again.errors


async def test_hanging_engine_gives_504_and_releases_everything() -> None:
    async with open_stack(proxy={"first_byte_timeout": '"300ms"'}) as stack:
        for index in (0, 1):
            stack.engine(index).set_faults(hang=True)
        response = await stack.client.post("/v1/chat/completions", json=chat("hang", stream=False))
        assert response.status_code == 504
        assert response.json()["error"]["code"] == "upstream_timeout"
        # The gateway hung up on the engine: nothing stays in flight on either side.
        await wait_until(stack.idle)
        for index in (0, 1):
            stack.engine(index).set_faults(hang=False)
        ok = await stream_chat(stack.client, chat("after the hang"))
        assert ok.status == 200 and ok.done


async def test_slow_stream_completes_within_the_idle_timeout(stack: Stack) -> None:
    for index in (0, 1):
        stack.engine(index).set_faults(slow_stream_s=0.02)
    result = await stream_chat(stack.client, chat(prompt("slow"), max_tokens=10))
    assert result.status == 200 and result.done and not result.errors
    usage = [e for e in result.events if '"usage"' in e and '"completion_tokens":10' in e]
    assert usage, result.events[-2:]


async def test_stream_idle_beyond_the_idle_timeout_is_cut_cleanly() -> None:
    async with open_stack(proxy={"idle_timeout": '"100ms"'}) as stack:
        for index in (0, 1):
            stack.engine(index).set_faults(slow_stream_s=1.0)
        result = await stream_chat(stack.client, chat(prompt("idle"), max_tokens=3))
        assert result.status == 200
        assert result.done
        assert result.errors[-1]["code"] == "upstream_stream_cut"
        assert "idle" in result.errors[-1]["message"]
        await wait_until(stack.idle)
