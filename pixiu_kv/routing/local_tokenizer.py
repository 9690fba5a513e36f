"""Optional local tokenization, so a first-seen prompt is routed without a ``/tokenize`` call.

Per model, either a Hugging Face ``tokenizer.json`` (the ``tokenizers`` package, installed
with ``pip install 'pixiu-kv[tokenizers]'``; imported only when such a tokenizer is
configured) or ``builtin:sim``, the simulator's tokenizer (tests and benchmarks).

The local prefix index only needs token ids that are consistent with themselves (the
same prompt prefix gives the same leading ids), so a tokenizer of the right family is
enough for routing. LMCache lookups and pins need the engine's exact ids: send those from
``/tokenize``. A ``tokenizer.json`` has no chat template, so chats are declined (None)
unless the tokenizer renders chats itself (the simulator's does).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from .config import TokenizerSpec

__all__ = [
    "BUILTIN_SIM",
    "HuggingFaceTokenizer",
    "LocalTokenizerError",
    "LocalTokenizers",
    "PromptTokenizer",
    "SimTokenizer",
    "load_local_tokenizers",
]

BUILTIN_SIM = "builtin:sim"


class LocalTokenizerError(RuntimeError):
    """A configured local tokenizer cannot be loaded (missing package or file, bad file)."""


class PromptTokenizer(Protocol):
    def encode_prompt(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def encode_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                    continue_final_message: bool = False,
                    add_special_tokens: bool = False) -> list[int] | None:
        """The chat's ids, or None when this tokenizer cannot render chats."""
        ...


class HuggingFaceTokenizer:
    """A ``tokenizer.json`` through the ``tokenizers`` package."""

    __slots__ = ("_tokenizer", "path")

    def __init__(self, path: str | Path) -> None:
        try:
            tokenizers = importlib.import_module("tokenizers")
        except ImportError:
            raise LocalTokenizerError(
                f"the local tokenizer {str(path)!r} needs the 'tokenizers' package: "
                "pip install 'pixiu-kv[tokenizers]'") from None
        self.path = Path(path)
        if not self.path.is_file():
            raise LocalTokenizerError(f"tokenizer file {str(self.path)!r} does not exist")
        try:
            self._tokenizer: Any = tokenizers.Tokenizer.from_file(str(self.path))
        except Exception as exc:  # the Rust side raises plain Exception on a bad file
            raise LocalTokenizerError(f"tokenizer file {str(self.path)!r} cannot be loaded: {exc}") from None

    def encode_prompt(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids: list[int] = self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        return ids

    def encode_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                    continue_final_message: bool = False,
                    add_special_tokens: bool = False) -> list[int] | None:
        return None  # a chat template lives in tokenizer_config.json, not here


class SimTokenizer:
    """The simulated engines' tokenizer (``pixiu_kv.sim.tokenizer``): exact for the simulator."""

    __slots__ = ("_module",)

    def __init__(self) -> None:
        try:
            self._module: Any = importlib.import_module("pixiu_kv.sim.tokenizer")
        except ImportError as exc:
            raise LocalTokenizerError(f"the simulator's tokenizer is unavailable: {exc}") from None

    def encode_prompt(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids: list[int] = self._module.tokenize_prompt(text, add_special_tokens)
        return ids

    def encode_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                    continue_final_message: bool = False,
                    add_special_tokens: bool = False) -> list[int] | None:
        try:
            ids: list[int] = self._module.tokenize_chat(messages, add_generation_prompt,
                                                        continue_final_message, add_special_tokens)
        except ValueError:  # the template refuses the messages: let the engine say why
            return None
        return ids


class LocalTokenizers:
    """Tokenizers per model; :meth:`tokens` takes the body vLLM's ``/tokenize`` would get."""

    __slots__ = ("_by_model",)

    def __init__(self, by_model: Mapping[str, PromptTokenizer]) -> None:
        self._by_model = dict(by_model)

    def __contains__(self, model: object) -> bool:
        return model in self._by_model

    def tokens(self, tokenize_body: Mapping[str, Any]) -> list[int] | None:
        """Token ids of a ``/tokenize`` body (``prompt`` or ``messages`` form), or None when
        no local tokenizer serves its model or it cannot render it."""
        tokenizer = self._by_model.get(str(tokenize_body.get("model", "")))
        if tokenizer is None:
            return None
        prompt = tokenize_body.get("prompt")
        if isinstance(prompt, str):
            return tokenizer.encode_prompt(prompt, bool(tokenize_body.get("add_special_tokens", True)))
        messages = tokenize_body.get("messages")
        if isinstance(messages, list) and not (set(tokenize_body) - _CHAT_FIELDS_UNDERSTOOD):
            return tokenizer.encode_chat(
                messages,
                add_generation_prompt=bool(tokenize_body.get("add_generation_prompt", True)),
                continue_final_message=bool(tokenize_body.get("continue_final_message", False)),
                add_special_tokens=bool(tokenize_body.get("add_special_tokens", False)),
            )
        return None


# A chat body with other template inputs (tools, a custom template, ...) renders differently:
# it goes to the engine's /tokenize instead.
_CHAT_FIELDS_UNDERSTOOD = frozenset({
    "model", "messages", "add_generation_prompt", "continue_final_message", "add_special_tokens",
})


def load_local_tokenizers(specs: Sequence[tuple[str, str] | TokenizerSpec]) -> LocalTokenizers:
    """Load ``RoutingConfig.tokenizers`` (or ``(model, path)`` pairs); raises LocalTokenizerError."""
    by_model: dict[str, PromptTokenizer] = {}
    for spec in specs:
        model, path = (spec.model, spec.path) if isinstance(spec, TokenizerSpec) else spec
        by_model[model] = SimTokenizer() if path == BUILTIN_SIM else HuggingFaceTokenizer(path)
    return LocalTokenizers(by_model)
