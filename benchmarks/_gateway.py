"""Gateway process for the benchmarks: ``python -m benchmarks._gateway ['<json config>']``.

The JSON is the gateway configuration as decoded TOML would be (``parse_config``); without
an argument it is read as the first line of stdin, so the process can be started (and its
imports done) while the fleet it will front is still starting. Serves it with hypercorn on
127.0.0.1 and a free port, prints ``{"url": ...}`` as one line, and runs until its stdin
closes or it is sent SIGTERM/SIGINT. A separate process so that its CPU time and memory can
be measured on its own, and it does not share a core's event loop with the load generator.
"""

from __future__ import annotations

import json
import logging
import sys
from functools import partial
from typing import Any

import trio

from ._process import parent_gone


async def _run(data: dict[str, Any]) -> None:
    from pixiu_kv.app import serve
    from pixiu_kv.config import parse_config

    config = parse_config(data)
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        running = await nursery.start(partial(serve, config, host="127.0.0.1", port=0,
                                              shutdown_trigger=stop.wait))
        print(json.dumps({"url": running.url}), flush=True)
        await parent_gone()
        stop.set()


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    import pixiu_kv.app  # noqa: F401 - the slow part of starting, done before the config arrives

    if argv:
        data = json.loads(argv[0])
    else:
        line = sys.stdin.buffer.readline()
        if not line.strip():
            return 1  # the benchmark went away before sending a configuration
        data = json.loads(line)
    trio.run(_run, data)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
