"""Which appliances a domain's start, stop or (re)definition ends (virtmount.mount.end_appliances_after),
over fake sources; registration for domain events never blocks the trio thread."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, cast

import libvirt
import pytest
import trio
import trio.testing

from virtmount import domainevents
from virtmount.domainevents import Change
from virtmount.fs.nodes import ServedSource
from virtmount.mount import end_appliances_after


@dataclass
class FakeAppliance:
    snapshot_taken_at: float | None = None
    reads_disks_as_they_are: bool = False
    running: bool = True
    booting: bool = False
    released: list[str] = field(default_factory=list)

    async def release(self, why: str = "released") -> None:
        self.released.append(why)


@dataclass
class FakeSource:
    identity: str
    appliance: FakeAppliance
    name: str = "web1"


async def after(change: Change, sources: list[FakeSource], uuid: str = "u1") -> None:
    async with trio.open_nursery() as nursery:
        end_appliances_after(change, uuid, cast(list[ServedSource], sources), nursery)


def disks() -> FakeAppliance:
    return FakeAppliance(reads_disks_as_they_are=True)


def snapshot() -> FakeAppliance:
    return FakeAppliance(snapshot_taken_at=1.0)


async def test_a_stop_ends_only_that_domains_point_in_time_view() -> None:
    view, other, own = snapshot(), snapshot(), disks()
    await after(Change.STOPPED, [FakeSource("u1", view), FakeSource("u2", other), FakeSource("u1", own)])
    assert view.released == ["the domain stopped"] and other.released == [] and own.released == []


async def test_a_start_ends_only_the_view_of_the_disks_as_they_are() -> None:
    own, view, guests_daemon = disks(), snapshot(), FakeAppliance()
    await after(Change.STARTED, [FakeSource("u1", own), FakeSource("u1", view), FakeSource("u1", guests_daemon)])
    assert own.released == ["the domain started"] and view.released == [] and guests_daemon.released == []


async def test_a_redefinition_ends_any_appliance_of_the_domain_even_one_booting() -> None:
    own, booting, off = disks(), FakeAppliance(running=False, booting=True), FakeAppliance(running=False)
    await after(Change.REDEFINED, [FakeSource("u1", own), FakeSource("u1", booting), FakeSource("u1", off)])
    assert own.released == booting.released == ["the domain was defined anew"] and off.released == []


class StuckConnection(libvirt.virConnect):
    """A connection whose deregistration never returns (as one did on the trio thread after a libvirtd
    restart, hanging the whole mount); registration answers at once."""

    def __init__(self) -> None:  # no libvirt connection behind it
        self._o = None
        self.deregister_called = threading.Event()
        self.release = threading.Event()

    def domainEventRegisterAny(self, dom: Any, eventID: int, cb: Any, opaque: Any) -> int:
        return 7

    def domainEventDeregisterAny(self, callbackID: int) -> int:
        self.deregister_called.set()
        self.release.wait(30)
        return 0


async def test_a_lost_connection_is_not_deregistered_from() -> None:
    conn = StuckConnection()
    with trio.fail_after(2):
        async with domainevents.domain_changes(conn, lambda: True):
            pass
    assert not conn.deregister_called.is_set()


async def test_deregistering_from_an_open_connection_is_bounded_and_off_the_trio_thread(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(domainevents, "DEREGISTER_TIMEOUT_S", 0.3)
    conn = StuckConnection()
    ticks = 0

    async def tick() -> None:  # runs only while the trio thread is free
        nonlocal ticks
        while True:
            ticks += 1
            await trio.sleep(0.01)

    try:
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(tick)
                async with domainevents.domain_changes(conn, lambda: False):
                    pass
                nursery.cancel_scope.cancel()
    finally:
        conn.release.set()
    assert conn.deregister_called.is_set()
    assert ticks > 5
