"""LMCache worker <-> controller ZMQ messages, encoded as lmcache 0.5.6 does. No I/O.

The controller decodes every frame with msgspec into tagged structs: a map whose
``"type"`` field names the message class, then the class's fields. Frames starting
with ``{`` are read as JSON, others as msgpack. Replies to workers are msgpack.
Field names and types follow ``lmcache/v1/cache_controller/message.py``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from enum import Enum
from typing import Any

import msgpack

from pixiu_kv.sim.lmcache_link import WorkerControl

__all__ = [
    "KvOp",
    "WireError",
    "answer_control",
    "decode_frame",
    "encode_deregister",
    "encode_full_sync_batch",
    "encode_full_sync_end",
    "encode_full_sync_start",
    "encode_full_sync_status",
    "encode_heartbeat",
    "encode_kv_batch",
    "encode_register",
]


class KvOp(Enum):
    ADMIT = "admit"
    EVICT = "evict"


class WireError(ValueError):
    """A frame that is not a message of the expected shape."""


def _pack(message: Mapping[str, Any]) -> bytes:
    packed: bytes = msgpack.packb(message, use_bin_type=True)
    return packed


def decode_frame(frame: bytes) -> dict[str, Any]:
    """Decode a msgpack or JSON frame into a message map with a string ``type``."""
    try:
        if frame.startswith(b"{"):
            message = json.loads(frame)
        else:
            message = msgpack.unpackb(frame, raw=False, strict_map_key=False)
    except (ValueError, msgpack.UnpackException) as exc:
        raise WireError(f"undecodable frame ({len(frame)} bytes): {exc}") from None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise WireError("frame is not a tagged message map")
    return message


def encode_register(instance_id: str, worker_id: int, ip: str, port: int) -> bytes:
    """RegisterMsg, as JSON (the controller's reply socket accepts both encodings)."""
    return json.dumps(
        {
            "type": "RegisterMsg",
            "instance_id": instance_id,
            "worker_id": worker_id,
            "ip": ip,
            "port": port,
            "peer_init_url": None,
        }
    ).encode()


def encode_heartbeat(instance_id: str, worker_id: int, ip: str, port: int) -> bytes:
    return _pack(
        {
            "type": "HeartbeatMsg",
            "instance_id": instance_id,
            "worker_id": worker_id,
            "ip": ip,
            "port": port,
            "peer_init_url": None,
        }
    )


def encode_deregister(instance_id: str, worker_id: int, ip: str, port: int) -> bytes:
    return _pack(
        {"type": "DeRegisterMsg", "instance_id": instance_id, "worker_id": worker_id, "ip": ip, "port": port}
    )


def encode_kv_batch(
    instance_id: str, worker_id: int, location: str, ops: Sequence[tuple[KvOp, int, int]]
) -> bytes:
    """BatchedKVOperationMsg from ``(op, key, seq_num)`` triples."""
    return _pack(
        {
            "type": "BatchedKVOperationMsg",
            "instance_id": instance_id,
            "worker_id": worker_id,
            "location": location,
            "operations": [{"op_type": op.value, "key": key, "seq_num": seq} for op, key, seq in ops],
        }
    )


def encode_full_sync_start(
    instance_id: str, worker_id: int, location: str, sync_id: str, total_keys: int, batch_count: int
) -> bytes:
    """FullSyncStartMsg: a request on the reply socket; the controller clears the worker's keys."""
    return _pack(
        {
            "type": "FullSyncStartMsg",
            "instance_id": instance_id,
            "worker_id": worker_id,
            "location": location,
            "sync_id": sync_id,
            "total_keys": total_keys,
            "batch_count": batch_count,
        }
    )


def encode_full_sync_batch(
    instance_id: str, worker_id: int, location: str, sync_id: str, batch_id: int, keys: Sequence[int]
) -> bytes:
    return _pack(
        {
            "type": "FullSyncBatchMsg",
            "instance_id": instance_id,
            "worker_id": worker_id,
            "location": location,
            "sync_id": sync_id,
            "batch_id": batch_id,
            "keys": list(keys),
        }
    )


def encode_full_sync_end(
    instance_id: str, worker_id: int, location: str, sync_id: str, actual_total_keys: int
) -> bytes:
    return _pack(
        {
            "type": "FullSyncEndMsg",
            "instance_id": instance_id,
            "worker_id": worker_id,
            "location": location,
            "sync_id": sync_id,
            "actual_total_keys": actual_total_keys,
        }
    )


def encode_full_sync_status(instance_id: str, worker_id: int, sync_id: str) -> bytes:
    return _pack(
        {"type": "FullSyncStatusMsg", "instance_id": instance_id, "worker_id": worker_id, "sync_id": sync_id}
    )


def _tokens(message: Mapping[str, Any]) -> list[int]:
    tokens = message.get("tokens")
    if tokens is None:
        return []
    if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
        raise WireError("tokens must be a list of integers")
    return tokens


def _text(message: Mapping[str, Any], name: str) -> str:
    value = message.get(name)
    if not isinstance(value, str):
        raise WireError(f"{name} must be a string")
    return value


def _error(text: str) -> bytes:
    return _pack({"type": "ErrorMsg", "error": text})


def answer_control(frame: bytes, control: WorkerControl) -> bytes:
    """Run one control message from the controller against ``control``; return the reply frame.

    Unknown or malformed messages and failing controls are answered with ``ErrorMsg``, as
    an LMCache worker does, so the controller's request/reply pair never stalls.
    """
    try:
        message = decode_frame(frame)
        kind = message["type"]
        if kind == "HealthWorkerMsg":
            return _pack({"type": "HealthWorkerRetMsg", "error_code": int(control.health())})
        if kind == "PinWorkerMsg":
            count = control.pin(_tokens(message), _text(message, "location"))
            return _pack({"type": "PinWorkerRetMsg", "num_tokens": int(count)})
        if kind == "ClearWorkerMsg":
            count = control.clear(_text(message, "location"))
            return _pack({"type": "ClearWorkerRetMsg", "num_tokens": int(count)})
        if kind == "CompressWorkerMsg":
            count = control.compress(_tokens(message), _text(message, "method"), _text(message, "location"))
            return _pack({"type": "CompressWorkerRetMsg", "num_tokens": int(count)})
        if kind == "DecompressWorkerMsg":
            count = control.decompress(_tokens(message), _text(message, "method"), _text(message, "location"))
            return _pack({"type": "DecompressWorkerRetMsg", "num_tokens": int(count)})
        return _error(f"Unknown message: {kind}")
    except WireError as exc:
        return _error(f"Worker error: {exc}")
    except Exception as exc:  # the engine failed: report it, keep the socket's REQ/REP cycle
        return _error(f"Worker error: {type(exc).__name__}: {exc}")
