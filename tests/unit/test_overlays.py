"""Which leftover overlays virt/overlays.delete_leftover_overlays deletes, on a made-up libvirt
connection: a domain of the appliance's name running again keeps only the overlays it has as disks."""

from __future__ import annotations

import libvirt
import pytest

from virtmount.virt import overlays

DIRECTORY = "/var/lib/libvirt/images/guests"
NAME = "virtmount-appliance-saved-0123456789abcdef"
OLD = f"{DIRECTORY}/old.qcow2.TRANSIENT-{NAME}"  # left by an appliance that is gone
REUSED = f"{DIRECTORY}/reused.qcow2.TRANSIENT-{NAME}"  # the disk of the domain of that name running now


class FakeVolume:
    def __init__(self, pool: FakePool, name: str) -> None:
        self.pool, self.name = pool, name

    def delete(self, flags: int) -> None:
        self.pool.files.remove(self.name)


class FakePool:
    def __init__(self, files: set[str]) -> None:
        self.files = files

    def XMLDesc(self, flags: int) -> str:
        return f"<pool type='dir'><target><path>{DIRECTORY}/</path></target></pool>"

    def refresh(self, flags: int) -> None:
        pass

    def storageVolLookupByName(self, name: str) -> FakeVolume:
        if name not in self.files:
            error = libvirt.libvirtError("no volume")
            error.err = (libvirt.VIR_ERR_NO_STORAGE_VOL, 0, "no volume", 0, "", "", "", 0, 0)
            raise error
        return FakeVolume(self, name)


class FakeDomain:
    def __init__(self, disks: list[str]) -> None:
        self.disks = disks

    def XMLDesc(self, flags: int) -> str:
        sources = "".join(f"<disk type='file'><source file='{disk}'/><transient/></disk>" for disk in self.disks)
        return f"<domain><name>{NAME}</name><devices>{sources}</devices></domain>"


class FakeConnection:
    def __init__(self, files: set[str], running: FakeDomain | None) -> None:
        self.pool = FakePool(files)
        self.running = running

    def lookupByName(self, name: str) -> FakeDomain:
        if self.running is None or name != NAME:
            error = libvirt.libvirtError("no domain")
            error.err = (libvirt.VIR_ERR_NO_DOMAIN, 0, "no domain", 0, "", "", "", 0, 0)
            raise error
        return self.running

    def listAllStoragePools(self, flags: int) -> list[FakePool]:
        return [self.pool]


def _files() -> set[str]:
    return {OLD.rsplit("/", 1)[1], REUSED.rsplit("/", 1)[1], "old.qcow2", "reused.qcow2"}


def test_with_no_domain_of_that_name_every_leftover_goes() -> None:
    conn = FakeConnection(_files(), running=None)
    assert overlays.delete_leftover_overlays(conn, NAME, [OLD, REUSED]) == [OLD, REUSED]  # type: ignore[arg-type]
    assert conn.pool.files == {"old.qcow2", "reused.qcow2"}


def test_a_domain_of_that_name_running_again_keeps_only_its_own_disks() -> None:
    conn = FakeConnection(_files(), running=FakeDomain([f"{DIRECTORY}/root.qcow2", REUSED]))
    assert overlays.delete_leftover_overlays(conn, NAME, [OLD, REUSED]) == [OLD]  # type: ignore[arg-type]
    assert conn.pool.files == {REUSED.rsplit("/", 1)[1], "old.qcow2", "reused.qcow2"}


def test_an_overlay_already_gone_is_not_reported() -> None:
    conn = FakeConnection({"old.qcow2"}, running=None)
    assert overlays.delete_leftover_overlays(conn, NAME, [OLD]) == []  # type: ignore[arg-type]


def test_other_libvirt_errors_are_raised() -> None:
    class Broken(FakeConnection):
        def lookupByName(self, name: str) -> FakeDomain:
            error = libvirt.libvirtError("connection lost")
            error.err = (libvirt.VIR_ERR_SYSTEM_ERROR, 0, "connection lost", 0, "", "", "", 0, 0)
            raise error

    with pytest.raises(libvirt.libvirtError):
        overlays.delete_leftover_overlays(Broken(_files(), None), NAME, [OLD])  # type: ignore[arg-type]
