"""The load generator: sends a workload's sessions to an OpenAI-compatible base URL.

Open loop: sessions start at Poisson arrival offsets (the request rate divided by the mean
turns per session), whatever the server's state. Closed loop: a fixed number of clients
each run one session at a time. A session's turns are always sequential and a
history-carrying turn is rendered with the *actual* answer text of the earlier turns.
Streaming by default with ``stream_options.include_usage`` so that ``cached_tokens`` (the
engine's prefix-cache hit) arrives with every request.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from typing import Any, Literal, TextIO

import attrs
import httpx
import trio

from .metrics import Sample
from .workloads import Session, Workload, poisson_arrivals, render_request

__all__ = [
    "ENDPOINT_HEADER",
    "ROUTE_HEADER",
    "LoadSettings",
    "Progress",
    "RunResult",
    "run_load",
]

ROUTE_HEADER = "x-pixiu-kv-route"
ENDPOINT_HEADER = "x-pixiu-kv-endpoint"


@attrs.frozen
class LoadSettings:
    mode: Literal["open", "closed"] = "open"
    rate: float = attrs.field(default=4.0, validator=attrs.validators.gt(0))
    concurrency: int = attrs.field(default=16, validator=attrs.validators.ge(1))
    # No new session starts after ``duration_s``; in-flight ones get ``drain_s`` more.
    duration_s: float = attrs.field(default=120.0, validator=attrs.validators.gt(0))
    drain_s: float = attrs.field(default=60.0, validator=attrs.validators.ge(0))
    request_timeout_s: float = attrs.field(default=120.0, validator=attrs.validators.gt(0))
    # Open loop still bounds the sessions in flight: beyond this, arrivals wait.
    max_in_flight: int = attrs.field(default=512, validator=attrs.validators.ge(1))
    stream: bool = True
    model: str = "sim-model"
    seed: int = 0


@attrs.frozen
class RunResult:
    samples: tuple[Sample, ...]
    wall_s: float
    not_started: int


class Progress:
    """A one-line progress bar on stderr; redrawn at most a few times a second."""

    def __init__(self, total: int, label: str, stream: TextIO | None = None) -> None:
        self.total = max(1, total)
        self.label = label
        self.done = 0
        self.errors = 0
        self._stream = stream if stream is not None else sys.stderr
        self._tty = self._stream.isatty()
        self._last_draw = -1.0
        self._last_decile = -1

    def step(self, ok: bool) -> None:
        self.done += 1
        self.errors += 0 if ok else 1
        self._draw(final=False)

    def _draw(self, *, final: bool) -> None:
        frac = min(1.0, self.done / self.total)
        if self._tty:
            now = trio.current_time() if _in_trio() else 0.0
            if not final and now - self._last_draw < 0.25 and self.done < self.total:
                return
            self._last_draw = now
            bar = "#" * int(frac * 30)
            self._stream.write(f"\r{self.label:<28} [{bar:<30}] {self.done}/{self.total}"
                               f" err={self.errors}")
            if final:
                self._stream.write("\n")
        else:
            decile = int(frac * 10)
            if decile != self._last_decile or final:
                self._last_decile = decile
                self._stream.write(f"{self.label}: {self.done}/{self.total} err={self.errors}\n")
        self._stream.flush()

    def close(self) -> None:
        self._draw(final=True)


def _in_trio() -> bool:
    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        return False
    return True


class _Clock:
    def __init__(self) -> None:
        self.t0 = trio.current_time()

    def now(self) -> float:
        return trio.current_time() - self.t0


def _endpoint_of(headers: httpx.Headers, default: str) -> str:
    return str(headers.get(ENDPOINT_HEADER, default))


def _chunk_text(event: dict[str, Any]) -> str:
    parts: list[str] = []
    for choice in event.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        if isinstance(choice.get("text"), str):
            parts.append(choice["text"])
        delta = choice.get("delta") or choice.get("message")
        if isinstance(delta, dict) and isinstance(delta.get("content"), str):
            parts.append(delta["content"])
    return "".join(parts)


def _usage(event: dict[str, Any]) -> tuple[int, int, int] | None:
    usage = event.get("usage")
    if not isinstance(usage, dict):
        return None
    details = usage.get("prompt_tokens_details") or {}
    cached = details.get("cached_tokens", 0) if isinstance(details, dict) else 0
    return int(usage.get("prompt_tokens") or 0), int(cached or 0), int(usage.get("completion_tokens") or 0)


async def _one_request(client: httpx.AsyncClient, clock: _Clock, session: Session, turn: int,
                       answers: Sequence[str], settings: LoadSettings,
                       default_endpoint: str) -> tuple[Sample, str]:
    body = render_request(session, turn, answers, model=settings.model)
    path = "/v1/chat/completions" if session.api == "chat" else "/v1/completions"
    if settings.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    start = clock.now()
    first: float | None = None
    last_token: float | None = None
    gaps: list[float] = []
    text: list[str] = []
    usage: tuple[int, int, int] | None = None
    status = 0
    endpoint = default_endpoint
    route = ""
    error = ""
    with trio.move_on_after(settings.request_timeout_s) as scope:
        try:
            async with client.stream("POST", path, json=body) as resp:
                status = resp.status_code
                endpoint = _endpoint_of(resp.headers, default_endpoint)
                route = resp.headers.get(ROUTE_HEADER, "")
                if status >= 400:
                    raw = await resp.aread()
                    error = f"http {status}: {_error_message(raw)}"
                elif not settings.stream:
                    event = json.loads(await resp.aread())
                    first = clock.now()
                    text.append(_chunk_text(event))
                    usage = _usage(event)
                else:
                    # Read to the end of the body even after [DONE]: leaving httpx's stream
                    # iterators half-consumed leaks them to the garbage collector.
                    done = False
                    async for line in resp.aiter_lines():
                        if done or not line.startswith("data:"):
                            continue
                        data = line[5:].strip()
                        if data == "[DONE]":
                            done = True
                            continue
                        try:
                            event = json.loads(data)
                        except ValueError:
                            error, done = "stream error: undecodable event", True
                            continue
                        if not isinstance(event, dict) or "error" in event:
                            error, done = f"stream error: {_error_message(data.encode())}", True
                            continue
                        piece = _chunk_text(event)
                        if piece:
                            now = clock.now()
                            if first is None:
                                first = now
                            elif last_token is not None:
                                gaps.append(now - last_token)
                            last_token = now
                            text.append(piece)
                        usage = _usage(event) or usage
        except (httpx.HTTPError, json.JSONDecodeError, ValueError) as exc:
            error = f"{type(exc).__name__}"
    if scope.cancelled_caught:
        error = "timeout"
    end = clock.now()
    if not error and first is None:
        # A reply without any text (e.g. zero-length output): its first token is its end.
        first = end
    prompt, cached, completion = usage or (0, 0, 0)
    sample = Sample(session_id=session.session_id, turn=turn, start_s=start, end_s=end,
                    ok=not error, first_token_s=first if not error else None, itl_s=tuple(gaps),
                    prompt_tokens=prompt, cached_tokens=cached, completion_tokens=completion,
                    usage_seen=usage is not None, endpoint=endpoint, route=route, error=error,
                    status=status)
    return sample, "".join(text)


def _error_message(raw: bytes) -> str:
    try:
        decoded = json.loads(raw)
    except ValueError:
        return raw[:120].decode("utf-8", "replace")
    if isinstance(decoded, dict) and isinstance(decoded.get("error"), dict):
        return str(decoded["error"].get("message", ""))[:120]
    return str(decoded)[:120]


async def run_load(base_url: str, workload: Workload, settings: LoadSettings, *,
                   default_endpoint: str = "", progress: Progress | None = None,
                   on_sample: Callable[[Sample], None] | None = None) -> RunResult:
    """Run ``workload`` against ``base_url`` and return every request's sample."""
    samples: list[Sample] = []
    clock = _Clock()
    sessions = list(workload.sessions)
    max_conn = settings.concurrency if settings.mode == "closed" else settings.max_in_flight
    limits = httpx.Limits(max_connections=max_conn, max_keepalive_connections=max_conn)
    timeout = httpx.Timeout(settings.request_timeout_s, connect=10.0)
    stop_issuing = settings.duration_s
    started = 0

    async def run_session(client: httpx.AsyncClient, session: Session) -> None:
        nonlocal started
        started += 1
        answers: list[str] = []
        def record(sample: Sample) -> None:
            samples.append(sample)
            if on_sample is not None:
                on_sample(sample)
            if progress is not None:
                progress.step(sample.ok)

        for turn in range(len(session.turns)):
            start = clock.now()
            try:
                sample, answer = await _one_request(client, clock, session, turn, answers, settings,
                                                    default_endpoint)
            except trio.Cancelled:
                # The run's drain deadline cut it: it counts as an error, not as nothing.
                record(Sample(session_id=session.session_id, turn=turn, start_s=start, end_s=clock.now(),
                              ok=False, error="cut at the run's deadline"))
                raise
            record(sample)
            if not sample.ok:
                return  # a broken conversation cannot continue with a real history
            answers.append(answer)

    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=timeout) as client:
        with trio.move_on_after(settings.duration_s + settings.drain_s):
            if settings.mode == "closed":
                queue = iter(sessions)

                async def worker() -> None:
                    for session in queue:
                        if clock.now() >= stop_issuing:
                            return
                        await run_session(client, session)

                async with trio.open_nursery() as nursery:
                    for _ in range(min(settings.concurrency, len(sessions))):
                        nursery.start_soon(worker)
            else:
                mean_turns = workload.request_count / max(1, len(sessions))
                offsets = poisson_arrivals(len(sessions), settings.rate / mean_turns, settings.seed)
                slots = trio.Semaphore(settings.max_in_flight)

                async def guarded(session: Session) -> None:
                    try:
                        await run_session(client, session)
                    finally:
                        slots.release()

                async with trio.open_nursery() as nursery:
                    for session, offset in zip(sessions, offsets, strict=True):
                        if offset >= stop_issuing:
                            break
                        delay = offset - clock.now()
                        if delay > 0:
                            await trio.sleep(delay)
                        await slots.acquire()
                        nursery.start_soon(guarded, session)
    wall = clock.now()
    if progress is not None:
        progress.close()
    if samples:
        wall = max(s.end_s for s in samples) - min(s.start_s for s in samples)
    return RunResult(samples=tuple(samples), wall_s=max(wall, 1e-9) if samples else 0.0,
                     not_started=len(sessions) - started)
