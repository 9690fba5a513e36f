"""The local prefix index: block schedule, match/record, LRU bound, corrections, cost in lookups."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from array import array

import pytest

from pixiu_kv.routing import BlockSchedule, PrefixIndex, PrefixKeys


def _prompt(seed: int, n: int) -> list[int]:
    rnd = random.Random(seed)
    return [rnd.randrange(32000) for _ in range(n)]


# -- block schedule --------------------------------------------------------------------

@pytest.mark.parametrize(("length", "blocks", "last_end"), [
    (0, 0, None),
    (15, 0, None),
    (16, 1, 16),
    (100, 6, 96),
    (256, 16, 256),
    (512, 24, 512),
    (1000, 31, 960),
    (4096, 48, 4096),
])
def test_schedule_cuts_by_position_only(length: int, blocks: int, last_end: int | None) -> None:
    ends = BlockSchedule(16, 256).ends(length)
    assert len(ends) == blocks
    if last_end is not None:
        assert ends[-1] == last_end
    assert all(e % 16 == 0 for e in ends)


def test_schedule_granularity_is_fine_near_the_start_and_bounded_relative_further_on() -> None:
    ends = BlockSchedule(16, 256).ends(100_000)
    sizes = [b - a for a, b in zip([0, *ends], ends, strict=False)]
    assert set(sizes[:16]) == {16}
    for start, size in zip([0, *ends], sizes, strict=False):
        assert size <= max(16, start // 8)  # a match is exact to 1/8 of its length
        assert size <= 256
    assert sizes[-1] == 256


def test_keys_name_whole_prefixes() -> None:
    schedule = BlockSchedule(16, 256)
    a = _prompt(1, 3000)
    b = a[:2000] + _prompt(2, 1000)
    ka, kb = schedule.keys(a), schedule.keys(b)
    shared = schedule.ends(2000)
    assert ka.keys[: len(shared)] == kb.keys[: len(shared)]
    assert ka.keys[len(shared)] != kb.keys[len(shared)]
    # Same tokens at a different position never give the same key (the chain carries position).
    c = _prompt(3, 16) + a[:2000]
    assert set(schedule.keys(c).keys).isdisjoint(ka.keys)


@pytest.mark.parametrize("changed", [0, 15, 16, 300, 511, 512, 590, 599])
def test_a_key_changes_with_any_token_of_its_prefix_and_only_those(changed: int) -> None:
    schedule = BlockSchedule(16, 256)
    a = _prompt(4, 600)
    b = list(a)
    b[changed] += 1
    ka, kb = schedule.keys(a), schedule.keys(b)
    assert ka.ends == kb.ends
    for end, key_a, key_b in zip(ka.ends, ka.keys, kb.keys, strict=True):
        assert (key_a == key_b) == (end <= changed)


def test_keys_do_not_depend_on_the_sequence_type() -> None:
    schedule = BlockSchedule(16, 256)
    prompt = _prompt(5, 1000)
    keys = schedule.keys(prompt).keys
    assert schedule.keys(tuple(prompt)).keys == keys
    assert schedule.keys(array("I", prompt)).keys == keys
    assert schedule.keys(prompt).compact().keys == keys


# Keys of tokens 1000..1599 (25 blocks), as every process computes them (64-bit CPython).
_KNOWN_KEYS = {0: 3415446868550774468, 1: 7456612749625473530, 24: -590067908696519777}


def test_keys_are_the_same_in_every_process() -> None:
    """Gateways sharing engines must agree on keys: no dependence on PYTHONHASHSEED (here
    against known answers, and against a process with another hash seed)."""
    keys = BlockSchedule(16, 256).keys(list(range(1000, 1600)))
    assert len(keys.keys) == 25
    assert {i: keys.keys[i] for i in _KNOWN_KEYS} == _KNOWN_KEYS
    script = ("from pixiu_kv.routing._blocks import BlockSchedule\n"
              "print(list(BlockSchedule(16, 256).keys(list(range(1000, 1600))).keys))")
    for seed in ("1", "4242"):
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONHASHSEED": seed}, timeout=60).stdout
        assert out.strip() == str(list(keys.keys))


# -- match and record ------------------------------------------------------------------

def test_match_after_record_finds_the_deepest_shared_block_per_endpoint() -> None:
    index = PrefixIndex(max_entries=10_000)
    system = _prompt(1, 1500)
    index.record("e1", system + _prompt(2, 300))
    index.record("e2", system[:600])
    query = system + _prompt(3, 500)
    matched = index.match(query)
    assert matched == {"e1": 1408, "e2": 576}  # the last block boundaries <= 1500 and <= 600
    assert index.match(_prompt(9, 2000)) == {}


def test_match_is_empty_for_prompts_shorter_than_a_block() -> None:
    index = PrefixIndex(max_entries=100)
    index.record("e1", [1, 2, 3])
    assert index.match([1, 2, 3]) == {}
    assert len(index) == 0


def test_total_entries_are_bounded_and_the_stalest_of_the_largest_endpoint_go_first() -> None:
    index = PrefixIndex(max_entries=200)
    old = _prompt(1, 1024)  # 64 blocks
    index.record("e1", old)
    for i in range(10):
        index.record("e2", _prompt(100 + i, 512))  # 32 blocks each
        assert len(index) <= 200
    assert len(index) > 100  # compaction keeps at least half the bound
    # e2 holds the most: its oldest prompts went; its latest and e1's only one stay (e1's
    # engine computed nothing since: an LRU cache still holds it).
    assert index.match(_prompt(100, 512)) == {}
    assert index.match(_prompt(109, 512)) == {"e2": 512}
    assert index.match(old) == {"e1": 1024}
    # Stale entries of an endpoint are gone whichever endpoint gets compacted.
    entries = len(index)
    assert index.forget("e1") + index.forget("e2") == entries
    assert len(index) == 0


def test_lru_drops_extensions_before_their_prefix() -> None:
    # A prefix shared by many prompts stays while their private tails are evicted.
    index = PrefixIndex(max_entries=48)
    system = _prompt(1, 512)  # 24 blocks, then room for 6 tails
    for i in range(10):
        index.record("e1", system + _prompt(10 + i, 256))  # +4 blocks each
        assert len(index) <= 48
    matched = index.match(system + _prompt(99, 256))
    assert matched == {"e1": 512}
    # The 7th tail compacted the 6 before it away (at least half the entries go); the later
    # ones survive, none is half-kept.
    held = [index.match(system + _prompt(10 + i, 256))["e1"] for i in range(10)]
    assert held == [512] * 6 + [768] * 4


def test_a_known_capacity_expires_entries_after_that_many_newer_tokens() -> None:
    index = PrefixIndex(max_entries=100_000, engine_cache_tokens=2048)
    first = _prompt(1, 1024)
    index.record("e1", first)
    index.record("e1", _prompt(2, 512))  # 1536 newer tokens: first still fits
    assert index.match(first) == {"e1": 1024}
    index.record("e1", first)  # touched again: most recent
    index.record("e1", _prompt(3, 1024))
    assert index.match(first) == {"e1": 1024}
    index.record("e1", _prompt(4, 1024))  # 2048 tokens inserted since its last use: still fits
    assert index.match(first) == {"e1": 1024}
    index.record("e1", _prompt(5, 16))  # one block more: evicted
    assert index.match(first) == {}
    # Re-sending what it holds inserts nothing.
    before = index.inserted("e1")
    index.record("e1", _prompt(4, 1024))
    assert index.inserted("e1") == before


def test_match_costs_logarithmic_lookups_per_holder_and_record_one_per_block() -> None:
    index = PrefixIndex(max_entries=100_000)
    prompt = _prompt(1, 4096)  # 48 blocks
    for e in ("e1", "e2", "e3"):
        index.record(e, prompt[: 1000 * (1 + len(e))])
    keys = index.keys(prompt)
    index.lookups = 0
    matched = index.match(keys)
    assert len(matched) == 3
    assert index.lookups <= 3 + 3 * (6 + 2)  # per endpoint: its first block; per holder: the
    # previous holder's depth and the next block (2), then at most ceil(log2(48)) = 6 probes
    index.lookups = 0
    index.record("e4", keys)
    assert index.lookups == len(keys.keys) == 48


def test_match_work_grows_with_blocks_and_endpoints_not_with_the_index_size() -> None:
    small, large = PrefixIndex(max_entries=1_000_000), PrefixIndex(max_entries=1_000_000)
    prompt = _prompt(1, 2048)
    small.record("e1", prompt)
    large.record("e1", prompt)
    for i in range(7):
        small.record(f"e{i}", _prompt(1000 + i, 1024))
    for i in range(300):
        large.record(f"e{i % 7}", _prompt(1000 + i, 1024))
    small.lookups = large.lookups = 0
    assert small.match(prompt) == large.match(prompt) == {"e1": 2048}
    assert small.lookups == large.lookups


def test_holders_of_a_shared_prefix_at_the_same_depth_cost_two_probes_each() -> None:
    index = PrefixIndex(max_entries=1_000_000)
    system = _prompt(1, 1024)  # 40 blocks
    for i in range(16):
        index.record(f"e{i}", system + _prompt(100 + i, 3072))
    index.lookups = 0
    matched = index.match(system + _prompt(99, 3072))
    assert matched == {f"e{i}": 1024 for i in range(16)}
    # One probe of the first block per endpoint, a binary search for the first holder
    # (<= 6 probes over 48 blocks), then two probes for each other holder.
    assert index.lookups <= 16 + 6 + 15 * 2


# -- corrections ----------------------------------------------------------------------

def test_reports_teach_the_engine_capacity_and_stale_beliefs_vanish() -> None:
    index = PrefixIndex(max_entries=100_000)
    prompts = [_prompt(i, 1024) for i in range(8)]
    for p in prompts:
        index.record("e1", p)
    index.record("e2", prompts[0])
    assert index.capacity("e1") == float("inf")
    # A new turn of prompts[0] goes to e1, which the index believes holds 1024 of it ...
    turn = prompts[0] + _prompt(100, 200)
    receipt = index.record("e1", turn)
    assert index.held_depth("e1", *receipt) == len(index.schedule.ends(1024))
    # ... but the engine had none of it: 8192 tokens since prompts[0] (its own included)
    # were more than it holds.
    assert index.observe("e1", turn, cached_tokens=0, receipt=receipt)
    assert index.capacity("e1") < 8 * 1024
    assert index.match(prompts[1]) == {}  # as old as the evicted one: gone too
    assert index.match(prompts[7]) == {"e1": 1024}  # recent: kept
    # The prompt just served is held in full (its next turn must stay here) ...
    assert index.match(turn)["e1"] == index.schedule.ends(1224)[-1]
    # ... and other endpoints are untouched.
    assert index.match(prompts[0])["e2"] == 1024


def test_a_hit_beyond_the_believed_capacity_raises_it() -> None:
    index = PrefixIndex(max_entries=100_000, engine_cache_tokens=1024)
    old = _prompt(1, 1024)
    index.record("e1", old)
    index.record("e1", _prompt(2, 2048))
    assert index.match(old) == {}
    receipt = index.record("e1", old)
    assert not index.observe("e1", old, cached_tokens=1008, receipt=receipt)  # it was there
    assert index.capacity("e1") >= 3072


def test_a_configured_capacity_is_not_learned_down() -> None:
    index = PrefixIndex(max_entries=100_000, engine_cache_tokens=4096)
    old = _prompt(1, 1024)
    index.record("e1", old)
    index.record("e1", _prompt(2, 1024))
    receipt = index.record("e1", old)
    assert index.observe("e1", old, cached_tokens=0, receipt=receipt)  # a miss ...
    assert index.capacity("e1") == 4096  # ... does not shrink what the operator configured
    assert index.match(old) == {"e1": 1024}  # and the prompt it computed again is held


def test_observe_without_a_receipt_uses_the_current_belief_and_records() -> None:
    index = PrefixIndex(max_entries=100_000)
    old, recent, probe = _prompt(1, 512), _prompt(2, 512), _prompt(3, 512)
    index.record("e1", old)
    index.record("e1", probe)
    index.record("e1", recent)
    assert index.observe("e1", probe, cached_tokens=0)
    assert index.capacity("e1") < 1024  # probe did not survive 1024 tokens
    assert index.match(old) == {}
    assert index.match(probe) == {"e1": 512}  # recomputed just now
    # Its recomputation was counted: recent (512) + probe (512) no longer fit together.
    assert index.match(recent) == {}


def test_a_report_within_one_block_of_the_belief_is_not_an_eviction() -> None:
    # vLLM recomputes the last token of a fully cached prompt and reports one block less.
    index = PrefixIndex(max_entries=10_000)
    other, p = _prompt(1, 512), _prompt(2, 512)
    index.record("e1", other)
    index.record("e1", p)
    receipt = index.record("e1", p)
    assert not index.observe("e1", p, cached_tokens=496, receipt=receipt)
    assert index.match(other) == {"e1": 512}
    assert index.capacity("e1") == float("inf")


def test_discard_and_forget() -> None:
    index = PrefixIndex(max_entries=10_000)
    p = _prompt(1, 1024)
    index.record("e1", p)
    index.record("e2", p)
    assert index.discard("e1", p, keep_tokens=256) > 0
    assert index.match(p) == {"e1": 256, "e2": 1024}
    assert index.forget("e2") == len(index.schedule.ends(1024))
    assert index.match(p) == {"e1": 256}
    assert len(index) == len(index.schedule.ends(256))


def test_a_failed_request_leaves_what_a_later_request_recorded_on_the_same_prefix() -> None:
    index = PrefixIndex(max_entries=10_000)
    first = _prompt(1, 1024)
    receipt = index.record("e1", first)  # new there
    later = first + _prompt(2, 512)  # recorded while the first is still in flight
    index.record("e1", later)
    # The first fails: what it alone brought goes, the later request's blocks stay.
    assert index.discard("e1", first, keep_tokens=0, stamp=receipt[1]) == 0
    assert index.match(later) == {"e1": 1536}
    lone = index.record("e1", _prompt(3, 512))
    assert index.discard("e1", _prompt(3, 512), keep_tokens=0, stamp=lone[1]) == 24
    assert index.match(_prompt(3, 512)) == {}


def test_compact_keys_match_like_the_originals() -> None:
    index = PrefixIndex(max_entries=10_000)
    prompt = _prompt(1, 1000)
    keys = index.keys(prompt)
    compact = keys.compact()
    assert compact.keys == keys.keys and compact.ends == keys.ends
    assert list(compact.tokens) == prompt and compact.length == 1000
    assert compact.compact() is compact
    index.record("e1", compact)
    assert index.match(keys) == index.match(prompt) == {"e1": 960}


@pytest.mark.parametrize("old_length", [0, 10, 16, 500, 512, 1000, 2048, 3001])
@pytest.mark.parametrize("compact", [False, True])
def test_extending_known_keys_gives_the_keys_of_the_whole_prompt(old_length: int, compact: bool) -> None:
    schedule = BlockSchedule(16, 256)
    whole = _prompt(7, 4200)
    known = schedule.keys(whole[:old_length])
    if compact:
        known = known.compact()
    extended = schedule.extend(known, whole[old_length:])
    full = schedule.keys(whole)
    assert extended.keys == full.keys
    assert extended.ends == full.ends
    assert list(extended.tokens) == whole
    assert extended.compact().keys == full.keys


def test_extending_reuses_the_known_keys_instead_of_hashing_the_old_tokens_again() -> None:
    schedule = BlockSchedule(16, 256)
    whole = _prompt(8, 3000)
    real = schedule.keys(whole[:2000])
    # Keys that no hashing of these tokens would give: extend must keep them as they are and
    # chain the new blocks from the last one.
    fake = PrefixKeys(tokens=real.tokens, keys=tuple(range(1, len(real.keys) + 1)), ends=real.ends)
    extended = schedule.extend(fake, whole[2000:])
    assert extended.keys[: len(real.keys)] == fake.keys
    assert extended.keys[len(real.keys):] != schedule.keys(whole).keys[len(real.keys):]
    assert len(extended.keys) == len(schedule.ends(3000))


@pytest.mark.parametrize("capacity", [float("inf"), 3000.0])
def test_binary_search_agrees_with_a_walk_over_every_block(capacity: float) -> None:
    # The binary search in match relies on each endpoint's held blocks being prefix-closed;
    # random traffic over shared prefixes, expiry and compaction must keep it so.
    rnd = random.Random(5)
    index = PrefixIndex(max_entries=400, engine_cache_tokens=capacity)
    systems = [_prompt(s, rnd.randrange(16, 1200)) for s in range(6)]
    prompts = []
    for step in range(400):
        prompt = rnd.choice(systems) + _prompt(1000 + step, rnd.randrange(0, 900))
        if prompts and rnd.random() < 0.3:
            prompt = rnd.choice(prompts) + _prompt(5000 + step, rnd.randrange(16, 300))  # a next turn
        prompts.append(prompt)
        endpoint = f"e{rnd.randrange(4)}"
        receipt = index.record(endpoint, prompt)
        if rnd.random() < 0.2:
            index.observe(endpoint, prompt, rnd.randrange(0, len(prompt) + 1), receipt=receipt)
        if rnd.random() < 0.05:
            # A failed request (as the router reports it: what was held stays).
            depth = index.held_depth(endpoint, *receipt)
            index.discard(endpoint, prompt, index.keys(prompt).ends[depth - 1] if depth else 0,
                          stamp=receipt[1])
        assert len(index) <= 400
        for probe in map(index.keys, rnd.sample(prompts, min(len(prompts), 5))):
            matched = index.match(probe)
            for e in ("e0", "e1", "e2", "e3"):
                depth = index.held_depth(e, index.stamps(e, probe))
                assert matched.get(e, 0) == (probe.ends[depth - 1] if depth else 0)
