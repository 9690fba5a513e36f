"""A deterministic, fast stand-in tokenizer and chat template.

The same text gives the same ids in every process (ids come from CRC32 of the text
pieces, never from ``hash()`` of a str). English-ish text gives roughly one token per
four to five characters. Special tokens are cut out first, so text on either side of
one is tokenized independently: that is what makes a rendered conversation a token
prefix of the next turn's rendering.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "BOS",
    "BOS_ID",
    "SPECIAL_TOKENS",
    "VOCAB_SIZE",
    "ChatTemplateError",
    "detokenize",
    "render_chat",
    "tokenize",
    "tokenize_chat",
    "tokenize_prompt",
]

VOCAB_SIZE = 32000
_FIRST_REGULAR_ID = 256

BOS = "<|begin_of_text|>"
_START_HEADER = "<|start_header_id|>"
_END_HEADER = "<|end_header_id|>"
_EOT = "<|eot_id|>"
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|pad|>", BOS, "<|end_of_text|>", _START_HEADER, _END_HEADER, _EOT,
)
_SPECIAL_IDS: dict[str, int] = {text: index for index, text in enumerate(SPECIAL_TOKENS)}
BOS_ID = _SPECIAL_IDS[BOS]

_SPECIAL_SPLIT = re.compile("(" + "|".join(re.escape(s) for s in SPECIAL_TOKENS) + ")")
# GPT-2-like pre-tokenization: a word keeps its leading space; whitespace runs before a
# word leave their last space to it. Long words are cut into pieces of at most six
# letters by the pattern itself, so every piece is one token.
_PIECES = re.compile(
    r" ?[A-Za-z]{1,6}| ?[0-9]{1,3}| ?[^\sA-Za-z0-9]{1,6}|\s+(?!\S)|\s+"
)

# Bounded memo tables: prompts repeat (multi-turn chat), so most text is seen before.
_PIECE_CACHE_MAX = 200_000
_SEGMENT_CACHE_MAX = 8192
_SEGMENT_CACHE_MAX_CHARS = 256 * 1024


class _PieceIds(dict[str, int]):
    """piece -> id, computed on first use; cleared when full (ids never change)."""

    def __missing__(self, piece: str) -> int:
        token = _FIRST_REGULAR_ID + zlib.crc32(piece.encode()) % (VOCAB_SIZE - _FIRST_REGULAR_ID)
        if len(self) >= _PIECE_CACHE_MAX:
            self.clear()
        self[piece] = token
        return token


_piece_ids = _PieceIds()
_segment_ids: dict[str, tuple[int, ...]] = {}


def _tokenize_segment(segment: str) -> tuple[int, ...]:
    cached = _segment_ids.get(segment)
    if cached is not None:
        return cached
    result = tuple(map(_piece_ids.__getitem__, _PIECES.findall(segment)))
    if len(segment) <= _SEGMENT_CACHE_MAX_CHARS:
        if len(_segment_ids) >= _SEGMENT_CACHE_MAX:
            del _segment_ids[next(iter(_segment_ids))]
        _segment_ids[segment] = result
    return result


def tokenize(text: str) -> list[int]:
    """Token ids of ``text``; special-token strings become their special ids. No BOS added."""
    ids: list[int] = []
    for index, part in enumerate(_SPECIAL_SPLIT.split(text)):
        if index % 2:
            ids.append(_SPECIAL_IDS[part])
        elif part:
            ids.extend(_tokenize_segment(part))
    return ids


def tokenize_prompt(text: str, add_special_tokens: bool = True) -> list[int]:
    """A completion prompt as vLLM tokenizes it: BOS first unless told otherwise."""
    ids = tokenize(text)
    return [BOS_ID, *ids] if add_special_tokens else ids


_SYLLABLES = (
    "ka", "lo", "mi", "ne", "su", "ta", "ri", "po", "de", "an", "or", "el", "um", "is", "ve", "zu",
)


def _regular_text(token: int) -> str:
    value = token - _FIRST_REGULAR_ID
    parts = [" "]
    for _ in range(3):
        parts.append(_SYLLABLES[value & 15])
        value >>= 4
        if not value:
            break
    return "".join(parts)


_token_text: list[str] = []
"""Text of every id, built on first use (a fixed 32k table: bounded)."""


def _token_table() -> list[str]:
    if not _token_text:
        _token_text.extend(SPECIAL_TOKENS)
        _token_text.extend("" for _ in range(len(SPECIAL_TOKENS), _FIRST_REGULAR_ID))
        _token_text.extend(_regular_text(token) for token in range(_FIRST_REGULAR_ID, VOCAB_SIZE))
    return _token_text


def detokenize(ids: Sequence[int]) -> str:
    """Deterministic text for ``ids`` (specials exactly; other ids as made-up syllables).

    Not the inverse of :func:`tokenize`: ids only keep a hash of the original text.
    Ids outside the vocabulary give no text.
    """
    table = _token_table()
    return "".join([table[t] if 0 <= t < VOCAB_SIZE else "" for t in ids])


class ChatTemplateError(ValueError):
    """A message list the chat template cannot render."""


def _message_text(message: Mapping[str, Any]) -> tuple[str, str]:
    role = message.get("role")
    if not isinstance(role, str) or not role:
        raise ChatTemplateError("each message needs a non-empty string 'role'")
    content = message.get("content")
    if content is None:
        return role, ""
    if isinstance(content, str):
        return role, content
    if isinstance(content, list):
        texts: list[str] = []
        for part in content:
            if not isinstance(part, Mapping):
                raise ChatTemplateError("message content parts must be objects")
            if part.get("type") == "text":
                text = part.get("text")
                if not isinstance(text, str):
                    raise ChatTemplateError("a text content part needs a string 'text'")
                texts.append(text)
            else:
                raise ChatTemplateError(f"unsupported content part type {part.get('type')!r}")
        return role, "\n".join(texts)
    raise ChatTemplateError("message content must be a string, a list of parts, or null")


def render_chat(
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
) -> str:
    """The conversation as text, in a Llama-3-like template.

    The rendering of turn N (with or without generation prompt) is a token prefix of the
    rendering of turn N+1, because every boundary falls on a special token.
    """
    if add_generation_prompt and continue_final_message:
        raise ChatTemplateError("add_generation_prompt and continue_final_message cannot both be true")
    parts = [BOS]
    last = len(messages) - 1
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ChatTemplateError("each message must be an object")
        role, text = _message_text(message)
        parts.append(f"{_START_HEADER}{role}{_END_HEADER}\n\n{text}")
        if not (continue_final_message and index == last):
            parts.append(_EOT)
    if add_generation_prompt:
        parts.append(f"{_START_HEADER}assistant{_END_HEADER}\n\n")
    return "".join(parts)


def tokenize_chat(
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    add_special_tokens: bool = False,
) -> list[int]:
    """A chat request's prompt ids as vLLM computes them (the template carries its own BOS)."""
    ids = tokenize(render_chat(messages, add_generation_prompt, continue_final_message))
    return [BOS_ID, *ids] if add_special_tokens else ids
