"""vLLM's OpenAI-server wire format for a simulated engine: parsing and rendering, no I/O."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import attrs

from .engine_config import EngineConfig
from .scheduler import Generation
from .tokenizer import VOCAB_SIZE, ChatTemplateError, detokenize, tokenize_chat, tokenize_prompt

__all__ = [
    "MAX_CHOICES",
    "ApiError",
    "GenerationRequest",
    "StreamRenderer",
    "error_json",
    "parse_chat",
    "parse_completion",
    "parse_json",
    "parse_tokenize",
    "render_final",
    "token_json",
    "usage_dict",
]

MAX_CHOICES = 16
_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def error_json(message: str, type_: str, code: int, param: str | None = None) -> bytes:
    return _dumps({"error": {"message": message, "type": type_, "param": param, "code": code}}).encode()


class ApiError(Exception):
    """An error reply in vLLM's shape."""

    def __init__(self, status: int, message: str, type_: str = "BadRequestError",
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param

    def body(self) -> bytes:
        return error_json(self.message, self.type, self.status, self.param)


def _bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, "BadRequestError", param)


def parse_json(content_type: bytes | None, body: bytes) -> dict[str, Any]:
    if content_type is None or not content_type.split(b";", 1)[0].strip().lower() == b"application/json":
        raise _bad("Unsupported Media Type: Only 'application/json' is allowed")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as error:
        raise _bad(f"Invalid JSON body: {error}") from None
    if not isinstance(data, dict):
        raise _bad("The request body must be a JSON object")
    return data


@attrs.frozen
class GenerationRequest:
    kind: Literal["completion", "chat"]
    model: str
    prompt_ids: list[int]
    max_tokens: int
    n: int
    stream: bool
    include_usage: bool
    continuous_usage: bool
    seed: int | None


def _check_model(data: Mapping[str, Any], config: EngineConfig) -> str:
    model = data.get("model")
    if model is None:
        return config.model
    if not isinstance(model, str):
        raise _bad("'model' must be a string", "model")
    if model != config.model:
        raise ApiError(404, f"The model `{model}` does not exist.", "NotFoundError", "model")
    return model


def _int_field(data: Mapping[str, Any], name: str, default: int | None, minimum: int,
               maximum: int | None = None) -> int | None:
    value = data.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"'{name}' must be an integer", name)
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f"at least {minimum}"
        raise _bad(f"'{name}' must be {bound}, got {value}", name)
    return value


def _bool_field(data: Mapping[str, Any], name: str, default: bool) -> bool:
    value = data.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _bad(f"'{name}' must be a boolean", name)
    return value


def _token_ids(value: Sequence[Any], param: str) -> list[int]:
    ids: list[int] = []
    for token in value:
        if isinstance(token, bool) or not isinstance(token, int):
            raise _bad(f"'{param}' token ids must be integers", param)
        if not 0 <= token < VOCAB_SIZE:
            raise _bad(f"Token id {token} is out of vocabulary", param)
        ids.append(token)
    return ids


def _completion_prompt(data: Mapping[str, Any], add_special_tokens: bool) -> list[int]:
    prompt = data.get("prompt")
    if isinstance(prompt, str):
        return tokenize_prompt(prompt, add_special_tokens)
    if isinstance(prompt, list) and prompt:
        first = prompt[0]
        if isinstance(first, int) and not isinstance(first, bool):
            return _token_ids(prompt, "prompt")
        if len(prompt) == 1:
            if isinstance(first, str):
                return tokenize_prompt(first, add_special_tokens)
            if isinstance(first, list) and first:
                return _token_ids(first, "prompt")
        if all(isinstance(p, str | list) for p in prompt):
            raise _bad("The simulated engine serves one prompt per request, not a batch", "prompt")
    raise _bad("'prompt' must be a string, a list of token ids, or a one-element list of either",
               "prompt")


def _chat_prompt(data: Mapping[str, Any], add_special_tokens: bool) -> list[int]:
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty list", "messages")
    try:
        return tokenize_chat(
            messages,
            _bool_field(data, "add_generation_prompt", True),
            _bool_field(data, "continue_final_message", False),
            add_special_tokens,
        )
    except ChatTemplateError as error:
        raise _bad(str(error), "messages") from None


def _generation(kind: Literal["completion", "chat"], data: Mapping[str, Any], config: EngineConfig,
                prompt_ids: list[int], model: str) -> GenerationRequest:
    prompt_len = len(prompt_ids)
    if prompt_len == 0:
        raise _bad("The prompt must not be empty", "prompt")
    max_tokens = _int_field(data, "max_tokens", None, 1)
    if kind == "chat":
        max_tokens = _int_field(data, "max_completion_tokens", max_tokens, 1)
    if max_tokens is None:
        max_tokens = max(1, min(config.default_max_tokens, config.max_model_len - prompt_len))
    if prompt_len + max_tokens > config.max_model_len:
        raise _bad(
            f"This model's maximum context length is {config.max_model_len} tokens. However, you "
            f"requested {prompt_len + max_tokens} tokens ({prompt_len} in the input, {max_tokens} in the "
            f"completion). Please reduce the length of the input or completion."
        )
    n = _int_field(data, "n", 1, 1, MAX_CHOICES)
    assert n is not None
    seed = _int_field(data, "seed", None, -(2**63), 2**64 - 1)
    stream = _bool_field(data, "stream", False)
    options = data.get("stream_options")
    include_usage = continuous = False
    if options is not None:
        if not isinstance(options, dict):
            raise _bad("'stream_options' must be an object", "stream_options")
        if not stream:
            raise _bad("Stream options can only be defined when `stream=True`.", "stream_options")
        include_usage = _bool_field(options, "include_usage", False)
        continuous = _bool_field(options, "continuous_usage_stats", False)
    _bool_field(data, "ignore_eos", False)
    return GenerationRequest(kind, model, prompt_ids, max_tokens, n, stream, include_usage, continuous, seed)


def parse_completion(data: Mapping[str, Any], config: EngineConfig) -> GenerationRequest:
    model = _check_model(data, config)
    prompt_ids = _completion_prompt(data, _bool_field(data, "add_special_tokens", True))
    return _generation("completion", data, config, prompt_ids, model)


def parse_chat(data: Mapping[str, Any], config: EngineConfig) -> GenerationRequest:
    model = _check_model(data, config)
    prompt_ids = _chat_prompt(data, _bool_field(data, "add_special_tokens", False))
    return _generation("chat", data, config, prompt_ids, model)


def parse_tokenize(data: Mapping[str, Any], config: EngineConfig) -> list[int]:
    _check_model(data, config)
    if "messages" in data:
        return _chat_prompt(data, _bool_field(data, "add_special_tokens", False))
    prompt = data.get("prompt")
    if not isinstance(prompt, str):
        raise _bad("'prompt' (a string) or 'messages' is required", "prompt")
    return tokenize_prompt(prompt, _bool_field(data, "add_special_tokens", True))


def usage_dict(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def render_final(req: GenerationRequest, gen: Generation, request_id: str, created: int) -> bytes:
    """The non-streaming reply."""
    choices: list[dict[str, Any]] = []
    for index, ids in enumerate(gen.outputs):
        text = detokenize(ids)
        if req.kind == "chat":
            choices.append({
                "index": index,
                "message": {"role": "assistant", "content": text, "refusal": None, "tool_calls": []},
                "logprobs": None, "finish_reason": "length", "stop_reason": None,
            })
        else:
            choices.append({"index": index, "text": text, "logprobs": None,
                            "finish_reason": "length", "stop_reason": None})
    body = {
        "id": request_id,
        "object": "chat.completion" if req.kind == "chat" else "text_completion",
        "created": created,
        "model": req.model,
        "choices": choices,
        "usage": usage_dict(len(req.prompt_ids), req.n * req.max_tokens, gen.plan.cached_tokens),
    }
    return _dumps(body).encode()


_token_json: list[bytes | None] = [None] * VOCAB_SIZE
"""Each id's text as a JSON string, made on first use (bounded by the vocabulary)."""


def token_json(token: int) -> bytes:
    """The JSON string of one token's text (``detokenize((token,))``), memoized."""
    if not 0 <= token < VOCAB_SIZE:
        return b'""'
    text = _token_json[token]
    if text is None:
        text = _token_json[token] = _dumps(detokenize((token,))).encode()
    return text


class StreamRenderer:
    """SSE events of one streaming reply; the constant head of every chunk is built once,
    and so are the bytes around a lone token (:meth:`one_token`, the common event)."""

    __slots__ = ("_head", "_one_after", "_one_before", "_req", "_sent_tokens")

    def __init__(self, req: GenerationRequest, request_id: str, created: int) -> None:
        self._req = req
        obj = "chat.completion.chunk" if req.kind == "chat" else "text_completion"
        self._head = (
            f'data: {{"id":{_dumps(request_id)},"object":"{obj}","created":{created},'
            f'"model":{_dumps(req.model)},"choices":'
        )
        self._sent_tokens = 0
        if req.kind == "chat":
            before, after = '[{"index":0,"delta":{"content":', '}'
        else:
            before, after = '[{"index":0,"text":', ''
        self._one_before = (self._head + before).encode()
        self._one_after = (after + ',"logprobs":null,"finish_reason":null}]}\n\n').encode()

    @property
    def one_token_ok(self) -> bool:
        """:meth:`one_token` renders this reply's mid-stream events (one choice, no usage
        in every chunk)."""
        return self._req.n == 1 and not self._req.continuous_usage

    def one_token(self, token: int) -> bytes:
        """The event of one new token of the only choice, not the last one: the same bytes
        as ``token_events([[token]], False, cached)`` where :attr:`one_token_ok`."""
        self._sent_tokens += 1
        return b"".join((self._one_before, token_json(token), self._one_after))

    def _event(self, choices: str, usage: str | None = None) -> bytes:
        if usage is None:
            return f"{self._head}{choices}}}\n\n".encode()
        return f'{self._head}{choices},"usage":{usage}}}\n\n'.encode()

    def _usage(self, cached: int) -> str:
        return _dumps(usage_dict(len(self._req.prompt_ids), self._sent_tokens, cached))

    def role_events(self) -> list[bytes]:
        """Chat streams open each choice with an empty assistant delta."""
        if self._req.kind != "chat":
            return []
        return [
            self._event(f'[{{"index":{i},"delta":{{"role":"assistant","content":""}},'
                        f'"logprobs":null,"finish_reason":null}}]')
            for i in range(self._req.n)
        ]

    def token_events(self, ids: Sequence[Sequence[int]], last: bool, cached: int) -> list[bytes]:
        """One event per choice carrying the text of its new tokens (one token, or several
        when the engine streams every ``stream_interval`` tokens)."""
        req = self._req
        finish = '"length","stop_reason":null' if last else "null"
        events: list[bytes] = []
        for index, tokens in enumerate(ids):
            text = token_json(tokens[0]).decode() if len(tokens) == 1 else _dumps(detokenize(tokens))
            self._sent_tokens += len(tokens)
            if req.kind == "chat":
                choices = (f'[{{"index":{index},"delta":{{"content":{text}}},'
                           f'"logprobs":null,"finish_reason":{finish}}}]')
            else:
                choices = f'[{{"index":{index},"text":{text},"logprobs":null,"finish_reason":{finish}}}]'
            events.append(self._event(choices, self._usage(cached) if req.continuous_usage else None))
        return events

    def usage_event(self, cached: int) -> bytes:
        return self._event("[]", self._usage(cached))
