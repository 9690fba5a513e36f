"""Child processes of a benchmark (or a test): start one in a nursery, read its stdout lines."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio

__all__ = ["process_starter", "read_line"]


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
