from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from pixiu_kv.sim.tokenizer import (
    BOS_ID,
    detokenize,
    render_chat,
    tokenize,
    tokenize_chat,
    tokenize_prompt,
)

TEXT = "The quick brown fox jumps over the lazy dog; internationalization matters 42 times!"
CONVERSATION: list[dict[str, Any]] = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Summarize the plot of Hamlet."},
    {"role": "assistant", "content": " A prince avenges his father."},
    {"role": "user", "content": [{"type": "text", "text": "  And Ophelia?"}]},
]


def test_same_ids_in_another_process_with_another_hash_seed() -> None:
    code = (
        "import json; from pixiu_kv.sim.tokenizer import tokenize, tokenize_chat;"
        f"print(json.dumps([tokenize({TEXT!r}), tokenize_chat({CONVERSATION!r})]))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, timeout=60)
    plain, chat = json.loads(out.stdout)
    assert plain == tokenize(TEXT)
    assert chat == tokenize_chat(CONVERSATION)


def test_roughly_four_to_five_characters_per_token() -> None:
    text = " ".join([TEXT] * 20)
    ratio = len(text) / len(tokenize(text))
    assert 3.0 <= ratio <= 6.0


def test_completion_prompt_gets_bos_unless_told_otherwise() -> None:
    assert tokenize_prompt(TEXT) == [BOS_ID, *tokenize(TEXT)]
    assert tokenize_prompt(TEXT, add_special_tokens=False) == tokenize(TEXT)


def test_each_turn_is_a_token_prefix_of_the_next() -> None:
    for turn in range(1, len(CONVERSATION)):
        history, longer = CONVERSATION[:turn], CONVERSATION[: turn + 1]
        full = tokenize_chat(longer, add_generation_prompt=True)
        for with_prompt in (False, True):
            prefix = tokenize_chat(history, add_generation_prompt=with_prompt)
            if with_prompt and longer[-1]["role"] != "assistant":
                continue  # the generation prompt is only a prefix of an assistant turn
            assert full[: len(prefix)] == prefix, (turn, with_prompt)


def test_template_has_role_markers_and_generation_prompt() -> None:
    rendered = render_chat(CONVERSATION[:2], add_generation_prompt=True)
    assert rendered.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>")
    assert rendered.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert not render_chat(CONVERSATION[:2], add_generation_prompt=False).endswith("\n\n")


def test_detokenize_is_deterministic_and_keeps_special_tokens() -> None:
    ids = tokenize_chat(CONVERSATION[:1])
    assert detokenize(ids) == detokenize(list(ids))
    assert detokenize(ids).startswith("<|begin_of_text|><|start_header_id|>")
    assert detokenize([1000, 2000]) != detokenize([2000, 1000])
