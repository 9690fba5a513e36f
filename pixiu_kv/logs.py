"""Structured one-line logs: ``key=value`` text or JSON, chosen by ``[log].format``.

Every record is one line with a timestamp, level, logger, an event name and fields. The
request path logs sizes, ids and durations only, never prompt text.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

from .config import LogConfig

__all__ = ["JsonFormatter", "KeyValueFormatter", "configure_logging", "log_event"]

_FIELDS = "pixiu_fields"
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


def log_event(logger: logging.Logger, level: int, event: str, **fields: Any) -> None:
    """Log ``event`` with structured ``fields`` (skipped cheaply when the level is off)."""
    if logger.isEnabledFor(level):
        logger.log(level, event, extra={_FIELDS: fields})


def _fields(record: logging.LogRecord) -> Mapping[str, Any]:
    fields = getattr(record, _FIELDS, None)
    return fields if isinstance(fields, Mapping) else {}


def _timestamp(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


def _text_value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, list | tuple):
        value = ",".join(map(str, value))
    text = str(value)
    if text == "" or any(c in text for c in ' "=\n\t'):
        return json.dumps(text)
    return text


class KeyValueFormatter(logging.Formatter):
    """``ts=... level=info logger=pixiu_kv.access event=request request_id=... status=200``."""

    def format(self, record: logging.LogRecord) -> str:
        parts = [f"ts={_timestamp(record)}", f"level={record.levelname.lower()}",
                 f"logger={record.name}", f"event={_text_value(record.getMessage())}"]
        parts.extend(f"{k}={_text_value(v)}" for k, v in _fields(record).items())
        line = " ".join(parts)
        if record.exc_info:
            line += " exc=" + json.dumps(self.formatException(record.exc_info))
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line with the same keys as the text format."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"ts": _timestamp(record), "level": record.levelname.lower(),
                               "logger": record.name, "event": record.getMessage()}
        out.update(_fields(record))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, separators=(",", ":"))


def configure_logging(config: LogConfig, stream: TextIO | None = None) -> None:
    """Route the ``pixiu_kv`` loggers to one handler with the configured format and level."""
    root = logging.getLogger("pixiu_kv")
    for handler in list(root.handlers):
        if getattr(handler, "_pixiu_kv", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler._pixiu_kv = True  # type: ignore[attr-defined]
    handler.setFormatter(JsonFormatter() if config.format == "json" else KeyValueFormatter())
    root.addHandler(handler)
    root.setLevel(_LEVELS.get(config.level, logging.INFO))
    root.propagate = False
