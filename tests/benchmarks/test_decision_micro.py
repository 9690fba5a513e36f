"""The decision micro-benchmark runs every part, with and without the KV admission term
(what it measures is CPU time: no figure is asserted)."""

from __future__ import annotations

import pytest

from benchmarks.decision_micro import measure


@pytest.mark.parametrize("kv_tokens", [0, 1000])
def test_every_part_is_measured(kv_tokens: int) -> None:
    results, ratios = measure(iterations=300, endpoints=4, tokens=512, repeats=1, kv_tokens=kv_tokens)
    assert "decide(token ids)" in results and "reference: hash(tuple(token ids))" in results
    assert len(results) == len(ratios) == 9
    assert all(seconds > 0 for seconds in results.values())
    assert ratios["reference: hash(tuple(token ids))"] == 1.0
