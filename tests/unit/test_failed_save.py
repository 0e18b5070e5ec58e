"""A saved appliance that cannot be saved (e.g. no room in the pool) leaves nothing and is not tried again
for a while: each try costs a whole boot (virtmount.appliance._save_appliance)."""

from __future__ import annotations

import errno
from typing import Any, cast

import libvirt
import pytest
import trio

from tests.unit.test_failures import FakeLibvirtError
from virtmount import appliance
from virtmount.appliance import ApplianceSettings
from virtmount.faststart import FastStartUnavailable, SavedAppliance
from virtmount.virt.provision import HostAppliance


class FakeDomain:
    def save(self, path: str) -> None:
        raise FakeLibvirtError(libvirt.VIR_ERR_OPERATION_FAILED, f"Unable to write {path}: No space left on device",
                               errno.ENOSPC)


class FakeClient:
    async def debug_sh(self, command: bytes) -> bytes:  # the warm-up before the save
        return b""

    async def aclose(self) -> None:
        pass


class FakeAppliance:
    domain = FakeDomain()
    client = FakeClient()


async def test_a_save_that_failed_is_not_tried_again_and_leaves_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    boots: list[str] = []
    deleted: list[str] = []

    async def boot_once(*args: Any, **kwargs: Any) -> FakeAppliance:
        boots.append("boot")
        return FakeAppliance()

    async def nothing(*args: Any, **kwargs: Any) -> None:
        pass

    async def delete_volumes(conn: Any, pool: str, names: list[str]) -> None:
        deleted.extend(names)

    monkeypatch.setattr(appliance, "_boot_once", boot_once)
    monkeypatch.setattr(appliance, "_replace_overlay", nothing)
    monkeypatch.setattr(appliance, "_destroy_quietly", nothing)
    monkeypatch.setattr(appliance, "_delete_volumes", delete_volumes)
    monkeypatch.setattr(appliance, "_failed_saves", {})
    host = HostAppliance("/pool/kernel", "/pool/initrd", "/pool/root.qcow2", "uuid")
    saved = SavedAppliance.for_boot(host, "qemu", 1024, 1, "", False)
    plan = cast(Any, type("Plan", (), {"first_output_window": lambda self, domain_type: None})())
    settings = ApplianceSettings(pool="small")

    async with trio.open_nursery() as nursery:
        with pytest.raises(FastStartUnavailable, match="No space left on device"):
            await appliance._save_appliance(cast(Any, None), saved, host, settings, "qemu", plan, nursery)
        assert boots == ["boot"]
        assert f"{saved.name}.state" in deleted and saved.root_volume in deleted
        with pytest.raises(FastStartUnavailable, match="failed 0 s ago"):
            await appliance._save_appliance(cast(Any, None), saved, host, settings, "qemu", plan, nursery)
        assert boots == ["boot"]  # no second boot
