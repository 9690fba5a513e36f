"""Load generator for the soak test, run as a separate process (it gets its own core).

    python soak_load.py URL STREAMS DISCONNECT_SHARE SEED TOKENS

Opens STREAMS streamed chat requests at once, one raw HTTP/1.1 connection each. A random
DISCONNECT_SHARE of the clients hang up when the line ``go`` arrives on stdin (sent by the
test once every stream is open at the gateway); the others read their stream to the end.
Prints ``started`` once all requests are sent, then one JSON summary line.
"""

from __future__ import annotations

import json
import random
import sys
from urllib.parse import urlsplit

import trio

PROMPT = "the quick brown fox jumps over the lazy dog " * 70


class Sent:
    def __init__(self, total: int) -> None:
        self.count = 0
        self.total = total
        self.all = trio.Event()

    def one(self) -> None:
        self.count += 1
        if self.count == self.total:
            self.all.set()


async def stream(url: str, index: int, tokens: int, leave: bool, go: trio.Event,
                 out: dict[str, int], sent: Sent) -> None:
    parts = urlsplit(url)
    body = json.dumps({"model": "sim-llama-8b", "max_tokens": tokens, "stream": True,
                       "messages": [{"role": "user", "content": f"[soak-{index % 20}] {PROMPT}"}]}).encode()
    conn = await trio.open_tcp_stream(parts.hostname or "127.0.0.1", parts.port or 80)
    received = bytearray()
    try:
        await conn.send_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\nconnection: close\r\n"
                            b"content-type: application/json\r\ncontent-length: "
                            + str(len(body)).encode() + b"\r\n\r\n" + body)
        sent.one()
        if leave:
            await go.wait()
            out["left"] += 1
            return
        while True:
            chunk = await conn.receive_some(65536)
            if not chunk:
                break
            received += chunk
    except OSError:
        out["transport_errors"] += 1
        return
    finally:
        await conn.aclose()
    head = bytes(received[:16])
    if not head.startswith(b"HTTP/1.1 200"):
        out["bad_status"] += 1
    elif b"data: [DONE]" in received and b'"error"' not in received:
        out["completed"] += 1
    else:
        out["incomplete"] += 1


async def main() -> None:
    url, streams, share, seed, tokens = (sys.argv[1], int(sys.argv[2]), float(sys.argv[3]),
                                         int(sys.argv[4]), int(sys.argv[5]))
    leave = set(random.Random(seed).sample(range(streams), int(streams * share)))
    out = {"completed": 0, "left": 0, "bad_status": 0, "incomplete": 0, "transport_errors": 0}
    sent = Sent(streams)
    go = trio.Event()

    async def wait_for_go() -> None:
        line = await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
        if line.strip() == "go":
            go.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait_for_go)
        async with trio.open_nursery() as clients:
            for i in range(streams):
                clients.start_soon(stream, url, i, tokens, i in leave, go, out, sent)
            await sent.all.wait()
            print("started", flush=True)
        nursery.cancel_scope.cancel()
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    trio.run(main)
