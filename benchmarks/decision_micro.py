"""CPU cost of one routing decision: a 4k-token prompt over 16 endpoints (goal: <= 100 us).

    python -m benchmarks.decision_micro [--iterations N] [--endpoints N] [--tokens N]

Measured with ``time.process_time`` (CPU of this process, not wall time) over batches of
decisions; the callbacks that release reservations run between batches, outside the
measurement. Prompts come from a pool: 8 groups sharing a system prompt of half the
length, each with its own question, so the index holds real matches (several endpoints
hold each group's prefix) as in a shared-prefix workload. Token ids are hashed afresh
on every ``decide(token ids)`` (the router keeps no keys between decisions). A chat's next
turn is measured as ``Router.extend_keys`` of the previous turn's keys (the prompt's
first ``--tokens - 256`` tokens) by 256 new tokens, then the decision. A new prompt
(first sight: nothing of it indexed anywhere, so new-prefix placement runs) is measured
from raw ids too; releasing its reservation drops its blocks again, so it stays new. Reported: the
median of ``--repeats`` runs, per decision, for each part of the pipeline, and the median
of its ratio to hashing the prompt's ids once in the same run; within a run the parts
take turns every 256 calls, so the ratios hold while a shared machine's speed moves. The
setup's objects are moved out of the garbage collector's generations before measuring
(``gc.freeze``; see :func:`measure`). The header says which block keys ran: the C
extension or pure Python (``PIXIU_KV_PURE_PYTHON=1`` forces the latter).
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import time
from collections.abc import Callable, Sequence

from pixiu_kv.routing import NATIVE_KEYS, Decision, EndpointView, PrefixKeys, Router, RoutingConfig

_BATCH = 32
_REFERENCE = "reference: hash(tuple(token ids))"
_NEW_TURN_TOKENS = 256


def _pool(tokens: int, groups: int, per_group: int, seed: int = 7) -> list[list[int]]:
    rnd = random.Random(seed)
    systems = [[rnd.randrange(128_000) for _ in range(tokens // 2)] for _ in range(groups)]
    return [systems[g] + [rnd.randrange(128_000) for _ in range(tokens - tokens // 2)]
            for _ in range(per_group) for g in range(groups)]


def _warm(router: Router, fleet: Sequence[EndpointView], prompts: Sequence[Sequence[int]]) -> None:
    now = 0.0
    for prompt in prompts:
        d = router.decide(fleet, prompt, None, None, now)
        router.on_first_byte(d, 0.2)
        router.on_complete(d, None, None, now + 0.2)
        now += 0.01


class _Bench:
    """One warmed router and its inputs; each ``*_batch`` method is one measured batch."""

    def __init__(self, endpoints: int, tokens: int, kv_tokens: int = 0) -> None:
        self.fleet = [EndpointView(f"engine-{i:02d}", in_flight=i % 5, max_in_flight=256)
                      for i in range(endpoints)]
        self.prompts = _pool(tokens, groups=8, per_group=16)
        # Prompts sharing nothing with the pool or each other (groups of one).
        self.new_prompts = _pool(tokens, groups=128, per_group=1, seed=8)
        self.router = Router(RoutingConfig(engine_kv_tokens=kv_tokens))
        _warm(self.router, self.fleet, self.prompts)
        self.keys = [self.router.prefix_keys(p) for p in self.prompts]
        # A next turn: the previous turn's keys (compact, as a token cache keeps them) and
        # the 256 tokens the turn adds.
        self.turns = [(self.router.prefix_keys(p[:tokens - _NEW_TURN_TOKENS]).compact(),
                       p[tokens - _NEW_TURN_TOKENS:]) for p in self.prompts]
        self.lookups = [{self.fleet[i % endpoints].id: tokens // 2} for i in range(len(self.prompts))]
        index = self.router.index
        assert index is not None
        self.index = index
        self.now = 1000.0
        self.decisions: list[Decision] = []

    def release(self) -> None:
        for d in self.decisions:
            self.router.on_failure(d)
        self.decisions.clear()

    def _decide(self, start: int, source: Sequence[Sequence[int] | PrefixKeys], with_lookup: bool) -> None:
        now = self.now
        decide = self.router.decide
        for i in range(start, start + _BATCH):
            j = i % len(source)
            self.decisions.append(decide(self.fleet, source[j], self.lookups[j] if with_lookup else None,
                                         None, now))
        self.now = now + 0.5

    def decide_tokens(self, start: int) -> None:
        self._decide(start, self.prompts, False)

    def decide_new_tokens(self, start: int) -> None:
        self._decide(start, self.new_prompts, False)

    def decide_tokens_lookup(self, start: int) -> None:
        self._decide(start, self.prompts, True)

    def decide_keys(self, start: int) -> None:
        self._decide(start, self.keys, False)

    def decide_next_turn(self, start: int) -> None:
        now = self.now
        decide = self.router.decide
        extend = self.router.extend_keys
        for i in range(start, start + _BATCH):
            previous, added = self.turns[i % len(self.turns)]
            self.decisions.append(decide(self.fleet, extend(previous, added), None, None, now))
        self.now = now + 0.5

    def extend_keys(self, start: int) -> None:
        extend = self.router.extend_keys
        for k in range(start, start + _BATCH):
            previous, added = self.turns[k % len(self.turns)]
            extend(previous, added)

    def block_keys(self, start: int) -> None:
        for k in range(start, start + _BATCH):
            self.index.schedule.keys(self.prompts[k % len(self.prompts)])

    def index_match(self, start: int) -> None:
        for k in range(start, start + _BATCH):
            self.index.match(self.keys[k % len(self.keys)])

    def index_record(self, start: int) -> None:
        for k in range(start, start + _BATCH):
            self.index.record("engine-00", self.keys[k % len(self.keys)])

    def reference(self, start: int) -> None:
        """Hashing the prompt's ids once (a lower bound of any exact prefix key)."""
        for k in range(start, start + _BATCH):
            hash(tuple(self.prompts[k % len(self.prompts)]))


def _cpu_seconds(bench: _Bench, fn: Callable[[int], None], iterations: int, start: int = 0) -> float:
    """CPU seconds of ``iterations`` calls; reservations are released between batches, unmeasured."""
    spent = 0.0
    done = 0
    while done < iterations:
        t0 = time.process_time()
        fn(start + done)
        spent += time.process_time() - t0
        bench.release()
        done += _BATCH
    return spent


_ROUND = 8 * _BATCH  # decisions of one part before the next part runs


def measure(iterations: int, endpoints: int, tokens: int, repeats: int,
            kv_tokens: int = 0) -> tuple[dict[str, float], dict[str, float]]:
    """Per part: the median over ``repeats`` of its CPU per call, and the median of its ratio
    to the reference in the same repeat. Within a repeat the parts take turns every
    ``_ROUND`` calls, so a slower minute of a shared machine weighs on every part alike and
    the ratios hold even when the absolute times move."""
    seconds: dict[str, list[float]] = {}
    ratios: dict[str, list[float]] = {}
    for _ in range(repeats):
        bench = _Bench(endpoints, tokens, kv_tokens)
        # The setup's garbage is collected and its objects (the prompt pool: 128 lists of
        # 4k ints, and the warmed router) leave the collector's generations, so that a full
        # collection over the benchmark's own scaffolding (~35 ms here) does not land in one
        # part's batches at random. Collections caused by the decisions' own allocations
        # still count.
        gc.collect()
        gc.freeze()
        parts = (
            ("decide(token ids)", bench.decide_tokens),
            ("decide(token ids) + LMCache lookup", bench.decide_tokens_lookup),
            ("decide(new prompt: token ids)", bench.decide_new_tokens),
            ("decide(cached PrefixKeys)", bench.decide_keys),
            ("decide(next turn: extend_keys)", bench.decide_next_turn),
            ("  part: block keys", bench.block_keys),
            ("  part: extend keys (+256 tokens)", bench.extend_keys),
            ("  part: index match", bench.index_match),
            ("  part: index record", bench.index_record),
            (_REFERENCE, bench.reference),
        )
        spent = dict.fromkeys([name for name, _ in parts], 0.0)
        done = 0
        while done < iterations:
            calls = min(_ROUND, iterations - done)
            for name, fn in parts:
                spent[name] += _cpu_seconds(bench, fn, calls, done)
            done += calls
        gc.unfreeze()
        for name, total in spent.items():
            seconds.setdefault(name, []).append(total / done)
            ratios.setdefault(name, []).append(total / spent[_REFERENCE])
    return ({name: statistics.median(values) for name, values in seconds.items()},
            {name: statistics.median(values) for name, values in ratios.items()})


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--iterations", type=int, default=4000)
    parser.add_argument("--endpoints", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--engine-kv-tokens", type=int, default=0,
                        help="the router's engine_kv_tokens (0: the default, no KV admission term); "
                             "small values keep every endpoint's KV cache full, so the term is computed")
    args = parser.parse_args(argv)
    results, ratios = measure(args.iterations, args.endpoints, args.tokens, args.repeats,
                              args.engine_kv_tokens)
    print(f"routing decision CPU, {args.tokens}-token prompt, {args.endpoints} endpoints, "
          f"engine_kv_tokens={args.engine_kv_tokens}, "
          f"median of {args.repeats} x {args.iterations} calls per part, parts taking turns every "
          f"{_ROUND} calls (time.process_time):")
    print(f"block keys: {'native C (pixiu_kv.routing._blockhash)' if NATIVE_KEYS else 'pure Python'}")
    for name, seconds in results.items():
        print(f"  {name:<40} {seconds * 1e6:8.1f} us  ({ratios[name]:4.2f} x reference)")


if __name__ == "__main__":
    main()
