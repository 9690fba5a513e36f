"""Full sync of a worker's chunk keys, as LMCache 0.5.6 workers do when the controller asks.

The controller asks (a ``full_sync`` command in a heartbeat reply) after it starts and
when it re-registers a worker it did not know, e.g. after a restart. The worker then
sends everything it holds: ``FullSyncStartMsg`` (request; the controller clears the
worker's keys and ignores incremental batches until the end), ``FullSyncBatchMsg``\\ es and
``FullSyncEndMsg`` (pushed), then polls ``FullSyncStatusMsg`` and resends batches the
controller reports missing. No I/O here beyond the two callables it is given.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import attrs
import trio

from pixiu_kv.sim._controller_wire import (
    encode_full_sync_batch,
    encode_full_sync_end,
    encode_full_sync_start,
    encode_full_sync_status,
)

__all__ = ["FullSyncPlan", "run_full_sync", "wants_full_sync"]

log = logging.getLogger(__name__)

Request = Callable[[bytes], Awaitable[dict[str, Any]]]
Push = Callable[[bytes], Awaitable[None]]


@attrs.frozen(slots=True)
class FullSyncPlan:
    instance_id: str
    worker_id: int
    location: str
    batch_size: int = 2000
    max_polls: int = 20
    poll_interval: float = 0.1
    max_resends: int = 3


def wants_full_sync(heartbeat_reply: dict[str, Any]) -> bool:
    """Whether a ``HeartbeatRetMsg`` carries a ``full_sync`` command."""
    commands = heartbeat_reply.get("commands")
    if not isinstance(commands, list):
        return False
    return any(isinstance(c, dict) and c.get("command_type") == "full_sync" for c in commands)


async def run_full_sync(plan: FullSyncPlan, keys: Sequence[int], request: Request, push: Push) -> bool:
    """Send ``keys`` as the worker's complete state; True once the controller reports it complete."""
    sync_id = f"{plan.instance_id}_{plan.worker_id}_{uuid.uuid4().hex[:8]}"
    batches = [list(keys[i : i + plan.batch_size]) for i in range(0, len(keys), plan.batch_size)]
    start = await request(
        encode_full_sync_start(
            plan.instance_id, plan.worker_id, plan.location, sync_id, len(keys), len(batches)
        )
    )
    if start.get("type") != "FullSyncStartRetMsg" or not start.get("accepted"):
        log.warning("lmcache link %s: full sync refused: %s", plan.instance_id, start)
        return False

    async def send(batch_ids: Sequence[int]) -> None:
        for batch_id in batch_ids:
            await push(
                encode_full_sync_batch(
                    plan.instance_id, plan.worker_id, plan.location, sync_id, batch_id, batches[batch_id]
                )
            )
        await push(encode_full_sync_end(plan.instance_id, plan.worker_id, plan.location, sync_id, len(keys)))

    await send(range(len(batches)))
    resends = 0
    for _ in range(plan.max_polls):
        status = await request(encode_full_sync_status(plan.instance_id, plan.worker_id, sync_id))
        if status.get("type") == "FullSyncStatusRetMsg":
            missing = [b for b in status.get("missing_batches") or [] if 0 <= b < len(batches)]
            if missing and resends < plan.max_resends:
                resends += 1
                await send(missing)
            elif status.get("is_complete"):
                log.info("lmcache link %s: full sync of %d keys complete", plan.instance_id, len(keys))
                return True
        await trio.sleep(plan.poll_interval)
    log.warning("lmcache link %s: full sync not confirmed", plan.instance_id)
    return False
