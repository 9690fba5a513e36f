"""``pixiu-kv``: serve the gateway, check a configuration, run the simulator or benchmarks.

* ``pixiu-kv serve [--config FILE] [--host H] [--port P]``: flags override the file. Without a
  file (no ``--config`` and no ``$PIXIU_KV_CONFIG``) it runs the embedded default: an
  in-process simulated fleet with the LMCache controller emulator, and the kvcache filter
  enabled in front of it. SIGINT/SIGTERM stop it gracefully.
* ``pixiu-kv check-config FILE``: validate; print the effective configuration as JSON with
  secrets redacted (exit 0), or the error naming the field (exit 2).
* ``pixiu-kv sim ...`` and ``pixiu-kv bench ...``: the simulator and the benchmarks.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from functools import partial
from typing import TYPE_CHECKING, Any

import attrs
import trio

from .config import ConfigError, GatewayConfig, config_to_dict, load_config, loads_config

if TYPE_CHECKING:
    from .sim.fleet import Fleet

__all__ = ["embedded_default", "main"]

EMBEDDED_ENGINES = 3


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pixiu-kv", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", help="TOML configuration file (default: $PIXIU_KV_CONFIG, "
                       "else the embedded simulated fleet)")
    serve.add_argument("--host", help="listen address (overrides listener.host)")
    serve.add_argument("--port", type=int, help="listen port (overrides listener.port)")
    check = sub.add_parser("check-config", help="validate a configuration file")
    check.add_argument("file")
    sub.add_parser("sim", help="run simulated engines (pixiu-kv sim --help)", add_help=False)
    sub.add_parser("bench", help="run benchmarks (pixiu-kv bench --help)", add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    # sim and bench own their arguments entirely.
    if args_list and args_list[0] in ("sim", "bench"):
        return _delegate(args_list[0], args_list[1:])
    args = _parser().parse_args(args_list)
    if args.command == "check-config":
        return _check_config(args.file)
    return _serve(args.config or os.environ.get("PIXIU_KV_CONFIG"), args.host, args.port)


def _delegate(command: str, rest: list[str]) -> int:
    module_name = {"sim": "pixiu_kv.sim.cli", "bench": "benchmarks.__main__"}[command]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        print(f"pixiu-kv {command}: not available ({module_name} cannot be imported: {exc})",
              file=sys.stderr)
        return 2
    result: Any = module.main(rest)
    return int(result or 0)


def _check_config(path: str) -> int:
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(f"pixiu-kv: invalid configuration: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(config_to_dict(config), indent=2))
    return 0


def _serve(path: str | None, host: str | None, port: int | None) -> int:
    try:
        config = load_config(path) if path else None
        if config is not None:
            config = _override_listener(config, host, port)
    except (ConfigError, ValueError) as exc:
        print(f"pixiu-kv: invalid configuration: {exc}", file=sys.stderr)
        return 2
    failure = ""
    try:
        trio.run(partial(_run_server, config, host, port, path))
    except* OSError as group:  # e.g. the address is in use
        failure = "; ".join(str(exc) for exc in _leaves(group))
    if failure:
        print(f"pixiu-kv: cannot serve: {failure}", file=sys.stderr)
        return 1
    return 0


def _leaves(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in _leaves(inner)]
    return [error]


def _override_listener(config: GatewayConfig, host: str | None, port: int | None) -> GatewayConfig:
    changes: dict[str, Any] = {}
    if host is not None:
        changes["host"] = host
    if port is not None:
        changes["port"] = port
    return attrs.evolve(config, listener=attrs.evolve(config.listener, **changes)) if changes else config


async def _run_server(config: GatewayConfig | None, host: str | None, port: int | None,
                      path: str | None = None) -> None:
    from .app import serve
    from .logs import configure_logging
    from .signals import handle_signals

    async with _embedded_or(config, host, port) as effective:
        configure_logging(effective.log)
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            apps: list[Any] = []

            async def reload() -> object:
                # SIGHUP before the app exists (startup) is ignored.
                return await apps[0].reload() if apps else None

            # SIGHUP is always caught: without a file the reload is refused and logged, rather
            # than the signal's default action ending the process.
            await nursery.start(partial(handle_signals, stop=stop, reload=reload))
            running = await nursery.start(partial(serve, effective, shutdown_trigger=stop.wait,
                                                  config_path=path))
            apps.append(running.app)
            if running.admin_url:
                print(f"pixiu-kv admin API on {running.admin_url}", flush=True)
            print(f"pixiu-kv gateway listening on {running.url}", flush=True)


@asynccontextmanager
async def _embedded_or(config: GatewayConfig | None, host: str | None,
                       port: int | None) -> AsyncIterator[GatewayConfig]:
    if config is not None:
        yield config
        return
    from .sim.fleet import open_fleet

    async with open_fleet(EMBEDDED_ENGINES) as fleet:
        print("pixiu-kv: no configuration given; serving the embedded simulated fleet: "
              + ", ".join(f"{e.instance_id}={e.url}" for e in fleet.engines)
              + (f", LMCache controller emulator={fleet.controller_url}" if fleet.controller_url else ""),
              flush=True)
        yield _override_listener(embedded_default(fleet), host, port)


def embedded_default(fleet: Fleet) -> GatewayConfig:
    """The configuration ``pixiu-kv serve`` uses without a file: the fleet behind the
    kvcache filter (endpoint ids = LMCache instance ids) with its router on and what an
    operator knows of these engines (their tokenizer, their cache and GPU KV sizes), everything else
    at defaults: a new user sees first-sight prefix routing at once."""
    endpoints = "\n".join(
        f'[[clusters.endpoints]]\nid = "{e.instance_id}"\naddress = "{e.url}"\n' for e in fleet.engines)
    lmcache = fleet.controller_url or ""
    engine = fleet.engines[0].engine.config if fleet.engines else None
    model = engine.model if engine is not None else ""
    # LMCache writes every chunk through to the CPU tier: an engine keeps the larger tier.
    cache_tokens = max(engine.gpu_kv_tokens, engine.cpu_tier_tokens) if engine is not None else 0
    kv_tokens = engine.gpu_kv_tokens if engine is not None else 0
    text = f"""
[[clusters]]
name = "sim"
lb_policy = "least_request"
{endpoints}
[[http_filters]]
name = "dgp.filter.ai.kvcache"
[http_filters.config]
enabled = {"true" if lmcache else "false"}
vllm_endpoint = "{fleet.engines[0].url}"
lmcache_endpoint = "{lmcache}"
default_model = "{model}"
[http_filters.config.token_cache]
enabled = true
[http_filters.config.routing]
enabled = true
engine_cache_tokens = {cache_tokens}
engine_kv_tokens = {kv_tokens}
compress_when_full = true
[[http_filters.config.routing.tokenizers]]
model = "{model}"
path = "builtin:sim"

[[http_filters]]
name = "dgp.filter.llm.proxy"
"""
    return loads_config(text, source="<embedded default>")
