"""examples/embed_trio.py: the core embedded in a plain trio program, run as its own process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import trio
from kv_fakes import FakeUpstream, fake_tokens

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "embed_trio.py"


async def test_embedded_in_a_plain_trio_program(upstream: tuple[FakeUpstream, str]) -> None:
    fake, url = upstream
    fake.layout = {"engine-7": ("LocalCPUBackend", 256)}

    result = await trio.run_process(
        [sys.executable, str(EXAMPLE), "--vllm", url, "--lmcache", url, "--prompt", "shared prefix",
         "--repeat", "3", "--pin-after", "2",
         # The routing budget (50 ms by default) is a deadline: on a loaded test machine a
         # fresh process's first lookup can take longer, and the request would rightly go on
         # without it. This test is about what the lookup answers, not how fast.
         "--lookup-timeout", "5"],
        capture_stdout=True, capture_stderr=True, check=False)
    assert result.returncode == 0, result.stderr.decode()
    lines = [json.loads(line) for line in result.stdout.decode().splitlines()]
    assert lines[0] == {"endpoint": None, "reason": "no_tokens", "matched_tokens": None,
                        "prompt_tokens": None}
    n = len(fake_tokens("shared prefix"))
    assert lines[1] == lines[2] == {"endpoint": "engine-7", "reason": "kv_prefix", "matched_tokens": 256,
                                    "prompt_tokens": n}
    assert lines[3]["tokenize_calls"] == 1 and lines[3]["pins"] == 1
    assert fake.calls["/tokenize"] == 1 and fake.calls["/pin"] == 1
    assert fake.bodies["/tokenize"] == [{"model": "default", "prompt": "shared prefix"}]


def test_example_documents_its_usage() -> None:
    out = subprocess.run([sys.executable, str(EXAMPLE), "--help"], capture_output=True, text=True, check=True)
    assert "--lmcache" in out.stdout
