"""Configuration reload: re-read, validate, build, swap; refuse and keep the old on any error."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import attrs
import pytest
import trio

from pixiu_kv.config import GatewayConfig, load_config
from pixiu_kv.reload import ConfigReloader, changed_sections, restart_required
from pixiu_kv.signals import handle_signals

BASE = """
[listener]
port = {port}

[[clusters]]
name = "fleet"
{endpoints}
"""


def endpoint(eid: str, port: int) -> str:
    return f'[[clusters.endpoints]]\nid = "{eid}"\naddress = "http://127.0.0.1:{port}"\n'


def write(path: Path, *endpoints: str, port: int = 8888) -> None:
    path.write_text(BASE.format(port=port, endpoints="\n".join(endpoints)), encoding="utf-8")


@attrs.frozen
class State:
    """A stand-in runtime: which endpoints serve, and which state survived from before."""

    endpoint_ids: tuple[str, ...]
    carried_from: tuple[str, ...] = ()


def build(config: GatewayConfig, previous: State) -> State:
    ids = tuple(e.id for c in config.clusters for e in c.endpoints)
    if "forbidden" in ids:
        raise ValueError("endpoint 'forbidden' cannot be built")
    return State(ids, previous.endpoint_ids)


def reloader_for(path: Path) -> ConfigReloader[State]:
    config = load_config(path)
    return ConfigReloader(path, config, build(config, State(())), build)


async def test_reload_swaps_to_the_new_file(tmp_path: Path) -> None:
    path = tmp_path / "gw.toml"
    write(path, endpoint("a", 9001))
    reloader = reloader_for(path)
    before = reloader.state
    write(path, endpoint("a", 9001), endpoint("b", 9002))
    result = await reloader.reload()
    assert result.ok, result.error
    assert result.generation == 2
    assert result.changed == ("clusters",)
    assert result.restart_required == ()
    assert reloader.state == State(("a", "b"), ("a",))
    # A request that read the state before the reload still holds the old one, unchanged.
    assert before == State(("a",), ())
    assert [e.id for e in reloader.config.clusters[0].endpoints] == ["a", "b"]


@pytest.mark.parametrize("text, expected", [
    ("[[clusters]]\nname = 'x'\n", "clusters[0].endpoints"),
    ("this is = = not toml", "is not valid TOML"),
    ("[[clusters]]\nname = 'x'\n[[clusters.endpoints]]\nid = 'a'\naddress = 'ftp://h'\n", "ftp://h"),
    (BASE.format(port=1, endpoints=endpoint("a", 1)).replace("port = 1", "port = 1\nbogus = 1"), "bogus"),
])
async def test_an_invalid_file_is_refused_and_the_old_state_stays(tmp_path: Path, text: str,
                                                                  expected: str) -> None:
    path = tmp_path / "gw.toml"
    write(path, endpoint("a", 9001))
    reloader = reloader_for(path)
    state, config = reloader.state, reloader.config
    path.write_text(text, encoding="utf-8")
    result = await reloader.reload()
    assert not result.ok
    assert result.error is not None and expected in result.error
    assert result.generation == 1
    assert reloader.state is state
    assert reloader.config is config


async def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "gw.toml"
    write(path, endpoint("a", 9001))
    reloader = reloader_for(path)
    path.unlink()
    result = await reloader.reload()
    assert not result.ok
    assert result.error is not None and "cannot be read" in result.error


async def test_a_build_failure_is_refused_and_the_old_state_stays(tmp_path: Path) -> None:
    path = tmp_path / "gw.toml"
    write(path, endpoint("a", 9001))
    reloader = reloader_for(path)
    state = reloader.state
    write(path, endpoint("forbidden", 9001))
    result = await reloader.reload()
    assert not result.ok
    assert result.error == "endpoint 'forbidden' cannot be built"
    assert reloader.state is state
    # The next valid file is accepted again.
    write(path, endpoint("c", 9003))
    assert (await reloader.reload()).generation == 2


async def test_listener_changes_are_reported_as_needing_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "gw.toml"
    write(path, endpoint("a", 9001), port=8888)
    reloader = reloader_for(path)
    old = reloader.config
    write(path, endpoint("a", 9001), port=9999)
    result = await reloader.reload()
    assert result.ok
    assert result.restart_required == ("listener.port",)
    assert changed_sections(old, reloader.config) == ("listener",)
    assert restart_required(old, old) == ()


async def test_without_a_file_there_is_nothing_to_reload(tmp_path: Path) -> None:
    path = tmp_path / "gw.toml"
    write(path, endpoint("a", 9001))
    config = load_config(path)
    reloader = ConfigReloader(None, config, build(config, State(())), build)
    result = await reloader.reload()
    assert not result.ok
    assert result.error is not None and "without a configuration file" in result.error


async def test_on_swap_sees_old_and_new_state(tmp_path: Path) -> None:
    path = tmp_path / "gw.toml"
    write(path, endpoint("a", 9001))
    config = load_config(path)
    swaps: list[tuple[State, State]] = []
    reloader = ConfigReloader(path, config, build(config, State(())), build,
                              on_swap=lambda old, new: swaps.append((old, new)))
    write(path, endpoint("b", 9002))
    await reloader.reload()
    assert swaps == [(State(("a",), ()), State(("b",), ("a",)))]


async def test_sighup_reloads_and_sigterm_stops(tmp_path: Path) -> None:
    path = tmp_path / "gw.toml"
    write(path, endpoint("a", 9001))
    reloader = reloader_for(path)
    write(path, endpoint("b", 9002))
    stop = trio.Event()
    reloaded = trio.Event()

    async def reload() -> None:
        await reloader.reload()
        reloaded.set()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: handle_signals(stop=stop, reload=reload,
                                                                   task_status=task_status))
            os.kill(os.getpid(), signal.SIGHUP)
            await reloaded.wait()
            assert reloader.state.endpoint_ids == ("b",)
            assert not stop.is_set()
            os.kill(os.getpid(), signal.SIGTERM)
            await stop.wait()
    # handle_signals returned once stop was set: the nursery closed by itself.
    assert reloader.generation == 2


async def test_an_async_build_is_awaited_before_the_swap(tmp_path: Path) -> None:
    path = tmp_path / "gw.toml"
    write(path, endpoint("a", 9001))
    config = load_config(path)
    opened: list[tuple[str, ...]] = []

    async def build_async(new: GatewayConfig, previous: State) -> State:
        await trio.lowlevel.checkpoint()  # e.g. opening connection pools
        state = build(new, previous)
        opened.append(state.endpoint_ids)
        return state

    reloader = ConfigReloader(path, config, build(config, State(())), build_async)
    write(path, endpoint("b", 9002))
    result = await reloader.reload()
    assert result.ok
    assert opened == [("b",)]
    assert reloader.state.endpoint_ids == ("b",)
    write(path, endpoint("forbidden", 9003))
    assert not (await reloader.reload()).ok
    assert reloader.state.endpoint_ids == ("b",)
