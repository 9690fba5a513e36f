"""The decision micro-benchmark runs every part, with and without the KV admission term
(what it measures is CPU time: no figure is asserted)."""

from __future__ import annotations

import pytest

from benchmarks.decision_micro import _BATCH, _Bench, measure


@pytest.mark.parametrize("kv_tokens", [0, 1000])
def test_every_part_is_measured(kv_tokens: int) -> None:
    results, ratios = measure(iterations=300, endpoints=4, tokens=512, repeats=1, kv_tokens=kv_tokens)
    assert "decide(token ids)" in results and "reference: hash(tuple(token ids))" in results
    assert len(results) == len(ratios) == 10
    assert all(seconds > 0 for seconds in results.values())
    assert ratios["reference: hash(tuple(token ids))"] == 1.0


def test_new_prompts_stay_first_sight_across_rounds() -> None:
    # Releasing a new prompt's reservation drops its blocks, so every round measures a first
    # sight (new-prefix placement), not a cache match.
    bench = _Bench(endpoints=4, tokens=512)
    for start in range(0, 4 * len(bench.new_prompts), _BATCH):
        bench.decide_new_tokens(start)
        assert all(d.matched_tokens == 0 and d.reason in ("load", "new-prefix") for d in bench.decisions)
        bench.release()
