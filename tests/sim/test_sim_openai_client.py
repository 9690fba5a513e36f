"""The official ``openai`` client against a simulated engine (httpx/anyio under trio)."""

from __future__ import annotations

import gc

import openai
import pytest

from pixiu_kv.sim import SimEngine, serve_engine


# openai's stream stops reading at [DONE] and leaves its inner async generators for the
# garbage collector, which trio reports as a ResourceWarning: a client-side artifact.
@pytest.mark.filterwarnings("ignore:Async generator:ResourceWarning")
async def test_openai_client_chat_stream_and_completion(engine: SimEngine) -> None:
    async with serve_engine(engine) as url:
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", timeout=10.0, max_retries=0)
        try:
            models = await client.models.list()
            assert [m.id for m in models.data] == ["sim-llama-8b"]

            messages = [{"role": "user", "content": "Explain prefix caching. " * 40}]
            for turn in range(2):
                stream = await client.chat.completions.create(
                    model="sim-llama-8b", messages=messages,  # type: ignore[arg-type]
                    max_tokens=5, stream=True, stream_options={"include_usage": True},
                )
                pieces: list[str] = []
                usage = None
                async with stream:
                    async for chunk in stream:
                        if chunk.choices:
                            pieces.append(chunk.choices[0].delta.content or "")
                        if chunk.usage is not None:
                            usage = chunk.usage
                assert usage is not None and usage.completion_tokens == 5
                assert usage.prompt_tokens_details is not None
                cached = usage.prompt_tokens_details.cached_tokens or 0
                assert (cached > 0) == (turn == 1)
                assert "".join(pieces)

            completion = await client.completions.create(model="sim-llama-8b", prompt="Once upon a time",
                                                         max_tokens=3)
            assert completion.choices[0].finish_reason == "length"
            assert completion.usage is not None and completion.usage.completion_tokens == 3
            assert completion.usage.prompt_tokens_details is not None

            try:
                await client.completions.create(model="other-model", prompt="x")
            except openai.NotFoundError as error:
                assert error.status_code == 404
            else:
                raise AssertionError("an unknown model must be a 404")
        finally:
            await client.close()
            gc.collect()
