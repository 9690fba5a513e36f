"""The optional C extension for block keys: the same keys as the pure-Python loop, or none.

The native-only tests skip when the extension was not built (no C compiler at install); in
CI (``CI=true``) it must have been built, and they fail instead.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import types
from array import array
from collections.abc import Callable, Hashable, Iterator, Sequence

import pytest

from pixiu_kv.routing import _blocks
from pixiu_kv.routing._blocks import BlockSchedule, PrefixKeys, chain_reference

Chain = Callable[[Sequence[Hashable], int, Sequence[int], int], list[int]]

_IN_CI = os.environ.get("CI") == "true"


@pytest.fixture
def chain() -> Chain:
    try:
        from pixiu_kv.routing._blockhash import chain
    except ImportError as exc:
        if _IN_CI:
            pytest.fail(f"CI must build the C extension pixiu_kv.routing._blockhash: {exc}")
        pytest.skip("the C extension pixiu_kv.routing._blockhash is not built (no C compiler at install?)")
    return chain


@pytest.fixture
def pure(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Block keys in pure Python for the duration of a test."""
    monkeypatch.setattr(_blocks, "_native_chain", None)
    yield


def _random_ends(rnd: random.Random, n: int) -> tuple[int, list[int]]:
    """A start and nondecreasing ends within [start, n] (empty blocks included)."""
    ends = sorted(rnd.choices(range(n + 1), k=rnd.randrange(0, 40)))
    start = rnd.randrange(0, ends[0] + 1) if ends else rnd.randrange(0, n + 1)
    return start, ends


_ODD_ITEMS: list[Hashable] = [
    -1, -2, 0, 1, 2**30 - 1, 2**30, -(2**30), 2**31, 2**32 - 1, 2**32, 2**40, 2**61 - 2, 2**61 - 1,
    2**61, 2**63 - 1, 2**63, 2**64 + 5, -(2**62), -(2**64), 10**30, True, False, 3.0, 2.5, -1.0,
    "a", b"b", None, (1, 2), frozenset({3}),
]

_KEYS = [0, 1, -1, -2, 2**61 - 1, 2**61, 2**63 - 1, -(2**63), 0x5EED]


def test_chain_reference_is_the_pure_python_loop(pure: None) -> None:
    schedule = BlockSchedule(16, 256)
    prompt = [random.Random(1).randrange(150_000) for _ in range(3000)]
    ends = schedule.ends(len(prompt))
    assert tuple(chain_reference(prompt, 0, ends, 0)) == schedule.keys(prompt).keys


def test_native_chain_equals_the_definition_on_random_lists_tuples_and_arrays(chain: Chain) -> None:
    rnd = random.Random(3)
    for _ in range(300):
        n = rnd.randrange(0, 2000)
        ids: list[Hashable] = [rnd.choice(_ODD_ITEMS) if rnd.random() < 0.05 else rnd.randrange(200_000)
                               for _ in range(n)]
        start, ends = _random_ends(rnd, n)
        key = rnd.choice([*_KEYS, rnd.randrange(-(2**63), 2**63)])
        expected = chain_reference(ids, start, ends, key)
        assert chain(ids, start, ends, key) == expected
        assert chain(tuple(ids), start, tuple(ends), key) == expected
        packed = [v % 2**32 for v in ids if type(v) is int]
        start, ends = _random_ends(rnd, len(packed))
        expected = chain_reference(packed, start, ends, key)
        assert chain(array("I", packed), start, ends, key) == expected
        assert chain(memoryview(array("I", packed)), start, ends, key) == expected


def test_native_chain_reads_an_unaligned_buffer(chain: Chain) -> None:
    ids = array("I", range(100_000, 100_100))
    raw = b"\x00" + ids.tobytes()
    unaligned = memoryview(raw)[1:].cast("I")
    assert unaligned.tolist() == ids.tolist()
    assert chain(unaligned, 0, [16, 64, 100], 7) == chain_reference(ids.tolist(), 0, [16, 64, 100], 7)


def test_native_chain_hashes_other_items_as_python_does(chain: Chain) -> None:
    class Token(int):
        def __hash__(self) -> int:
            return 12345

    class Tokens(list[Hashable]):
        pass

    ids: list[Hashable] = [Token(5), 6, Token(-1), "x", 2**100]
    expected = chain_reference(ids, 0, [2, 5], 9)
    assert expected != chain_reference([5, 6, -1, "x", 2**100], 0, [2, 5], 9)
    assert chain(ids, 0, [2, 5], 9) == expected
    assert chain(Tokens(ids), 0, [2, 5], 9) == expected
    # Other iterables are copied to a list first.
    assert chain(range(100), 3, [20, 50], 1) == chain_reference(list(range(100)), 3, [20, 50], 1)
    assert chain((i for i in range(100)), 0, iter([20, 50]), 1) == chain_reference(list(range(100)), 0,
                                                                                    [20, 50], 1)


@pytest.mark.parametrize(("args", "error"), [
    (([1, 2, 3], 0, [4], 0), ValueError),  # past the end
    (([1, 2, 3], 0, [2, 1], 0), ValueError),  # ends decrease
    (([1, 2, 3], 2, [1], 0), ValueError),  # an end before start
    (([1, 2, 3], -1, [2], 0), ValueError),
    (([1, 2, 3], 4, [], 0), ValueError),
    ((array("I", [1, 2, 3]), 0, [4], 0), ValueError),
    ((array("I", [1, 2, 3]), 4, [], 0), ValueError),
    ((array("i", [1, 2, 3]), 0, [1], 0), TypeError),  # signed
    ((array("Q", [1, 2, 3]), 0, [1], 0), TypeError),
    ((array("H", [1, 2, 3]), 0, [1], 0), TypeError),
    ((b"abcd", 0, [1], 0), TypeError),
    ((memoryview(array("I", range(8)))[::2], 0, [1], 0), BufferError),  # not contiguous
    (([1, [2], 3], 0, [3], 0), TypeError),  # unhashable item
    (([1, 2, 3], 0, [1], []), TypeError),  # unhashable key
    (([1, 2, 3], 0, [1.0], 0), TypeError),
    (([1, 2, 3], 0.0, [1], 0), TypeError),
    (([1, 2, 3], 0, 3, 0), TypeError),
    ((5, 0, [1], 0), TypeError),
    (([1, 2, 3], 0, [1]), TypeError),  # three arguments
    (([1, 2, 3], 0, [2**70], 0), OverflowError),
])
def test_native_chain_rejects_bad_arguments(chain: Chain, args: tuple[object, ...], error: type) -> None:
    with pytest.raises(error):
        chain(*args)  # type: ignore[arg-type]


def test_native_chain_survives_a_hash_that_raises_or_changes_the_tokens(chain: Chain) -> None:
    class Raises:
        def __hash__(self) -> int:
            raise KeyError("no hash")

    marker = Raises()
    ids: list[object] = [*range(40), marker, *range(40)]
    before = sys.getrefcount(marker)
    for _ in range(100):
        with pytest.raises(KeyError):
            chain(ids, 0, [16, 32, 48, 80], 0)  # type: ignore[arg-type]
    assert sys.getrefcount(marker) == before

    shrink: list[object] = []

    class Shrinks:
        def __hash__(self) -> int:
            shrink.clear()
            return 1

    shrink.extend([*range(40), Shrinks(), *range(40)])
    with pytest.raises(RuntimeError, match="changed size"):
        chain(shrink, 0, [16, 32, 48, 80], 0)  # type: ignore[arg-type]

    ends = [16, 32, 48, 80]

    class ShrinksTheEnds:
        def __hash__(self) -> int:
            ends.clear()
            return 1

    ids = [*range(40), ShrinksTheEnds(), *range(40)]
    expected = chain_reference([*range(40), 1, *range(40)], 0, [16, 32, 48, 80], 0)
    assert chain(ids, 0, ends, 0) == expected  # type: ignore[arg-type]  # the ends as they were passed


@pytest.mark.parametrize(("block_size", "max_block_size"), [(16, 256), (1, 1), (4, 64), (256, 256)])
def test_keys_and_extend_are_the_same_native_and_pure(chain: Chain, monkeypatch: pytest.MonkeyPatch,
                                                      block_size: int, max_block_size: int) -> None:
    rnd = random.Random(block_size * 1000 + max_block_size)
    schedule = BlockSchedule(block_size, max_block_size)
    monkeypatch.setattr(_blocks, "_native_chain", chain)
    cases = []
    for _ in range(40):
        whole = [rnd.randrange(2**32) if rnd.random() < 0.1 else rnd.randrange(150_000)
                 for _ in range(rnd.randrange(0, 5000))]
        old = rnd.randrange(0, len(whole) + 1)
        for kind in (list, tuple, lambda ids: array("I", ids)):
            prompt = kind(whole)
            known = schedule.keys(kind(whole[:old]))
            cases.append((prompt, schedule.keys(prompt), known, whole[old:],
                          schedule.extend(known, whole[old:]), schedule.extend(known.compact(), whole[old:])))
    monkeypatch.setattr(_blocks, "_native_chain", None)
    for prompt, keys, known, more, extended, extended_compact in cases:
        pure = schedule.keys(prompt)
        assert (keys.keys, keys.ends) == (pure.keys, pure.ends)
        # Kept as given, except a list that pure Python copies to a tuple to slice it.
        assert keys.tokens is prompt
        assert pure.tokens is prompt or (type(prompt) is list and pure.tokens == tuple(prompt))
        for native_result, known_tokens in ((extended, known), (extended_compact, known.compact())):
            pure_result = schedule.extend(known_tokens, more)
            assert (native_result.keys, native_result.ends) == (pure_result.keys, pure_result.ends)
            assert list(native_result.tokens) == list(pure_result.tokens)
            assert native_result.keys == schedule.keys(list(prompt)).keys


@pytest.mark.parametrize("native", [False, True])
def test_keys_keep_a_tuple_or_packed_ids_as_given_and_a_list_when_native(request: pytest.FixtureRequest,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  native: bool) -> None:
    monkeypatch.setattr(_blocks, "_native_chain", request.getfixturevalue("chain") if native else None)
    schedule = BlockSchedule(16, 256)
    ids = list(range(1000, 1600))
    as_tuple, packed = tuple(ids), array("I", ids)
    assert schedule.keys(as_tuple).tokens is as_tuple
    assert schedule.keys(packed).tokens is packed
    from_list = schedule.keys(ids)
    if native:
        assert from_list.tokens is ids  # hashed in place, not copied
    else:
        assert type(from_list.tokens) is tuple and from_list.tokens == as_tuple
    # Known answers (as in test_routing_prefix_index.py), either way.
    assert from_list.keys[0] == 3415446868550774468 and from_list.keys[24] == -590067908696519777
    # Ids packed in another width are copied to a tuple (the extension reads only 'I').
    wide = schedule.keys(array("q", range(1000, 1600)))
    assert type(wide.tokens) is tuple and wide.keys == from_list.keys
    # Extending keys whose tokens are another sequence type works too.
    odd = PrefixKeys(tokens=array("q", range(1000, 1300)), keys=from_list.keys[:17], ends=from_list.ends[:17])
    assert schedule.extend(odd, range(1300, 1600)).keys == from_list.keys


def test_a_native_chain_that_disagrees_or_fails_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    name = "pixiu_kv.routing._blockhash"
    monkeypatch.delenv(_blocks.PURE_PYTHON_ENV, raising=False)

    def with_chain(fn: Callable[..., list[int]]) -> types.ModuleType:
        module = types.ModuleType(name)
        module.chain = fn  # type: ignore[attr-defined]
        return module

    good = with_chain(chain_reference)
    monkeypatch.setitem(sys.modules, name, good)
    assert _blocks._load_native() is chain_reference

    def off_by_one(tokens: Sequence[Hashable], start: int, ends: Sequence[int], key: int) -> list[int]:
        return [k + 1 for k in chain_reference(tokens, start, ends, key)]

    def no_packed_ids(tokens: Sequence[Hashable], start: int, ends: Sequence[int], key: int) -> list[int]:
        if isinstance(tokens, array):
            raise TypeError("no buffers")
        return chain_reference(tokens, start, ends, key)

    for fn in (off_by_one, no_packed_ids):
        monkeypatch.setitem(sys.modules, name, with_chain(fn))
        assert _blocks._load_native() is None
    monkeypatch.setitem(sys.modules, name, None)  # import fails
    assert _blocks._load_native() is None
    monkeypatch.setitem(sys.modules, name, good)
    monkeypatch.setenv(_blocks.PURE_PYTHON_ENV, "1")
    assert _blocks._load_native() is None
    monkeypatch.setenv(_blocks.PURE_PYTHON_ENV, "0")
    assert _blocks._load_native() is chain_reference


def _native_keys_in_a_new_process(pure_python: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != _blocks.PURE_PYTHON_ENV}
    if pure_python is not None:
        env[_blocks.PURE_PYTHON_ENV] = pure_python
    code = "from pixiu_kv.routing import NATIVE_KEYS; print(NATIVE_KEYS)"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env=env, timeout=60).stdout.strip()


def test_the_environment_variable_selects_pure_python() -> None:
    assert _native_keys_in_a_new_process("1") == "False"


def test_native_keys_are_used_when_built(chain: Chain) -> None:
    """With the extension built, a new process uses it (its self-check passed), unless told not to."""
    assert _native_keys_in_a_new_process(None) == "True"
    assert _native_keys_in_a_new_process("0") == "True"
    if os.environ.get(_blocks.PURE_PYTHON_ENV, "") in ("", "0"):
        assert _blocks.NATIVE_KEYS


# -- the prefix index's loops ----------------------------------------------------------

def _index_traffic(native: bool, monkeypatch: pytest.MonkeyPatch, seed: int) -> list[object]:
    """Everything a PrefixIndex answers under random traffic (records, reports, failures,
    expiry, compaction), with its loops in C or in pure Python."""
    from pixiu_kv.routing import _prefix_index
    from pixiu_kv.routing._prefix_index import PrefixIndex

    monkeypatch.setattr(_prefix_index, "_NATIVE", native)
    rnd = random.Random(seed)
    index = PrefixIndex(max_entries=300, engine_cache_tokens=rnd.choice([float("inf"), 2500.0]))
    schedule = index.schedule
    systems = [[rnd.randrange(32000) for _ in range(rnd.randrange(16, 900))] for _ in range(5)]
    prompts: list[PrefixKeys] = []
    seen: list[object] = []
    for step in range(300):
        ids = rnd.choice(systems) + [rnd.randrange(32000) for _ in range(rnd.randrange(0, 600))]
        prompt = schedule.keys(ids)
        prompts.append(prompt)
        endpoint = f"e{rnd.randrange(5)}"
        receipt = index.record(endpoint, prompt)
        seen.append(receipt)
        if rnd.random() < 0.3:
            seen.append(index.observe(endpoint, prompt, rnd.randrange(0, prompt.length + 1), receipt=receipt))
        if rnd.random() < 0.05:
            keep = rnd.randrange(0, prompt.length + 1)
            seen.append(index.discard(endpoint, prompt, keep, stamp=receipt[1]))
        for probe in rnd.sample(prompts, min(3, len(prompts))):
            matched = index.match(probe)
            seen.append(list(matched.items()))  # in order
        seen.append((len(index), index.lookups, step))
    return seen


@pytest.mark.parametrize("seed", range(4))
def test_the_index_answers_the_same_with_its_loops_in_c(chain: Chain, monkeypatch: pytest.MonkeyPatch,
                                                        seed: int) -> None:
    assert _index_traffic(True, monkeypatch, seed) == _index_traffic(False, monkeypatch, seed)


def test_the_index_loops_reject_what_they_cannot_read(chain: Chain) -> None:
    from pixiu_kv.routing import _blockhash

    assert _blockhash.stamp({1: 0.5}, (1, 2), 3.0) == [0.5, None]
    found = _blockhash.depths({"e": {1: 0.0, 2: 0.0}}, (1, 2, 3), (16, 32, 48), {}, {}, float("inf"))
    assert found == ({"e": 32}, 3)
    with pytest.raises(TypeError):
        _blockhash.stamp({}, [1, 2], 3.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        _blockhash.depths({"e": [1]}, (1,), (16,), {}, {}, 1.0)  # type: ignore[dict-item]
    with pytest.raises(ValueError):
        _blockhash.depths({}, (1, 2), (16,), {}, {}, 1.0)
    with pytest.raises(TypeError):
        _blockhash.depths({"e": {1: "old"}}, (1,), (16,), {}, {}, 1.0)  # type: ignore[dict-item]
