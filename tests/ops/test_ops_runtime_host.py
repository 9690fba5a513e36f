"""Runtime generations: a reload swaps atomically; requests finish on the runtime they began with."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import attrs
import pytest
import trio
import trio.testing

from pixiu_kv.config import GatewayConfig, loads_config
from pixiu_kv.reload import ConfigReloader
from pixiu_kv.runtime_host import RuntimeHost

TOML = '[[clusters]]\nname = "fleet"\n[[clusters.endpoints]]\nid = "{eid}"\naddress = "http://127.0.0.1:1"\n'


def config(eid: str) -> GatewayConfig:
    return loads_config(TOML.format(eid=eid))


@attrs.define
class FakeRuntime:
    name: str
    closed: bool = False


@attrs.define
class Opener:
    opened: list[FakeRuntime] = attrs.field(factory=list)
    fail_for: str | None = None

    @asynccontextmanager
    async def __call__(self, cfg: GatewayConfig) -> AsyncIterator[FakeRuntime]:
        name = cfg.clusters[0].endpoints[0].id
        await trio.lowlevel.checkpoint()
        if name == self.fail_for:
            raise ValueError(f"cannot open pools for {name}")
        runtime = FakeRuntime(name)
        self.opened.append(runtime)
        try:
            yield runtime
        finally:
            runtime.closed = True


async def test_requests_finish_on_their_runtime_and_the_old_one_closes_after(nursery: trio.Nursery) -> None:
    opener = Opener()
    host: RuntimeHost[FakeRuntime] = RuntimeHost(opener, retire_timeout=60)
    first = await nursery.start(partial(host.run, config("a")))
    assert host.current is first
    with host.use() as in_flight:
        new = await host.replace(config("b"))
        assert host.current is new and new.name == "b"
        await trio.testing.wait_all_tasks_blocked()
        assert in_flight is first and not first.closed  # still serving its request
        with host.use() as later:
            assert later is new
    await trio.testing.wait_all_tasks_blocked()
    assert first.closed and not new.closed
    assert host.generations_open == 1


async def test_a_generation_that_fails_to_open_changes_nothing(nursery: trio.Nursery) -> None:
    opener = Opener(fail_for="bad")
    host: RuntimeHost[FakeRuntime] = RuntimeHost(opener, retire_timeout=60)
    first = await nursery.start(partial(host.run, config("a")))
    with pytest.raises(ValueError, match="cannot open pools"):
        await host.replace(config("bad"))
    assert host.current is first and not first.closed


async def test_an_old_generation_is_closed_at_the_retire_timeout(
        nursery: trio.Nursery, autojump_clock: trio.testing.MockClock) -> None:
    host: RuntimeHost[FakeRuntime] = RuntimeHost(Opener(), retire_timeout=5)
    first = await nursery.start(partial(host.run, config("a")))
    with host.use():
        await host.replace(config("b"))
        await trio.sleep(4)
        assert not first.closed
        await trio.sleep(2)
        assert first.closed


async def test_reload_through_the_host(tmp_path: Path, nursery: trio.Nursery) -> None:
    path = tmp_path / "gw.toml"
    path.write_text(TOML.format(eid="a"), encoding="utf-8")
    host: RuntimeHost[FakeRuntime] = RuntimeHost(Opener(fail_for="bad"), retire_timeout=60)
    first = await nursery.start(partial(host.run, config("a")))

    async def build(cfg: GatewayConfig, _: FakeRuntime) -> FakeRuntime:
        return await host.replace(cfg)

    reloader = ConfigReloader(path, config("a"), first, build)
    path.write_text(TOML.format(eid="bad"), encoding="utf-8")
    refused = await reloader.reload()
    assert not refused.ok and refused.error == "cannot open pools for bad"
    assert host.current is first
    path.write_text(TOML.format(eid="b"), encoding="utf-8")
    accepted = await reloader.reload()
    assert accepted.ok and accepted.generation == 2
    assert host.current is reloader.state and reloader.state.name == "b"
    await trio.testing.wait_all_tasks_blocked()
    assert first.closed


async def test_cancelling_the_host_closes_every_generation() -> None:
    opener = Opener()
    host: RuntimeHost[FakeRuntime] = RuntimeHost(opener, retire_timeout=60)
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(host.run, config("a")))
        with host.use():
            await host.replace(config("b"))
        nursery.cancel_scope.cancel()
    assert [r.closed for r in opener.opened] == [True, True]
    assert host.current is None
