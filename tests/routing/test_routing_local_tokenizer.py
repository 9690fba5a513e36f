"""Local tokenization: the simulator's tokenizer, and tokenizer.json files when available."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from pixiu_kv.routing import EndpointView, Router
from pixiu_kv.routing.local_tokenizer import (
    BUILTIN_SIM,
    HuggingFaceTokenizer,
    LocalTokenizerError,
    load_local_tokenizers,
)
from pixiu_kv.sim import tokenizer as sim_tokenizer

HAS_TOKENIZERS = importlib.util.find_spec("tokenizers") is not None


def test_sim_tokenizer_gives_the_engine_ids_for_prompts_and_chats() -> None:
    local = load_local_tokenizers([("sim-model", BUILTIN_SIM)])
    assert "sim-model" in local
    assert local.tokens({"model": "sim-model", "prompt": "hello there"}) == \
        sim_tokenizer.tokenize_prompt("hello there")
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert local.tokens({"model": "sim-model", "messages": messages}) == sim_tokenizer.tokenize_chat(messages)


def test_unknown_models_and_unrenderable_chats_are_declined() -> None:
    local = load_local_tokenizers([("sim-model", BUILTIN_SIM)])
    assert local.tokens({"model": "other", "prompt": "x"}) is None
    messages = [{"role": "user", "content": "hi"}]
    assert local.tokens({"model": "sim-model", "messages": messages, "tools": []}) is None
    assert local.tokens({"model": "sim-model", "messages": [{"content": "no role"}]}) is None


def test_chat_turns_tokenized_locally_route_to_the_engine_holding_the_conversation() -> None:
    local = load_local_tokenizers([("m", BUILTIN_SIM)])
    history = [{"role": "system", "content": "You are a careful assistant. " * 60},
               {"role": "user", "content": "Summarise the report."}]
    router = Router()
    fleet = [EndpointView(f"e{i}") for i in range(4)]
    turn1 = local.tokens({"model": "m", "messages": history})
    assert turn1 is not None
    d1 = router.decide(fleet, turn1, None, None, now=0.0)
    router.on_complete(d1, None, None)
    history += [{"role": "assistant", "content": "It is short."}, {"role": "user", "content": "Why?"}]
    turn2 = local.tokens({"model": "m", "messages": history})
    # The template's trailing "\n\n" merges with the reply's first word: all but the last token
    # of turn 1 lead turn 2, as with a real BPE tokenizer.
    assert turn2 is not None and turn2[: len(turn1) - 1] == turn1[:-1]
    d2 = router.decide(fleet, turn2, None, None, now=1.0)
    assert (d2.endpoint_id, d2.reason) == (d1.endpoint_id, "cache")
    # The last block boundary within turn 1 (blocks of 32 tokens at this position).
    assert d2.matched_tokens == router.prefix_keys(turn1[:-1]).ends[-1]


def test_a_missing_tokenizers_package_is_a_clear_error(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # what an absent package looks like
    path = tmp_path / "tokenizer.json"
    path.write_text("{}")
    with pytest.raises(LocalTokenizerError, match=r"pixiu-kv\[tokenizers\]"):
        load_local_tokenizers([("m", str(path))])


@pytest.mark.skipif(not HAS_TOKENIZERS, reason="needs the 'tokenizers' package (pixiu-kv[tokenizers])")
def test_a_tokenizer_json_is_loaded_and_used(tmp_path: Path) -> None:
    vocab = {"[UNK]": 0, "hello": 1, "world": 2}
    spec = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
        "normalizer": None, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None,
        "decoder": None, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"},
    }
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(spec))
    local = load_local_tokenizers([("m", str(path))])
    assert local.tokens({"model": "m", "prompt": "hello world hello"}) == [1, 2, 1]
    assert local.tokens({"model": "m", "messages": [{"role": "user", "content": "hello"}]}) is None
    with pytest.raises(LocalTokenizerError, match="does not exist"):
        HuggingFaceTokenizer(tmp_path / "missing.json")
