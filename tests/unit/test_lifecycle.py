"""Laying out a guest in a booted appliance (virtmount.guests) over a fake daemon client."""

from __future__ import annotations

import errno
import json
import logging
from pathlib import Path
from typing import Any, cast

import libvirt
import pytest
import trio
import trio.testing

from virtmount.guestfs.client import GuestfsClient
from virtmount.guestfs.errors import GuestfsError
from virtmount.guestfs.procs import Statns
from virtmount.devicenames import COLD_BOOTED, RESTORED
from virtmount.guestlayout import lay_out_os, mount_devices
from virtmount.appliance import ApplianceSettings
from virtmount.lifecycle import GuestUnavailableError, SourceAppliance
from virtmount.sources.domain import DomainRef
from virtmount.inspection_cache import FstabFingerprint, InspectionCache, RememberedLayout
from virtmount.virt.link import LibvirtLink

FILESYSTEMS = {"/dev/sda1": "ext4", "/dev/vg0/root": "ext4", "/dev/vg0/data": "xfs", "/dev/sda2": "swap"}
DEV_OF = {"/dev/sda1": 2049, "/dev/vg0/root": 64768, "/dev/vg0/data": 64769}

GUEST = DomainRef("guest", "6f1c2a3b-4d5e-4f60-8a71-92b3c4d5e6f7")


MOUNTPOINTS = {"/srv/data": "/dev/vg0/data", "/": "/dev/vg0/root", "/boot": "/dev/sda1"}


def statns(dev: int) -> Statns:
    return Statns(dev, 2, 0o40755, 2, *([0] * 18))


def fstab_statns(ino: int = 131, size: int = 412, mtime: tuple[int, int] = (1700000000, 5),
                 ctime: tuple[int, int] = (1700000000, 7)) -> Statns:
    return Statns(64768, ino, 0o100644, 1, 0, 0, 0, size, 4096, 8, 0, 0, *mtime, *ctime, *([0] * 6))


FSTAB = FstabFingerprint(inode=131, size=412, mtime_ns=1700000000_000000005, ctime_ns=1700000000_000000007)


class FakeDaemon:
    """Records the layout calls; devices listed in ``dirty`` refuse a plain read-only mount."""

    def __init__(self, *, roots: list[str], dirty: frozenset[str] = frozenset(),
                 fstab: Statns | None = fstab_statns(), broken: frozenset[str] = frozenset()) -> None:
        self.roots = roots
        self.dirty = dirty
        self.fstab = fstab  # the root filesystem's /etc/fstab, None: it has none
        self.broken = broken  # devices that do not mount at all
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.mounted: dict[bytes, str] = {}

    async def inspect_os(self) -> list[str]:
        self.calls.append(("inspect_os", ()))
        return self.roots

    async def inspect_get_mountpoints(self, root: str) -> dict[str, str]:
        return dict(MOUNTPOINTS)

    async def list_filesystems(self) -> dict[str, str]:
        self.calls.append(("list_filesystems", ()))
        return dict(FILESYSTEMS)

    async def vfs_type(self, device: str) -> str:
        self.calls.append(("vfs_type", (device,)))
        return FILESYSTEMS[device]

    async def mkmountpoint(self, path: bytes) -> None:
        self.calls.append(("mkmountpoint", (path,)))

    async def rmmountpoint(self, path: bytes) -> None:
        self.calls.append(("rmmountpoint", (path,)))

    async def umount(self, path: bytes) -> None:
        self.calls.append(("umount", (path,)))
        del self.mounted[path]

    async def mount_ro(self, device: str, mountpoint: bytes) -> None:
        self.calls.append(("mount_ro", (device, mountpoint)))
        if device in self.broken:
            raise GuestfsError(None, "", "mount: wrong fs type", "mount_ro")
        if device in self.dirty:
            raise GuestfsError(None, "", "mount: cannot mount read-only", "mount_ro")
        self.mounted[mountpoint] = device

    async def mount_options(self, options: str, device: str, mountpoint: bytes) -> None:
        self.calls.append(("mount_options", (options, device, mountpoint)))
        if device in self.broken:
            raise GuestfsError(None, "", "mount: wrong fs type", "mount_options")
        self.mounted[mountpoint] = device

    async def lstatns(self, path: bytes) -> Statns:
        if path == b"/fs/etc/fstab":
            if self.fstab is None or self.mounted.get(b"/fs") != "/dev/vg0/root":
                raise GuestfsError(errno.ENOENT, "ENOENT", "lstatns: /etc/fstab: No such file", "lstatns")
            return self.fstab
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


async def test_what_is_not_a_filesystem_is_logged_not_shown(caplog: pytest.LogCaptureFixture) -> None:
    daemon = FakeDaemon(roots=[])
    layout = await lay_out_os(cast(GuestfsClient, daemon), "guest", 1)
    with caplog.at_level(logging.INFO, logger="virtmount.guestlayout"):
        await mount_devices(layout, "guest")
    assert "sda2" not in layout.devices
    assert "guest: /dev/sda2 (swap) is not a mountable filesystem; not shown" in caplog.messages


async def test_disks_without_any_filesystem_leave_devices_empty_and_say_why(caplog: pytest.LogCaptureFixture) -> None:
    class RandomBytes(FakeDaemon):
        async def list_filesystems(self) -> dict[str, str]:
            return {"/dev/sda": "unknown"}

    layout = await lay_out_os(cast(GuestfsClient, RandomBytes(roots=[])), "volume", 1)
    with caplog.at_level(logging.INFO, logger="virtmount.guestlayout"):
        await mount_devices(layout, "volume")
    assert layout.devices == {} and layout.devices_mounted
    assert "volume: no filesystem found on the disks (/dev/sda: unknown); devices/ is empty" in caplog.messages


async def test_a_dirty_journal_is_not_replayed() -> None:
    daemon = FakeDaemon(roots=["/dev/vg0/root"], dirty=frozenset({"/dev/vg0/data"}))
    layout = await lay_out_os(cast(GuestfsClient, daemon), "guest", 1)
    assert ("vfs_type", ("/dev/vg0/data",)) in daemon.calls
    assert ("mount_options", ("ro,norecovery", "/dev/vg0/data", b"/fs/srv/data")) in daemon.calls
    assert 64769 in layout.fs_by_dev


class WritingDaemon(FakeDaemon):
    """Mounts read-write too; devices in ``broken_rw`` refuse it (e.g. a filesystem with errors)."""

    broken_rw: frozenset[str] = frozenset({"/dev/vg0/data"})

    async def umask(self, mask: int) -> int:
        self.calls.append(("umask", (mask,)))
        return 0o022

    async def mount(self, device: str, mountpoint: bytes) -> None:
        self.calls.append(("mount", (device, mountpoint)))
        if device in self.broken_rw:
            raise GuestfsError(None, "", "mount: cannot mount read-write", "mount")
        self.mounted[mountpoint] = device


async def test_writable_filesystems_are_mounted_once_and_devices_link_to_fs() -> None:
    daemon = WritingDaemon(roots=["/dev/vg0/root"])
    layout = await lay_out_os(cast(GuestfsClient, daemon), "guest", 1, writable=True)
    assert daemon.calls[0] == ("umask", (0,))  # new files get exactly the modes asked for
    assert [args for name, args in daemon.calls if name == "mount"] == [
        ("/dev/vg0/root", b"/fs"), ("/dev/sda1", b"/fs/boot"), ("/dev/vg0/data", b"/fs/srv/data")]
    assert ("mount_ro", ("/dev/vg0/data", b"/fs/srv/data")) in daemon.calls  # read-write failed: read-only
    assert layout.writable_filesystem("vg0-root") and not layout.writable_filesystem("vg0-data")
    daemon.calls.clear()
    await mount_devices(layout, "guest")
    assert not [name for name in daemon.names() if name.startswith("mount")]  # no second mount of any of them
    assert sorted(layout.devices) == ["sda1", "vg0-data", "vg0-root"]
    assert (layout.device_link("vg0-root"), layout.device_link("sda1")) == (b"../fs", b"../fs/boot")


async def test_no_os_mounts_nothing_until_devices_are_asked_for() -> None:
    daemon = FakeDaemon(roots=[])
    layout = await lay_out_os(cast(GuestfsClient, daemon), "guest", 1)
    assert not layout.has_os and daemon.names() == ["inspect_os"]
    await mount_devices(layout, "guest")
    assert sorted(layout.devices) == ["sda1", "vg0-data", "vg0-root"]


async def test_a_failed_inspection_leaves_devices_readable(caplog: pytest.LogCaptureFixture) -> None:
    """A damaged filesystem fails libguestfs' whole inspection (seen: EBADMSG from a corrupt ext2
    directory): no fs/, but every other filesystem is still in devices/."""

    class DamagedDisk(FakeDaemon):
        async def inspect_os(self) -> list[str]:
            self.mounted[b"/"] = "/dev/sda1"  # what libguestfs' inspection leaves behind when it fails
            raise GuestfsError(errno.EBADMSG, "EBADMSG", "lstat: /grub/menu.lst: Bad message", "inspect_os")

        async def umount_all(self) -> None:
            self.mounted.clear()

    daemon = DamagedDisk(roots=[])
    with caplog.at_level(logging.WARNING, logger="virtmount.guestlayout"):
        layout = await lay_out_os(cast(GuestfsClient, daemon), "guest", 1)
    assert not layout.has_os
    assert any("inspection failed" in message for message in caplog.messages)
    assert daemon.mounted == {}
    await mount_devices(layout, "guest")
    assert sorted(layout.devices) == ["sda1", "vg0-data", "vg0-root"]


async def test_a_filesystem_whose_root_cannot_be_read_is_left_out_of_devices() -> None:
    class UnreadableRoot(FakeDaemon):
        async def lstatns(self, path: bytes) -> Statns:
            if self.mounted.get(path) == "/dev/sda1":
                raise GuestfsError(errno.EUCLEAN, "EUCLEAN", "lstatns: Structure needs cleaning", "lstatns")
            return await super().lstatns(path)

    daemon = UnreadableRoot(roots=[])
    layout = await lay_out_os(cast(GuestfsClient, daemon), "guest", 1)
    await mount_devices(layout, "guest")
    assert sorted(layout.devices) == ["vg0-data", "vg0-root"]


async def test_an_inspection_is_remembered_with_the_identity_of_fstab() -> None:
    daemon = FakeDaemon(roots=["/dev/vg0/root"])
    layout = await lay_out_os(cast(GuestfsClient, daemon), "guest", 1)
    assert layout.remembered == RememberedLayout(mountpoints=MOUNTPOINTS, fstab=FSTAB)


async def test_a_guest_without_fstab_is_not_remembered() -> None:
    daemon = FakeDaemon(roots=["/dev/vg0/root"], fstab=None)
    layout = await lay_out_os(cast(GuestfsClient, daemon), "guest", 1)
    assert layout.has_os and layout.remembered is None


async def test_a_remembered_layout_is_mounted_without_inspecting() -> None:
    inspected = FakeDaemon(roots=["/dev/vg0/root"])
    first = await lay_out_os(cast(GuestfsClient, inspected), "guest", 1)
    daemon = FakeDaemon(roots=["/dev/vg0/root"])
    layout = await lay_out_os(cast(GuestfsClient, daemon), "guest", 2, first.remembered)
    assert "inspect_os" not in daemon.names()
    assert daemon.mounted == inspected.mounted
    assert layout.has_os and layout.generation == 2 and layout.remembered == first.remembered
    assert layout.fs_by_dev == first.fs_by_dev


@pytest.mark.parametrize("daemon", [
    FakeDaemon(roots=["/dev/vg0/root"], fstab=fstab_statns(ctime=(1700000000, 8))),  # fstab edited
    FakeDaemon(roots=["/dev/vg0/root"], fstab=fstab_statns(ino=132)),  # fstab replaced
    FakeDaemon(roots=["/dev/vg0/root"], fstab=None),  # not the filesystem it was
    FakeDaemon(roots=["/dev/sda1"], broken=frozenset({"/dev/vg0/root"})),  # the device is gone
], ids=["edited", "replaced", "no-fstab", "root-unmountable"])
async def test_a_remembered_layout_that_no_longer_holds_is_inspected_again(daemon: FakeDaemon) -> None:
    remembered = RememberedLayout(mountpoints=MOUNTPOINTS, fstab=FSTAB)
    layout = await lay_out_os(cast(GuestfsClient, daemon), "guest", 1, remembered)
    names = daemon.names()
    assert "inspect_os" in names
    # nothing of the remembered attempt is left mounted when the inspection starts
    before = names[:names.index("inspect_os")]
    assert before.count("mkmountpoint") == before.count("rmmountpoint") == 1
    assert before.count("umount") == sum(1 for n, a in daemon.calls[:len(before)] if n == "mount_ro"
                                         and a[0] not in daemon.broken)
    assert layout.remembered != remembered


class FakeAppliance:
    def __init__(self, daemon: FakeDaemon) -> None:
        self.client = daemon
        self.disks_key = "k" * 64
        self.naming = COLD_BOOTED


class RestoredDaemon(FakeDaemon):
    """A restored appliance: its own root is sda, so the guest's first disk is sdb. ``blkid``: whether
    its shell lists the filesystems (else the layout comes from inspect_os)."""

    def __init__(self, *, roots: list[str], blkid: bool = False) -> None:
        super().__init__(roots=roots)
        self.blkid = blkid

    async def debug_sh(self, command: bytes) -> bytes:
        self.calls.append(("debug_sh", (command,)))
        if not self.blkid:
            raise GuestfsError(None, "", "debug commands are disabled", "debug")
        listed = [("/dev/sda", "ext2", "appliance"), ("/dev/sdb1", "ext4", "b00t"), ("/dev/sdb2", "swap", "5wap"),
                  ("/dev/sdb3", "LVM2_member", "1vm"), ("/dev/mapper/vg0-root", "ext4", "r00t"),
                  ("/dev/mapper/vg0-data", "xfs", "da7a")]
        return "".join(f"DEVNAME={name}\nUUID={uuid}\nTYPE={fstype}\n\n"
                       for name, fstype, uuid in listed).encode() + b"virtmount-blkid-status 0\n"

    async def download(self, path: bytes) -> bytes:
        self.calls.append(("download", (path,)))
        assert path == b"/fs/etc/fstab" and self.mounted.get(b"/fs") == "/dev/vg0/root"
        return b"UUID=r00t / ext4 defaults 0 1\nUUID=b00t /boot ext4 defaults 0 2\n" \
               b"/dev/mapper/vg0-data /srv/data xfs defaults 0 2\nUUID=5wap none swap sw 0 0\n"

    async def inspect_get_mountpoints(self, root: str) -> dict[str, str]:
        return {**MOUNTPOINTS, "/boot": "/dev/sdb1"}

    async def lstatns(self, path: bytes) -> Statns:
        if self.mounted.get(path) == "/dev/sdb1":
            return statns(DEV_OF["/dev/sda1"])
        return await super().lstatns(path)


async def test_layouts_are_remembered_in_the_guest_disk_order_whichever_way_the_appliance_booted() -> None:
    restored = RestoredDaemon(roots=["/dev/vg0/root"])
    layout = await lay_out_os(cast(GuestfsClient, restored), "guest", 1, naming=RESTORED)
    assert layout.remembered is not None and layout.remembered.mountpoints == MOUNTPOINTS
    assert layout.fs_by_dev[2049] == "sda1"
    again = RestoredDaemon(roots=["/dev/vg0/root"])
    await lay_out_os(cast(GuestfsClient, again), "guest", 2, layout.remembered, RESTORED)
    assert "inspect_os" not in again.names() and again.mounted[b"/fs/boot"] == "/dev/sdb1"
    cold = FakeDaemon(roots=["/dev/vg0/root"])
    await lay_out_os(cast(GuestfsClient, cold), "guest", 3, layout.remembered)
    assert "inspect_os" not in cold.names() and cold.mounted[b"/fs/boot"] == "/dev/sda1"


async def test_a_restored_appliance_lays_a_plain_linux_guest_out_from_its_fstab_as_inspection_would() -> None:
    inspected = await lay_out_os(cast(GuestfsClient, RestoredDaemon(roots=["/dev/vg0/root"])), "guest", 1,
                                 naming=RESTORED)
    daemon = RestoredDaemon(roots=["/dev/vg0/root"], blkid=True)
    layout = await lay_out_os(cast(GuestfsClient, daemon), "guest", 1, naming=RESTORED)
    assert "inspect_os" not in daemon.names()
    assert layout.remembered == inspected.remembered and layout.fs_by_dev == inspected.fs_by_dev
    assert daemon.mounted == {b"/fs": "/dev/vg0/root", b"/fs/boot": "/dev/sdb1", b"/fs/srv/data": "/dev/vg0/data"}


async def test_the_appliance_stores_and_forgets_remembered_layouts(tmp_path: Path) -> None:
    cache = InspectionCache(tmp_path / "layouts")
    guest = SourceAppliance(cast(Any, None), GUEST, cast(Any, None), cast(Any, None), cast(Any, None), cache)
    key = "k" * 64
    await guest._lay_out(cast(Any, FakeAppliance(FakeDaemon(roots=["/dev/vg0/root"]))))
    assert cache.load(key) == RememberedLayout(mountpoints=MOUNTPOINTS, fstab=FSTAB)

    again = FakeDaemon(roots=["/dev/vg0/root"])
    await guest._lay_out(cast(Any, FakeAppliance(again)))
    assert "inspect_os" not in again.names()

    await guest._lay_out(cast(Any, FakeAppliance(FakeDaemon(roots=["/dev/vg0/root"], fstab=None))))
    assert cache.load(key) is None and not (tmp_path / "layouts" / f"{key}.json").exists()


def test_the_cache_survives_damage_and_unwritable_directories(tmp_path: Path) -> None:
    cache = InspectionCache(tmp_path)
    layout = RememberedLayout(mountpoints={"/": "/dev/sda2", "/b\udcff": "/dev/sda1"}, fstab=FSTAB)
    cache.store("a", layout)
    assert cache.load("a") == layout
    assert list(tmp_path.iterdir()) == [tmp_path / "a.json"]  # no temporary file left behind
    for damaged in ("{", "[]", json.dumps({"version": 99}), json.dumps({"version": 1, "mountpoints": {"/": "/dev/sda2"}}),
                    json.dumps({"version": 1, "mountpoints": {"/": 1}, "fstab": {}}),
                    json.dumps({"version": 1, "mountpoints": {"/boot": "/dev/sda1"},
                                "fstab": {"inode": 1, "size": 2, "mtime_ns": 3, "ctime_ns": 4}})):
        (tmp_path / "a.json").write_text(damaged)
        assert cache.load("a") is None
    assert cache.load("missing") is None
    (tmp_path / "file").write_text("")
    InspectionCache(tmp_path / "file" / "sub").store("a", layout)  # logged, not raised
    InspectionCache(tmp_path / "file" / "sub").forget("a")


async def test_discarding_a_running_appliance_tells_the_tree() -> None:
    class Booted:
        shut_down = False

        async def shutdown(self) -> None:
            self.shut_down = True

    guest = SourceAppliance(cast(Any, None), GUEST, cast(Any, None), cast(Any, None), cast(Any, None))
    told: list[str] = []
    guest.on_discard = lambda: told.append("discarded")
    await guest.release()
    assert told == []  # nothing was running
    booted = Booted()
    guest._appliance = cast(Any, booted)
    await guest.release()
    assert booted.shut_down and told == ["discarded"]


async def test_an_appliance_mounting_its_devices_is_not_idle() -> None:
    class SlowDaemon(FakeDaemon):
        closed = False
        release = trio.Event()

        async def list_filesystems(self) -> dict[str, str]:
            await self.release.wait()
            return await super().list_filesystems()

    daemon = SlowDaemon(roots=["/dev/vg0/root"])
    guest = SourceAppliance(cast(Any, None), GUEST, cast(Any, None), cast(Any, None), cast(Any, None))
    guest._appliance = cast(Any, object())
    guest._layout = await lay_out_os(cast(GuestfsClient, daemon), "guest", 1)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: guest.layout(with_devices=True))
        await trio.testing.wait_all_tasks_blocked()
        guest._last_used -= 3600  # an hour without access, as far as the clock goes
        assert guest.idle_for() == 0.0
        daemon.release.set()
    assert guest._layout.devices_mounted and guest.idle_for() < 60


async def test_a_source_deleted_while_served_ends_its_appliance_with_eio() -> None:
    class Booted:
        shut_down = False

        async def shutdown(self) -> None:
            self.shut_down = True

    class DeletedLater:
        identity, name = "volume:/pool/v.raw", "pool/v.raw"
        reason: str | None = None
        asked = 0

        async def resolve(self, conn: Any, attach: Any) -> Any:
            raise AssertionError("not booted again within the retry time")

        async def gone(self, conn: Any) -> str | None:
            self.asked += 1
            return self.reason

    ref = DeletedLater()
    link = LibvirtLink("qemu:///system", cast(Any, object()))
    guest = SourceAppliance(link, ref, cast(Any, None), cast(Any, None), cast(Any, None))
    class OpenDaemon(FakeDaemon):
        closed = False

    daemon = OpenDaemon(roots=["/dev/vg0/root"])
    booted = Booted()
    guest._appliance = cast(Any, booted)
    guest._layout = await lay_out_os(cast(GuestfsClient, daemon), "guest", 1)
    layout = guest._layout
    assert await guest.layout() is layout and ref.asked == 0  # checked at most every PRESENCE_CHECK_S
    guest._presence_checked_at -= 60
    assert await guest.layout() is layout and ref.asked == 1  # still there
    guest._presence_checked_at -= 60
    ref.reason = "volume pool/v.raw was deleted"
    for _ in range(2):  # the first access finds it gone, the next ones answer from the failure
        with pytest.raises(GuestUnavailableError) as failed:
            await guest.layout()
        assert failed.value.errno == errno.EIO and "deleted" in str(failed.value)
    assert booted.shut_down and not guest.running and ref.asked == 2
class FailingRef:
    """A source whose resolution fails as given (a libvirt error from a lookup, a bug)."""

    name = identity = "web1"

    def __init__(self, failure: Exception) -> None:
        self.failure = failure
        self.resolved = 0

    async def resolve(self, conn: Any, attach: Any) -> Any:
        self.resolved += 1
        raise self.failure


class NoHost:
    async def get(self) -> Any:
        return None


@pytest.mark.parametrize("failure", [libvirt.libvirtError("Cannot recv data: Connection reset by peer"),
                                     RuntimeError("a bug")])
async def test_whatever_a_boot_meets_fails_that_source_only(failure: Exception) -> None:
    ref = FailingRef(failure)
    async with trio.open_nursery() as nursery:  # stands for the mount's: it must not end with an error
        link = LibvirtLink("qemu:///system", cast(Any, object()))
        guest = SourceAppliance(link, cast(Any, ref), ApplianceSettings(), cast(Any, NoHost()), nursery)
        for _ in range(2):  # the failure is remembered: one boot attempt for both accesses
            with pytest.raises(GuestUnavailableError) as failed:
                await guest.layout()
            assert failed.value.errno == errno.EIO and str(failure) in str(failed.value)
        assert ref.resolved == 1


async def test_no_boot_while_the_connection_is_down() -> None:
    ref = FailingRef(RuntimeError("never resolved"))
    link = LibvirtLink("qemu:///system", cast(Any, object()))
    link._mark_lost(link.conn, "the server closed it")
    guest = SourceAppliance(link, cast(Any, ref), ApplianceSettings(), cast(Any, NoHost()), cast(Any, None))
    with pytest.raises(GuestUnavailableError, match="is down") as failed:
        await guest.layout()
    assert failed.value.errno == errno.EIO and ref.resolved == 0
