"""Laying out a guest in a booted appliance (virtmount.guests) over a fake daemon client."""

from __future__ import annotations

from typing import Any, cast

from virtmount.guestfs.client import GuestfsClient
from virtmount.guestfs.errors import GuestfsError
from virtmount.guestfs.procs import Statns
from virtmount.guests import lay_out_os, mount_devices

FILESYSTEMS = {"/dev/sda1": "ext4", "/dev/vg0/root": "ext4", "/dev/vg0/data": "xfs", "/dev/sda2": "swap"}
DEV_OF = {"/dev/sda1": 2049, "/dev/vg0/root": 64768, "/dev/vg0/data": 64769}


def statns(dev: int) -> Statns:
    return Statns(dev, 2, 0o40755, 2, *([0] * 18))


class FakeDaemon:
    """Records the layout calls; devices listed in ``dirty`` refuse a plain read-only mount."""

    def __init__(self, *, roots: list[str], dirty: frozenset[str] = frozenset()) -> None:
        self.roots = roots
        self.dirty = dirty
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.mounted: dict[bytes, str] = {}

    async def inspect_os(self) -> list[str]:
        self.calls.append(("inspect_os", ()))
        return self.roots

    async def inspect_get_mountpoints(self, root: str) -> dict[str, str]:
        return {"/srv/data": "/dev/vg0/data", "/": "/dev/vg0/root", "/boot": "/dev/sda1"}

    async def list_filesystems(self) -> dict[str, str]:
        self.calls.append(("list_filesystems", ()))
        return dict(FILESYSTEMS)

    async def vfs_type(self, device: str) -> str:
        self.calls.append(("vfs_type", (device,)))
        return FILESYSTEMS[device]

    async def mkmountpoint(self, path: bytes) -> None:
        self.calls.append(("mkmountpoint", (path,)))

    async def mount_ro(self, device: str, mountpoint: bytes) -> None:
        self.calls.append(("mount_ro", (device, mountpoint)))
        if device in self.dirty:
            raise GuestfsError(None, "", "mount: cannot mount read-only", "mount_ro")
        self.mounted[mountpoint] = device

    async def mount_options(self, options: str, device: str, mountpoint: bytes) -> None:
        self.calls.append(("mount_options", (options, device, mountpoint)))
        self.mounted[mountpoint] = device

    async def lstatns(self, path: bytes) -> Statns:
        return statns(DEV_OF[self.mounted[path]])

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


async def test_the_os_view_is_mounted_without_listing_every_filesystem() -> None:
    daemon = FakeDaemon(roots=["/dev/vg0/root"])
    layout = await lay_out_os(cast(GuestfsClient, daemon), "guest", 3)
    assert layout.has_os and layout.generation == 3
    assert "list_filesystems" not in daemon.names()
    assert [args for name, args in daemon.calls if name == "mount_ro"] == [
        ("/dev/vg0/root", b"/fs"), ("/dev/sda1", b"/fs/boot"), ("/dev/vg0/data", b"/fs/srv/data")]
    assert layout.fs_by_dev == {64768: "vg0-root", 2049: "sda1", 64769: "vg0-data"}
    assert layout.devices == {} and not layout.devices_mounted


async def test_devices_are_mounted_later_and_keep_the_names_already_given() -> None:
    daemon = FakeDaemon(roots=["/dev/vg0/root"])
    layout = await lay_out_os(cast(GuestfsClient, daemon), "guest", 1)
    layout.fs_by_dev[2049] = "named-first"  # inode numbers already handed out use this name
    await mount_devices(layout, "guest")
    assert layout.devices_mounted
    assert layout.devices == {"sda1": "/dev/sda1", "vg0-data": "/dev/vg0/data", "vg0-root": "/dev/vg0/root"}
    assert layout.fs_by_dev[2049] == "named-first"
    assert (b"/d/vg0-data") in daemon.mounted and b"/d/sda2" not in daemon.mounted  # swap skipped


async def test_a_dirty_journal_is_not_replayed() -> None:
    daemon = FakeDaemon(roots=["/dev/vg0/root"], dirty=frozenset({"/dev/vg0/data"}))
    layout = await lay_out_os(cast(GuestfsClient, daemon), "guest", 1)
    assert ("vfs_type", ("/dev/vg0/data",)) in daemon.calls
    assert ("mount_options", ("ro,norecovery", "/dev/vg0/data", b"/fs/srv/data")) in daemon.calls
    assert 64769 in layout.fs_by_dev


async def test_no_os_mounts_nothing_until_devices_are_asked_for() -> None:
    daemon = FakeDaemon(roots=[])
    layout = await lay_out_os(cast(GuestfsClient, daemon), "guest", 1)
    assert not layout.has_os and daemon.names() == ["inspect_os"]
    await mount_devices(layout, "guest")
    assert sorted(layout.devices) == ["sda1", "vg0-data", "vg0-root"]
