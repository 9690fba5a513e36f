"""What a request asks the engine to prefill: its model and prompt, as the cache sees them.

Completions carry ``prompt``; chats carry ``messages``, which the engine renders through
its chat template. The cache key must change whenever the engine's tokens would change,
so chat messages are rendered *with* their roles and every template-affecting field
(tools, template arguments, ...): ``[user: "a", assistant: "b"]`` and ``[user: "a\\nb"]``
never share a key. The same data, in vLLM's own form, is what ``/tokenize`` receives.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any, Literal

import attrs

__all__ = ["Prompt", "extract_prompt", "prompt_key"]

PromptKind = Literal["completion", "chat"]

# Chat fields that change what the chat template produces, forwarded to /tokenize as is.
_CHAT_TEMPLATE_FIELDS = (
    "add_generation_prompt",
    "continue_final_message",
    "add_special_tokens",
    "chat_template",
    "chat_template_kwargs",
    "tools",
    "documents",
)
_COMPLETION_TOKENIZE_FIELDS = ("add_special_tokens",)

# A rendered chat starts with a NUL, which no completion prompt sent as text contains in
# practice; it keeps chat keys apart from completion keys of the same characters.
_CHAT_MARK = "\x00chat\x00"


def prompt_key(model: str, text: str) -> str:
    """The token-cache and hotness key: SHA-256 of ``model + "\\x00" + text`` (Pixiu's key)."""
    return hashlib.sha256(f"{model}\x00{text}".encode("utf-8", "surrogatepass")).hexdigest()


@attrs.frozen(slots=True)
class Prompt:
    """The model and prompt of one request, plus the ``/tokenize`` body that yields its tokens."""

    kind: PromptKind
    model: str
    # The text the key is computed from (for chats: the role-aware rendering).
    text: str
    key: str
    tokenize_body: Mapping[str, Any] = attrs.field(eq=False, repr=False)

    @property
    def size(self) -> int:
        """Characters of the keyed text: logged instead of the text itself."""
        return len(self.text)


def extract_prompt(body: object, default_model: str) -> Prompt | None:
    """The request's prompt, or ``None`` when there is nothing to manage (pass through)."""
    if not isinstance(body, dict):
        return None
    model = body.get("model")
    if not isinstance(model, str) or not model:
        model = default_model
    prompt = body.get("prompt")
    if prompt is not None:
        return _completion(body, model, prompt)
    messages = body.get("messages")
    if isinstance(messages, list):
        return _chat(body, model, messages)
    return None


def _completion(body: Mapping[str, Any], model: str, prompt: object) -> Prompt | None:
    # A list of strings is a batch that goes to one engine: its first prompt stands for the
    # batch (batches usually share their prefix). Token-id prompts are not text: skipped.
    if isinstance(prompt, list):
        if not prompt or not isinstance(prompt[0], str):
            return None
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt.strip():
        return None
    tokenize: dict[str, Any] = {"model": model, "prompt": prompt}
    for name in _COMPLETION_TOKENIZE_FIELDS:
        if name in body:
            tokenize[name] = body[name]
    text = prompt if len(tokenize) == 2 else prompt + _extras_suffix(tokenize, ("model", "prompt"))
    return Prompt(kind="completion", model=model, text=text, key=prompt_key(model, text),
                  tokenize_body=tokenize)


def _chat(body: Mapping[str, Any], model: str, messages: list[Any]) -> Prompt | None:
    rendered: list[str] = []
    has_content = False
    for message in messages:
        if not isinstance(message, dict):
            return None
        role = message.get("role")
        if not isinstance(role, str):
            return None
        raw = message.get("content")
        has_content = has_content or _has_content(raw)
        content = _render_content(raw)
        # JSON-escaped fields contain no raw newline, so the line structure is unambiguous.
        line = _dumps(role) + ":" + content
        others = {k: v for k, v in message.items() if k not in ("role", "content")}
        if others:
            line += " " + _dumps(others)
        rendered.append(line)
    if not has_content:
        return None
    tokenize: dict[str, Any] = {"model": model, "messages": messages}
    for name in _CHAT_TEMPLATE_FIELDS:
        if name in body:
            tokenize[name] = body[name]
    text = _CHAT_MARK + "\n".join(rendered) + _extras_suffix(tokenize, ("model", "messages"))
    return Prompt(kind="chat", model=model, text=text, key=prompt_key(model, text),
                  tokenize_body=tokenize)


def _has_content(content: object) -> bool:
    if isinstance(content, str):
        return bool(content.strip())
    if isinstance(content, list):
        return any(not (isinstance(part, dict) and part.get("type") == "text")
                   or _has_content(part.get("text")) for part in content)
    return False


def _render_content(content: object) -> str:
    """A message's content as one JSON-escaped string; non-text parts keep their identity."""
    if content is None:
        return _dumps("")
    if isinstance(content, str):
        return _dumps(content)
    if isinstance(content, list):
        parts: list[str] = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(_dumps(part["text"]))
            else:
                # An image (or any other part) changes the engine's input: two requests that
                # differ only there must not share a key.
                parts.append(_dumps(part))
        return "[" + ",".join(parts) + "]"
    return _dumps(content)


def _extras_suffix(tokenize: Mapping[str, Any], skip: tuple[str, ...]) -> str:
    extras = {k: v for k, v in tokenize.items() if k not in skip}
    return "" if not extras else "\x00" + _dumps(extras)


def _dumps(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
