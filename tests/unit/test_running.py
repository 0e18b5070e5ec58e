"""Running domains (sources/running.py, virt/backup.py): the backup job's XML and life cycle, over fake libvirt objects."""

from __future__ import annotations

import errno
import logging
import threading
import xml.etree.ElementTree as ET
from typing import Any, cast

import libvirt
import pytest
import trio
import trio.testing

from virtmount.appliance import ApplianceSettings, BootFailed
from virtmount.lifecycle import GuestUnavailableError, SourceAppliance
from virtmount.sources import SourceUnavailable
from virtmount.virt.link import LibvirtLink
from virtmount.sources import running
from virtmount.sources.domain import DomainRef
from virtmount.sources.running import AnyStateDomainRef, snapshot_source
from virtmount.virt import backup

from .test_tree import libvirt_error

UUID = "2195c483-9297-4564-b89b-b8496d906dec"
REF = DomainRef("web1", UUID)
POOL_DIR = "/var/lib/libvirt/virtmount"


def live_xml(agent: str | None = None) -> str:
    channel = "" if agent is None else (
        f"<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0' state='{agent}'/></channel>")
    return f"""<domain type='qemu'><name>web1</name><uuid>{UUID}</uuid><devices>
      <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/img/web1.qcow2'/>
        <target dev='vda' bus='virtio'/></disk>
      <disk type='block' device='disk'><source dev='/dev/vg/web1-data'/><target dev='vdb' bus='virtio'/></disk>
      <disk type='file' device='cdrom'><source file='/iso/install.iso'/><target dev='sda' bus='sata'/><readonly/></disk>
      {channel}</devices>
      <seclabel type='dynamic' model='dac' relabel='yes'><label>+64055:+64055</label></seclabel></domain>"""


class FakeVolume:
    def __init__(self, pool: FakePool, name: str, path: str) -> None:
        self.pool, self._name, self._path = pool, name, path

    def name(self) -> str:
        return self._name

    def path(self) -> str:
        return self._path

    def delete(self, flags: int) -> None:
        del self.pool.volumes[self._name]


class FakePool:
    def __init__(self, full: bool = False) -> None:
        self.volumes: dict[str, FakeVolume] = {}
        self.created: list[str] = []
        self.full = full
        self.available = 10 << 30

    def createXML(self, xml: str, flags: int) -> FakeVolume:
        volume = ET.fromstring(xml)
        name = volume.findtext("name") or ""
        if self.full and name.endswith("vdb.qcow2"):
            raise libvirt_error(libvirt.VIR_ERR_INTERNAL_ERROR, "No space left on device")
        self.created.append(xml)
        self.volumes[name] = FakeVolume(self, name, f"{POOL_DIR}/{name}")
        return self.volumes[name]

    def storageVolLookupByName(self, name: str) -> FakeVolume:
        if name not in self.volumes:
            raise libvirt_error(libvirt.VIR_ERR_NO_STORAGE_VOL, f"no volume {name}")
        return self.volumes[name]

    def listAllVolumes(self, flags: int) -> list[FakeVolume]:
        return list(self.volumes.values())

    def refresh(self, flags: int) -> None:
        pass

    def info(self) -> list[int]:
        return [libvirt.VIR_STORAGE_POOL_RUNNING, 20 << 30, 10 << 30, self.available]


class FakeDomain:
    """A running domain; ``calls`` records what was asked of it in order."""

    def __init__(self, agent: str | None = None, job: str | None = None, hung_agent: bool = False) -> None:
        self.agent = agent
        self.job = job  # the XML of its backup job, None: none
        self.hung_agent = hung_agent
        self.unhang = threading.Event()
        self.calls: list[str] = []

    def isActive(self) -> bool:
        return True

    def XMLDesc(self, flags: int) -> str:
        return live_xml(self.agent)

    def blockInfo(self, target: str) -> list[int]:
        return [{"vda": 10 << 30, "vdb": 1 << 30}[target], 0, 0]

    def backupGetXMLDesc(self, flags: int) -> str:
        if self.job is None:
            raise libvirt_error(libvirt.VIR_ERR_NO_DOMAIN_BACKUP, "no domain backup job present")
        return self.job

    def backupBegin(self, xml: str, checkpoint: str | None, flags: int) -> None:
        self.calls.append(f"begin checkpoint={checkpoint} flags={flags}")
        self.job = xml

    def abortJob(self) -> None:
        self.calls.append("abort")
        self.job = None

    def fsFreeze(self, mountpoints: None, flags: int) -> int:
        self.calls.append("freeze")
        if self.hung_agent:
            self.unhang.wait(10)
        return 1

    def fsThaw(self, mountpoints: None, flags: int) -> int:
        self.calls.append("thaw")
        return 1


class FakeConn:
    def __init__(self, domain: FakeDomain, pool: FakePool) -> None:
        self.domain, self.pool = domain, pool

    def lookupByUUIDString(self, uuid: str) -> FakeDomain:
        return self.domain

    def storagePoolLookupByName(self, name: str) -> FakePool:
        return self.pool

    def storageVolLookupByPath(self, path: str) -> FakeVolume:
        for volume in self.pool.volumes.values():
            if volume.path() == path:
                return volume
        raise libvirt_error(libvirt.VIR_ERR_NO_STORAGE_VOL, f"no volume at {path}")


def scratch_volumes(pool: FakePool) -> list[str]:
    return sorted(name for name in pool.volumes if name.startswith(backup.SCRATCH_PREFIX))


async def begin(domain: FakeDomain, pool: FakePool | None = None) -> tuple[Any, FakeConn]:
    conn = FakeConn(domain, pool or FakePool())
    return await snapshot_source(cast(Any, conn), cast(Any, domain), REF, "virtmount", "virtmount"), conn


async def test_each_disk_is_exported_read_only_over_nbd_on_the_jobs_socket() -> None:
    source, conn = await begin(FakeDomain())
    socket_path = f"{POOL_DIR}/virtmount-nbd-64055-64055/{UUID}.sock"
    assert [ET.tostring(disk, encoding="unicode") for disk in source.disks] == [
        f'<disk type="network" device="disk"><driver name="qemu" type="raw" /><source protocol="nbd" name="{t}">'
        f'<host transport="unix" socket="{socket_path}" /></source><readonly /></disk>' for t in ("vda", "vdb")]
    assert source.identity == UUID and source.hold is not None
    job = ET.fromstring(conn.domain.job or "")
    assert job.get("mode") == "pull"
    assert job.find("server").attrib == {"transport": "unix", "socket": socket_path}  # type: ignore[union-attr]
    assert [d.get("name") for d in job.findall("./disks/disk")] == ["vda", "vdb"]  # the cdrom is not exported
    assert conn.domain.calls == [f"begin checkpoint=None flags={libvirt.VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL}"]


async def test_scratch_volumes_are_qcow2_as_large_as_their_disk_and_the_socket_directory_is_the_qemu_users() -> None:
    _, conn = await begin(FakeDomain())
    created = [ET.fromstring(xml) for xml in conn.pool.created]
    directory, *scratch = created
    assert directory.findtext("name") == "virtmount-nbd-64055-64055"
    assert directory.find("./target/format").get("type") == "dir"  # type: ignore[union-attr]
    assert [directory.findtext(f"./target/permissions/{p}") for p in ("owner", "group", "mode")] == [
        "64055", "64055", "0700"]
    assert [(v.find("./target/format").get("type"), v.findtext("capacity")) for v in scratch] == [  # type: ignore[union-attr]
        ("qcow2", str(10 << 30)), ("qcow2", str(1 << 30))]
    assert [backup.scratch_owner(v.findtext("name") or "") for v in scratch] == [backup.this_owner()] * 2


async def test_releasing_ends_the_job_and_deletes_the_scratch() -> None:
    source, conn = await begin(FakeDomain())
    assert len(scratch_volumes(conn.pool)) == 2
    await source.hold.release()
    assert conn.domain.calls[-1] == "abort" and conn.domain.job is None
    assert scratch_volumes(conn.pool) == []


async def test_a_job_that_ended_with_its_guest_leaves_only_scratch_to_delete() -> None:
    source, conn = await begin(FakeDomain())
    conn.domain.job = None  # the guest shut down
    await source.hold.release()
    assert "abort" not in conn.domain.calls and scratch_volumes(conn.pool) == []


async def test_someone_elses_job_is_refused_and_never_touched() -> None:
    theirs = "<domainbackup mode='pull'><disks><disk name='vda'><scratch file='/other/s.qcow2'/></disk></disks></domainbackup>"
    domain = FakeDomain(job=theirs)
    with pytest.raises(SourceUnavailable, match="a backup job is already running on web1"):
        await begin(domain)
    assert domain.calls == [] and domain.job == theirs
    conn = FakeConn(domain, FakePool())
    assert not backup.end_job(cast(Any, conn), cast(Any, domain), backup.this_owner())
    assert domain.job == theirs


async def test_a_full_pool_begins_no_job_and_leaves_no_scratch() -> None:
    pool = FakePool(full=True)
    domain = FakeDomain()
    with pytest.raises(SourceUnavailable, match="No space left"):
        await begin(domain, pool)
    assert domain.calls == [] and scratch_volumes(pool) == []


async def test_a_scratch_pool_without_room_begins_no_job() -> None:
    pool = FakePool()
    pool.available = backup.SCRATCH_RESERVE_BYTES - 1
    domain = FakeDomain()
    with pytest.raises(SourceUnavailable, match="needs at least 128 MiB"):
        await begin(domain, pool)
    assert domain.calls == [] and scratch_volumes(pool) == []


async def test_a_socket_path_too_long_for_a_socket_address_begins_no_job(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backup, "SOCKET_PATH_MAX", 20)
    domain = FakeDomain()
    with pytest.raises(SourceUnavailable, match="longer than the 20 bytes a UNIX socket address holds"):
        await begin(domain)
    assert domain.calls == []


async def test_a_held_job_breaks_when_its_scratch_pool_fills_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("virtmount.sources.running.SCRATCH_CHECK_S", 0.01)
    source, conn = await begin(FakeDomain())
    with trio.move_on_after(0.2) as still_room:
        await source.hold.broken()
    assert still_room.cancelled_caught
    conn.pool.available = 100 << 20
    with trio.fail_after(5):
        reason = await source.hold.broken()
    assert reason.startswith("scratch pool virtmount has 100 MiB free, less than 128 MiB")


async def test_a_broken_hold_ends_the_appliance_and_answers_eio() -> None:
    class Breaking(Held):
        def __init__(self) -> None:
            super().__init__()
            self.breaks = trio.Event()

        async def broken(self) -> str:
            await self.breaks.wait()
            return "scratch pool full"

    class Booted:
        shut_down = False

        async def shutdown(self) -> None:
            self.shut_down = True

    ref = HeldRef()
    ref.held = held = Breaking()
    guest = SourceAppliance(cast(Any, None), ref, ApplianceSettings(), cast(Any, None), cast(Any, None))
    booted = Booted()
    guest._appliance = cast(Any, booted)
    guest._served = await ref.resolve(None, None)
    async with trio.open_nursery() as nursery:
        guest._hold_watch = watch = trio.CancelScope()
        nursery.start_soon(guest._end_when_broken, held, watch)
        await trio.testing.wait_all_tasks_blocked()
        assert not booted.shut_down
        held.breaks.set()
    assert booted.shut_down and held.released == 1 and not guest.running
    with pytest.raises(GuestUnavailableError, match="scratch pool full") as failed:
        await guest.layout()
    assert failed.value.errno == errno.EIO


async def test_with_an_agent_the_filesystems_are_frozen_for_the_jobs_start_only() -> None:
    _, conn = await begin(FakeDomain(agent="connected"))
    assert [c.split()[0] for c in conn.domain.calls] == ["freeze", "begin", "thaw"]


async def test_an_agent_that_is_not_connected_is_not_asked() -> None:
    _, conn = await begin(FakeDomain(agent="disconnected"))
    assert [c.split()[0] for c in conn.domain.calls] == ["begin"]


async def test_a_hung_agent_gives_a_crash_consistent_view_in_bounded_time(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(running, "FREEZE_TIMEOUT_S", 0.2)
    domain = FakeDomain(agent="connected", hung_agent=True)
    caplog.set_level(logging.INFO)
    with trio.fail_after(5):
        source, _ = await begin(domain)
    domain.unhang.set()
    assert [c.split()[0] for c in domain.calls] == ["freeze", "begin", "thaw"]
    assert "did not freeze the filesystems within" in caplog.text and source.hold is not None


async def test_a_shut_off_domain_is_served_from_its_disks() -> None:
    class ShutOff(FakeDomain):
        def isActive(self) -> bool:
            return False

    domain = ShutOff()
    source = await AnyStateDomainRef(REF, "virtmount", "virtmount").resolve(cast(Any, FakeConn(domain, FakePool())),
                                                               cast(Any, None))
    assert source.hold is None and domain.calls == []
    assert [d.get("type") for d in source.disks] == ["file", "block"]  # the cdrom is not served


def test_jobs_are_recognised_by_their_scratch_names() -> None:
    ours = backup.scratch_name("client.example.4242", UUID, "vda")
    assert backup.scratch_owner(f"{POOL_DIR}/{ours}") == "client.example.4242"
    assert backup.scratch_owner("/var/lib/libvirt/images/web1.qcow2") is None
    job = backup.backup_xml("/s.sock", [backup.ExportedDisk("vda", f"{POOL_DIR}/{ours}")])
    assert backup.job_owner(job) == "client.example.4242"
    mixed = backup.backup_xml("/s.sock", [backup.ExportedDisk("vda", f"{POOL_DIR}/{ours}"),
                                          backup.ExportedDisk("vdb", "/elsewhere/x.qcow2")])
    assert backup.job_owner(mixed) is None


def test_only_dead_processes_of_this_host_leave_jobs_behind() -> None:
    assert not backup.owner_is_gone(backup.this_owner())
    assert backup.owner_is_gone(backup.this_owner().rsplit(".", 1)[0] + ".999999999")
    assert not backup.owner_is_gone("another-client.1")


class Held:
    watchdog_item = "backup:x:y"
    taken_at = 0.0

    def __init__(self) -> None:
        self.released = 0

    async def broken(self) -> str:
        await trio.sleep_forever()

    async def release(self) -> None:
        self.released += 1


class HeldRef:
    """A source whose resolution holds something on the host."""

    identity, name = UUID, "web1"

    def __init__(self) -> None:
        self.held = Held()

    async def resolve(self, conn: Any, attach: Any) -> Any:
        from virtmount.sources import Attach, Source
        return Source(identity=UUID, name="web1", disks=(), attach=Attach.READ_ONLY_OVERLAY,
                      hold=self.held)

    async def gone(self, conn: Any) -> str | None:
        return None


class FakeHost:
    async def get(self) -> Any:
        return None


async def test_a_failed_boot_releases_what_the_source_holds(monkeypatch: pytest.MonkeyPatch) -> None:
    async def failing_boot(*args: Any) -> Any:
        raise BootFailed("no")

    monkeypatch.setattr("virtmount.lifecycle.boot_appliance", failing_boot)
    ref = HeldRef()
    async with trio.open_nursery() as nursery:
        link = LibvirtLink("test:///default", cast(Any, object()))
        guest = SourceAppliance(link, ref, ApplianceSettings(fast_start=False), cast(Any, FakeHost()), nursery)
        with pytest.raises(Exception, match="no"):
            await guest.layout()
    assert ref.held.released == 1


async def test_the_hold_is_released_after_the_appliance_shut_down(monkeypatch: pytest.MonkeyPatch) -> None:
    order: list[str] = []

    class Booted:
        async def shutdown(self) -> None:
            order.append("appliance")

    ref = HeldRef()
    guest = SourceAppliance(cast(Any, None), ref, ApplianceSettings(), cast(Any, None), cast(Any, None))
    guest._appliance = cast(Any, Booted())
    guest._served = await ref.resolve(None, None)
    original = ref.held.release

    async def release() -> None:
        order.append("hold")
        await original()

    monkeypatch.setattr(ref.held, "release", release)
    await guest.release()
    assert order == ["appliance", "hold"]


async def test_a_point_in_time_view_says_when_it_was_taken() -> None:
    import os

    from .test_tree import make_world, names_in, walk
    world = make_world()
    tree = world.tree
    alpha = await walk(tree, b"domains", b"alpha")
    assert b"snapshot-time" not in await names_in(tree, alpha)  # disks as they are: no point in time
    world.appliance("alpha").snapshot_taken_at = 1764652380.25  # 2025-12-02T05:13:00.250Z
    assert b"snapshot-time" in await names_in(tree, alpha)
    node = await tree.lookup(alpha.inode, b"snapshot-time")
    handle = await tree.open(node.inode, os.O_RDONLY)
    assert await tree.read(handle, 0, 100) == b"2025-12-02T05:13:00.250Z\n"


@pytest.mark.parametrize(("channel_type", "own_daemon"), [("unix", True), ("pty", False)])
async def test_a_domain_with_a_guestfs_channel_is_served_by_its_own_daemon(channel_type: str,
                                                                         own_daemon: bool) -> None:
    class WithDaemon(FakeDomain):
        def XMLDesc(self, flags: int) -> str:
            channel = (f"<channel type='{channel_type}'><source mode='bind'/>"
                       "<target type='virtio' name='org.libguestfs.channel.0'/></channel>")
            return live_xml().replace("</devices>", channel + "</devices>")

    domain = WithDaemon()
    source = await AnyStateDomainRef(REF, "virtmount", "virtmount").resolve(cast(Any, FakeConn(domain, FakePool())),
                                                               cast(Any, None))
    assert source.own_daemon is own_daemon
    assert (domain.calls == [] and source.disks == () and source.hold is None) if own_daemon else \
        domain.calls[0].startswith("begin")  # libvirt opens only unix channels: a pty one needs the backup


async def test_only_an_appliance_reading_disks_as_they_are_ends_when_its_domain_starts() -> None:
    from dataclasses import replace
    ref = HeldRef()
    guest = SourceAppliance(cast(Any, None), ref, ApplianceSettings(), cast(Any, None), cast(Any, None))
    served = await ref.resolve(None, None)
    guest._served = replace(served, hold=None)
    assert not guest.reads_disks_as_they_are  # no appliance runs
    guest._appliance = cast(Any, object())
    assert guest.reads_disks_as_they_are
    guest._served = served
    assert not guest.reads_disks_as_they_are  # a point-in-time export
    guest._served = replace(served, hold=None, own_daemon=True)
    assert not guest.reads_disks_as_they_are  # the running guest's own daemon
