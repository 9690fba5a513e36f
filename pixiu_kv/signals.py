"""Process signals: SIGHUP reloads the configuration, SIGTERM/SIGINT start a graceful stop.

Shutdown order (see ``docs/operations.md``): stop accepting, let in-flight streams finish
within ``listener.graceful_timeout`` (hypercorn's ``graceful_timeout`` does this once its
shutdown trigger fires), then cancel background cache management, close upstream clients
and exit 0. This module only turns signals into those two triggers.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Awaitable, Callable

import trio

from .logs import log_event

__all__ = ["handle_signals"]

_log = logging.getLogger("pixiu_kv.signals")


async def handle_signals(*, stop: trio.Event, reload: Callable[[], Awaitable[object]] | None = None,
                         task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve signals until ``stop`` is set: SIGHUP runs ``reload()``, SIGTERM/SIGINT set ``stop``.

    Must run in the main thread (trio's rule for signal handlers). Reloads run one at a time
    in this task, so a burst of SIGHUPs cannot pile up concurrent reloads; a reload that
    raises is logged and the process keeps serving.
    """
    wanted = {signal.SIGTERM, signal.SIGINT}
    if reload is not None:
        wanted.add(signal.SIGHUP)
    with trio.open_signal_receiver(*wanted) as signals:
        task_status.started()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_when_set, stop, nursery.cancel_scope)
            async for signum in signals:
                if signum == signal.SIGHUP and reload is not None:
                    log_event(_log, logging.INFO, "signal", signal="SIGHUP", action="reload")
                    try:
                        await reload()
                    except Exception:
                        _log.exception("reload_failed")
                    continue
                log_event(_log, logging.INFO, "signal", signal=signal.Signals(signum).name,
                          action="graceful_shutdown")
                stop.set()


async def _cancel_when_set(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()
