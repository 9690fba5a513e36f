"""The engine core on simulated time (autojump clock): TTFT and cache hits, no HTTP."""

from __future__ import annotations

import itertools

import pytest
import trio
import trio.testing
from sim_helpers import RecordingSink

from pixiu_kv.sim import EngineConfig, EngineOverloaded, SimEngine
from pixiu_kv.sim.costmodel import PrefillPlan
from pixiu_kv.sim.lmcache_link import LOCATION, chunk_keys
from pixiu_kv.sim.prefix_cache import block_hashes
from pixiu_kv.sim.scheduler import StepCallback
from pixiu_kv.sim.tokenizer import tokenize_prompt


def _prompt(chunks_of_256: float, salt: int = 0) -> list[int]:
    return [400 + salt * 65537 + i for i in range(int(chunks_of_256 * 256))]


def _engine(sink: RecordingSink | None = None, **changes: object) -> SimEngine:
    fields: dict[str, object] = {"gpu_kv_tokens": 4096, "cpu_tier_tokens": 16384, "max_model_len": 4096}
    fields.update(changes)
    return SimEngine(EngineConfig(**fields), chunk_sink=sink)  # type: ignore[arg-type]


async def test_repeated_prompt_is_faster_and_reports_cached_tokens(
    autojump_clock: trio.testing.MockClock,
) -> None:
    engine = _engine()
    prompt = _prompt(8)  # 2048 tokens
    cold = await engine.scheduler.generate(prompt, 4)
    warm = await engine.scheduler.generate(prompt, 4)
    assert cold.plan.cached_tokens == 0
    assert warm.plan.gpu_hit_tokens == 2048 - 16  # whole blocks, last token recomputed
    # LMCache holds all 8 chunks and serves up to the last token: 15 tokens beyond the GPU hit.
    assert warm.plan.cpu_hit_tokens == 15
    assert warm.plan.cached_tokens == 2047
    assert warm.ttft_s < cold.ttft_s / 5
    # TTFT is measured on trio's clock: ~2048 tokens at 10k tok/s.
    assert cold.ttft_s == pytest.approx(2048 / 10_000, rel=0.01)
    assert cold.outputs == warm.outputs  # deterministic for the same prompt and seed
    other_seed = await engine.scheduler.generate(prompt, 4, seed=7)
    assert other_seed.outputs != cold.outputs


async def test_without_lmcache_hits_are_gpu_blocks_only(autojump_clock: trio.testing.MockClock) -> None:
    engine = _engine(cpu_tier_tokens=0)
    prompt = _prompt(8)
    await engine.scheduler.generate(prompt, 4)
    warm = await engine.scheduler.generate(prompt, 4)
    assert warm.plan.cached_tokens == warm.plan.gpu_hit_tokens == 2032
    assert engine.metrics.external_queries == 0


async def test_cpu_tier_serves_a_prompt_after_gpu_eviction(autojump_clock: trio.testing.MockClock) -> None:
    sink = RecordingSink()
    engine = _engine(sink, gpu_kv_tokens=2048, max_model_len=2048)
    target = _prompt(6, salt=1)  # 1536 tokens
    cold = await engine.scheduler.generate(target, 2)
    assert sink.admitted == chunk_keys(target)
    # Push the prompt out of the (small) GPU cache with other prompts.
    await engine.scheduler.generate(_prompt(6, salt=2), 2)
    await engine.scheduler.generate(_prompt(6, salt=3), 2)
    assert engine.prefix_cache.match(block_hashes(target, 16), len(target)) == 0
    again = await engine.scheduler.generate(target, 2)
    assert again.plan.gpu_hit_tokens == 0
    assert again.plan.cpu_hit_tokens == 1535  # all 6 chunks but the last token
    assert again.plan.cached_tokens == 1535
    assert again.ttft_s < cold.ttft_s / 3
    assert engine.metrics.external_hits == 1535


async def test_compressed_chunks_load_slower(autojump_clock: trio.testing.MockClock) -> None:
    engine = _engine(gpu_kv_tokens=2048, max_model_len=2048)
    target = _prompt(6, salt=1)
    await engine.scheduler.generate(target, 2)
    engine.prefix_cache.reset()
    plain = await engine.scheduler.generate(target, 2)
    engine.prefix_cache.reset()
    assert engine.worker_control.compress(target, "cachegen", LOCATION) == 1536
    packed = await engine.scheduler.generate(target, 2)
    assert packed.plan.cpu_hit_tokens == plain.plan.cpu_hit_tokens > 0
    assert packed.ttft_s > plain.ttft_s


async def test_pin_keeps_a_prompt_in_the_cpu_tier(autojump_clock: trio.testing.MockClock) -> None:
    engine = _engine(gpu_kv_tokens=2048, max_model_len=2048, cpu_tier_tokens=2048)
    hot = _prompt(4, salt=1)
    await engine.scheduler.generate(hot, 2)
    assert engine.worker_control.pin(hot, LOCATION) == 1024
    for salt in range(2, 6):
        await engine.scheduler.generate(_prompt(4, salt=salt), 2)
    engine.prefix_cache.reset()
    again = await engine.scheduler.generate(hot, 2)
    assert again.plan.cpu_hit_tokens == 1023


async def test_queued_requests_wait_for_a_batch_slot(autojump_clock: trio.testing.MockClock) -> None:
    engine = _engine(max_num_seqs=2, max_waiting=1)
    results: dict[int, float] = {}

    async def one(i: int) -> None:
        gen = await engine.scheduler.generate(_prompt(1, salt=i), 50)
        results[i] = gen.ttft_s

    async with trio.open_nursery() as nursery:
        for i in range(3):
            nursery.start_soon(one, i)
        await trio.testing.wait_all_tasks_blocked()
        assert engine.scheduler.running == 2
        assert engine.scheduler.waiting == 1
        with pytest.raises(EngineOverloaded):
            await engine.scheduler.generate(_prompt(1, salt=9), 1)
    # The queued one waited for a whole decode of a running request; the others did not.
    ttfts = sorted(results.values())
    assert ttfts[1] < 10 * engine.config.decode_interval_s
    assert ttfts[2] > 40 * engine.config.decode_interval_s
    assert engine.scheduler.running == 0 and engine.prefix_cache.used_blocks == 0


async def test_cancelled_request_frees_its_slot_and_blocks(autojump_clock: trio.testing.MockClock) -> None:
    engine = _engine()
    with trio.move_on_after(0.5):
        await engine.scheduler.generate(_prompt(4), 1000)
    assert engine.scheduler.running == 0
    assert engine.prefix_cache.used_blocks == 0
    assert engine.metrics.requests_aborted == 1


async def test_decode_slows_with_batch_size(autojump_clock: trio.testing.MockClock) -> None:
    engine = _engine()
    assert engine.scheduler.cost.decode_interval(200) > engine.scheduler.cost.decode_interval(1)


async def test_speed_scales_simulated_time(autojump_clock: trio.testing.MockClock) -> None:
    slow, fast = _engine(), _engine(speed=100.0)
    prompt = tokenize_prompt("some words here " * 200)
    a = await slow.scheduler.generate(prompt, 1)
    b = await fast.scheduler.generate(prompt, 1)
    assert b.ttft_s == pytest.approx(a.ttft_s / 100, rel=0.01)


async def test_streams_decode_in_lockstep_and_survive_a_cancelled_peer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    engine = _engine()
    times: dict[int, list[float]] = {i: [] for i in range(4)}

    def recorder(i: int) -> StepCallback:
        async def on_step(step: int, ids: list[int], plan: PrefillPlan) -> None:
            times[i].append(trio.current_time())
        return on_step

    async def stream(i: int, max_tokens: int) -> None:
        await engine.scheduler.generate(_prompt(1, salt=i), max_tokens, on_step=recorder(i))

    async def doomed_stream(task_status: trio.TaskStatus[trio.CancelScope]) -> None:
        with trio.CancelScope() as scope:
            task_status.started(scope)
            await stream(3, 1000)

    async with trio.open_nursery() as nursery:
        # Stream 3 decodes first, so it holds the step timer when it is cancelled.
        doomed = await nursery.start(doomed_stream)
        await trio.testing.wait_all_tasks_blocked()
        for i in range(3):
            nursery.start_soon(stream, i, 20)
        # Long enough for steps that carry the three prefills' chunks, and a few more.
        await trio.sleep(0.5)
        doomed.cancel()
    assert [len(times[i]) for i in range(3)] == [20, 20, 20]
    assert 1 < len(times[3]) < 1000
    # After the first token, every stream's tokens land on the shared batch steps.
    shared_steps = set(times[0][1:]) & set(times[1][1:]) & set(times[2][1:])
    assert len(shared_steps) >= 15
    assert engine.scheduler.running == 0


async def test_own_timer_decode_spreads_streams(autojump_clock: trio.testing.MockClock) -> None:
    engine = _engine(lockstep_decode=False)
    times: dict[int, list[float]] = {0: [], 1: []}

    def recorder(i: int) -> StepCallback:
        async def on_step(step: int, ids: list[int], plan: PrefillPlan) -> None:
            times[i].append(trio.current_time())
        return on_step

    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: engine.scheduler.generate(_prompt(1, salt=0), 10, on_step=recorder(0)))
        await trio.sleep(0.005)
        nursery.start_soon(lambda: engine.scheduler.generate(_prompt(1, salt=1), 10, on_step=recorder(1)))
    assert len(times[0]) == len(times[1]) == 10
    assert not set(times[0]) & set(times[1])


@pytest.mark.parametrize("budget", [2048, 0])
async def test_prefill_and_decode_share_the_gpu_with_chunked_prefill(
    autojump_clock: trio.testing.MockClock, budget: int,
) -> None:
    """A stream decoding while another prompt prefills: with a step budget, the steps that
    carry the prefill's chunks take longer and the prefill waits for the batch's steps; with
    budget 0 the two never slow each other."""
    engine = _engine(gpu_kv_tokens=16384, max_model_len=8192, max_num_batched_tokens=budget)
    cost = engine.scheduler.cost
    step_times: list[float] = []

    async def on_step(step: int, ids: list[int], plan: PrefillPlan) -> None:
        step_times.append(trio.current_time())

    long_prompt = _prompt(16, salt=2)  # 4096 tokens: 0.41 s of prefill, two 2048-token chunks
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: engine.scheduler.generate(_prompt(1, salt=1), 60, on_step=on_step))
        await trio.sleep(0.2)  # the stream is decoding
        big = await engine.scheduler.generate(long_prompt, 1)
    gaps = [b - a for a, b in itertools.pairwise(step_times[1:])]
    plain = cost.decode_interval(2)
    work = 4096 / 10_000
    if budget:
        # Two chunks, each riding in one of the batch's steps.
        assert big.ttft_s == pytest.approx(work + 2 * cost.decode_interval(2), rel=0.02)
        carrying = [g for g in gaps if g > 1.5 * plain]
        assert len(carrying) in (2, 3)  # the window's steps (its edges may split a chunk)
        assert sum(carrying) == pytest.approx(work + len(carrying) * plain, rel=0.1)
    else:
        assert big.ttft_s == pytest.approx(work, rel=0.01)
        assert max(gaps) == pytest.approx(cost.decode_interval(2), rel=0.01)
