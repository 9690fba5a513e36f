"""Request-body validation with the real controller's (FastAPI + pydantic v2) 422 shape.

The real controller validates leniently: unknown fields are ignored, ``"5"``, ``5.0``
and ``true`` are accepted as integers. ``strict`` mode instead rejects unknown fields
and anything but a JSON integer, to check that a client sends exactly the documented body.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from enum import Enum
from typing import Any

import attrs

__all__ = ["BodyError", "FieldKind", "FieldSpec", "parse_json_body", "validate_body"]

_INT_TEXT = re.compile(r"^\s*[+-]?\d+\s*$")


class FieldKind(Enum):
    STR = "str"
    INT_LIST = "int_list"
    STR_PAIR = "str_pair"
    BOOL = "bool"


@attrs.frozen(slots=True)
class FieldSpec:
    name: str
    kind: FieldKind
    required: bool = True
    nullable: bool = False
    default: Any = None


class BodyError(Exception):
    """A 422 reply: ``detail`` is the list FastAPI would return."""

    def __init__(self, detail: list[dict[str, Any]]) -> None:
        super().__init__(f"{len(detail)} validation error(s)")
        self.detail = detail


def _error(kind: str, loc: list[str | int], msg: str, value: Any) -> dict[str, Any]:
    return {"type": kind, "loc": loc, "msg": msg, "input": value}


def parse_json_body(raw: bytes, content_type: str) -> Any:
    """Decode a body as FastAPI does for a pydantic body model; raise BodyError if it cannot."""
    if not raw:
        raise BodyError([_error("missing", ["body"], "Field required", None)])
    text = raw.decode("utf-8", errors="replace")
    if "json" not in content_type.lower():
        # FastAPI hands a non-JSON body to the model as a string.
        raise BodyError(
            [
                _error(
                    "model_attributes_type",
                    ["body"],
                    "Input should be a valid dictionary or object to extract fields from",
                    text,
                )
            ]
        )
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        err = _error("json_invalid", ["body", exc.pos], "JSON decode error", {})
        err["ctx"] = {"error": exc.msg}
        raise BodyError([err]) from None


def _int(value: Any, loc: list[str | int], strict: bool, errors: list[dict[str, Any]]) -> int | None:
    if isinstance(value, bool):
        if strict:
            errors.append(_error("int_type", loc, "Input should be a valid integer", value))
            return None
        return int(value)
    if isinstance(value, int):
        return value
    if not strict and isinstance(value, float):
        if value.is_integer():
            return int(value)
        errors.append(
            _error(
                "int_from_float",
                loc,
                "Input should be a valid integer, got a number with a fractional part",
                value,
            )
        )
        return None
    if not strict and isinstance(value, str):
        if _INT_TEXT.match(value):
            return int(value)
        errors.append(
            _error(
                "int_parsing",
                loc,
                "Input should be a valid integer, unable to parse string as an integer",
                value,
            )
        )
        return None
    errors.append(_error("int_type", loc, "Input should be a valid integer", value))
    return None


def _field(spec: FieldSpec, value: Any, strict: bool, errors: list[dict[str, Any]]) -> Any:
    loc: list[str | int] = ["body", spec.name]
    if value is None and spec.nullable:
        return None
    if spec.kind is FieldKind.STR:
        if isinstance(value, str):
            return value
        errors.append(_error("string_type", loc, "Input should be a valid string", value))
        return None
    if spec.kind is FieldKind.BOOL:
        if isinstance(value, bool):
            return value
        if not strict and value in (0, 1, "true", "false", "0", "1"):
            return value in (1, "true", "1")
        errors.append(_error("bool_type", loc, "Input should be a valid boolean", value))
        return None
    if spec.kind is FieldKind.STR_PAIR:
        if not isinstance(value, list) or len(value) != 2:
            errors.append(_error("tuple_type", loc, "Input should be a valid tuple of two strings", value))
            return None
        pair: list[str] = []
        for i, item in enumerate(value):
            if isinstance(item, str):
                pair.append(item)
            else:
                errors.append(_error("string_type", [*loc, i], "Input should be a valid string", item))
        return tuple(pair) if len(pair) == 2 else None
    # INT_LIST
    if not isinstance(value, list):
        errors.append(_error("list_type", loc, "Input should be a valid list", value))
        return None
    before = len(errors)
    ints = [_int(item, [*loc, i], strict, errors) for i, item in enumerate(value)]
    return ints if len(errors) == before else None


def validate_body(body: Any, specs: tuple[FieldSpec, ...], *, strict: bool) -> dict[str, Any]:
    """Check a decoded JSON body against ``specs``; return the coerced fields or raise BodyError."""
    if not isinstance(body, Mapping):
        raise BodyError(
            [
                _error(
                    "model_attributes_type",
                    ["body"],
                    "Input should be a valid dictionary or object to extract fields from",
                    body,
                )
            ]
        )
    errors: list[dict[str, Any]] = []
    out: dict[str, Any] = {}
    for spec in specs:
        if spec.name not in body:
            if spec.required:
                errors.append(_error("missing", ["body", spec.name], "Field required", dict(body)))
            else:
                out[spec.name] = spec.default
            continue
        out[spec.name] = _field(spec, body[spec.name], strict, errors)
    if strict:
        known = {spec.name for spec in specs}
        for name, value in body.items():
            if name not in known:
                errors.append(
                    _error("extra_forbidden", ["body", name], "Extra inputs are not permitted", value)
                )
    if errors:
        raise BodyError(errors)
    return out
