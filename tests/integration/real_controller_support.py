"""Starting and stopping a real ``lmcache_controller`` for the integration tier."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import attrs
import httpx
import pytest

from pixiu_kv.sim.lmcache_worker import ControllerPorts

CONTROLLER_ENV = "PIXIU_KV_LMCACHE_CONTROLLER"
REQUIRE_ENV = "PIXIU_KV_REQUIRE_INTEGRATION"
HOST = "127.0.0.1"
START_DEADLINE_S = 120.0
STOP_DEADLINE_S = 15.0


@attrs.frozen
class RealController:
    url: str
    host: str
    ports: ControllerPorts
    executable: Path
    log_path: Path
    http_port: int

    @property
    def python(self) -> Path:
        """The interpreter of the controller's virtual environment (next to the executable)."""
        return self.executable.parent / "python"


def _free_ports(count: int) -> list[int]:
    """Distinct free loopback ports (bound together, so they cannot repeat)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((HOST, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _log_tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-3000:]
    except OSError:
        return "(no log)"


def _wait_ready(proc: subprocess.Popen[bytes], url: str, log_path: Path) -> None:
    """Poll the liveness route until it answers; fail on exit or after the deadline."""
    deadline = time.monotonic() + START_DEADLINE_S
    with httpx.Client(timeout=2.0) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"lmcache_controller exited with {proc.returncode}:\n{_log_tail(log_path)}")
            try:
                if client.get(f"{url}/controller/key-stats").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
    pytest.fail(f"lmcache_controller not ready within {START_DEADLINE_S}s:\n{_log_tail(log_path)}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=STOP_DEADLINE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=STOP_DEADLINE_S)


@contextmanager
def run_real_controller(
    log_dir: Path, same_ports_as: RealController | None = None
) -> Iterator[RealController]:
    """Start the controller named by ``PIXIU_KV_LMCACHE_CONTROLLER`` on free loopback ports
    (or on the ports of ``same_ports_as``, to restart it).

    Skips (or fails, when ``PIXIU_KV_REQUIRE_INTEGRATION=1``) if it is not configured.
    """
    executable = os.environ.get(CONTROLLER_ENV)
    if not executable:
        reason = f"{CONTROLLER_ENV} is unset (run scripts/provision-lmcache.sh and export its output)"
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"integration tier required but {reason}")
        pytest.skip(reason)
    if not os.access(executable, os.X_OK):
        pytest.fail(f"{CONTROLLER_ENV}={executable} is not an executable file")
    if same_ports_as is None:
        http_port, pull, reply, heartbeat = _free_ports(4)
    else:
        http_port = same_ports_as.http_port
        pull, reply = same_ports_as.ports.pull, same_ports_as.ports.reply
        heartbeat = same_ports_as.ports.heartbeat or _free_ports(1)[0]
    log_path = log_dir / "controller.log"
    command = [
        executable,
        "--host",
        HOST,
        "--port",
        str(http_port),
        "--monitor-ports",
        json.dumps({"pull": pull, "reply": reply, "heartbeat": heartbeat}),
    ]
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://{HOST}:{http_port}"
    try:
        _wait_ready(proc, url, log_path)
        ports = ControllerPorts(pull, reply, heartbeat)
        yield RealController(url, HOST, ports, Path(executable), log_path, http_port)
    finally:
        _stop(proc)
