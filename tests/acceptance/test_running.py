"""Running guests: a point-in-time view through libvirt's pull-mode backup, on a guest that keeps writing.

The guest (tests/running_guest.py) appends a counter to /counter on its first
disk every 100 ms and never touches its second disk. Everything these tests
make is named virtmount-test-run*.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Iterator

import libvirt
import pytest

from tests import images, running_guest, volumes
from tests.acceptance.conftest import unmount
from tests.acceptance.helpers import VIRTMOUNT, appliances_of, mount_foreground, run_virtmount, wait_until
from tests.tcpproxy import tcp_proxy
from virtmount.virt import backup

pytestmark = pytest.mark.acceptance


@pytest.fixture(scope="module")
def writer(libvirtd: str) -> Iterator[running_guest.RunningGuest]:
    guest = running_guest.start(libvirtd)
    yield guest
    running_guest.stop(guest)


def mount(uri: str, mountpoint: Path, *options: str) -> None:
    """Mount in the foreground with -v, its log in MOUNTPOINT.log (shown when a test fails)."""
    mount_foreground(uri, mountpoint, "idle=600", *options)


def log_of(mountpoint: Path) -> str:
    return mountpoint.with_suffix(".log").read_text()


@pytest.fixture(scope="module")
def writer_mount(writer: running_guest.RunningGuest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """qemu:///system mounted for this module; its tests share the writer's appliance (and its job)."""
    mountpoint = tmp_path_factory.mktemp("virtmount-run")
    mount(writer.uri, mountpoint)
    try:
        yield mountpoint
    finally:
        unmount(mountpoint)


def devices_of(mountpoint: Path) -> Path:
    return mountpoint / "domains" / running_guest.NAME / "devices"


def counter_file(mountpoint: Path) -> Path:
    """The counter file in the devices/ view of the writer's first disk."""
    devices = devices_of(mountpoint)
    found = [d / "counter" for d in sorted(devices.iterdir()) if (d / "counter").exists()]
    assert len(found) == 1, list(devices.iterdir())
    return found[0]


def last_count(path: Path) -> int:
    return int(path.read_text().split()[-1])


def test_a_running_guest_shows_a_stable_view_while_it_writes(writer: running_guest.RunningGuest,
                                                              writer_mount: Path) -> None:
    started = time.monotonic()
    listing = sorted(p.name for p in devices_of(writer_mount).iterdir())
    first_listing = time.monotonic() - started
    print(f"first access of the running guest -> first listing of devices/: {first_listing:.1f} s ({listing})")
    path = counter_file(writer_mount)
    first = path.read_bytes()
    mtime = writer.data_disk.stat().st_mtime_ns
    time.sleep(2)  # ~20 more lines written by the guest meanwhile
    assert writer.data_disk.stat().st_mtime_ns != mtime, "the guest stopped writing"
    assert path.read_bytes() == first, log_of(writer_mount)
    assert last_count(path) > 0
    taken = (writer_mount / "domains" / running_guest.NAME / "snapshot-time").read_text().strip()
    assert taken.startswith(time.strftime("%Y-%m-%dT", time.gmtime())) and taken.endswith("Z")
    status = run_virtmount("status", "--json", str(writer_mount))
    assert taken in status.stdout, status
    began = [line for line in log_of(writer_mount).splitlines() if "backup job began" in line]
    print(f"job start: {began}")


def test_later_writes_appear_after_a_refresh(writer_mount: Path) -> None:
    domain_dir = writer_mount / "domains" / running_guest.NAME
    before = last_count(counter_file(writer_mount))
    taken = (domain_dir / "snapshot-time").read_text()
    time.sleep(1)
    os.getxattr(domain_dir, "user.virtmount.release")
    assert not (domain_dir / "snapshot-time").exists()  # no view until the next access
    after = last_count(counter_file(writer_mount))
    assert after > before, log_of(writer_mount)
    assert (domain_dir / "snapshot-time").read_text() > taken


def test_the_disks_are_never_written(writer: running_guest.RunningGuest, writer_mount: Path) -> None:
    """The second disk is never written by the guest: its image is the same before and after a view of it."""
    domain_dir = writer_mount / "domains" / running_guest.NAME
    os.getxattr(domain_dir, "user.virtmount.release")
    before = running_guest.disk_checksum(writer.quiet_disk)
    contents = [(d / "hello.txt").read_bytes() for d in sorted((domain_dir / "devices").iterdir())
                if (d / "hello.txt").exists()]
    assert contents == [running_guest.QUIET_CONTENT]
    os.getxattr(domain_dir, "user.virtmount.release")
    after = running_guest.disk_checksum(writer.quiet_disk)
    print(f"sha256 of the guest's second disk before a view: {before}, after: {after}")
    assert before == after
    info = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(writer.data_disk)], capture_output=True,
                          text=True, check=True).stdout
    assert "bitmaps" not in info  # no checkpoint was made


def mount_with_a_view(writer: running_guest.RunningGuest, tmp_path_factory: pytest.TempPathFactory,
                      name: str) -> Path:
    """A mount of its own whose view of the writer is up (its backup job and scratch exist)."""
    mountpoint = tmp_path_factory.mktemp(name)
    mount(writer.uri, mountpoint)
    try:
        assert counter_file(mountpoint), log_of(mountpoint)
        assert running_guest.backup_job(writer.uri) is not None
        assert running_guest.scratch_volumes(writer.uri)
    except BaseException:
        unmount(mountpoint)
        raise
    return mountpoint


def test_nothing_is_left_after_unmount(writer: running_guest.RunningGuest,
                                       tmp_path_factory: pytest.TempPathFactory) -> None:
    unmount(mount_with_a_view(writer, tmp_path_factory, "virtmount-run-unmount"))
    assert running_guest.backup_job(writer.uri) is None
    assert running_guest.scratch_volumes(writer.uri) == []


def test_sigkill_leaves_no_job_behind(writer: running_guest.RunningGuest,
                                      tmp_path_factory: pytest.TempPathFactory) -> None:
    mountpoint = mount_with_a_view(writer, tmp_path_factory, "virtmount-run-kill")
    try:
        pid = int(subprocess.run(["pgrep", "-f", f"virtmount .*{mountpoint}$"], capture_output=True, text=True,
                                 check=True).stdout.split()[0])
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while running_guest.backup_job(writer.uri) is not None or running_guest.scratch_volumes(writer.uri):
            assert time.monotonic() < deadline, "the watchdog left the backup job or its scratch"
            time.sleep(0.5)
        assert "ended the backup job" in log_of(mountpoint)
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True)


def test_a_view_cut_off_with_its_tcp_link_is_ended_once_the_link_is_back(
        writer: running_guest.RunningGuest, tcp_uri: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    """The lost connection cannot end the view's backup job: once connected again, virtmount ends it, and
    the next access takes a new view (not EBUSY for its own old job)."""
    with tcp_proxy(("127.0.0.1", 16509)) as proxy:
        mountpoint = tmp_path_factory.mktemp("virtmount-run-cut")
        mount(f"qemu+tcp://127.0.0.1:{proxy.port}/system", mountpoint)
        try:
            assert counter_file(mountpoint), log_of(mountpoint)
            snapshot = mountpoint / "domains" / running_guest.NAME / "snapshot-time"
            taken = snapshot.read_text()
            proxy.cut()
            time.sleep(2)
            proxy.restore()
            deadline = time.monotonic() + 300
            while True:
                with contextlib.suppress(OSError, AssertionError):
                    if counter_file(mountpoint) and snapshot.read_text() > taken:
                        break
                assert time.monotonic() < deadline, log_of(mountpoint)
                time.sleep(0.5)
            assert f"ended a leftover backup job of virtmount's on {running_guest.NAME}" in log_of(mountpoint)
        finally:
            unmount(mountpoint)
    assert running_guest.backup_job(writer.uri) is None, log_of(mountpoint)


def test_the_next_start_ends_a_leftover_job(writer: running_guest.RunningGuest,
                                            tmp_path_factory: pytest.TempPathFactory) -> None:
    """A job of a virtmount of this host that died with its watchdog is ended when a mount starts."""
    dead = f"{backup.this_owner().rsplit('.', 1)[0]}.999999999"
    conn = libvirt.open(writer.uri)
    try:
        domain = conn.lookupByName(running_guest.NAME)
        pool = conn.storagePoolLookupByName("virtmount")
        scratch = pool.createXML(backup.scratch_volume_xml(backup.scratch_name(dead, domain.UUIDString(), "vda"),
                                                           domain.blockInfo("vda")[0]), 0)
        domain.backupBegin(backup.backup_xml("/var/lib/libvirt/virtmount/virtmount-nbd-64055-64055/test-run.sock",
                                             [backup.ExportedDisk("vda", scratch.path())]),
                           None, libvirt.VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL)
    finally:
        conn.close()
    mountpoint = tmp_path_factory.mktemp("virtmount-run-leftover")
    mount(writer.uri, mountpoint)
    try:
        assert running_guest.backup_job(writer.uri) is None
        assert running_guest.scratch_volumes(writer.uri) == []
    finally:
        unmount(mountpoint)


def test_someone_elses_job_is_refused_and_left_alone(writer: running_guest.RunningGuest,
                                                     tmp_path_factory: pytest.TempPathFactory) -> None:
    conn = libvirt.open(writer.uri)
    pool = conn.storagePoolLookupByName("virtmount")
    scratch = pool.createXML(backup.scratch_volume_xml("virtmount-test-run-other-scratch.qcow2", 64 << 20), 0)
    domain = conn.lookupByName(running_guest.NAME)
    domain.backupBegin(backup.backup_xml("/var/lib/libvirt/virtmount/virtmount-nbd-64055-64055/test-run-other.sock",
                                         [backup.ExportedDisk("vda", scratch.path())]),
                       None, libvirt.VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL)
    mountpoint = tmp_path_factory.mktemp("virtmount-run-other")
    try:
        mount(writer.uri, mountpoint)
        try:
            with pytest.raises(OSError) as raised:
                list(devices_of(mountpoint).iterdir())
            assert raised.value.errno == errno.EBUSY, log_of(mountpoint)
            status = run_virtmount("status", str(mountpoint)).stdout
            assert f"a backup job is already running on {running_guest.NAME}" in status
        finally:
            unmount(mountpoint)
        assert running_guest.backup_job(writer.uri) is not None  # theirs, untouched
    finally:
        domain.abortJob()
        deadline = time.monotonic() + 30
        while running_guest.backup_job(writer.uri) is not None:  # it ends a moment after the abort
            assert time.monotonic() < deadline
            time.sleep(0.1)
        scratch.delete(0)
        conn.close()


def test_a_point_in_time_view_over_a_remote_uri(writer: running_guest.RunningGuest, tcp_uri: str,
                                                tmp_path_factory: pytest.TempPathFactory) -> None:
    """Socket, scratch and appliance are made on the host through libvirt only: the same view over
    qemu+tcp, and nothing left after it. The mount is -o rw: a point-in-time view stays read-only."""
    mountpoint = tmp_path_factory.mktemp("virtmount-run-tcp")
    mount(tcp_uri, mountpoint, "rw")
    try:
        counter = counter_file(mountpoint)
        assert last_count(counter) > 0, log_of(mountpoint)
        for attempt in (lambda: open(counter, "ab"), lambda: open(counter.with_name("new"), "xb"),
                        lambda: os.unlink(counter)):
            with pytest.raises(OSError) as refused:
                attempt()
            assert refused.value.errno == errno.EROFS
        assert (mountpoint / "domains" / running_guest.NAME / "snapshot-time").read_text().endswith("Z\n")
        assert running_guest.backup_job(writer.uri) is not None
    finally:
        unmount(mountpoint)
    assert running_guest.backup_job(writer.uri) is None
    assert running_guest.scratch_volumes(writer.uri) == []


def test_the_guest_agent_freezes_the_filesystems_for_the_jobs_start_only(writer: running_guest.RunningGuest,
                                                                         writer_mount: Path) -> None:
    """The writer runs the real qemu-ga: the job begins between a freeze and a thaw of its /data."""
    domain_dir = writer_mount / "domains" / running_guest.NAME
    os.getxattr(domain_dir, "user.virtmount.release")
    assert counter_file(writer_mount).read_bytes().endswith(b"\n")  # a new job, frozen at its start
    frozen = [line for line in log_of(writer_mount).splitlines() if "filesystems frozen for" in line]
    print(f"job starts with the guest agent: {frozen}")
    assert frozen and "crash-consistent" not in log_of(writer_mount), log_of(writer_mount)
    running_guest.wait_until_writing(writer, 30)  # thawed: the guest writes on
    os.getxattr(domain_dir, "user.virtmount.release")  # the next tests make jobs of their own


SCRATCH_POOL = "virtmount-test-run-scratch"


@pytest.fixture
def small_scratch_pool(writer: running_guest.RunningGuest) -> Iterator[str]:
    """A dir pool on a 256 MiB tmpfs, for the scratch volumes of one mount. The writer is started again
    after the tmpfs is mounted: mounts do not propagate into a running QEMU's mount namespace here."""
    directory = volumes.POOL_PARENT / SCRATCH_POOL
    directory.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m,mode=0755", SCRATCH_POOL, str(directory)], check=True)
    try:
        volumes.start_dir_pool(writer.uri, SCRATCH_POOL)
        running_guest.stop(writer)
        running_guest.start(writer.uri)
        yield SCRATCH_POOL
    finally:
        volumes.stop_pool(writer.uri, SCRATCH_POOL)
        subprocess.run(["umount", "--lazy", str(directory)], check=False)


def test_a_scratch_pool_filling_up_ends_the_view_and_the_guest_keeps_running(
        writer: running_guest.RunningGuest, small_scratch_pool: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    mountpoint = tmp_path_factory.mktemp("virtmount-run-scratch")
    mount(writer.uri, mountpoint, f"scratch_pool={small_scratch_pool}")
    try:
        counter = counter_file(mountpoint)
        assert running_guest.scratch_volumes(writer.uri, small_scratch_pool), log_of(mountpoint)
        volumes.virsh(writer.uri, "vol-create-as", small_scratch_pool, "filler.raw", "200M", "--allocation", "200M")
        deadline = time.monotonic() + 30
        while running_guest.backup_job(writer.uri) is not None:
            assert time.monotonic() < deadline, log_of(mountpoint)
            time.sleep(0.2)
        assert "less than 128 MiB: the view is ended" in log_of(mountpoint)
        with pytest.raises(OSError) as failed:
            counter.read_bytes()
        assert failed.value.errno == errno.EIO
        # the job ends a moment before its scratch is deleted (backup.end_job): the test saw only the first
        assert wait_until(lambda: running_guest.scratch_volumes(writer.uri, small_scratch_pool) == [], 15), \
            log_of(mountpoint)
        running_guest.wait_until_writing(writer, 30)  # the guest never noticed
        volumes.virsh(writer.uri, "vol-delete", "--pool", small_scratch_pool, "filler.raw")
        os.getxattr(mountpoint / "domains" / running_guest.NAME, "user.virtmount.release")  # retry at once
        assert last_count(counter_file(mountpoint)) > 0, log_of(mountpoint)  # room again: a new view
    finally:
        unmount(mountpoint)
    assert running_guest.backup_job(writer.uri) is None
    assert running_guest.scratch_volumes(writer.uri, small_scratch_pool) == []


@pytest.fixture
def silent_agent(writer: running_guest.RunningGuest) -> Iterator[None]:
    """The writer started again with a guest agent that holds its channel open and never answers; after the
    test, started again with its real agent."""
    running_guest.stop(writer)
    running_guest.start(writer.uri, silent_agent=True)
    try:
        yield
    finally:
        running_guest.stop(writer)
        running_guest.start(writer.uri)


def test_a_hung_guest_agent_gives_a_crash_consistent_view(writer: running_guest.RunningGuest, silent_agent: None,
                                                          writer_mount: Path) -> None:
    """The agent channel shows connected, nothing answers the freeze: the view is taken anyway within the
    bounded wait, said in a log line, and the guest writes on (never left frozen or paused)."""
    started = time.monotonic()
    assert last_count(counter_file(writer_mount)) > 0, log_of(writer_mount)
    print(f"first read of a view with a hung agent: {time.monotonic() - started:.1f} s")
    unanswered = [line for line in log_of(writer_mount).splitlines() if "the view is crash-consistent" in line]
    assert unanswered, log_of(writer_mount)
    print(f"log: {unanswered[-1]}")
    assert running_guest.domain_state(writer.uri) == libvirt.VIR_DOMAIN_RUNNING
    running_guest.wait_until_writing(writer, 30)
    os.getxattr(writer_mount / "domains" / running_guest.NAME, "user.virtmount.release")


def test_a_guest_that_stops_during_a_view_is_then_read_from_its_disks(writer: running_guest.RunningGuest,
                                                                      writer_mount: Path) -> None:
    """Runs last: it stops the writer. Its view ends with it (domain event); the next access reads its disks."""
    domain_dir = writer_mount / "domains" / running_guest.NAME
    seen = last_count(counter_file(writer_mount))
    running_guest.stop(writer)
    deadline = time.monotonic() + 60
    while (domain_dir / "snapshot-time").exists():  # the view ended on the domain's stop event
        assert time.monotonic() < deadline, log_of(writer_mount)
        time.sleep(0.5)
    assert "the domain stopped" in log_of(writer_mount)
    assert last_count(counter_file(writer_mount)) >= seen, log_of(writer_mount)
    assert not (domain_dir / "snapshot-time").exists()  # served from its disks now
    assert running_guest.backup_job(writer.uri) is None and running_guest.scratch_volumes(writer.uri) == []


def test_a_domain_with_its_own_guestfs_daemon_is_read_through_its_channel(
        libvirtd: str, nos_guest: images.Guest, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Case 1: no job and no appliance; the domain's own daemon (guestfsd, in the appliance booted as a guest)."""
    running_guest.start_guestfsd_domain(libvirtd, nos_guest.image)
    mountpoint = tmp_path_factory.mktemp("virtmount-run-guestfsd")
    try:
        mount(libvirtd, mountpoint)
        try:
            devices = mountpoint / "domains" / running_guest.GUESTFSD_NAME / "devices"
            (name, content), = images.NOOS_FILES.items()
            assert [(d / name.lstrip("/")).read_bytes() for d in sorted(devices.iterdir())] == [content], \
                log_of(mountpoint)
            pid = int(subprocess.run(["pgrep", "-f", f"virtmount .*{mountpoint}$"], capture_output=True, text=True,
                                     check=True).stdout.split()[0])
            assert appliances_of(pid) == []
            assert running_guest.backup_job(libvirtd, running_guest.GUESTFSD_NAME) is None
            assert "reached its own guestfs daemon" in log_of(mountpoint)
        finally:
            unmount(mountpoint)
    finally:
        running_guest.destroy(libvirtd, running_guest.GUESTFSD_NAME)


def test_a_domain_with_its_own_guestfs_daemon_is_written_with_rw(
        libvirtd: str, nos_guest: images.Guest, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Case 1 with -o rw: a file written and fsynced through the domain's own daemon is on its disk once the
    mount ends (read from the image on the host with debugfs); the daemon's domain is never destroyed by us,
    it powers off when its channel closes."""
    image = volumes.POOL_PARENT / f"{running_guest.GUESTFSD_NAME}-rw.qcow2"
    shutil.copyfile(nos_guest.image, image)
    running_guest.start_guestfsd_domain(libvirtd, image, writable=True)
    mountpoint = tmp_path_factory.mktemp("virtmount-run-guestfsd-rw")
    content = b"written through the guest's own daemon\n"
    try:
        mount(libvirtd, mountpoint, "rw")
        try:
            device, = (mountpoint / "domains" / running_guest.GUESTFSD_NAME / "devices").iterdir()
            with open(device / "written.txt", "wb") as written:
                written.write(content)
                os.fsync(written.fileno())
            assert (device / "written.txt").read_bytes() == content
            assert "reached its own guestfs daemon" in log_of(mountpoint)
        finally:
            unmount(mountpoint)
        assert wait_until(lambda: not running_guest.exists(libvirtd, running_guest.GUESTFSD_NAME), 60) is not None
        raw = tmp_path_factory.mktemp("guestfsd-rw") / "disk.raw"
        subprocess.run(["qemu-img", "convert", "-O", "raw", str(image), str(raw)], check=True)
        on_disk = subprocess.run(["debugfs", "-R", "cat /written.txt", str(raw)], check=True,
                                 capture_output=True).stdout
        assert on_disk == content
        fsck = subprocess.run(["e2fsck", "-fn", str(raw)], capture_output=True, text=True)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    finally:
        running_guest.destroy(libvirtd, running_guest.GUESTFSD_NAME)
        image.unlink(missing_ok=True)
