from __future__ import annotations

from typing import Any

import pytest

from pixiu_kv.upstream.lmcache import LayoutEntry, parse_lookup_reply
from pixiu_kv.upstream.resilience import MalformedReply
from pixiu_kv.upstream.tokenizer import parse_tokenize_reply


def test_real_controller_array_form_best_is_largest_matched_end() -> None:
    r = parse_lookup_reply({"event_id": "x", "layout_info": {
        "C": ["LocalCPUBackend", 512], "D": ["LocalCPUBackend", 1024]}})
    assert r.best == LayoutEntry("D", "LocalCPUBackend", 1024)
    assert set(r.layout) == {"C", "D"}


def test_pixiu_object_form() -> None:
    r = parse_lookup_reply({"layout_info": {"a": {"0": "LocalCPUBackend", "1": 10},
                                            "b": {"0": "LocalCPUBackend", "1": 30}}})
    assert r.best == LayoutEntry("b", "LocalCPUBackend", 30)


def test_mixed_forms_and_malformed_entries_are_ignored() -> None:
    r = parse_lookup_reply({"layout_info": {
        "good": ["LocalCPUBackend", 5],
        "obj": {"0": "LocalCPUBackend", "1": 7},
        "short": ["LocalCPUBackend"],
        "long": ["a", 1, 2],
        "strcount": ["LocalCPUBackend", "900"],
        "boolcount": ["LocalCPUBackend", True],
        "floatcount": ["LocalCPUBackend", 9.5],
        "negative": ["LocalCPUBackend", -4],
        "badloc": [3, 99],
        "null": None,
        "objnocount": {"0": "LocalCPUBackend"},
        "": ["LocalCPUBackend", 1000],
    }})
    assert set(r.layout) == {"good", "obj"}
    assert r.best is not None and r.best.instance_id == "obj"


def test_zero_matched_never_wins_and_miss_is_empty() -> None:
    assert parse_lookup_reply({"layout_info": {"z": ["LocalCPUBackend", 0]}}).best is None
    miss = parse_lookup_reply({"event_id": "e", "layout_info": {}})
    assert miss.best is None and dict(miss.layout) == {}


def test_ties_are_broken_deterministically() -> None:
    a = parse_lookup_reply({"layout_info": {"b": ["L", 5], "a": ["L", 5]}})
    b = parse_lookup_reply({"layout_info": {"a": ["L", 5], "b": ["L", 5]}})
    assert a.best == b.best == LayoutEntry("a", "L", 5)


@pytest.mark.parametrize("reply", [None, [], "x", {}, {"layout_info": []}, {"layout_info": "a"},
                                   {"detail": "boom"}])
def test_reply_without_layout_is_malformed(reply: Any) -> None:
    with pytest.raises(MalformedReply):
        parse_lookup_reply(reply)


def test_tokenize_reply() -> None:
    r = parse_tokenize_reply({"count": 3, "tokens": [1, 2, 3], "max_model_len": 8})
    assert r.tokens == [1, 2, 3] and r.max_model_len == 8
    for bad in (None, {"tokens": "abc"}, {"tokens": [1, "2"]}, {"tokens": [1.0]}, {"count": 2, "tokens": [1]},
                {"tokens": [True]}):
        with pytest.raises(MalformedReply):
            parse_tokenize_reply(bad)
