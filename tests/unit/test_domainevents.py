"""Which views a domain's start or stop ends (virtmount.mount.end_views_on), over fake sources."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import cast

import trio

from virtmount.domainevents import StateChange
from virtmount.fs.nodes import ServedSource
from virtmount.mount import end_views_on


@dataclass
class FakeAppliance:
    snapshot_taken_at: float | None = None
    reads_disks_as_they_are: bool = False
    released: list[str] = field(default_factory=list)

    async def release(self, why: str = "released") -> None:
        self.released.append(why)


@dataclass
class FakeSource:
    identity: str
    appliance: FakeAppliance
    name: str = "web1"


async def deliver(changes: list[StateChange], sources: list[FakeSource]) -> None:
    send, receive = trio.open_memory_channel[StateChange](math.inf)
    for change in changes:
        send.send_nowait(change)
    send.close()
    async with trio.open_nursery() as nursery:
        await end_views_on(receive, lambda: cast(list[ServedSource], sources), nursery)


async def test_a_stop_ends_only_that_domains_point_in_time_view() -> None:
    snapshot, other, disks = FakeAppliance(snapshot_taken_at=1.0), FakeAppliance(snapshot_taken_at=1.0), \
        FakeAppliance(reads_disks_as_they_are=True)
    await deliver([StateChange("u1", started=False)],
                  [FakeSource("u1", snapshot), FakeSource("u2", other), FakeSource("u1", disks)])
    assert snapshot.released == ["the domain stopped"] and other.released == [] and disks.released == []


async def test_a_start_ends_the_view_of_the_disks_as_they_are_only() -> None:
    disks, snapshot, idle = FakeAppliance(reads_disks_as_they_are=True), FakeAppliance(snapshot_taken_at=1.0), \
        FakeAppliance()
    await deliver([StateChange("u1", started=True)],
                  [FakeSource("u1", disks), FakeSource("u1", snapshot), FakeSource("u1", idle)])
    assert disks.released == ["the domain started"] and snapshot.released == [] and idle.released == []

