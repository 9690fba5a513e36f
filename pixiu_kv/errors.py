"""Errors a client sees, always in the OpenAI error shape."""

from __future__ import annotations

import json

__all__ = ["GatewayError", "error_body"]


def error_body(message: str, type_: str, code: int | str | None = None, param: str | None = None) -> bytes:
    """``{"error": {"message", "type", "param", "code"}}`` as vLLM and OpenAI send it."""
    return json.dumps(
        {"error": {"message": message, "type": type_, "param": param, "code": code}},
        separators=(",", ":"),
    ).encode()


class GatewayError(Exception):
    """Raise anywhere on the request path to answer the client with an OpenAI-shaped error."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 *, param: str | None = None, code: int | str | None = None,
                 headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code if code is not None else status
        self.headers = headers

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.code, self.param)
