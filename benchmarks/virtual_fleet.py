"""Routing policies replayed on in-process simulated engines, in virtual time.

    python -m benchmarks.virtual_fleet --workload shared-prefix --mode closed --concurrency 160 \
        --cache-fraction 1.5 [--policies round-robin,pixiu-kv,oracle,sglang] [--lookup-loss 0.3]

The engines are the simulator's own schedulers (:class:`pixiu_kv.sim.engine.SimEngine`: GPU
prefix cache with KV-bound admission, LMCache CPU tier, chunked prefill sharing the lockstep
decode's steps), driven directly without HTTP on trio's autojump clock: a saturated run of a thousand
requests takes seconds of CPU and is the same every time. What it leaves out is the
machine: no gateway CPU, no network, lookups that always answer in time (unless
``--lookup-loss`` drops a share of them, as a loaded gateway's 50 ms budget does). So it
isolates routing *policy* (which engine, given what the router can know) from the
implementation costs that ``python -m benchmarks`` measures end to end.

Policies:

* ``round-robin``, ``least-request``: the baselines;
* ``pixiu-kv``: :class:`pixiu_kv.routing.Router` with the benchmark target's settings
  (:func:`benchmarks.targets.routing_settings`), fed as the gateway feeds it: the local
  tokenizer's ids, an LMCache-style lookup (each engine's CPU tier, in whole 256-token
  chunks), in-flight counts, first-token and completion callbacks with the engine's
  ``cached_tokens``, and the compression of reused prefixes it asks for on a full engine;
* ``oracle``: :class:`benchmarks.oracle.OracleRouter`, full knowledge of every engine;
* ``sglang``: SGLang's ``cache_aware`` rule as its documentation gives it (prefix match per
  worker on an approximate tree of what was sent there, shortest queue on imbalance, the
  smallest tree when nothing matches well).

The engines run at ``speed`` 1 (virtual time needs no slowing down); the router's priors
are at the same speed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import multiprocessing
import os
import random
import statistics
import sys
from collections.abc import Sequence
from typing import Any, Protocol

import attrs
import trio
import trio.testing

from pixiu_kv.routing import Decision, EndpointView, Router, RoutingConfig, read_routing_config
from pixiu_kv.sim.engine import SimEngine
from pixiu_kv.sim.engine_config import EngineConfig
from pixiu_kv.sim.lmcache_link import LOCATION, chunk_keys
from pixiu_kv.sim.openai_api import parse_chat, parse_completion
from pixiu_kv.sim.prefix_cache import block_hashes
from pixiu_kv.sim.tokenizer import detokenize

from .oracle import OracleRouter, Ticket
from .sizing import FleetPlan, plan_fleet
from .workloads import (
    WORKLOAD_NAMES,
    Session,
    Workload,
    WorkloadSpec,
    build_workload,
    default_spec,
    render_request,
)

__all__ = ["POLICIES", "Outcome", "run_policy"]

POLICIES = ("round-robin", "least-request", "pixiu-kv", "oracle", "sglang")
_MODEL = "sim-llama-8b"
_MAX_IN_FLIGHT = 1024


@attrs.frozen
class Outcome:
    policy: str
    requests: int
    hit_ratio: float
    ttft_p50: float
    ttft_p90: float
    ttft_p99: float
    throughput_rps: float
    load_cv: float
    per_engine: tuple[int, ...]
    wall_s: float
    reasons: dict[str, int]

    def line(self) -> str:
        return (f"{self.policy:14s} n={self.requests:5d} hit={self.hit_ratio:.3f} "
                f"p50={self.ttft_p50:7.3f} p90={self.ttft_p90:7.3f} p99={self.ttft_p99:7.3f} "
                f"rps={self.throughput_rps:6.2f} cv={self.load_cv:.3f} per_engine={list(self.per_engine)} "
                f"{dict(sorted(self.reasons.items()))}")


class _Fleet:
    def __init__(self, plan: FleetPlan) -> None:
        self.engines = [SimEngine(EngineConfig(
            instance_id=f"engine-{i}", engine_index=i, speed=1.0, gpu_kv_tokens=plan.gpu_kv_tokens,
            cpu_tier_tokens=plan.cpu_tier_tokens, max_model_len=plan.max_model_len, seed=i))
            for i in range(plan.engines)]
        self.in_flight = [0] * plan.engines
        self.config = self.engines[0].config

    def lookup(self, tokens: Sequence[int]) -> dict[str, int]:
        """What LMCache's controller answers: per engine, the prefix its CPU tier holds in
        whole chunks (reported by its worker as each chunk is stored)."""
        keys = chunk_keys(tokens, self.config.chunk_size)
        out: dict[str, int] = {}
        for engine in self.engines:
            chunks = engine.cpu_tier.held_prefix(keys)
            if chunks:
                out[engine.instance_id] = min(chunks * self.config.chunk_size, len(tokens))
        return out


class _Policy(Protocol):
    def pick(self, tokens: list[int], now: float) -> tuple[int, object]: ...

    def first_token(self, handle: object, ttft: float) -> None: ...

    def done(self, handle: object, cached: int, prompt: int, output: int, now: float) -> None: ...


class _RoundRobin:
    def __init__(self, fleet: _Fleet) -> None:
        self._n = len(fleet.engines)
        self._next = 0

    def pick(self, tokens: list[int], now: float) -> tuple[int, object]:
        i = self._next
        self._next = (i + 1) % self._n
        return i, None

    def first_token(self, handle: object, ttft: float) -> None:
        pass

    def done(self, handle: object, cached: int, prompt: int, output: int, now: float) -> None:
        pass


class _LeastRequest(_RoundRobin):
    def __init__(self, fleet: _Fleet) -> None:
        super().__init__(fleet)
        self._fleet = fleet

    def pick(self, tokens: list[int], now: float) -> tuple[int, object]:
        loads = self._fleet.in_flight
        low = min(loads)
        start = self._next
        self._next = (start + 1) % len(loads)
        for k in range(len(loads)):
            i = (start + k) % len(loads)
            if loads[i] == low:
                return i, None
        raise AssertionError("unreachable")


class _PixiuKv:
    def __init__(self, fleet: _Fleet, config: RoutingConfig, lookup_loss: float, seed: int) -> None:
        self._fleet = fleet
        self.router = Router(config)
        self._ids = [e.instance_id for e in fleet.engines]
        self._index = {eid: i for i, eid in enumerate(self._ids)}
        self._loss = lookup_loss
        self._rng = random.Random(seed)
        self.reasons: dict[str, int] = {}

    def pick(self, tokens: list[int], now: float) -> tuple[int, object]:
        lookup = None if self._rng.random() < self._loss else self._fleet.lookup(tokens)
        views = [EndpointView(eid, in_flight=self._fleet.in_flight[i], max_in_flight=_MAX_IN_FLIGHT)
                 for i, eid in enumerate(self._ids)]
        d = self.router.decide(views, tokens, lookup, None, now)
        self.reasons[d.reason] = self.reasons.get(d.reason, 0) + 1
        assert d.endpoint_id is not None
        index = self._index[d.endpoint_id]
        if d.compress_tokens:  # what the kvcache filter asks LMCache for (compress_when_full)
            self._fleet.engines[index].cpu_tier.compress(tokens[: d.compress_tokens], "zstd", LOCATION)
        return index, d

    def first_token(self, handle: object, ttft: float) -> None:
        assert isinstance(handle, Decision)
        self.router.on_first_byte(handle, ttft)

    def done(self, handle: object, cached: int, prompt: int, output: int, now: float) -> None:
        assert isinstance(handle, Decision)
        self.router.on_complete(handle, cached, prompt, now, output)


class _Oracle:
    def __init__(self, fleet: _Fleet) -> None:
        self._oracle = OracleRouter(fleet.engines)

    def pick(self, tokens: list[int], now: float) -> tuple[int, object]:
        ticket = self._oracle.pick(tokens)
        return ticket.index, ticket

    def first_token(self, handle: object, ttft: float) -> None:
        pass

    def done(self, handle: object, cached: int, prompt: int, output: int, now: float) -> None:
        assert isinstance(handle, Ticket)
        self._oracle.done(handle)


class _SglangCacheAware:
    """SGLang's cache_aware policy (sgl-router), on token chunks instead of characters: per
    worker an LRU of the chunk prefixes sent there; balance_abs 64, balance_rel 1.5,
    cache_threshold 0.3; no match above the threshold -> the worker with the smallest tree."""

    def __init__(self, fleet: _Fleet, chunk: int = 16, max_tree_chunks: int = 1 << 20) -> None:
        self._fleet = fleet
        self._chunk = chunk
        self._trees: list[dict[int, None]] = [{} for _ in fleet.engines]
        self._max = max_tree_chunks

    def pick(self, tokens: list[int], now: float) -> tuple[int, object]:
        loads = self._fleet.in_flight
        keys = block_hashes(tokens, self._chunk)
        if max(loads) - min(loads) > 64 and max(loads) > 1.5 * min(loads):
            i = loads.index(min(loads))
        else:
            matched = []
            for tree in self._trees:
                m = 0
                for k in keys:
                    if k not in tree:
                        break
                    m += 1
                matched.append(m)
            best = max(range(len(matched)), key=lambda j: (matched[j], -j))
            if keys and matched[best] / len(keys) > 0.3:
                i = best
            else:
                i = min(range(len(self._trees)), key=lambda j: (len(self._trees[j]), j))
        tree = self._trees[i]
        for k in keys:
            tree.pop(k, None)
            tree[k] = None
        while len(tree) > self._max:
            del tree[next(iter(tree))]
        return i, None

    def first_token(self, handle: object, ttft: float) -> None:
        pass

    def done(self, handle: object, cached: int, prompt: int, output: int, now: float) -> None:
        pass


@attrs.define
class _Record:
    ttft: list[float] = attrs.Factory(list)
    prompt: int = 0
    cached: int = 0
    done_at: list[float] = attrs.Factory(list)


def _tokens(body: dict[str, Any], config: EngineConfig) -> list[int]:
    parse = parse_chat if "messages" in body else parse_completion
    return list(parse(body, config).prompt_ids)


async def _one(fleet: _Fleet, policy: _Policy, body: dict[str, Any], record: _Record,
               per_engine: list[int]) -> str:
    tokens = _tokens(body, fleet.config)
    start = trio.current_time()
    index, handle = policy.pick(tokens, start)
    engine = fleet.engines[index]
    fleet.in_flight[index] += 1
    first: list[float] = []

    async def on_step(step: int, ids: list[int], plan: Any) -> None:
        if step == 0 and not first:
            first.append(trio.current_time() - start)
            policy.first_token(handle, first[0])

    def deliver(step: int, ids: list[int], plan: Any) -> bool:
        return True

    try:
        gen = await engine.scheduler.generate(tokens, int(body["max_tokens"]), on_step=on_step,
                                              deliver=deliver)
    finally:
        fleet.in_flight[index] -= 1
    now = trio.current_time()
    cached = gen.plan.cached_tokens
    policy.done(handle, cached, len(tokens), len(gen.outputs[0]), now)
    record.ttft.append(first[0] if first else gen.ttft_s)
    record.prompt += len(tokens)
    record.cached += cached
    record.done_at.append(now)
    per_engine[index] += 1
    return detokenize(gen.outputs[0])


async def _session(fleet: _Fleet, policy: _Policy, session: Session, record: _Record,
                   per_engine: list[int]) -> None:
    answers: list[str] = []
    for turn in range(len(session.turns)):
        body = render_request(session, turn, answers, model=_MODEL)
        answers.append(await _one(fleet, policy, body, record, per_engine))


def _make_policy(name: str, fleet: _Fleet, plan: FleetPlan, *, lookup_loss: float, seed: int,
                 overrides: dict[str, Any]) -> _Policy:
    if name == "round-robin":
        return _RoundRobin(fleet)
    if name == "least-request":
        return _LeastRequest(fleet)
    if name == "oracle":
        return _Oracle(fleet)
    if name == "sglang":
        return _SglangCacheAware(fleet)
    if name == "pixiu-kv":
        from pixiu_kv._config_parse import Table

        from .targets import routing_settings

        settings = routing_settings(_MODEL, {"speed": 1.0, "gpu_kv_tokens": plan.gpu_kv_tokens,
                                             "cpu_tier_tokens": plan.cpu_tier_tokens})
        settings.pop("tokenizers")  # ids come from the engine's own tokenizer here
        settings.update(overrides)
        return _PixiuKv(fleet, read_routing_config(Table(settings, "routing")), lookup_loss, seed)
    raise ValueError(f"unknown policy {name!r}; choose from {', '.join(POLICIES)}")


def run_policy(name: str, workload: Workload, plan: FleetPlan, *, mode: str, concurrency: int,
               rate: float, duration: float, seed: int = 0, lookup_loss: float = 0.0,
               overrides: dict[str, Any] | None = None) -> Outcome:
    """One policy on a fresh fleet, in virtual time (deterministic for a seed)."""
    record = _Record()
    per_engine = [0] * plan.engines
    policy_box: list[_Policy] = []

    async def main() -> float:
        fleet = _Fleet(plan)
        policy = _make_policy(name, fleet, plan, lookup_loss=lookup_loss, seed=seed,
                              overrides=overrides or {})
        policy_box.append(policy)
        sessions = list(workload.sessions)
        t0 = trio.current_time()
        async with trio.open_nursery() as nursery:
            if mode == "closed":
                queue = iter(sessions)

                async def client() -> None:
                    for session in queue:
                        if trio.current_time() - t0 >= duration:
                            return
                        await _session(fleet, policy, session, record, per_engine)

                for _ in range(concurrency):
                    nursery.start_soon(client)
            else:
                rnd = random.Random(seed)
                at = t0
                for session in sessions:
                    at += rnd.expovariate(rate)
                    if at - t0 >= duration:
                        break
                    await trio.sleep_until(at)
                    nursery.start_soon(_session, fleet, policy, session, record, per_engine)
        return trio.current_time() - t0

    # trio reverses its run batches at random (so that no code relies on task order); its
    # generator, seeded, makes a run repeatable. Private: without it runs merely vary.
    scheduling_rng = getattr(getattr(trio, "_core", None), "_run", None)
    if isinstance(getattr(scheduling_rng, "_r", None), random.Random):
        scheduling_rng._r.seed(seed)  # type: ignore[union-attr]
    wall = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    policy = policy_box[0]
    n = len(record.ttft)
    q = statistics.quantiles(record.ttft, n=100, method="inclusive") if n > 1 else [0.0] * 99
    mean = statistics.fmean(per_engine) if per_engine else 0.0
    cv = statistics.pstdev(per_engine) / mean if mean else 0.0
    return Outcome(policy=name, requests=n, hit_ratio=record.cached / record.prompt if record.prompt else 0.0,
                   ttft_p50=q[49], ttft_p90=q[89], ttft_p99=q[98],
                   throughput_rps=n / wall if wall > 0 else 0.0, load_cv=cv, per_engine=tuple(per_engine),
                   wall_s=wall, reasons=dict(getattr(policy, "reasons", {})))


def _override(text: str) -> tuple[str, Any]:
    key, _, value = text.partition("=")
    parsed: Any
    try:
        parsed = json.loads(value)
    except ValueError:
        parsed = value
    return key.strip(), parsed


def _run_job(spec: WorkloadSpec, seed: int, name: str, engines: int, cache_fraction: float, mode: str,
             concurrency: int, rate: float | None, duration: float, lookup_loss: float,
             overrides: dict[str, Any]) -> tuple[str, str]:
    """One run, in its own process: the fleet plan as a header, and the outcome's line."""
    workload = build_workload(spec, seed=seed)
    plan = plan_fleet(spec, engines=engines, cache_fraction=cache_fraction, speed=1.0)
    if rate is None:
        # The plan's rate is in requests per second; sessions arrive at it / turns per session
        # (as in ``python -m benchmarks``).
        rate = plan.rate * max(1, len(workload.sessions)) / max(1, workload.request_count)
    out = run_policy(name, workload, plan, mode=mode, concurrency=concurrency, rate=rate, duration=duration,
                     seed=seed, lookup_loss=lookup_loss, overrides=overrides)
    header = (f"rate={rate:.2f} cache_fraction={plan.cache_fraction} gpu={plan.gpu_kv_tokens} "
              f"cpu={plan.cpu_tier_tokens}")
    return header, out.line()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.virtual_fleet", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", choices=WORKLOAD_NAMES, default="shared-prefix")
    ap.add_argument("--policies", default="round-robin,pixiu-kv,oracle,sglang")
    ap.add_argument("--mode", choices=("open", "closed"), default="closed")
    ap.add_argument("--concurrency", type=int, default=160)
    ap.add_argument("--rate", type=float, default=None,
                    help="open loop: sessions/s (default: the plan's request rate / turns per session)")
    ap.add_argument("--duration", type=float, default=math.inf,
                    help="no session starts after this (virtual seconds)")
    ap.add_argument("--engines", type=int, default=4)
    ap.add_argument("--cache-fraction", type=float, default=0.7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, default=1, help="repeat with seeds seed..seed+N-1")
    ap.add_argument("--lookup-loss", type=float, default=0.0, help="share of LMCache lookups lost")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--jobs", type=int, default=1, help="runs at once, each in its own process")
    ap.add_argument("--set", action="append", default=[], type=_override,
                    help="pixiu-kv routing setting KEY=VALUE (repeatable)")
    args = ap.parse_args(argv)
    if os.environ.get("PYTHONHASHSEED") != "0":
        # The simulator's tokenizer and caches hash strings: fix the seed so that a run is
        # the same every time (the workload's own seed then decides everything).
        os.execve(sys.executable, [sys.executable, "-m", "benchmarks.virtual_fleet",
                                   *(sys.argv[1:] if argv is None else argv)],
                  {**os.environ, "PYTHONHASHSEED": "0"})
    overrides = dict(args.set)
    spec = default_spec(args.workload, quick=args.quick)
    jobs: list[tuple[int, str]] = [(seed, name) for seed in range(args.seed, args.seed + args.seeds)
                                   for name in args.policies.split(",")]
    unknown = sorted({name for _, name in jobs} - set(POLICIES))
    if unknown:
        ap.error(f"unknown policies {', '.join(unknown)}; choose from {', '.join(POLICIES)}")
    # One fresh process per run: in a process that already ran something, trio wakes tasks
    # with equal deadlines in an order that follows object addresses, so a policy's figures
    # would depend on what ran before it.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=args.jobs, mp_context=context,
                                                max_tasks_per_child=1) as pool:
        futures = [pool.submit(_run_job, spec, seed, name, args.engines, args.cache_fraction, args.mode,
                               args.concurrency, args.rate, args.duration, args.lookup_loss, overrides)
                   for seed, name in jobs]
        for (seed, name), future in zip(jobs, futures, strict=True):
            header, line = future.result()
            if name == args.policies.split(",")[0]:
                print(f"# {args.workload} seed={seed} mode={args.mode} concurrency={args.concurrency} "
                      f"{header} lookup_loss={args.lookup_loss} overrides={overrides}")
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
