"""Fleet process for the benchmarks: ``python -m benchmarks._fleet '<json settings>'``.

Runs the simulated engines and the LMCache controller emulator (pixiu_kv.sim.fleet), and
next to them the oracle router (it must live here: it reads the engines' memory) which also
serves ``GET /fleet/stats``. Prints one JSON line describing the fleet, then runs until its
stdin closes (the benchmark process went away) or it is sent SIGTERM/SIGINT.
"""

from __future__ import annotations

import json
import sys
from functools import partial
from typing import Any, cast

import hypercorn.config
import hypercorn.trio
import hypercorn.typing
import trio

from ._process import parent_gone
from .oracle import OracleApp, OracleRouter


def _http11_only() -> None:
    """Make this process's hypercorn servers speak HTTP/1.1 only, as vLLM's uvicorn does.

    Hypercorn switches a connection to HTTP/2 on the h2c preface. Some routers (smg) probe
    every worker for gRPC that way, and under concurrent streams hypercorn's HTTP/2 path on
    trio can fail with BusyResourceError and take the whole server process down. A real
    vLLM server refuses such probes; so do these engines: the connection is closed.
    """
    from hypercorn.events import Closed
    from hypercorn.protocol import ProtocolWrapper
    from hypercorn.protocol.h11 import H2CProtocolRequiredError, H2ProtocolAssumedError

    async def handle(self: ProtocolWrapper, event: Any) -> None:
        try:
            await self.protocol.handle(event)
        except (H2ProtocolAssumedError, H2CProtocolRequiredError):
            await self.send(Closed())

    ProtocolWrapper.handle = handle  # type: ignore[method-assign]


async def _run(settings: dict[str, Any]) -> None:
    from pixiu_kv.sim._serving import tune_gc_for_serving
    from pixiu_kv.sim.engine_config import EngineConfig
    from pixiu_kv.sim.fleet import open_fleet

    engine_fields = dict(settings.get("engine", {}))
    config = EngineConfig(**engine_fields)
    count = int(settings.get("engines", 4))
    async with open_fleet(count, config) as fleet:
        front = OracleApp(OracleRouter([e.engine for e in fleet.engines]))
        hc = hypercorn.config.Config()
        hc.bind = ["127.0.0.1:0"]
        hc.accesslog = None
        hc.errorlog = None
        hc.graceful_timeout = 1.0
        hc.keep_alive_max_requests = 1_000_000
        hc.read_timeout = None
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            binds: list[str] = await nursery.start(partial(
                hypercorn.trio.serve, cast(hypercorn.typing.ASGIFramework, front), hc,
                shutdown_trigger=stop.wait))
            tune_gc_for_serving()
            print(json.dumps({
                "engines": [{"id": e.instance_id, "url": e.url} for e in fleet.engines],
                "controller_url": fleet.controller_url,
                "oracle_url": binds[0],
                "model": config.model,
            }), flush=True)
            await parent_gone()
            stop.set()


def main(argv: list[str]) -> int:
    settings = json.loads(argv[0]) if argv else {}
    _http11_only()
    trio.run(_run, settings)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
