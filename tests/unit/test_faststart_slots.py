"""Appliances running at once each restore a saved appliance of their own, one of faststart.SLOTS
(virtmount.appliance._fast_boot): libvirt restores a saved domain only under the name it was saved with."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

import libvirt
import pytest
import trio

from tests.unit.test_failures import FakeLibvirtError
from tests.unit.test_faststart import HOST, saved_domain_xml
from virtmount import appliance
from virtmount.appliance import ApplianceSettings
from virtmount.faststart import SLOTS, FastStartUnavailable, SavedAppliance
from virtmount.virt import overlays
from virtmount.virt.domainxml import GuestDefinition


def slot(index: int) -> SavedAppliance:
    return SavedAppliance.for_boot(HOST, "qemu", 1024, 1, "", False, "", index)


@dataclass
class FakeConnection:
    """Saved states in the pool and domains running, by name; what was restored."""

    states: set[str] = field(default_factory=set)  # saved appliance names
    running: set[str] = field(default_factory=set)
    restored: list[str] = field(default_factory=list)

    def saveImageGetXMLDesc(self, path: str, flags: int) -> str:
        for index in range(SLOTS):
            if path == slot(index).state_path(HOST) and slot(index).name in self.states:
                return saved_domain_xml(slot(index))
        raise FakeLibvirtError(libvirt.VIR_ERR_OPERATION_FAILED, f"cannot read {path}")

    def lookupByName(self, name: str) -> str:
        if name not in self.running:
            raise FakeLibvirtError(libvirt.VIR_ERR_NO_DOMAIN, f"no domain {name}")
        return name

    def restoreFlags(self, path: str, xml: str, flags: int) -> None:
        [name] = [slot(i).name for i in range(SLOTS) if slot(i).state_path(HOST) == path]
        if name in self.running:
            raise FakeLibvirtError(libvirt.VIR_ERR_OPERATION_FAILED, f"domain {name} is already active")
        self.running.add(name)
        self.restored.append(name)


class FakeAppliance:
    naming = watchdog = accelerator = None


class FakeWatchdog:
    def watch(self, name: str) -> None:
        pass

    def unwatch(self, name: str) -> None:
        pass


class FakePlan:
    domain_types = ["qemu"]

    def worked(self, domain_type: str) -> None:
        pass


@pytest.fixture
def conn(monkeypatch: pytest.MonkeyPatch) -> FakeConnection:
    fake = FakeConnection()

    async def nothing(*args: Any, **kwargs: Any) -> None:
        pass

    async def attached(*args: Any, **kwargs: Any) -> FakeAppliance:
        return FakeAppliance()

    async def save(conn: FakeConnection, saved: SavedAppliance, *args: Any) -> None:
        conn.states.add(saved.name)

    monkeypatch.setattr(appliance, "_replace_overlay", nothing)
    monkeypatch.setattr(appliance, "_plug_in_guest_disks", nothing)
    monkeypatch.setattr(appliance, "_attach_and_resume", attached)
    monkeypatch.setattr(appliance, "_save_appliance", save)
    return fake


async def fast_boot(conn: FakeConnection) -> FastStartUnavailable | None:
    """None if it restored one, else why not."""
    async with trio.open_nursery() as nursery:
        try:
            await appliance._fast_boot(cast(Any, conn), GuestDefinition("guest", ()), HOST, ApplianceSettings(),
                                       cast(Any, FakePlan()), nursery, cast(Any, FakeWatchdog()))
        except FastStartUnavailable as exc:
            return exc
    return None


async def test_an_appliance_restores_the_first_saved_appliance_not_in_use(conn: FakeConnection) -> None:
    conn.states = {slot(0).name, slot(1).name}
    conn.running = {slot(0).name}  # another mount's appliance
    assert await fast_boot(conn) is None
    assert conn.restored == [slot(1).name]


async def test_the_next_saved_appliance_is_made_when_the_others_are_in_use(conn: FakeConnection) -> None:
    conn.states = {slot(0).name}
    conn.running = {slot(0).name}
    assert await fast_boot(conn) is None
    assert conn.restored == [slot(1).name] and slot(1).name in conn.states
    assert await fast_boot(conn) is None  # both running now
    assert conn.restored == [slot(1).name, slot(2).name]


async def test_one_being_made_elsewhere_is_passed_over(conn: FakeConnection) -> None:
    conn.running = {slot(0).name}  # being saved by another process: no state yet
    assert await fast_boot(conn) is None
    assert conn.restored == [slot(1).name]


async def test_with_every_saved_appliance_in_use_the_boot_is_cold(conn: FakeConnection) -> None:
    conn.states = conn.running = {slot(index).name for index in range(SLOTS)}
    assert "all in use" in str(await fast_boot(conn))
    assert conn.restored == []


def test_slot_0_keeps_the_name_saved_appliances_had() -> None:
    assert slot(0) == SavedAppliance.for_boot(HOST, "qemu", 1024, 1, "", False)
    assert len({slot(index).name for index in range(SLOTS)}) == SLOTS


class HalfPluggedAppliance(FakeAppliance):
    """A restored appliance whose hot-plug fails after libvirt made its first disk's overlay."""

    domain_name = slot(0).name

    def __init__(self, conn: FakeConnection) -> None:
        self.conn = conn
        self.overlays: list[str] = []

    async def shutdown(self) -> None:
        self.conn.running.discard(self.domain_name)


@pytest.mark.parametrize("failure", ["libvirt refused", "boot cancelled"])
async def test_overlays_of_an_interrupted_hot_plug_are_deleted_once_the_appliance_is_gone(
        conn: FakeConnection, monkeypatch: pytest.MonkeyPatch, failure: str) -> None:
    conn.states = {slot(0).name}
    half_plugged = HalfPluggedAppliance(conn)
    overlay = f"/images/guest.qcow2.TRANSIENT-{slot(0).name}"
    deleted: list[tuple[str, list[str], bool]] = []

    async def restored(*args: Any, **kwargs: Any) -> HalfPluggedAppliance:
        return half_plugged

    async def plug(appliance_: HalfPluggedAppliance, *args: Any) -> None:
        appliance_.overlays = [overlay]
        if failure == "libvirt refused":
            raise FakeLibvirtError(libvirt.VIR_ERR_OPERATION_FAILED, "monitor closed")
        await trio.sleep_forever()

    def delete(conn_: FakeConnection, name: str, paths: list[str]) -> list[str]:
        deleted.append((name, paths, name in conn_.running))
        return paths

    monkeypatch.setattr(appliance, "_attach_and_resume", restored)
    monkeypatch.setattr(appliance, "_plug_in_guest_disks", plug)
    monkeypatch.setattr(overlays, "delete_leftover_overlays", delete)
    if failure == "libvirt refused":
        assert "cannot plug the guest's disks in: monitor closed" in str(await fast_boot(conn))
    else:
        with trio.move_on_after(0.1):
            await fast_boot(conn)
    assert deleted == [(slot(0).name, [overlay], False)]  # asked for after the appliance was gone
