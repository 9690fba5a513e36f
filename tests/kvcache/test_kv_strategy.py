from __future__ import annotations

from typing import Any

import pytest

from pixiu_kv.config import CacheStrategyConfig
from pixiu_kv.filters.kvcache import Action, decide
from pixiu_kv.hostload import HostLoad
from pixiu_kv.upstream.lmcache import parse_lookup_reply

ALL_ON = {"enable_compression": True, "enable_pinning": True, "enable_eviction": True,
          "load_threshold": 0.7, "memory_threshold": 0.85, "hot_content_threshold": 3}
FOUND = parse_lookup_reply({"layout_info": {"A": ["LocalCPUBackend", 256], "B": ["LocalDiskBackend", 512]}})
NOWHERE = parse_lookup_reply({"layout_info": {}})
IDLE = HostLoad(cpu=0.1, memory=0.1)
BUSY = HostLoad(cpu=0.7, memory=0.1)
FULL = HostLoad(cpu=0.1, memory=0.85)
BOTH = HostLoad(cpu=0.9, memory=0.9)

CASES: list[tuple[str, dict[str, Any], HostLoad | None, int, Any, list[Action]]] = [
    ("idle, cold: nothing", ALL_ON, IDLE, 1, FOUND, []),
    ("cpu at threshold: compress where the prefix is", ALL_ON, BUSY, 1, FOUND,
     [Action("compress", "B", "LocalDiskBackend", "zstd")]),
    ("hot: pin where the prefix is", ALL_ON, IDLE, 3, FOUND, [Action("pin", "B", "LocalDiskBackend")]),
    ("memory at threshold: evict", ALL_ON, FULL, 1, FOUND, [Action("evict", "B", "LocalDiskBackend")]),
    ("hot under memory pressure: pin wins, no evict", ALL_ON, FULL, 5, FOUND,
     [Action("pin", "B", "LocalDiskBackend")]),
    ("everything: compress then pin", ALL_ON, BOTH, 5, FOUND,
     [Action("compress", "B", "LocalDiskBackend", "zstd"), Action("pin", "B", "LocalDiskBackend")]),
    ("no load sample yet: only pin can fire", ALL_ON, None, 5, FOUND,
     [Action("pin", "B", "LocalDiskBackend")]),
    ("prefix nowhere and no configured target: skip", ALL_ON, BOTH, 5, NOWHERE, []),
    ("no lookup at all: skip", ALL_ON, BOTH, 5, None, []),
    ("disabled flags", {**ALL_ON, "enable_compression": False, "enable_pinning": False,
                        "enable_eviction": False}, BOTH, 5, FOUND, []),
    ("thresholds 0 are off", {**ALL_ON, "load_threshold": 0.0, "memory_threshold": 0.0,
                              "hot_content_threshold": 0}, HostLoad(1.0, 1.0), 300, FOUND, []),
    ("configured targets win over the lookup", {**ALL_ON, "pin_instance_id": "P", "pin_location": "L",
                                                "compress_instance_id": "C", "compress_method": "lz4"},
     BOTH, 5, NOWHERE, [Action("compress", "C", "LocalCPUBackend", "lz4"), Action("pin", "P", "L")]),
    ("configured instance takes the lookup's location for it", {**ALL_ON, "evict_instance_id": "A"},
     FULL, 1, FOUND, [Action("evict", "A", "LocalCPUBackend")]),
    ("configured location overrides", {**ALL_ON, "pin_location": "LocalDiskBackend"}, IDLE, 3, FOUND,
     [Action("pin", "B", "LocalDiskBackend")]),
    ("below thresholds", ALL_ON, HostLoad(0.69, 0.84), 2, FOUND, []),
]


@pytest.mark.parametrize(("name", "strategy", "load", "hot", "lookup", "expected"), CASES,
                         ids=[c[0] for c in CASES])
def test_decision_table(name: str, strategy: dict[str, Any], load: HostLoad | None, hot: int,
                        lookup: Any, expected: list[Action]) -> None:
    assert list(decide(CacheStrategyConfig(**strategy), load, hot, lookup)) == expected


def test_decide_is_pure() -> None:
    cfg = CacheStrategyConfig(**ALL_ON)
    assert decide(cfg, BOTH, 5, FOUND) == decide(cfg, BOTH, 5, FOUND)
