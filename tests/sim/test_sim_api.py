"""The engine's HTTP API against vLLM's shapes, on a real loopback server."""

from __future__ import annotations

import json

import httpx
from sim_helpers import sse_events, words

from pixiu_kv.sim import SimEngine, detokenize, tokenize_chat, tokenize_prompt

MODEL = "sim-llama-8b"


async def test_completion_json_shape_and_cached_tokens(client: httpx.AsyncClient) -> None:
    body = {"model": MODEL, "prompt": words(400), "max_tokens": 5, "ignore_eos": True, "seed": 3}
    first = (await client.post("/v1/completions", json=body)).json()
    assert set(first) == {"id", "object", "created", "model", "choices", "usage"}
    assert first["id"].startswith("cmpl-") and first["object"] == "text_completion"
    assert first["model"] == MODEL
    [choice] = first["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "length" and choice["logprobs"] is None
    assert isinstance(choice["text"], str) and choice["text"]
    prompt_tokens = len(tokenize_prompt(words(400)))
    assert first["usage"] == {
        "prompt_tokens": prompt_tokens, "completion_tokens": 5, "total_tokens": prompt_tokens + 5,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    second = (await client.post("/v1/completions", json=body)).json()
    assert second["choices"][0]["text"] == choice["text"]
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached == prompt_tokens - 1  # GPU blocks plus the LMCache tail, never the last token


async def test_default_max_tokens_and_token_id_prompt(client: httpx.AsyncClient) -> None:
    reply = (await client.post("/v1/completions", json={"prompt": [5, 600, 700]})).json()
    assert reply["usage"]["completion_tokens"] == 16
    assert reply["usage"]["prompt_tokens"] == 3


async def test_chat_json_shape(client: httpx.AsyncClient) -> None:
    messages = [{"role": "user", "content": "hello " * 50}]
    reply = (await client.post("/v1/chat/completions",
                               json={"model": MODEL, "messages": messages, "max_tokens": 3, "n": 2})).json()
    assert reply["id"].startswith("chatcmpl-") and reply["object"] == "chat.completion"
    assert [c["index"] for c in reply["choices"]] == [0, 1]
    message = reply["choices"][0]["message"]
    assert message["role"] == "assistant" and isinstance(message["content"], str)
    assert reply["choices"][0]["message"]["content"] != reply["choices"][1]["message"]["content"]
    assert reply["usage"]["prompt_tokens"] == len(tokenize_chat(messages))
    assert reply["usage"]["completion_tokens"] == 6
    assert reply["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}


async def test_chat_stream_shapes(client: httpx.AsyncClient) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "tell me " * 100}], "max_tokens": 4,
            "stream": True, "stream_options": {"include_usage": True}}
    for attempt in range(2):
        reply = await client.post("/v1/chat/completions", json=body)
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/event-stream")
        payloads = sse_events(reply.text)
        assert payloads[-1] == "[DONE]"
        chunks = [json.loads(p) for p in payloads[:-1]]
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
        assert len({c["id"] for c in chunks}) == 1
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        tokens = chunks[1:-1]
        assert len(tokens) == 4
        assert all(set(c["choices"][0]["delta"]) == {"content"} for c in tokens)
        assert [c["choices"][0]["finish_reason"] for c in tokens] == [None, None, None, "length"]
        usage = chunks[-1]
        assert usage["choices"] == []
        assert usage["usage"]["completion_tokens"] == 4
        cached = usage["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert (cached > 0) == (attempt == 1)


async def test_completion_stream_without_usage(client: httpx.AsyncClient) -> None:
    body = {"prompt": "stream me please", "max_tokens": 3, "stream": True}
    payloads = sse_events((await client.post("/v1/completions", json=body)).text)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert len(chunks) == 3
    assert all(c["object"] == "text_completion" and "usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    text = "".join(c["choices"][0]["text"] for c in chunks)
    unary = (await client.post("/v1/completions", json={**body, "stream": False})).json()
    assert unary["choices"][0]["text"] == text


async def test_continuous_usage_stats(client: httpx.AsyncClient) -> None:
    body = {"prompt": "count me", "max_tokens": 2, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    chunks = [json.loads(p) for p in sse_events((await client.post("/v1/completions", json=body)).text)[:-1]]
    assert [c["usage"]["completion_tokens"] for c in chunks] == [1, 2, 2]


async def test_tokenize_both_forms_and_detokenize(client: httpx.AsyncClient) -> None:
    completion = (await client.post("/tokenize", json={"prompt": "Hello there, world"})).json()
    assert completion == {"count": len(tokenize_prompt("Hello there, world")), "max_model_len": 8192,
                          "tokens": tokenize_prompt("Hello there, world"), "token_strs": None}
    bare = (await client.post("/tokenize", json={"prompt": "Hello", "add_special_tokens": False})).json()
    assert bare["tokens"] == tokenize_prompt("Hello", add_special_tokens=False)
    messages = [{"role": "user", "content": "Hi"}]
    chat = (await client.post("/tokenize", json={"model": MODEL, "messages": messages,
                                                  "add_generation_prompt": True})).json()
    assert chat["tokens"] == tokenize_chat(messages)
    # The ids /tokenize returns are exactly what the generation endpoint counts.
    gen = (await client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 1})).json()
    assert gen["usage"]["prompt_tokens"] == chat["count"]
    strs = (await client.post("/tokenize", json={"prompt": "Hi", "return_token_strs": True})).json()
    assert strs["token_strs"] == ["<|begin_of_text|>", detokenize(strs["tokens"][1:])]
    detok = (await client.post("/detokenize", json={"tokens": chat["tokens"][:2]})).json()
    assert detok["prompt"].startswith("<|begin_of_text|><|start_header_id|>")


async def test_models_health_load_and_probes(client: httpx.AsyncClient) -> None:
    models = (await client.get("/v1/models")).json()
    assert models["object"] == "list"
    [card] = models["data"]
    assert card["id"] == MODEL and card["owned_by"] == "vllm" and card["max_model_len"] == 8192
    health = await client.get("/health")
    assert health.status_code == 200 and health.content == b""
    assert (await client.get("/load")).json() == {"server_load": 0}
    info = (await client.get("/model_info")).json()
    assert "model_path" not in info and "tokenizer_path" not in info
    assert (await client.get("/server_info")).status_code == 200
    assert (await client.get("/get_load")).json()["load"] == 0
    assert (await client.post("/reset_prefix_cache")).status_code == 200


async def test_metrics_names_and_counts(client: httpx.AsyncClient, engine: SimEngine) -> None:
    body = {"prompt": words(300), "max_tokens": 2}
    await client.post("/v1/completions", json=body)
    await client.post("/v1/completions", json=body)
    text = (await client.get("/metrics")).text
    labels = '{engine="0",model_name="sim-llama-8b"}'
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
                 "vllm:external_prefix_cache_queries_total", "vllm:external_prefix_cache_hits_total",
                 "vllm:prompt_tokens_cached_total", "vllm:gpu_prefix_cache_hit_rate",
                 "vllm:gpu_cache_usage_perc", "vllm:time_to_first_token_seconds_count"):
        assert f"{name}{labels} " in text, name
    assert f"vllm:time_to_first_token_seconds_count{labels} 2" in text
    hits = engine.metrics.prefix_hits + engine.metrics.external_hits
    assert f"vllm:prompt_tokens_cached_total{labels} {float(hits)!r}" in text
    assert hits > 0


async def test_errors_have_vllm_shapes(client: httpx.AsyncClient) -> None:
    not_json = await client.post("/v1/completions", content=b"prompt=x",
                                 headers={"content-type": "application/x-www-form-urlencoded"})
    assert not_json.status_code == 400
    assert not_json.json()["error"]["type"] == "BadRequestError"
    assert set(not_json.json()["error"]) == {"message", "type", "param", "code"}
    broken = await client.post("/v1/completions", content=b"{",
                               headers={"content-type": "application/json"})
    assert broken.status_code == 400
    unknown = await client.post("/v1/chat/completions",
                                json={"model": "gpt-x", "messages": [{"role": "user", "content": "a"}]})
    assert unknown.status_code == 404
    assert unknown.json()["error"]["type"] == "NotFoundError" and unknown.json()["error"]["code"] == 404
    too_long = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 10_000})
    assert too_long.status_code == 400 and "maximum context length" in too_long.json()["error"]["message"]
    bad_field = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": "many"})
    assert bad_field.status_code == 400
    assert (await client.get("/v1/completions")).status_code == 405
    assert (await client.get("/nope")).status_code == 404
    # The server keeps serving.
    assert (await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})).status_code == 200


async def test_body_size_is_bounded(engine: SimEngine) -> None:
    import attrs

    from pixiu_kv.sim import serve_engine

    small = SimEngine(attrs.evolve(engine.config, max_body_bytes=1024))
    async with serve_engine(small) as url, httpx.AsyncClient(base_url=url, timeout=10) as http:
        reply = await http.post("/v1/completions", json={"prompt": "x" * 5000})
        assert reply.status_code == 413
        assert reply.json()["error"]["code"] == 413


async def test_stream_interval_batches_tokens(engine: SimEngine) -> None:
    import attrs

    from pixiu_kv.sim import serve_engine

    batched = SimEngine(attrs.evolve(engine.config, stream_interval=3))
    async with serve_engine(batched) as url, httpx.AsyncClient(base_url=url, timeout=10) as http:
        body = {"prompt": "batch my tokens", "max_tokens": 7, "stream": True,
                "stream_options": {"include_usage": True}}
        reply = await http.post("/v1/completions", json=body)
        chunks = [json.loads(p) for p in sse_events(reply.text)[:-1]]
        token_chunks, usage = chunks[:-1], chunks[-1]
        assert len(token_chunks) == 3  # token 1, tokens 2-4, tokens 5-7
        assert usage["usage"]["completion_tokens"] == 7
        unary = (await http.post("/v1/completions", json={**body, "stream": False,
                                                          "stream_options": None})).json()
        assert "".join(c["choices"][0]["text"] for c in token_chunks) == unary["choices"][0]["text"]


async def test_chat_template_options_and_bad_messages(client: httpx.AsyncClient) -> None:
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hel"}]
    cont = (await client.post("/tokenize", json={"messages": messages, "add_generation_prompt": False,
                                                  "continue_final_message": True})).json()
    assert cont["tokens"] == tokenize_chat(messages, False, True)
    assert cont["tokens"][-1] != tokenize_chat(messages, False)[-1]  # no end-of-turn token
    for bad in ([], [{"content": "no role"}], [{"role": "user", "content": 5}], "text"):
        reply = await client.post("/v1/chat/completions", json={"messages": bad})
        assert reply.status_code == 400, bad
        assert reply.json()["error"]["param"] == "messages"
    both = await client.post("/tokenize", json={"messages": messages, "add_generation_prompt": True,
                                                 "continue_final_message": True})
    assert both.status_code == 400


async def test_chat_stream_with_two_choices(client: httpx.AsyncClient) -> None:
    body = {"messages": [{"role": "user", "content": "two please"}], "max_tokens": 2, "n": 2, "stream": True}
    reply = await client.post("/v1/chat/completions", json=body)
    chunks = [json.loads(p) for p in sse_events(reply.text)[:-1]]
    roles = [c for c in chunks if "role" in c["choices"][0]["delta"]]
    assert sorted(c["choices"][0]["index"] for c in roles) == [0, 1]
    per_choice = {0: 0, 1: 0}
    for c in chunks:
        if "role" not in c["choices"][0]["delta"]:
            per_choice[c["choices"][0]["index"]] += 1
    assert per_choice == {0: 2, 1: 2}
    no_stream = await client.post("/v1/completions",
                                  json={"prompt": "x", "stream_options": {"include_usage": True}})
    assert no_stream.status_code == 400


async def test_reset_prefix_cache_leaves_the_lmcache_tier(
    client: httpx.AsyncClient, engine: SimEngine
) -> None:
    body = {"prompt": words(300), "max_tokens": 1}
    prompt_len = len(tokenize_prompt(words(300)))
    chunks = prompt_len // 256
    assert chunks >= 2
    await client.post("/v1/completions", json=body)
    state = (await client.get("/sim/state")).json()
    assert state["gpu_blocks_cached"] == prompt_len // 16
    assert state["cpu_tier_chunks"] == chunks
    assert state["running"] == 0 and state["gpu_blocks_used"] == 0
    assert (await client.post("/reset_prefix_cache")).status_code == 200
    assert (await client.get("/sim/state")).json()["gpu_blocks_cached"] == 0
    hits_before = engine.metrics.prefix_hits
    again = (await client.post("/v1/completions", json=body)).json()
    assert engine.metrics.prefix_hits == hits_before  # nothing from the GPU cache
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == min(chunks * 256, prompt_len - 1)


def test_pre_rendered_token_events_are_the_general_renderer_s_bytes() -> None:
    from pixiu_kv.sim.engine_config import EngineConfig
    from pixiu_kv.sim.openai_api import StreamRenderer, parse_chat, parse_completion

    config = EngineConfig()
    for req in (parse_completion({"prompt": "hi", "stream": True}, config),
                parse_chat({"messages": [{"role": "user", "content": "hi"}], "stream": True}, config)):
        renderer = StreamRenderer(req, "cmpl-1", 1700000000)
        assert renderer.one_token_ok
        for token in (0, 5, 300, 31999, 40000):  # special, unused, regular, last, outside
            general = renderer.token_events([[token]], False, 0)[0]
            assert renderer.one_token(token) == general
            event = json.loads(general.removeprefix(b"data: "))
            assert event["choices"][0]["finish_reason"] is None
    many = parse_completion({"prompt": "hi", "stream": True, "n": 2}, config)
    assert not StreamRenderer(many, "cmpl-2", 1).one_token_ok
