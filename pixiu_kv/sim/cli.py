"""``pixiu-kv sim``: run a fleet of simulated engines until interrupted."""

from __future__ import annotations

import argparse
import json
import signal
import sys

import trio

from ._serving import tune_gc_for_serving
from .engine_config import EngineConfig
from .fleet import DEFAULT_SERVER, SERVER_KINDS, Fleet, open_fleet

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pixiu-kv sim",
        description="Serve simulated vLLM engines (with LMCache CPU tiers) and an LMCache controller"
        " emulator.",
    )
    defaults = EngineConfig()
    parser.add_argument("--engines", type=int, default=4, help="number of engines (default 4)")
    parser.add_argument("--speed", type=float, default=1.0, help="time scale: 100 runs 100x faster")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--base-port", type=int, default=0,
                        help="engine i listens on base-port + i (0: free ports)")
    parser.add_argument("--model", default=defaults.model)
    parser.add_argument("--max-num-seqs", type=int, default=defaults.max_num_seqs)
    parser.add_argument("--max-model-len", type=int, default=defaults.max_model_len)
    parser.add_argument("--gpu-kv-tokens", type=int, default=defaults.gpu_kv_tokens)
    parser.add_argument("--cpu-tier-tokens", type=int, default=defaults.cpu_tier_tokens,
                        help="LMCache CPU tier per engine (0: no LMCache)")
    parser.add_argument("--stream-interval", type=int, default=defaults.stream_interval,
                        help="stream new tokens every N decode steps (vLLM's --stream-interval)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=defaults.max_num_batched_tokens,
                        help="prefill tokens each decode step carries (vLLM's chunked prefill budget); "
                             "0: prefill never slows decode")
    parser.add_argument("--no-controller", action="store_true", help="do not run the controller emulator")
    parser.add_argument("--controller-port", type=int, default=0)
    parser.add_argument("--server", choices=SERVER_KINDS, default=DEFAULT_SERVER,
                        help=f"engines' HTTP server (default {DEFAULT_SERVER}: the lean trio one)")
    parser.add_argument("--json", action="store_true", help="print the fleet as one JSON line")
    return parser


def _describe(fleet: Fleet, as_json: bool) -> str:
    if as_json:
        return json.dumps({
            "engines": [{"instance_id": e.instance_id, "url": e.url} for e in fleet.engines],
            "controller_url": fleet.controller_url,
        })
    lines = [f"{e.instance_id} {e.url}" for e in fleet.engines]
    if fleet.controller_url:
        lines.append(f"controller {fleet.controller_url}")
    return "\n".join(lines)


async def _run(args: argparse.Namespace, config: EngineConfig) -> None:
    async with open_fleet(args.engines, config, host=args.host, base_port=args.base_port,
                          controller=not args.no_controller, controller_port=args.controller_port,
                          server=args.server) as fleet:
        tune_gc_for_serving()
        print(_describe(fleet, args.json), flush=True)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                return


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = EngineConfig(
            model=args.model, speed=args.speed, max_num_seqs=args.max_num_seqs,
            max_model_len=args.max_model_len, gpu_kv_tokens=args.gpu_kv_tokens,
            cpu_tier_tokens=args.cpu_tier_tokens, stream_interval=args.stream_interval,
            max_num_batched_tokens=args.max_num_batched_tokens,
        )
        if args.engines < 1:
            raise ValueError("--engines must be at least 1")
    except ValueError as error:
        print(f"pixiu-kv sim: {error}", file=sys.stderr)
        return 2
    trio.run(_run, args, config)
    return 0
