"""-o rw against the real components: a shut-off domain of our own (a qcow2 overlay of the cached
standard image, so the shared image is never written), served by one writable mount for the module.

POSIX calls on ext4 (the root, fs/) and XFS (fs/srv/data), caches after writes, devices/ linking to
fs/, never two writers (QEMU's image locks), and durability: what was fsynced (or released) is in the
image after virtmount is SIGKILLed mid-write, and the filesystem is clean. The SIGKILL test runs last.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import stat
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest

from tests import images, volumes
from tests.acceptance.conftest import unmount
from tests.acceptance.helpers import appliances_of, run_virtmount
from tests.writing import (FileModel, RENAME_EXCHANGE, RENAME_NOREPLACE, UTIME_OMIT, ScratchGuest, guestfs_handle,
                           make_scratch_guest, make_tree, remove_scratch_guest, renameat2, run_fio, tree_manifest,
                           utimensat)

GUEST = "virtmount-test-writing"
SYNCED = b"fsynced before the kill\n" * 40_000  # ~1 MiB
# per filesystem, 10,000 in all (~4-5 ms each here)
OPERATIONS = int(os.environ.get("VIRTMOUNT_RANDOM_OPERATIONS", "5000"))
# per filesystem (~11 daemon calls and ~19-22 ms a file under TCG here)
UNTAR_FILES = int(os.environ.get("VIRTMOUNT_UNTAR_FILES", "5000"))
RELEASED = b"written, then the appliance was released\n" * 1000


@dataclass(frozen=True)
class RwMount:
    path: Path
    pid: int
    guest: ScratchGuest

    @property
    def fs(self) -> Path:
        return self.path / "domains" / GUEST / "fs"


@pytest.fixture(scope="module")
def rw(libvirtd: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RwMount]:
    guest = make_scratch_guest(libvirtd, GUEST, images.STANDARD)
    mountpoint = tmp_path_factory.mktemp("virtmount-rw")
    try:
        result = run_virtmount("-o", "rw,idle=600", libvirtd, str(mountpoint))
        assert result.returncode == 0, result.stderr
        pid = json.loads((mountpoint / ".virtmount").read_text())["pid"]
        yield RwMount(mountpoint, pid, guest)
    finally:
        if os.path.ismount(mountpoint):
            unmount(mountpoint)
        subprocess.run(["fusermount3", "-uz", str(mountpoint)], capture_output=True)
        remove_scratch_guest(guest)


def _errno_of(call: Callable[..., object], *args: object) -> int:
    try:
        call(*args)
    except OSError as exc:
        return exc.errno or 0
    return 0


@pytest.mark.parametrize("where", ["w-ext4", "srv/data/w-xfs"])
def test_posix_calls(rw: RwMount, where: str) -> None:
    top = rw.fs / where
    parent = top.parent
    mtime_before = parent.stat().st_mtime_ns
    time.sleep(0.01)
    top.mkdir(0o750)
    assert stat.S_IMODE(top.stat().st_mode) == 0o750 and top.stat().st_nlink == 2
    assert parent.stat().st_mtime_ns > mtime_before  # the parent's times follow
    f = top / "file"
    with open(f, "xb") as out:  # O_CREAT|O_EXCL
        out.write(b"hello ")
        out.flush()
        assert f.read_bytes() == b"hello "  # read back through another handle while open
        out.write(b"world")
    assert f.read_bytes() == b"hello world" and f.stat().st_size == 11
    assert _errno_of(lambda: open(f, "xb")) == errno.EEXIST
    with open(f, "ab") as out:  # O_APPEND
        out.write(b"!")
    with open(f, "r+b") as out:  # overwrite in the middle, extend past the end
        out.seek(6)
        out.write(b"W")
        out.seek(20)
        out.write(b"end")
    assert f.read_bytes() == b"hello World!" + bytes(8) + b"end"
    os.truncate(f, 5)
    assert f.read_bytes() == b"hello"
    with open(f, "wb") as out:  # O_TRUNC
        out.write(b"new")
    assert f.read_bytes() == b"new"
    big = os.urandom(3 * 1024 * 1024 + 5)
    (top / "big").write_bytes(big)
    assert (top / "big").read_bytes() == big
    # hard links: every name shows the new link count
    os.link(f, top / "link")
    assert f.stat().st_nlink == 2 and (top / "link").stat().st_ino == f.stat().st_ino
    os.unlink(top / "link")
    assert f.stat().st_nlink == 1
    os.symlink("file", top / "sym")
    assert os.readlink(top / "sym") == "file" and (top / "sym").read_bytes() == b"new"
    os.mkfifo(top / "fifo", 0o640)
    assert stat.S_ISFIFO(os.lstat(top / "fifo").st_mode) and stat.S_IMODE(os.lstat(top / "fifo").st_mode) == 0o640
    os.mknod(top / "null", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    assert os.lstat(top / "null").st_rdev == os.makedev(1, 3)
    os.chmod(f, 0o4751)
    assert stat.S_IMODE(f.stat().st_mode) == 0o4751
    os.chown(f, 1234, 5678)
    assert (f.stat().st_uid, f.stat().st_gid) == (1234, 5678)
    os.utime(f, ns=(1_500_000_000_123_456_789, 1_600_000_000_987_654_321))
    assert (f.stat().st_atime_ns, f.stat().st_mtime_ns) == (1_500_000_000_123_456_789, 1_600_000_000_987_654_321)
    utimensat(f, (0, UTIME_OMIT), (1_700_000_000, 5))  # UTIME_OMIT leaves atime alone
    assert (f.stat().st_atime_ns, f.stat().st_mtime_ns) == (1_500_000_000_123_456_789, 1_700_000_000_000_000_005)
    os.setxattr(f, "user.note", b"a\0b")
    assert os.getxattr(f, "user.note") == b"a\0b" and "user.note" in os.listxattr(f)
    os.removexattr(f, "user.note")
    assert "user.note" not in os.listxattr(f)
    assert _errno_of(os.removexattr, f, "user.note") == errno.ENODATA
    subprocess.run(["setfacl", "-m", "u:4321:rw", str(f)], check=True)
    assert "user:4321:rw-" in subprocess.run(["getfacl", "-cn", str(f)], capture_output=True, text=True).stdout
    # renames: within and across directories, over a file, over an empty directory, NOREPLACE, EXCHANGE
    (top / "sub").mkdir()
    (top / "sub" / "inner").write_bytes(b"inside")
    os.rename(f, top / "sub" / "moved")
    assert not f.exists() and (top / "sub" / "moved").read_bytes() == b"new"
    os.rename(top / "sub", top / "sub2")  # the nodes below follow their directory
    assert (top / "sub2" / "inner").read_bytes() == b"inside"
    (top / "sub2" / "inner").write_bytes(b"inside again")
    assert (top / "sub2" / "inner").read_bytes() == b"inside again"
    (top / "other").write_bytes(b"other")
    os.rename(top / "other", top / "sub2" / "inner")  # replaces a file
    assert (top / "sub2" / "inner").read_bytes() == b"other"
    (top / "empty").mkdir()
    (top / "d").mkdir()
    os.rename(top / "d", top / "empty")  # replaces an empty directory
    assert (top / "empty").is_dir() and not (top / "d").exists()
    (top / "x").write_bytes(b"x")
    assert _errno_of(renameat2, top / "x", top / "big", RENAME_NOREPLACE) == errno.EEXIST
    renameat2(top / "x", top / "y", RENAME_NOREPLACE)
    assert (top / "y").read_bytes() == b"x"
    assert _errno_of(renameat2, top / "y", top / "big", RENAME_EXCHANGE) == errno.EINVAL
    # errors
    assert _errno_of(os.mkdir, top / "empty") == errno.EEXIST
    assert _errno_of(os.rmdir, top / "sub2") == errno.ENOTEMPTY
    assert _errno_of(os.unlink, top / "sub2") == errno.EISDIR
    assert _errno_of(os.rmdir, top / "y") == errno.ENOTDIR
    assert _errno_of(os.open, top / "nothere" / "f", os.O_CREAT | os.O_WRONLY) == errno.ENOENT
    assert _errno_of(os.open, top / ("n" * 256), os.O_CREAT | os.O_WRONLY) == errno.ENAMETOOLONG
    assert _errno_of(os.rename, top / "y", rw.fs / "boot" / "y") == errno.EXDEV
    # listings follow: what was made shows, what was removed does not
    for name in ("y", "big", "fifo", "null", "sym"):
        os.unlink(top / name)
    os.rmdir(top / "empty")
    assert sorted(os.listdir(top)) == ["sub2"]
    assert statvfs_is_sane(top)


def statvfs_is_sane(path: Path) -> bool:
    """statfs answers (pyfuse3 does not say which filesystem is asked about: the mount's figures)."""
    return os.statvfs(path).f_namemax == 255


def test_devices_link_to_their_place_in_fs(rw: RwMount) -> None:
    devices = rw.path / "domains" / GUEST / "devices"
    assert os.readlink(devices / "sda1") == "../fs/boot"
    assert os.readlink(devices / "vg0-root") == "../fs"
    assert os.readlink(devices / "vg0-data") == "../fs/srv/data"
    (devices / "sda1" / "through-devices").write_bytes(b"one mount")
    assert (rw.fs / "boot" / "through-devices").read_bytes() == b"one mount"
    assert (rw.fs / "boot" / "virtmount-boot").read_bytes() == images.STANDARD.files["/boot/virtmount-boot"]


def test_a_file_removed_while_open_stays_readable_until_closed(rw: RwMount) -> None:
    path = rw.fs / "srv" / "data" / "open-then-removed"
    with open(path, "w+b") as handle:
        handle.write(b"still here")
        os.unlink(path)
        handle.write(b", and more")
        handle.seek(0)
        assert handle.read() == b"still here, and more"
        assert not path.exists()
        assert [n for n in os.listdir(path.parent) if n.startswith(".virtmount-hidden-")]  # as NFS does
    deadline = time.monotonic() + 10  # the kernel sends RELEASE after close(2) has returned
    while [n for n in os.listdir(path.parent) if n.startswith(".virtmount-hidden-")]:
        assert time.monotonic() < deadline, "the hidden file outlived its last close"
        time.sleep(0.2)


@pytest.mark.parametrize("where", ["srv/data", "boot"])
def test_random_operations_match_a_model(rw: RwMount, where: str) -> None:
    """An fsx-like run: random writes, reads, truncates, renames, links and removals through open
    descriptors and names, every read and stat compared with an in-memory model."""
    directory = rw.fs / where / "random"
    directory.mkdir()
    model = FileModel(directory, seed=14)
    started = time.monotonic()
    try:
        while len(model.log) < OPERATIONS:
            model.step()
    finally:
        model.close()
    print(f"{len(model.log)} random operations in {where}: {time.monotonic() - started:.1f} s")


def _release(rw: RwMount) -> float:
    """Sync and shut the guest's appliance down, so that what is read next comes from its disk through a
    fresh appliance (the kernel forgets what it cached); the seconds it took."""
    started = time.monotonic()
    os.getxattr(rw.path / "domains" / GUEST, "user.virtmount.release")
    return time.monotonic() - started


@pytest.mark.parametrize("where", ["fio-ext4", "srv/data/fio-xfs"])
def test_fio_verifies_every_block(rw: RwMount, where: str) -> None:
    """fio writes 32 MiB in random blocks with a crc32c in each and reads them back; again from a fresh
    appliance after a release; and a byte changed behind fio's back fails its verify (the check can fail)."""
    directory = rw.fs / where
    directory.mkdir()
    written = run_fio(directory)
    assert (written.returncode, written.error) == (0, 0), written.stderr[-2000:]
    assert written.written == written.read == 32 * 1024 * 1024
    print(f"fio in {where}: randwrite {written.write_bandwidth / 1e6:.1f} MB/s, verify read "
          f"{written.read_bandwidth / 1e6:.1f} MB/s, verify: no error")
    release = _release(rw)
    again = run_fio(directory, verify_only=True)
    assert (again.returncode, again.error) == (0, 0), again.stderr[-2000:]
    assert again.read == 32 * 1024 * 1024
    print(f"fio in {where} after a release ({release:.1f} s): verify read {again.read_bandwidth / 1e6:.1f} MB/s, "
          f"no error")
    for victim in (directory / "crc32c.0.0", directory / "crc32c.1.0"):  # one bit in each job's file
        with open(victim, "r+b") as file:
            byte = os.pread(file.fileno(), 1, 12345)
            os.pwrite(file.fileno(), bytes([byte[0] ^ 0x01]), 12345)
    corrupted = run_fio(directory, verify_only=True)
    assert corrupted.returncode != 0 and corrupted.error == errno.EILSEQ, corrupted
    assert f"verify failed at file {directory / 'crc32c.0.0'}" in corrupted.stderr, corrupted.stderr[-2000:]
    for name in os.listdir(directory):
        os.unlink(directory / name)
    directory.rmdir()


@pytest.fixture(scope="module")
def tree_archive(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, tuple[object, ...]]]:
    """A tar (POSIX format: nanosecond mtimes) of a UNTAR_FILES-file tree, and the tree's manifest."""
    top = tmp_path_factory.mktemp("untar")
    make_tree(top / "tree", UNTAR_FILES)
    archive = top / "tree.tar"
    subprocess.run(["tar", "--format=posix", "-C", str(top), "-cf", str(archive), "tree"], check=True)
    return archive, tree_manifest(top / "tree")


def test_untars_into_ext4_and_xfs_read_back_identical(
        rw: RwMount, tree_archive: tuple[Path, dict[str, tuple[object, ...]]]) -> None:
    """A 5,000-file tree (UNTAR_FILES) untarred into the ext4 root and into the XFS srv/data, both at once,
    is, read back from the disks through a fresh appliance (one release for both), the same tree in both:
    names, types, modes, owners, nanosecond mtimes, link counts, contents, link targets. (Both at once, and
    read back both at once: under TCG here two 1,000-file untars took 32 s together against 72 s one after
    the other.)"""
    archive, expected = tree_archive
    took = []
    started = time.monotonic()
    destinations = (rw.fs / "untar-ext4", rw.fs / "srv/data/untar-xfs")
    untars = []
    try:
        for destination in destinations:
            destination.mkdir()
            untars.append(subprocess.Popen(["tar", "-C", str(destination), "-xf", str(archive)]))
        for destination, untar in zip(destinations, untars):
            assert untar.wait(timeout=1800) == 0, destination
            took.append(f"{destination.name} {time.monotonic() - started:.1f} s")
    finally:
        for untar in untars:
            untar.kill()
    release = _release(rw)
    started = time.monotonic()
    os.listdir(rw.fs)  # boots the fresh appliance
    boot = time.monotonic() - started
    started = time.monotonic()
    with ThreadPoolExecutor(len(destinations)) as readers:  # both at once too
        manifests = list(readers.map(lambda destination: tree_manifest(destination / "tree"), destinations))
    for destination, found in zip(destinations, manifests):
        assert found == expected, (destination, sorted(set(found.items()) ^ set(expected.items()))[:10])
    took.append(f"both read back and compared in {time.monotonic() - started:.1f} s")
    print(f"untars of {UNTAR_FILES} files ({len(expected)} entries): {', '.join(took[:2])}; release {release:.1f} s, "
          f"fresh appliance {boot:.1f} s; {', '.join(took[2:])}")


def test_sequential_write(rw: RwMount) -> None:
    """32 MiB written and fsynced in one go reads back identical; the throughput is printed."""
    data = os.urandom(32 * 1024 * 1024)
    started = time.monotonic()
    with open(rw.fs / "sequential", "wb") as out:
        out.write(data)
        os.fsync(out.fileno())
    write = time.monotonic() - started
    assert (rw.fs / "sequential").read_bytes() == data
    print(f"32 MiB written and fsynced: {write:.1f} s ({len(data) / write / 1e6:.1f} MB/s)")


def test_a_full_filesystem_answers_enospc_and_the_mount_goes_on(rw: RwMount) -> None:
    filler = rw.fs / "boot" / "filler"  # /boot: a 200 MiB ext4
    chunk = bytes(4 * 1024 * 1024)
    with pytest.raises(OSError) as full:
        with open(filler, "wb") as out:
            for _ in range(100):
                out.write(chunk)
                out.flush()
    assert full.value.errno == errno.ENOSPC
    os.unlink(filler)
    (rw.fs / "boot" / "after-enospc").write_bytes(b"room again")
    assert (rw.fs / "boot" / "after-enospc").read_bytes() == b"room again"


def test_an_appliance_that_dies_fails_its_open_files_and_the_next_access_boots_another(rw: RwMount) -> None:
    path = rw.fs / "srv" / "data" / "during-a-crash"
    with open(path, "wb", buffering=0) as out:
        out.write(b"before")
        os.fsync(out.fileno())
        [appliance] = appliances_of(rw.pid)
        subprocess.run(["virsh", "-q", "-c", rw.guest.uri, "destroy", appliance], check=True, capture_output=True)
        with pytest.raises(OSError) as failed:
            out.write(b"during")
        assert failed.value.errno == errno.EIO
        with pytest.raises(OSError) as still_failing:  # this file was opened in the appliance that died
            out.write(b"after")
        assert still_failing.value.errno == errno.EIO
    assert path.read_bytes() == b"before"  # a fresh appliance, the fsynced bytes there
    path.write_bytes(b"written again")
    assert path.read_bytes() == b"written again"


def test_a_volume_is_written_too(rw: RwMount, libvirtd: str) -> None:
    pool, name = "virtmount-test-vol-writing", "noos-overlay.qcow2"
    base = images.build(images.NOOS)
    base_mtime = base.stat().st_mtime_ns
    volumes.start_dir_pool(libvirtd, pool)
    try:
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base),
                        str(volumes.POOL_PARENT / pool / name)], check=True)
        volumes.virsh(libvirtd, "pool-refresh", pool)
        device = rw.path / "volumes" / pool / name / "devices" / "sda"
        assert (device / "hello.txt").read_bytes() == images.NOOS.files["/hello.txt"]
        (device / "new.txt").write_bytes(b"written to a volume")
        assert sorted(os.listdir(device)) == ["hello.txt", "lost+found", "new.txt"]
        assert (device / "new.txt").read_bytes() == b"written to a volume"
        os.getxattr(rw.path / "volumes" / pool / name, "user.virtmount.release")  # syncs, shuts down
        assert (device / "new.txt").read_bytes() == b"written to a volume"  # a fresh appliance reads it
    finally:
        with contextlib.suppress(OSError):
            os.getxattr(rw.path / "volumes" / pool / name, "user.virtmount.release")
        volumes.virsh(libvirtd, "vol-delete", "--pool", pool, name, check=False)
        volumes.stop_pool(libvirtd, pool)
    assert base.stat().st_mtime_ns == base_mtime  # the shared cached image behind the overlay is untouched


def _lock_refusal(command: list[str]) -> str:
    """What the command said when it failed (with libguestfs's debug output, where QEMU's error is)."""
    env = {**os.environ, "LIBGUESTFS_BACKEND": "direct", "LIBGUESTFS_BACKEND_SETTINGS": "force_tcg",
           "LIBGUESTFS_DEBUG": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode != 0, result
    return result.stderr


def test_never_two_writers(rw: RwMount, libvirtd: str, tmp_path: Path) -> None:
    assert (rw.fs / "etc" / "virtmount-test").read_bytes()  # the appliance holds the disk for writing
    started = _lock_refusal(["virsh", "-c", libvirtd, "start", GUEST])
    assert "lock" in started, started
    guestfish = _lock_refusal(["guestfish", "--rw", "-a", str(rw.guest.disk), "run"])
    assert 'Failed to get "write" lock' in guestfish, guestfish[-2000:]
    second = tmp_path / "second"
    second.mkdir()
    result = run_virtmount("-o", "rw,fast_start=off", libvirtd, str(second))
    assert result.returncode == 0, result.stderr
    try:
        assert _errno_of(os.listdir, second / "domains" / GUEST / "fs") == errno.EBUSY  # the image is locked
    finally:
        unmount(second)
    assert (rw.fs / "etc" / "virtmount-test").read_bytes()  # the first writer carries on


def test_what_was_fsynced_or_released_survives_a_sigkill(rw: RwMount) -> None:
    released = rw.fs / "released"
    released.write_bytes(RELEASED)  # no fsync: releasing the appliance syncs
    os.getxattr(rw.path / "domains" / GUEST, "user.virtmount.release")
    synced = rw.fs / "synced"
    with open(synced, "wb") as out:
        out.write(SYNCED)
        started = time.monotonic()
        os.fsync(out.fileno())
        fsync_seconds = time.monotonic() - started
    print(f"fsync of {len(SYNCED)} bytes: {fsync_seconds:.2f} s")
    stop = threading.Event()

    def write_on() -> None:
        try:
            with open(rw.fs / "unsynced", "wb") as out:
                while not stop.is_set():
                    out.write(os.urandom(128 * 1024))
        except OSError:
            pass  # the mount died under it

    writer = threading.Thread(target=write_on)
    writer.start()
    time.sleep(2)
    os.kill(rw.pid, signal.SIGKILL)
    stop.set()
    writer.join(30)
    killed = time.monotonic()
    deadline = killed + 60
    while appliances_of(rw.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not appliances_of(rw.pid), "the killed mount's appliance is still running"
    print(f"appliance gone {time.monotonic() - killed:.1f} s after the SIGKILL")
    handle = guestfs_handle(rw.guest.disk, readonly=True)  # writes of its own go to a throw-away overlay
    try:
        handle.launch()
        handle.mount("/dev/vg0/root", "/")  # replays the journal, as the guest would
        assert handle.read_file("/synced") == SYNCED
        assert handle.read_file("/released") == RELEASED
        assert handle.read_file("/etc/virtmount-test") == images.STANDARD.files["/etc/virtmount-test"]
        handle.umount_all()
        assert handle.fsck("ext4", "/dev/vg0/root") == 0  # nothing to correct
        assert handle.fsck("ext4", "/dev/sda1") == 0
    finally:
        handle.close()
