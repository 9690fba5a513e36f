"""Parsing primitives for the TOML configuration: durations, sizes and a strict table reader.

Every error names the dotted path of the field, the offending value and what is allowed,
e.g. ``http_filters[0].config.cache_strategy.load_threshold: 1.7 is outside [0, 1]``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

__all__ = [
    "ConfigError",
    "FieldError",
    "Table",
    "format_duration",
    "parse_duration",
    "parse_size",
]

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration is invalid. ``str(err)`` is ``"<path>: <value> <problem>"``."""

    def __init__(self, path: str, value: object, problem: str) -> None:
        self.path = path
        self.value = value
        self.problem = problem
        super().__init__(f"{path}: {_show(value)} {problem}" if path else f"{_show(value)} {problem}")


class FieldError(ValueError):
    """Raised by value-class validators; the reader adds the path of the table."""

    def __init__(self, field: str, value: object, problem: str) -> None:
        self.field = field
        self.value = value
        self.problem = problem
        super().__init__(f"{field}: {_show(value)} {problem}")


def _show(value: object) -> str:
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, float) and value.is_integer():
        return repr(value)
    return repr(value)


_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(us|µs|ms|s|m|h)\s*$")
_DURATION_UNITS = {"us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """``"50ms"`` -> 0.05 seconds. A compound form like ``"1m30s"`` is accepted too."""
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*(us|µs|ms|s|m|h)", text)
    joined = "".join(f"{n}{u}" for n, u in parts)
    if not parts or joined != re.sub(r"\s+", "", text):
        if text.strip().startswith("-"):
            raise ValueError("is negative; durations must be >= 0")
        raise ValueError("is not a duration; use a number with a unit: us, ms, s, m, h (e.g. '50ms')")
    return sum(float(n) * _DURATION_UNITS[u] for n, u in parts)


def format_duration(seconds: float) -> str:
    """Inverse of :func:`parse_duration`, choosing the largest exact unit."""
    if seconds == 0:
        return "0s"
    for unit, scale in (("h", 3600.0), ("m", 60.0), ("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        n = seconds / scale
        if n >= 1 and math.isclose(n, round(n), rel_tol=0, abs_tol=1e-9):
            return f"{round(n)}{unit}"
    return f"{seconds * 1e3:g}ms"


_SIZE_RE = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|GiB|KB|MB|GB)?\s*$")
_SIZE_UNITS = {
    None: 1, "B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3,
    "KB": 1000, "MB": 1000**2, "GB": 1000**3,
}


def parse_size(value: int | str) -> int:
    """``"8MiB"`` or ``8388608`` -> bytes."""
    if isinstance(value, int):
        return value
    m = _SIZE_RE.match(value)
    if not m:
        raise ValueError("is not a size; use bytes or a unit: B, KiB, MiB, GiB, KB, MB, GB")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2)]


_MISSING: Any = object()


class Table:
    """A strict reader of one TOML table: typed getters, and unknown keys rejected by
    :meth:`close`. Getters raise :class:`ConfigError` naming ``path.key``."""

    __slots__ = ("_data", "_seen", "path")

    def __init__(self, data: Mapping[str, Any], path: str = "") -> None:
        self._data = data
        self.path = path
        self._seen: set[str] = set()

    def at(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def has(self, key: str) -> bool:
        self._seen.add(key)
        return key in self._data

    def _get(self, key: str, default: Any) -> Any:
        self._seen.add(key)
        if key in self._data:
            return self._data[key]
        if default is _MISSING:
            raise ConfigError(self.at(key), "(missing)", "is required")
        return default

    def _typed(self, key: str, default: Any, types: tuple[type, ...], what: str) -> Any:
        value = self._get(key, default)
        # bool is an int in Python; never accept it where a number is meant.
        if isinstance(value, bool) and bool not in types:
            raise ConfigError(self.at(key), value, f"is not {what}")
        if not isinstance(value, types):
            raise ConfigError(self.at(key), value, f"is not {what}")
        return value

    def text(self, key: str, default: Any = _MISSING, *, choices: Mapping[str, str] | None = None) -> str:
        """A string; with ``choices`` (alias -> canonical) it must be one of them."""
        value: str = self._typed(key, default, (str,), "a string")
        if choices is not None:
            if value not in choices:
                allowed = ", ".join(sorted(set(choices)))
                raise ConfigError(self.at(key), value, f"is not one of: {allowed}")
            return choices[value]
        return value

    def flag(self, key: str, default: Any = _MISSING) -> bool:
        value: bool = self._typed(key, default, (bool,), "a boolean (true or false)")
        return value

    def integer(self, key: str, default: Any = _MISSING, *, minimum: int | None = None,
            maximum: int | None = None) -> int:
        value: int = self._typed(key, default, (int,), "an integer")
        _check_range(self.at(key), value, minimum, maximum)
        return value

    def number(self, key: str, default: Any = _MISSING, *, minimum: float | None = None,
              maximum: float | None = None) -> float:
        value = self._typed(key, default, (int, float), "a number")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(self.at(key), value, "is not a finite number")
        _check_range(self.at(key), value, minimum, maximum)
        return float(value)

    def ratio(self, key: str, default: Any = _MISSING) -> float:
        value = self._typed(key, default, (int, float), "a number in [0, 1]")
        if not (0.0 <= value <= 1.0):
            raise ConfigError(self.at(key), value, "is outside [0, 1]")
        return float(value)

    def duration(self, key: str, default: Any = _MISSING, *, minimum: float = 0.0,
                 positive: bool = False) -> float:
        """A duration string such as ``"50ms"``; returns seconds."""
        raw = self._get(key, default)
        if isinstance(raw, (int, float)) and not isinstance(raw, bool) and key not in self._data:
            seconds = float(raw)  # a default given in seconds
        elif isinstance(raw, str):
            try:
                seconds = parse_duration(raw)
            except ValueError as exc:
                raise ConfigError(self.at(key), raw, str(exc)) from None
        else:
            raise ConfigError(self.at(key), raw, "is not a duration string (e.g. '50ms', '2s', '5m')")
        if positive and seconds <= 0:
            raise ConfigError(self.at(key), raw, "must be greater than 0")
        if seconds < minimum:
            raise ConfigError(self.at(key), raw, f"must be at least {format_duration(minimum)}")
        return seconds

    def size(self, key: str, default: Any = _MISSING, *, minimum: int = 1) -> int:
        raw = self._get(key, default)
        if isinstance(raw, bool) or not isinstance(raw, (int, str)):
            raise ConfigError(self.at(key), raw, "is not a size (bytes, or a string like '8MiB')")
        try:
            value = parse_size(raw)
        except ValueError as exc:
            raise ConfigError(self.at(key), raw, str(exc)) from None
        if value < minimum:
            raise ConfigError(self.at(key), raw, f"must be at least {minimum} bytes")
        return value

    def str_list(self, key: str, default: Any = _MISSING) -> tuple[str, ...]:
        value = self._typed(key, default, (list, tuple), "a list of strings")
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise ConfigError(f"{self.at(key)}[{i}]", item, "is not a string")
        return tuple(value)

    def table(self, key: str) -> Table:
        """A sub-table; an absent one reads as empty (all defaults)."""
        value = self._typed(key, {}, (dict,), "a table")
        return Table(value, self.at(key))

    def tables(self, key: str, *, required: bool = False) -> list[Table]:
        """An array of tables (``[[key]]``)."""
        value = self._typed(key, _MISSING if required else [], (list,), "an array of tables")
        out = []
        for i, item in enumerate(value):
            if not isinstance(item, dict):
                raise ConfigError(f"{self.at(key)}[{i}]", item, "is not a table")
            out.append(Table(item, f"{self.at(key)}[{i}]"))
        return out

    def build(self, factory: Callable[..., T], **fields: Any) -> T:
        """Close the table, then construct a value class, mapping validator errors to paths."""
        self.close()
        try:
            return factory(**fields)
        except FieldError as exc:
            raise ConfigError(self.at(exc.field), exc.value, exc.problem) from None

    def close(self) -> None:
        """Reject keys nobody read: a typo never silently becomes a default."""
        unknown = sorted(set(self._data) - self._seen)
        if unknown:
            allowed = ", ".join(sorted(self._seen)) or "(none)"
            raise ConfigError(self.at(unknown[0]), self._data[unknown[0]],
                              f"is an unknown key; allowed keys here: {allowed}")


def _check_range(path: str, value: float, minimum: float | None, maximum: float | None) -> None:
    if minimum is not None and maximum is not None and not (minimum <= value <= maximum):
        raise ConfigError(path, value, f"is outside [{minimum}, {maximum}]")
    if minimum is not None and value < minimum:
        raise ConfigError(path, value, f"must be at least {minimum}")
    if maximum is not None and value > maximum:
        raise ConfigError(path, value, f"must be at most {maximum}")
