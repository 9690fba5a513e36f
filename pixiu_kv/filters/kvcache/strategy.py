"""The cache-management decision for one request: a pure function of its inputs.

* compress when the host's CPU usage ratio >= ``load_threshold`` (a threshold of 0 is off);
* pin when the prompt is hot: seen >= ``hot_content_threshold`` times within the hot window
  (0 is off);
* evict when the host's memory usage ratio >= ``memory_threshold`` (0 is off);

each only when its ``enable_*`` flag is set. An action targets the configured
``*_instance_id`` when there is one, else the instance that the lookup found holding the
longest prefix of the prompt; with neither, the action is skipped.

Pinning and evicting the same tokens in one decision would undo each other: pin wins,
because a prompt that is hot right now is the one worth keeping under memory pressure.
"""

from __future__ import annotations

from typing import Literal

import attrs

from ...config import CacheStrategyConfig
from ...hostload import HostLoad
from ...upstream.lmcache import LookupResult

__all__ = ["DEFAULT_LOCATION", "Action", "decide"]

DEFAULT_LOCATION = "LocalCPUBackend"
"""LMCache's CPU tier: the location used when neither the config nor the lookup names one."""

ActionKind = Literal["compress", "pin", "evict"]


@attrs.frozen(slots=True)
class Action:
    kind: ActionKind
    instance_id: str
    location: str
    method: str = ""


def decide(
    strategy: CacheStrategyConfig,
    load: HostLoad | None,
    hot_count: int,
    lookup: LookupResult | None,
) -> tuple[Action, ...]:
    """The actions to run, in order compress, pin, evict. ``load`` None = not sampled yet."""
    actions: list[Action] = []
    if (strategy.enable_compression and strategy.load_threshold > 0 and load is not None
            and load.cpu >= strategy.load_threshold):
        target = _target(strategy.compress_instance_id, strategy.compress_location, lookup)
        if target is not None:
            actions.append(Action("compress", target[0], target[1], strategy.compress_method))
    pinned = False
    if (strategy.enable_pinning and strategy.hot_content_threshold > 0
            and hot_count >= strategy.hot_content_threshold):
        target = _target(strategy.pin_instance_id, strategy.pin_location, lookup)
        if target is not None:
            actions.append(Action("pin", target[0], target[1]))
            pinned = True
    if (strategy.enable_eviction and strategy.memory_threshold > 0 and load is not None
            and load.memory >= strategy.memory_threshold and not pinned):
        target = _target(strategy.evict_instance_id, "", lookup)
        if target is not None:
            actions.append(Action("evict", target[0], target[1]))
    return tuple(actions)


def _target(instance_id: str, location: str, lookup: LookupResult | None) -> tuple[str, str] | None:
    """(instance, location) for an action, or None when there is nowhere to aim it."""
    if instance_id:
        found = lookup.layout.get(instance_id) if lookup is not None else None
        return instance_id, location or (found.location if found is not None else DEFAULT_LOCATION)
    best = lookup.best if lookup is not None else None
    if best is None:
        return None
    return best.instance_id, location or best.location or DEFAULT_LOCATION
