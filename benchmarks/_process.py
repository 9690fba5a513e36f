"""Child processes of a benchmark (or a test): start one in a nursery, read its stdout lines;
in the child, wait until the parent is gone."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from subprocess import PIPE
from typing import Any

import trio

__all__ = ["parent_gone", "process_starter", "read_line", "sim_fleet_process", "stop_popen"]


async def parent_gone() -> None:
    """In a child process: return once its stdin closes (the parent went away) or it is sent
    SIGTERM/SIGINT."""
    async def stdin_closed() -> None:
        # A thread blocks on the pipe; when the parent dies the read returns.
        await trio.to_thread.run_sync(sys.stdin.buffer.read, abandon_on_cancel=True)

    async def signalled() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                return

    async with trio.open_nursery() as waiters:
        async def first(wait: Callable[[], Awaitable[None]]) -> None:
            await wait()
            waiters.cancel_scope.cancel()

        waiters.start_soon(first, stdin_closed)
        waiters.start_soon(first, signalled)


def process_starter(command: list[str], **kwargs: Any) -> Callable[..., Awaitable[None]]:
    """For ``await nursery.start(process_starter(cmd, ...))``, which returns the trio.Process;
    the nursery owns it (cancelling the nursery kills it)."""
    async def run(task_status: trio.TaskStatus[trio.Process] = trio.TASK_STATUS_IGNORED) -> None:
        await trio.run_process(command, check=False, task_status=task_status, **kwargs)
    return run


async def read_line(stream: trio.abc.ReceiveStream, buffer: bytearray) -> str:
    """The next line of ``stream`` (without its newline); ``buffer`` keeps what follows it."""
    while b"\n" not in buffer:
        chunk = await stream.receive_some(65536)
        if not chunk:
            raise EOFError("the process closed its output")
        buffer += chunk
    line, _, rest = bytes(buffer).partition(b"\n")
    buffer[:] = rest
    return line.decode()


@asynccontextmanager
async def sim_fleet_process(engines: int, *, max_num_seqs: int,
                            startup_timeout: float) -> AsyncIterator[dict[str, Any]]:
    """A fast simulated fleet (``pixiu-kv sim --json`` at speed 100) in its own process: yields
    what it prints at startup (``engines`` with ``instance_id`` and ``url``, ``controller_url``);
    terminated on exit."""
    command = [sys.executable, "-m", "pixiu_kv.sim", "--engines", str(engines), "--speed", "100",
               "--max-num-seqs", str(max_num_seqs), "--json"]
    async with trio.open_nursery() as nursery:
        process: trio.Process = await nursery.start(process_starter(command, stdout=PIPE))
        try:
            assert process.stdout is not None
            with trio.fail_after(startup_timeout):
                described: dict[str, Any] = json.loads(await read_line(process.stdout, bytearray()))
            yield described
        finally:
            process.terminate()


def stop_popen(process: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    """Terminate a process started with ``subprocess.Popen``; kill it if it lingers. Its
    pipes are closed."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    for pipe in (process.stdin, process.stdout, process.stderr):
        if pipe is not None:
            pipe.close()
