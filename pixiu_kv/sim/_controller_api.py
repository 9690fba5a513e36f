"""The controller emulator's HTTP API as plain functions: request in, (status, JSON) out.

Routes, bodies, replies and error details follow ``lmcache_controller`` 0.5.6 (FastAPI):
422 ``{"detail":[...]}`` for bad bodies, 500 ``{"detail":"..."}`` for failed operations,
404/405 ``{"detail":"Not Found"|"Method Not Allowed"}`` for unknown routes and methods.
No network I/O here; the ASGI layer lives in ``_controller_asgi``.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs

import attrs

from pixiu_kv.sim._controller_index import ChunkIndex
from pixiu_kv.sim._controller_validation import (
    BodyError,
    FieldKind,
    FieldSpec,
    parse_json_body,
    validate_body,
)
from pixiu_kv.sim.lmcache_link import WorkerControl, chunk_keys

__all__ = ["ApiReply", "EmulatorState", "handle_request"]

WORKER_ID = 0
"""Each in-process instance has one worker (tensor-parallel rank 0)."""

WORKER_IP = "127.0.0.1"

_TOKENS = FieldSpec("tokens", FieldKind.INT_LIST)
_INSTANCE = FieldSpec("instance_id", FieldKind.STR)
_LOCATION = FieldSpec("location", FieldKind.STR)
_METHOD = FieldSpec("method", FieldKind.STR)
_OPTIONAL_TOKENS = FieldSpec("tokens", FieldKind.INT_LIST, required=False, nullable=True, default=[])

_BODIES: dict[str, tuple[FieldSpec, ...]] = {
    "/lookup": (_TOKENS,),
    "/pin": (_INSTANCE, _LOCATION, _TOKENS),
    "/compress": (_INSTANCE, _METHOD, _LOCATION, _OPTIONAL_TOKENS),
    "/decompress": (_INSTANCE, _METHOD, _LOCATION, _OPTIONAL_TOKENS),
    "/clear": (_INSTANCE, _LOCATION),
    "/move": (
        FieldSpec("old_position", FieldKind.STR_PAIR),
        FieldSpec("new_position", FieldKind.STR_PAIR),
        _OPTIONAL_TOKENS,
        FieldSpec("should_copy", FieldKind.BOOL, required=False, nullable=True, default=False),
    ),
    "/health": (_INSTANCE,),
    "/check_finish": (FieldSpec("event_id", FieldKind.STR),),
    "/query_worker_info": (
        _INSTANCE,
        FieldSpec("worker_ids", FieldKind.INT_LIST, required=False, nullable=True, default=None),
    ),
    "/query_instance": (FieldSpec("event_id", FieldKind.STR), FieldSpec("ip", FieldKind.STR)),
    "/evict": (_TOKENS, _INSTANCE),
}

_GET_PATHS = frozenset({"/controller/workers", "/controller/key-stats", "/metrics"})


@attrs.frozen(slots=True)
class ApiReply:
    status: int
    body: bytes
    content_type: str = "application/json"


def _json(status: int, payload: Any) -> ApiReply:
    return ApiReply(status, json.dumps(payload, separators=(",", ":")).encode())


def _detail(status: int, detail: Any) -> ApiReply:
    return _json(status, {"detail": detail})


@attrs.define(slots=True)
class EmulatorState:
    """Everything the API reads and changes. Flags may be flipped at run time."""

    index: ChunkIndex
    controls: dict[str, WorkerControl] = attrs.field(factory=dict)
    object_form: bool = False
    evict_enabled: bool = True
    move_enabled: bool = False
    strict_bodies: bool = False
    requests: Counter[str] = attrs.field(factory=Counter)
    lookups: int = 0
    lookup_hits: int = 0


def _event_id(prefix: str) -> str:
    return prefix + str(uuid.uuid4())


def handle_request(
    state: EmulatorState, method: str, path: str, query: str, raw: bytes, content_type: str
) -> ApiReply:
    """Answer one HTTP request as the real controller would (plus the pixiu extensions)."""
    # Only known routes are counted, so a client probing random paths cannot grow the map.
    state.requests[path if path in _BODIES or path in _GET_PATHS else "<other>"] += 1
    if path in _GET_PATHS:
        if method != "GET":
            return _detail(405, "Method Not Allowed")
        return _get(state, path, query)
    specs = _BODIES.get(path)
    if specs is None or (path == "/evict" and not state.evict_enabled):
        return _detail(404, "Not Found")
    if method != "POST":
        return _detail(405, "Method Not Allowed")
    try:
        body = validate_body(parse_json_body(raw, content_type), specs, strict=state.strict_bodies)
    except BodyError as exc:
        return _detail(422, exc.detail)
    return _POST_HANDLERS[path](state, body)


# -- POST handlers ---------------------------------------------------------------------------


def _lookup(state: EmulatorState, body: dict[str, Any]) -> ApiReply:
    hits = state.index.lookup(chunk_keys(body["tokens"], state.index.chunk_size))
    state.lookups += 1
    if hits:
        state.lookup_hits += 1
    layout: dict[str, Any] = {}
    for hit in hits.values():
        layout[hit.instance_id] = (
            {"0": hit.location, "1": hit.matched_end}
            if state.object_form
            else [hit.location, hit.matched_end]
        )
    return _json(200, {"event_id": _event_id("Lookup"), "layout_info": layout})


def _worker_call(
    state: EmulatorState,
    instance_id: str,
    op_name: str,
    prefix: str,
    call: Callable[[WorkerControl], int],
) -> ApiReply:
    control = state.controls.get(instance_id)
    if control is None:
        # What the real controller answers when the instance has no registered worker.
        return _detail(500, f"The number of tokens {op_name} should be the same across all workers.")
    try:
        num_tokens = call(control)
    except Exception:  # a failing engine is the controller's 500, not an emulator crash
        return _detail(500, "'ErrorMsg' object has no attribute 'num_tokens'")
    return _json(200, {"event_id": _event_id(prefix), "num_tokens": int(num_tokens)})


def _pin(state: EmulatorState, body: dict[str, Any]) -> ApiReply:
    return _worker_call(
        state, body["instance_id"], "pinned", "Pin", lambda c: c.pin(body["tokens"], body["location"])
    )


def _compress(state: EmulatorState, body: dict[str, Any]) -> ApiReply:
    tokens = body["tokens"] or []
    return _worker_call(
        state,
        body["instance_id"],
        "compressed",
        "Compress",
        lambda c: c.compress(tokens, body["method"], body["location"]),
    )


def _decompress(state: EmulatorState, body: dict[str, Any]) -> ApiReply:
    if body["instance_id"] not in state.controls:
        return _detail(500, "")  # the real /decompress loses its error message
    tokens = body["tokens"] or []
    return _worker_call(
        state,
        body["instance_id"],
        "decompressed",
        "Decompress",
        lambda c: c.decompress(tokens, body["method"], body["location"]),
    )


def _clear(state: EmulatorState, body: dict[str, Any]) -> ApiReply:
    return _worker_call(state, body["instance_id"], "cleared", "Clear", lambda c: c.clear(body["location"]))


def _evict(state: EmulatorState, body: dict[str, Any]) -> ApiReply:
    instance_id = body["instance_id"]
    if instance_id not in state.controls:
        return _detail(500, f"instance {instance_id} is not registered")
    return _worker_call(state, instance_id, "evicted", "Evict", lambda c: c.evict(body["tokens"]))


def _move(state: EmulatorState, body: dict[str, Any]) -> ApiReply:
    src, dst = body["old_position"][0], body["new_position"][0]
    if not state.move_enabled or src not in state.controls or dst not in state.controls:
        return _detail(500, "The number of tokens moved should be the same across all workers.")
    # Simulated engines have no peer-to-peer transfer: acknowledge what the source holds.
    held = state.index.held_prefix_tokens(src, chunk_keys(body["tokens"] or [], state.index.chunk_size))
    return _json(200, {"event_id": _event_id("Move"), "num_tokens": held})


def _health(state: EmulatorState, body: dict[str, Any]) -> ApiReply:
    control = state.controls.get(body["instance_id"])
    codes: dict[str, int] = {}
    if control is not None:
        try:
            codes[str(WORKER_ID)] = int(control.health())
        except Exception:
            codes[str(WORKER_ID)] = -1001  # the real controller's code for a worker error
    return _json(200, {"event_id": _event_id("health"), "error_codes": codes})


def _check_finish(_state: EmulatorState, _body: dict[str, Any]) -> ApiReply:
    return _detail(500, "")  # not implemented by the real controller either


def _worker_info(state: EmulatorState, instance_id: str) -> dict[str, Any] | None:
    entry = state.index.get(instance_id)
    if entry is None:
        return None
    return {
        "instance_id": instance_id,
        "worker_id": WORKER_ID,
        "ip": WORKER_IP,
        "port": 0,
        "peer_init_url": None,
        "registration_time": entry.registration_time,
        "last_heartbeat_time": entry.last_heartbeat_time,
    }


def _query_worker_info(state: EmulatorState, body: dict[str, Any]) -> ApiReply:
    wanted = body["worker_ids"]
    if body["instance_id"] == "all":
        ids = [e.instance_id for e in state.index.instances()]
    else:
        ids = [body["instance_id"]]
    infos = []
    for instance_id in ids:
        info = _worker_info(state, instance_id)
        if info is not None and (not wanted or WORKER_ID in wanted):
            infos.append(info)
    return _json(200, {"event_id": _event_id("QueryWorkerInfo"), "worker_infos": infos})


def _query_instance(state: EmulatorState, body: dict[str, Any]) -> ApiReply:
    instances = state.index.instances()
    if body["ip"] != WORKER_IP or not instances:
        return _detail(
            500,
            "1 validation error for QueryInstResponse\nres\n  Input should be a valid string "
            "[type=string_type, input_value=None, input_type=NoneType]",
        )
    return _json(200, {"event_id": body["event_id"], "res": instances[0].instance_id})


_POST_HANDLERS: dict[str, Callable[[EmulatorState, dict[str, Any]], ApiReply]] = {
    "/lookup": _lookup,
    "/pin": _pin,
    "/compress": _compress,
    "/decompress": _decompress,
    "/clear": _clear,
    "/move": _move,
    "/health": _health,
    "/check_finish": _check_finish,
    "/query_worker_info": _query_worker_info,
    "/query_instance": _query_instance,
    "/evict": _evict,
}


# -- GET handlers ----------------------------------------------------------------------------


def _worker_row(state: EmulatorState, instance_id: str) -> dict[str, Any] | None:
    info = _worker_info(state, instance_id)
    entry = state.index.get(instance_id)
    if info is None or entry is None:
        return None
    return {**info, "key_count": len(entry.keys)}


def _get(state: EmulatorState, path: str, query: str) -> ApiReply:
    if path == "/metrics":
        return ApiReply(200, _metrics_text(state).encode(), "text/plain; charset=utf-8")
    if path == "/controller/key-stats":
        instances = [
            {"instance_id": e.instance_id, "key_count": len(e.keys), "worker_count": 1}
            for e in state.index.instances()
        ]
        return _json(
            200,
            {
                "total_key_count": state.index.total_keys,
                "total_instance_count": len(instances),
                "total_worker_count": len(instances),
                "instances": instances,
            },
        )
    params = parse_qs(query)
    instance_id = params.get("instance_id", [None])[0]
    worker_id_text = params.get("worker_id", [None])[0]
    if instance_id is None:
        rows = [_worker_row(state, e.instance_id) for e in state.index.instances()]
        workers = [r for r in rows if r is not None]
        return _json(200, {"workers": workers, "total_count": len(workers)})
    row = _worker_row(state, instance_id)
    if worker_id_text is not None:
        if not worker_id_text.strip().lstrip("+-").isdigit():
            return _detail(
                422,
                [
                    {
                        "type": "int_parsing",
                        "loc": ["query", "worker_id"],
                        "msg": "Input should be a valid integer, unable to parse string as an integer",
                        "input": worker_id_text,
                    }
                ],
            )
        if row is None or int(worker_id_text) != WORKER_ID:
            return _detail(404, f"Worker ({instance_id}, {worker_id_text}) not found")
        return _json(200, row)
    if row is None:
        return _detail(404, f"No workers found for instance {instance_id}")
    return _json(200, {"workers": [row], "total_count": 1})


_GAUGES = (
    ("kv_pool_keys_count", "The number of keys in the KV pool"),
    ("registered_workers_count", "The total number of registered workers"),
    ("pull_socket_message_count", "The total number of messages received on PULL socket"),
    ("reply_socket_message_count", "The total number of messages received on REPLY socket"),
    ("pull_socket_has_pending", "Whether PULL socket has pending messages (1=yes, 0=no)"),
    ("reply_socket_has_pending", "Whether REPLY socket has pending messages (1=yes, 0=no)"),
    ("pull_socket_active_requests", "Number of requests being processed from PULL socket"),
    ("reply_socket_active_requests", "Number of requests being processed from REPLY socket"),
    ("kv_op_seq_discontinuity_count", "Total count of KV operation sequence number discontinuities"),
    ("full_sync_workers_syncing", "Number of workers currently in full sync"),
    ("full_sync_workers_completed", "Number of workers that have completed full sync"),
    ("full_sync_global_progress", "Global full sync progress (0.0 to 1.0)"),
    ("full_sync_missing_batches_total", "Total count of missing batches across all syncing workers"),
)


def _metrics_text(state: EmulatorState) -> str:
    values = {
        "kv_pool_keys_count": float(state.index.total_keys),
        "registered_workers_count": float(len(state.controls)),
    }
    lines: list[str] = []
    for name, doc in _GAUGES:
        metric = f"lmcache:cache_controller_{name}"
        lines += [
            f"# HELP {metric} {doc}",
            f"# TYPE {metric} gauge",
            f'{metric}{{role="controller"}} {values.get(name, 0.0)}',
        ]
    lines += [
        "# HELP pixiu_kv_emulator_lookups_total Lookups answered by the controller emulator",
        "# TYPE pixiu_kv_emulator_lookups_total counter",
        f"pixiu_kv_emulator_lookups_total {float(state.lookups)}",
        "# HELP pixiu_kv_emulator_lookup_hits_total Lookups that matched at least one chunk",
        "# TYPE pixiu_kv_emulator_lookup_hits_total counter",
        f"pixiu_kv_emulator_lookup_hits_total {float(state.lookup_hits)}",
        "# HELP pixiu_kv_emulator_refused_admits_total Admits refused because the index was full",
        "# TYPE pixiu_kv_emulator_refused_admits_total counter",
        f"pixiu_kv_emulator_refused_admits_total {float(state.index.refused_admits)}",
    ]
    return "\n".join(lines) + "\n"
