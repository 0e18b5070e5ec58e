"""Which appliances a domain's start, stop or (re)definition ends (virtmount.mount.end_appliances_after),
over fake sources."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

import trio
import trio.testing

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
