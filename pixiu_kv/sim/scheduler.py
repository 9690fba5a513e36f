"""Continuous batching for a simulated engine: admission, prefill, decode, on trio time.

Up to ``max_num_seqs`` requests run at once; more wait in a bounded FIFO (head-of-line,
like vLLM) until a slot and enough KV blocks are free. Prefill is serialized on one
GPU lane: a request's prefill starts when the lane is free, so queued prompts see
each other's prefill time in their TTFT. Requests (streamed or not) decode in lockstep, one
token per batch step, at an interval that grows with the batch (as one vLLM engine
step serves every running sequence); one waiter keeps the step timer and the others
park, which keeps hundreds of streams cheap. Everything is computed from
``trio.current_time()``, so tests can use an autojump clock.
"""

from __future__ import annotations

import random
import zlib
from array import array
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager

import attrs
import trio

from .costmodel import CostModel, PrefillPlan
from .cpu_tier import CpuTier
from .engine_config import EngineConfig
from .lmcache_link import chunk_keys
from .metrics import EngineMetrics
from .prefix_cache import BlockAllocation, PrefixCache, block_hashes
from .tokenizer import VOCAB_SIZE

__all__ = ["EngineOverloaded", "Generation", "Scheduler", "StepCallback", "StepDelivery"]

StepCallback = Callable[[int, list[int], PrefillPlan], Awaitable[None]]
"""Called once per decode step with the step index, one new token id per choice, and the
prompt's prefill plan (what was cached)."""

StepDelivery = Callable[[int, list[int], PrefillPlan], bool]
"""The same step, delivered without blocking by whichever task runs the batch step (so
hundreds of parked streams cost no task switch per token). False: the step's output
could not all be written; the stream's own task then runs ``on_step`` for a step with
no new tokens (its flush), and the stream follows the batch again."""

_FIRST_OUTPUT_ID = 256


class EngineOverloaded(Exception):
    """The waiting queue is full."""


@attrs.frozen
class Generation:
    plan: PrefillPlan
    ttft_s: float
    outputs: list[list[int]]
    """Token ids per choice."""


_OUTPUT_SPAN = 1 << 16
_OUTPUT_MASK = _OUTPUT_SPAN - 1


def _output_table() -> list[int]:
    # A fixed pseudo-random walk through the vocabulary (Mersenne Twister with an int seed
    # gives the same bits in every process and Python version). Each output reads a window
    # of it, so a whole reply is one slice instead of a hash per token.
    rnd = random.Random(0x5EED)
    span = VOCAB_SIZE - _FIRST_OUTPUT_ID
    return [_FIRST_OUTPUT_ID + rnd.getrandbits(24) % span for _ in range(_OUTPUT_SPAN)]


_OUTPUTS = _output_table()


def _output_start(base: int, choice: int) -> int:
    """Where choice ``choice`` of a prompt+seed digest ``base`` starts in the table."""
    x = (base ^ (choice * 0x9E3779B1)) & 0xFFFFFFFF
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    return (x ^ (x >> 15)) & _OUTPUT_MASK


def output_token(base: int, choice: int, step: int) -> int:
    """Deterministic output id for (prompt+seed digest, choice, step)."""
    return _OUTPUTS[(_output_start(base, choice) + step) & _OUTPUT_MASK]


def output_ids(base: int, choice: int, first_step: int, count: int) -> list[int]:
    """``output_token`` for ``count`` steps from ``first_step``, in one slice."""
    start = (_output_start(base, choice) + first_step) & _OUTPUT_MASK
    ids = _OUTPUTS[start:start + count]
    while len(ids) < count:
        ids += _OUTPUTS[: count - len(ids)]
    return ids


@attrs.define(eq=False)
class _Waiter:
    hashes: list[int]
    prompt_len: int
    total_tokens: int
    granted: trio.Event = attrs.field(factory=trio.Event)
    allocation: BlockAllocation | None = None


def _unused_delivery(step: int, ids: list[int], plan: PrefillPlan) -> bool:
    raise AssertionError("a request decoding without a stream gets no step deliveries")


@attrs.define(eq=False)
class _Follower:
    """A request decoding in lockstep, parked while the step-timer holder runs the steps:
    a stream (its steps delivered) or, with ``finish_step``, a request that only waits for
    its last step."""

    starts: list[int]
    """Each choice's window in the output table."""
    max_tokens: int
    outputs: list[list[int]]
    plan: PrefillPlan
    deliver: StepDelivery
    finish_step: int | None = None
    """The batch step after which a request without a stream is done."""
    next_step: int = 1
    stopped: bool = False
    """Finished, or its output waits for an async flush: its task must run."""
    wake: trio.Event | None = None
    failure: BaseException | None = None


class Scheduler:
    """The engine core: GPU prefix cache, CPU tier, cost model, batch, metrics."""

    def __init__(self, config: EngineConfig, prefix_cache: PrefixCache, cpu_tier: CpuTier,
                 metrics: EngineMetrics) -> None:
        self.config = config
        self.prefix_cache = prefix_cache
        self.cpu_tier = cpu_tier
        self.metrics = metrics
        self.cost = CostModel(config)
        self._running = 0
        self._waiting: deque[_Waiter] = deque()
        self._prefill_free_at = 0.0
        self._step = 0
        self._step_time = 0.0
        self._step_timer_held = False
        self._decoding = 0
        self._step_lot = trio.lowlevel.ParkingLot()
        self._followers: dict[_Follower, None] = {}
        """Every parked decoding request, one of which takes the step timer over from a
        holder that leaves (insertion-ordered set)."""
        self._streams: dict[_Follower, None] = {}
        """The followers the step-timer holder delivers each step to."""
        self._finishing: dict[int, list[_Follower]] = {}
        """Followers without a stream, by the batch step after which they are done."""

    @property
    def running(self) -> int:
        return self._running

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def _admit_waiting(self) -> None:
        while self._waiting and self._running < self.config.max_num_seqs:
            head = self._waiting[0]
            allocation = self.prefix_cache.try_allocate(head.hashes, head.prompt_len, head.total_tokens)
            if allocation is None:
                return
            self._waiting.popleft()
            head.allocation = allocation
            self._running += 1
            head.granted.set()

    async def _acquire(self, hashes: list[int], prompt_len: int, total_tokens: int) -> BlockAllocation:
        if not self._waiting and self._running < self.config.max_num_seqs:
            allocation = self.prefix_cache.try_allocate(hashes, prompt_len, total_tokens)
            if allocation is not None:
                self._running += 1
                return allocation
        if len(self._waiting) >= self.config.max_waiting:
            raise EngineOverloaded
        waiter = _Waiter(hashes, prompt_len, total_tokens)
        self._waiting.append(waiter)
        try:
            await waiter.granted.wait()
        except BaseException:
            if waiter.allocation is None:
                self._waiting.remove(waiter)
            else:
                self._release(waiter.allocation)
            raise
        assert waiter.allocation is not None
        return waiter.allocation

    def _release(self, allocation: BlockAllocation) -> None:
        self.prefix_cache.release(allocation)
        self._running -= 1
        self._admit_waiting()

    def _step_seconds(self, step_start: float) -> float:
        """One decode step from ``step_start``: the batch's tokens, plus a chunk of the
        prefill lane's work while it has some (chunked prefill shares the GPU's steps)."""
        prefill = min(self.cost.chunk_seconds, max(0.0, self._prefill_free_at - step_start))
        return self.cost.decode_interval(self._running) + prefill

    async def _wait_step(self, after: int, extra_delay: float) -> int:
        """Wait until the batch step counter passes ``after``; returns the new step.

        One waiter holds the step timer; the others park. If the holder is cancelled,
        everyone wakes and a new holder takes over without losing the step's time.
        """
        while self._step <= after:
            if self._step_timer_held:
                await self._step_lot.park()
                continue
            await self._hold_step_timer(extra_delay)
        return self._step

    async def _hold_step_timer(self, extra_delay: float) -> None:
        """Sleep one batch step, advance the counter, deliver the followers' tokens."""
        self._step_timer_held = True
        try:
            deadline = self._step_time + self._step_seconds(self._step_time) + extra_delay
            await trio.sleep_until(deadline)
            self._step += 1
            self._step_time = deadline
            if self._streams:
                self._deliver_step()
            for follower in self._finishing.pop(self._step, ()):
                self._stop(follower)
        finally:
            self._step_timer_held = False
            self._step_lot.unpark_all()
            # If this task does not take the timer again at once, a parked follower must:
            # wake one (a woken one that finds the timer held parks again).
            for follower in self._followers:
                if follower.wake is not None:
                    follower.wake.set()
                    break

    @contextmanager
    def _in_batch(self) -> Iterator[None]:
        """A request decoding in the lockstep batch; if the batch was idle, its first step
        is one interval from now."""
        if self._decoding == 0:
            self._step_time = trio.current_time()
        self._decoding += 1
        try:
            yield
        finally:
            self._decoding -= 1

    def _stop(self, follower: _Follower) -> None:
        follower.stopped = True
        self._followers.pop(follower, None)
        self._streams.pop(follower, None)
        if follower.wake is not None:
            follower.wake.set()

    def _deliver_step(self) -> None:
        for follower in list(self._streams):
            step = follower.next_step
            ids = [_OUTPUTS[(start + step) & _OUTPUT_MASK] for start in follower.starts]
            for out, token in zip(follower.outputs, ids, strict=True):
                out.append(token)
            follower.next_step = step + 1
            try:
                delivered = follower.deliver(step, ids, follower.plan)
            except Exception as error:  # raised again in the stream's own task
                follower.failure = error
                delivered = False
            if not delivered or follower.next_step >= follower.max_tokens:
                self._stop(follower)

    async def _follow(self, follower: _Follower, extra_delay: float) -> None:
        """Until the holder stops ``follower``: park, or hold the step timer."""
        follower.stopped = False
        self._followers[follower] = None
        if follower.finish_step is None:
            self._streams[follower] = None
        else:
            self._finishing.setdefault(follower.finish_step, []).append(follower)
        try:
            while not follower.stopped:
                if self._step_timer_held:
                    follower.wake = wake = trio.Event()
                    try:
                        await wake.wait()
                    finally:
                        follower.wake = None
                    continue
                await self._hold_step_timer(extra_delay)
        finally:
            if not follower.stopped:  # cancelled
                self._followers.pop(follower, None)
                self._streams.pop(follower, None)
                if follower.finish_step is not None:
                    self._finishing[follower.finish_step].remove(follower)
                    if not self._finishing[follower.finish_step]:
                        del self._finishing[follower.finish_step]
        if follower.failure is not None:
            raise follower.failure

    async def _decode_followed(self, base: int, n: int, max_tokens: int, outputs: list[list[int]],
                               plan: PrefillPlan, on_step: StepCallback, deliver: StepDelivery,
                               extra_delay: float) -> None:
        with self._in_batch():
            starts = [_output_start(base, c) for c in range(n)]
            follower = _Follower(starts, max_tokens, outputs, plan, deliver)
            while follower.next_step < max_tokens:
                await self._follow(follower, extra_delay)
                if follower.next_step < max_tokens:
                    await on_step(-1, [], plan)  # the flush of output the socket did not take

    async def _decode_parked(self, steps: int, plan: PrefillPlan, extra_delay: float) -> None:
        """Wait ``steps`` batch steps without a stream: parked until the step-timer holder
        reaches the last one (or holding the timer when no one else does)."""
        with self._in_batch():
            follower = _Follower([], steps + 1, [], plan, _unused_delivery,
                                 finish_step=self._step + steps)
            await self._follow(follower, extra_delay)

    def _plan(self, prompt_ids: Sequence[int], allocation: BlockAllocation,
              keys: list[int]) -> PrefillPlan:
        prompt_len = len(prompt_ids)
        gpu_hit = allocation.hit_tokens
        cpu_hit = 0
        compressed = 0
        tier = self.cpu_tier
        if tier.enabled and keys:
            match = tier.match(keys)
            # LMCache never serves the last prompt token: vLLM must compute one.
            tier_tokens = min(match.chunks * tier.chunk_size, prompt_len - 1)
            if tier_tokens > gpu_hit:
                cpu_hit = tier_tokens - gpu_hit
                first_loaded_chunk = gpu_hit // tier.chunk_size
                compressed_chunks = sum(
                    1 for key in keys[first_loaded_chunk : match.chunks] if tier.is_compressed(key)
                )
                compressed = min(compressed_chunks * tier.chunk_size, cpu_hit)
        return self.cost.plan_prefill(prompt_len, gpu_hit, cpu_hit, compressed)

    async def _decode_lockstep(self, base: int, n: int, max_tokens: int, outputs: list[list[int]],
                               plan: PrefillPlan, on_step: StepCallback, extra_delay: float) -> None:
        with self._in_batch():
            seen = self._step
            for step in range(1, max_tokens):
                seen = await self._wait_step(seen, extra_delay)
                ids = [output_token(base, c, step) for c in range(n)]
                for out, token in zip(outputs, ids, strict=True):
                    out.append(token)
                await on_step(step, ids, plan)

    async def _decode_own_timer(self, base: int, n: int, max_tokens: int, outputs: list[list[int]],
                                plan: PrefillPlan, on_step: StepCallback, extra_delay: float) -> None:
        deadline = trio.current_time()
        for step in range(1, max_tokens):
            # Streams on timers of their own do not model a shared batch step, so no
            # step carries prefill work here (the lockstep batch does).
            deadline += self.cost.decode_interval(self._running) + extra_delay
            await trio.sleep_until(deadline)
            ids = [output_token(base, c, step) for c in range(n)]
            for out, token in zip(outputs, ids, strict=True):
                out.append(token)
            await on_step(step, ids, plan)

    def _digest(self, prompt_ids: Sequence[int], seed: int | None) -> int:
        return zlib.crc32(array("I", prompt_ids)) ^ ((seed or 0) & 0xFFFFFFFF) ^ self.config.seed

    async def generate(
        self,
        prompt_ids: Sequence[int],
        max_tokens: int,
        *,
        n: int = 1,
        seed: int | None = None,
        on_step: StepCallback | None = None,
        deliver: StepDelivery | None = None,
        extra_token_delay: float = 0.0,
    ) -> Generation:
        """Run one request to completion. ``on_step`` streams tokens; without it the request
        decodes in the batch's steps all the same (or, without lockstep decode, in one
        sleep at the current batch size's rate). With ``deliver`` too (and
        lockstep decode), decode steps after the first go through ``deliver``, run by the
        step-timer holder; ``on_step`` is then called with step -1 only to flush what
        ``deliver`` could not write."""
        config = self.config
        prompt_len = len(prompt_ids)
        arrival = trio.current_time()
        hashes = block_hashes(prompt_ids, config.block_size)
        allocation = await self._acquire(hashes, prompt_len, prompt_len + max_tokens)
        metrics = self.metrics
        completed = False
        try:
            keys = chunk_keys(prompt_ids, config.chunk_size) if self.cpu_tier.enabled else []
            plan = self._plan(prompt_ids, allocation, keys)
            metrics.prefix_queries += prompt_len
            metrics.prefix_hits += plan.gpu_hit_tokens
            if self.cpu_tier.enabled:
                # vLLM counts every prompt token as queried from the KV connector.
                metrics.external_queries += prompt_len
                metrics.external_hits += plan.cpu_hit_tokens
            start = max(trio.current_time(), self._prefill_free_at)
            done = start + plan.seconds
            if self._decoding:
                done += self.cost.interleaved_decode(plan.seconds, self._running)
            self._prefill_free_at = done
            await trio.sleep_until(done + extra_token_delay)
            self.prefix_cache.commit_prompt(allocation, hashes)
            self.cpu_tier.store(keys)
            ttft = trio.current_time() - arrival
            metrics.observe_ttft(ttft)
            metrics.prompt_tokens += prompt_len
            metrics.prompt_tokens_cached += plan.cached_tokens

            base = self._digest(prompt_ids, seed)
            outputs: list[list[int]] = [[output_token(base, c, 0)] for c in range(n)]
            if on_step is not None:
                await on_step(0, [out[0] for out in outputs], plan)
                if max_tokens > 1:
                    if deliver is not None and config.lockstep_decode:
                        await self._decode_followed(base, n, max_tokens, outputs, plan, on_step,
                                                    deliver, extra_token_delay)
                    else:
                        decode = self._decode_lockstep if config.lockstep_decode else self._decode_own_timer
                        await decode(base, n, max_tokens, outputs, plan, on_step, extra_token_delay)
            else:
                if max_tokens > 1 and config.lockstep_decode:
                    # In the batch's steps like a stream (vLLM decodes every running request
                    # in each step), parked until the last one: no timer of its own.
                    await self._decode_parked(max_tokens - 1, plan, extra_token_delay)
                elif max_tokens > 1:
                    per_token = self.cost.decode_interval(self._running) + extra_token_delay
                    await trio.sleep(per_token * (max_tokens - 1))
                for c, out in enumerate(outputs):
                    out += output_ids(base, c, 1, max_tokens - 1)
            metrics.generation_tokens += n * max_tokens
            metrics.requests_finished += 1
            completed = True
            return Generation(plan, ttft, outputs)
        finally:
            if not completed:
                metrics.requests_aborted += 1
            self._release(allocation)
