from __future__ import annotations

import hashlib

from pixiu_kv.filters.kvcache import extract_prompt, prompt_key


def test_completion_string_uses_pixiu_key() -> None:
    p = extract_prompt({"model": "m", "prompt": "hello"}, "default")
    assert p is not None
    assert p.kind == "completion"
    assert p.model == "m"
    assert p.key == hashlib.sha256(b"m\x00hello").hexdigest() == prompt_key("m", "hello")
    assert dict(p.tokenize_body) == {"model": "m", "prompt": "hello"}


def test_default_model_when_missing_or_not_a_string() -> None:
    for body in ({"prompt": "x"}, {"model": 3, "prompt": "x"}, {"model": "", "prompt": "x"}):
        p = extract_prompt(body, "fallback")
        assert p is not None and p.model == "fallback"
        assert p.tokenize_body["model"] == "fallback"


def test_completion_list_of_strings_is_keyed_by_its_first_prompt() -> None:
    batch = extract_prompt({"model": "m", "prompt": ["a b", "c"]}, "")
    single = extract_prompt({"model": "m", "prompt": "a b"}, "")
    assert batch is not None and single is not None
    assert batch.key == single.key
    assert batch.tokenize_body["prompt"] == "a b"


def test_bodies_without_a_prompt_pass_through() -> None:
    for body in (None, "text", [1, 2], {}, {"model": "m"}, {"prompt": ""}, {"prompt": "   "},
                 {"prompt": [1, 2, 3]}, {"prompt": []}, {"prompt": 5}, {"messages": "hi"},
                 {"messages": []}, {"messages": [{"role": "user", "content": ""}]},
                 {"messages": [{"content": "no role"}]}, {"messages": ["not a dict"]}):
        assert extract_prompt(body, "m") is None, body


def test_chat_role_splits_never_collide() -> None:
    one = extract_prompt({"messages": [{"role": "user", "content": "a\nassistant: b"}]}, "m")
    two = extract_prompt({"messages": [{"role": "user", "content": "a"},
                                       {"role": "assistant", "content": "b"}]}, "m")
    swapped = extract_prompt({"messages": [{"role": "system", "content": "a"},
                                           {"role": "assistant", "content": "b"}]}, "m")
    joined = extract_prompt({"messages": [{"role": "user", "content": "a\nb"}]}, "m")
    keys = {p.key for p in (one, two, swapped, joined) if p is not None}
    assert len(keys) == 4


def test_chat_and_completion_of_same_characters_differ() -> None:
    chat = extract_prompt({"messages": [{"role": "user", "content": "hi"}]}, "m")
    assert chat is not None
    completion = extract_prompt({"prompt": chat.text}, "m")
    other = extract_prompt({"prompt": '"user":"hi"'}, "m")
    assert completion is not None and other is not None
    assert chat.kind == "chat" and completion.kind == "completion"
    assert other.key != chat.key


def test_chat_text_parts_are_used_and_other_parts_keep_identity() -> None:
    text = extract_prompt({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "describe"}]}]}, "m")
    img_a = extract_prompt({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "describe"}, {"type": "image_url", "image_url": {"url": "a"}}]}]}, "m")
    img_b = extract_prompt({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "describe"}, {"type": "image_url", "image_url": {"url": "b"}}]}]}, "m")
    assert text is not None and img_a is not None and img_b is not None
    assert len({text.key, img_a.key, img_b.key}) == 3
    assert "describe" in text.text


def test_chat_tokenize_body_is_vllm_chat_form_with_template_fields() -> None:
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    tools = [{"type": "function", "function": {"name": "f"}}]
    p = extract_prompt({"model": "m", "messages": messages, "tools": tools, "temperature": 0.5,
                        "stream": True}, "")
    plain = extract_prompt({"model": "m", "messages": messages}, "")
    assert p is not None and plain is not None
    assert dict(p.tokenize_body) == {"model": "m", "messages": messages, "tools": tools}
    # Tools change the template's output, so they change the key; sampling fields do not.
    assert p.key != plain.key
    sampled = extract_prompt({"model": "m", "messages": messages, "temperature": 1.0}, "")
    assert sampled is not None and sampled.key == plain.key


def test_model_is_part_of_the_key() -> None:
    a = extract_prompt({"model": "a", "prompt": "x"}, "")
    b = extract_prompt({"model": "b", "prompt": "x"}, "")
    assert a is not None and b is not None and a.key != b.key
