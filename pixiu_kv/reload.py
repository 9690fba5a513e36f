"""Configuration hot reload: re-read the file, validate, build, swap atomically.

The gateway's routes, clusters and filter settings live in one immutable runtime object
that a request reads *once*, when it starts; a reload builds a complete new object and
replaces the reference in a single assignment. So a request in flight finishes on the
configuration it started with, and no request ever sees half of a new one.

A reload that fails anywhere (the file cannot be read, is not TOML, does not validate, or
the runtime cannot be built from it) is refused with its error and changes nothing.

Listener and admin addresses are bound sockets: a new value is reported as needing a
restart rather than silently ignored.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Generic, TypeVar

import attrs
import trio

from .config import ConfigError, GatewayConfig, config_to_dict, load_config
from .logs import log_event

__all__ = ["ConfigReloader", "ReloadResult", "changed_sections", "restart_required"]

S = TypeVar("S")

_log = logging.getLogger("pixiu_kv.reload")

_READ_TIMEOUT = 10.0
"""A config file on a hung network filesystem must not hang the admin API forever."""

_RESTART_ONLY: dict[str, Callable[[GatewayConfig], object]] = {
    "listener.host": lambda c: c.listener.host,
    "listener.port": lambda c: c.listener.port,
    "admin.enabled": lambda c: c.admin.enabled,
    "admin.host": lambda c: c.admin.host,
    "admin.port": lambda c: c.admin.port,
}


@attrs.frozen
class ReloadResult:
    """What a reload did. ``ok`` False means nothing changed and ``error`` says why."""

    ok: bool
    generation: int
    error: str | None = None
    # Top-level sections whose values changed (``routes``, ``clusters``, ``http_filters``, ...).
    changed: tuple[str, ...] = ()
    # Fields that changed but only take effect after a restart (bound sockets).
    restart_required: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, object]:
        return {"ok": self.ok, "generation": self.generation, "error": self.error,
                "changed": list(self.changed), "restart_required": list(self.restart_required)}


def changed_sections(old: GatewayConfig, new: GatewayConfig) -> tuple[str, ...]:
    """Names of the top-level sections that differ (secrets compared, never shown)."""
    a = config_to_dict(old, redact=False)
    b = config_to_dict(new, redact=False)
    return tuple(sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k)))


def restart_required(old: GatewayConfig, new: GatewayConfig) -> tuple[str, ...]:
    return tuple(name for name, get in _RESTART_ONLY.items() if get(old) != get(new))


class ConfigReloader(Generic[S]):
    """Owns the current runtime state ``S`` and replaces it on :meth:`reload`.

    ``build(config, previous)`` makes a new runtime state from a validated configuration
    (it may be a coroutine function, e.g. to open connection pools for new endpoints);
    it receives the previous state so it can carry over what must survive a reload (endpoint
    health, drain marks, connection pools of unchanged endpoints). It must not mutate the
    previous state: on failure, the previous state stays in service untouched. It may raise
    :class:`ConfigError` (or ``ValueError``) to refuse a configuration.

    ``on_swap(old, new)`` runs after a successful swap, e.g. to close the connection pools
    of removed endpoints once their last request is done.
    """

    def __init__(self, path: str | Path | None, config: GatewayConfig, state: S,
                 build: Callable[[GatewayConfig, S], S | Awaitable[S]],
                 on_swap: Callable[[S, S], None] | None = None,
                 *, load: Callable[[Path], GatewayConfig] = load_config) -> None:
        self._path = Path(path) if path is not None else None
        self._config = config
        self._state = state
        self._build = build
        self._on_swap = on_swap
        self._load = load
        self._generation = 1
        self._lock = trio.Lock()
        self.last_result: ReloadResult | None = None

    @property
    def state(self) -> S:
        """The current runtime state: read it once per request and keep the reference."""
        return self._state

    @property
    def config(self) -> GatewayConfig:
        return self._config

    @property
    def generation(self) -> int:
        return self._generation

    @property
    def path(self) -> Path | None:
        return self._path

    async def reload(self) -> ReloadResult:
        """Re-read the configuration file; swap on success, keep everything on failure.

        Concurrent reloads (SIGHUP and the admin API at once) run one after the other.
        """
        async with self._lock:
            result = await self._reload_locked()
        self.last_result = result
        if result.ok:
            log_event(_log, logging.INFO, "config_reloaded", generation=result.generation,
                      changed=list(result.changed), restart_required=list(result.restart_required))
        else:
            log_event(_log, logging.WARNING, "config_reload_refused", generation=result.generation,
                      error=result.error)
        return result

    async def _reload_locked(self) -> ReloadResult:
        if self._path is None:
            return ReloadResult(False, self._generation,
                                "the gateway was started without a configuration file; nothing to reload")
        path = self._path
        try:
            with trio.fail_after(_READ_TIMEOUT):
                new_config = await trio.to_thread.run_sync(self._load, path, abandon_on_cancel=True)
        except ConfigError as exc:
            return ReloadResult(False, self._generation, str(exc))
        except trio.TooSlowError:
            return ReloadResult(False, self._generation,
                                f"{path}: (file) could not be read within {_READ_TIMEOUT:g}s")
        return await self.apply(new_config)

    async def apply(self, new_config: GatewayConfig) -> ReloadResult:
        """Build the new state, then swap to it in one step (the swap itself never awaits, so
        no request observes a half-applied configuration). Reloads are serialised by
        :meth:`reload`; call this directly only for a configuration validated elsewhere."""
        old_config, old_state = self._config, self._state
        try:
            built = self._build(new_config, old_state)
            new_state: S = await built if inspect.isawaitable(built) else built
        except (ConfigError, ValueError) as exc:
            return ReloadResult(False, self._generation, str(exc))
        self._config, self._state = new_config, new_state
        self._generation += 1
        if self._on_swap is not None:
            self._on_swap(old_state, new_state)
        return ReloadResult(True, self._generation, None, changed_sections(old_config, new_config),
                            restart_required(old_config, new_config))
