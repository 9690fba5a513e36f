"""Fault knobs of a simulated engine: what can go wrong, settable at start and at runtime."""

from __future__ import annotations

import random
import zlib
from collections.abc import Mapping
from typing import Any

import attrs

__all__ = ["FaultConfig", "FaultInjector", "faults_from_json", "faults_to_json"]


def _non_negative(_inst: object, attr: attrs.Attribute[Any], value: float) -> None:
    if value < 0:
        raise ValueError(f"{attr.name} must be >= 0, got {value!r}")


def _rate(_inst: object, attr: attrs.Attribute[Any], value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{attr.name} must be within [0, 1], got {value!r}")


def _drop_after(_inst: object, attr: attrs.Attribute[Any], value: int | None) -> None:
    if value is not None and value < 0:
        raise ValueError(f"{attr.name} must be >= 0 or null, got {value!r}")


@attrs.frozen
class FaultConfig:
    """Faults an engine injects. Delays are wall seconds, not scaled by the engine's speed.

    * ``added_latency_s``: extra wait before a generation or tokenize request is handled.
    * ``error_rate``: share of those requests answered with a vLLM-shaped 500.
    * ``hang``: those requests never answer (until the client goes away).
    * ``drop_after_chunks``: a stream is cut (connection closed, no ``[DONE]``) after this
      many events; a non-streaming reply is cut halfway through its body.
    * ``slow_stream_s``: extra delay before every generated token.
    * ``dead``: ``/health`` and every API route answer 503.
    """

    added_latency_s: float = attrs.field(default=0.0, validator=_non_negative)
    error_rate: float = attrs.field(default=0.0, validator=_rate)
    hang: bool = False
    drop_after_chunks: int | None = attrs.field(default=None, validator=_drop_after)
    slow_stream_s: float = attrs.field(default=0.0, validator=_non_negative)
    dead: bool = False


_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "added_latency_s": (int, float),
    "error_rate": (int, float),
    "hang": (bool,),
    "drop_after_chunks": (int, type(None)),
    "slow_stream_s": (int, float),
    "dead": (bool,),
}


def faults_from_json(current: FaultConfig, patch: Mapping[str, Any]) -> FaultConfig:
    """``current`` with the fields named in ``patch`` replaced; ValueError on a bad field."""
    changes: dict[str, Any] = {}
    for name, value in patch.items():
        types = _FIELD_TYPES.get(name)
        if types is None:
            raise ValueError(f"unknown fault field {name!r}")
        # bool is an int subclass: only the bool fields take booleans.
        if isinstance(value, bool) and bool not in types:
            raise ValueError(f"fault field {name!r} must not be a boolean")
        if not isinstance(value, types):
            raise ValueError(f"fault field {name!r} has the wrong type")
        if float in types and isinstance(value, int | float):
            value = float(value)
        changes[name] = value
    return attrs.evolve(current, **changes)


def faults_to_json(faults: FaultConfig) -> dict[str, Any]:
    return attrs.asdict(faults)


class FaultInjector:
    """The live fault settings of one engine, and the dice for its error rate.

    The dice are seeded from the instance id, so a run is reproducible.
    """

    __slots__ = ("_random", "config")

    def __init__(self, config: FaultConfig, instance_id: str) -> None:
        self.config = config
        self._random = random.Random(zlib.crc32(instance_id.encode()))

    def update(self, patch: Mapping[str, Any]) -> FaultConfig:
        self.config = faults_from_json(self.config, patch)
        return self.config

    def should_fail(self) -> bool:
        rate = self.config.error_rate
        if rate <= 0.0:
            return False
        return rate >= 1.0 or self._random.random() < rate
