"""Issue 16: faults the mount survives (real libvirtd, QEMU, appliances and FUSE mounts).

The libvirtd restart test stops the system libvirtd that every other test uses:
run it alone, under ``flock -x /tmp/virtmount-libvirtd.lock`` where others run tests
under ``flock -s`` on the same machine. Every test counts only its own mount's appliances.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Callable, Iterator

import libvirt
import pytest

from tests import images
from tests.acceptance.conftest import unmount
from tests.acceptance.helpers import mount_foreground, wait_until
from tests.acceptance.test_mount import defined_domain, own_mount
from tests.conftest import START_LIBVIRTD, TCP_CONF
from tests.tcpproxy import tcp_proxy
from virtmount.lifecycle import FAILED_BOOT_RETRY_S
from virtmount.virt.domainxml import APPLIANCE_NAME_PREFIX, appliance_owner

pytestmark = pytest.mark.acceptance

POOL_DIR = Path("/var/lib/libvirt/virtmount")  # the virtmount pool: appliance roots and their overlays
NO_HANG_S = 150.0  # generous: a call may wait for a boot (TCG, loaded host); a hang never ends


def appliance_ids(pid: int, uri: str = "qemu:///system") -> set[tuple[str, int]]:
    """(name, domain id) of the appliances the process ``pid`` runs: a restored appliance keeps its name
    across boots, its id is new each time."""
    conn = libvirt.open(uri)
    try:
        found = set()
        for domain in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
            with contextlib.suppress(libvirt.libvirtError):  # ended while we looked
                if domain.name().startswith(APPLIANCE_NAME_PREFIX) and appliance_owner(domain.XMLDesc(0)) == str(pid):
                    found.add((domain.name(), domain.ID()))
        return found
    finally:
        conn.close()


def errno_of(action: Callable[[], object]) -> int | None:
    try:
        action()
    except OSError as exc:
        return exc.errno
    return None


def listing_works(directory: Path) -> bool:
    """A listing of a guest directory: an appliance answers (the kernel never caches listings here)."""
    try:
        return len(os.listdir(directory)) > 0
    except OSError:
        return False


class Reader(threading.Thread):
    """Reads 64 KiB at random offsets of a guest file, each time past the page cache, until stopped;
    records how long each read took and how it ended ("ok", "wrong" or the errno's name)."""

    def __init__(self, path: Path, content: bytes) -> None:
        super().__init__(daemon=True)
        self.path, self.content = path, content
        self.outcomes: list[tuple[float, str]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        generator = random.Random(16)
        while not self.stop.is_set():
            started = time.monotonic()
            offset = generator.randrange(0, len(self.content))
            try:
                fd = os.open(self.path, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    data = os.pread(fd, 65536, offset)
                finally:
                    os.close(fd)
                outcome = "ok" if data == self.content[offset:offset + 65536] else "wrong"
            except OSError as exc:
                outcome = errno.errorcode.get(exc.errno or 0, str(exc.errno))
            self.outcomes.append((time.monotonic() - started, outcome))
            time.sleep(0.05)

    def finish(self) -> list[tuple[float, str]]:
        self.stop.set()
        self.join(NO_HANG_S)
        assert not self.is_alive(), "a read hung"
        return self.outcomes


@contextlib.contextmanager
def reading(path: Path, content: bytes) -> Iterator[Reader]:
    reader = Reader(path, content)
    reader.start()
    try:
        yield reader
    finally:
        reader.finish()


def assert_no_hang_and_only_eio(outcomes: list[tuple[float, str]]) -> None:
    assert outcomes, "nothing was read"
    assert max(seconds for seconds, _ in outcomes) < NO_HANG_S
    assert {outcome for _, outcome in outcomes} <= {"ok", "EIO"}, outcomes


def leftover_overlays(appliances: set[str], directories: list[Path], since: float) -> list[Path]:
    """libvirt's throw-away overlays (IMAGE.TRANSIENT-DOMAIN) of these appliances where none of them runs,
    made or relabelled since ``since`` (wall clock): a restored appliance's name is its saved appliance's,
    which other mounts use too, and an earlier run's leftover under that name is not this test's (one
    killed by hand during a libvirtd restart failed a later run here)."""
    conn = libvirt.open("qemu:///system")
    try:
        running = {domain.name() for domain in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)}
    finally:
        conn.close()
    return [path for directory in directories for name in appliances - running
            for path in directory.glob(f"*.TRANSIENT-{name}") if path.stat().st_ctime >= since]


def restart_libvirtd() -> None:
    """Stop the system libvirtd (by pid, waiting until it is gone) and start it again with the TCP listener."""
    pids = subprocess.run(["pgrep", "-x", "libvirtd"], capture_output=True, text=True).stdout.split()
    for pid in pids:
        os.kill(int(pid), signal.SIGTERM)
    gone = wait_until(lambda: not subprocess.run(["pgrep", "-x", "libvirtd"], capture_output=True).stdout, 60)
    assert gone is not None, "libvirtd did not stop"
    subprocess.run([str(START_LIBVIRTD), "--tcp", str(TCP_CONF)], check=True, timeout=300, stdin=subprocess.DEVNULL)


def test_appliance_killed_mid_read(test_guest: images.Guest, tmp_path: Path) -> None:
    """SIGKILL of the appliance's QEMU while a reader reads: reads in flight end (EIO), a new appliance
    serves the next ones."""
    started = time.time()
    with own_mount(test_guest.uri, tmp_path, "-o", "idle=600") as (mountpoint, pid):
        fs = mountpoint / "domains" / test_guest.name / "fs"
        random_file = fs / images.DATA_RANDOM_FILE.lstrip("/")
        assert random_file.read_bytes() == test_guest.files[images.DATA_RANDOM_FILE]
        before = appliance_ids(pid)
        [(name, _)] = before
        with reading(random_file, test_guest.files[images.DATA_RANDOM_FILE]) as reader:
            time.sleep(1)
            os.kill(int(Path(f"/run/libvirt/qemu/{name}.pid").read_text()), signal.SIGKILL)
            back = wait_until(lambda: listing_works(fs / "srv/data/many"), timeout=300)
            assert back is not None, "the view did not come back"
            time.sleep(1)
        outcomes = reader.finish()
        print(f"fs/ listed again {back:.1f} s after the kill; {len(outcomes)} reads: "
              f"{sorted({o for _, o in outcomes})}, the slowest {max(s for s, _ in outcomes):.1f} s")
        assert_no_hang_and_only_eio(outcomes)
        assert outcomes[-1][1] == "ok"
        after = appliance_ids(pid)
        assert len(after) == 1 and not after & before
    assert appliance_ids(pid) == set()
    assert leftover_overlays({name for name, _ in before | after}, [test_guest.image.parent, POOL_DIR],
                             started) == []


def test_libvirtd_restarted_while_mounted(test_guest: images.Guest, tmp_path: Path) -> None:
    """Views come back by themselves after libvirtd restarts; reads in flight end (EIO), none hangs;
    the appliance of the old connection is destroyed and a new one serves."""
    started = time.time()
    with own_mount(test_guest.uri, tmp_path, "-o", "idle=600") as (mountpoint, pid):
        fs = mountpoint / "domains" / test_guest.name / "fs"
        random_file = fs / images.DATA_RANDOM_FILE.lstrip("/")
        assert random_file.read_bytes() == test_guest.files[images.DATA_RANDOM_FILE]
        before = appliance_ids(pid)
        assert len(before) == 1
        with reading(random_file, test_guest.files[images.DATA_RANDOM_FILE]) as reader:
            time.sleep(1)
            stopped_at = time.monotonic()
            restart_libvirtd()
            restarted_at = time.monotonic()
            back = wait_until(lambda: listing_works(fs / "srv/data/many"), timeout=300)
            assert back is not None, "the view did not come back"
            time.sleep(1)  # a few reads on the new appliance
        outcomes = reader.finish()
        print(f"libvirtd down for {restarted_at - stopped_at:.1f} s; fs/ listed again {back:.1f} s after it was "
              f"back; {len(outcomes)} reads: {sorted({o for _, o in outcomes})}, the slowest "
              f"{max(s for s, _ in outcomes):.1f} s")
        assert_no_hang_and_only_eio(outcomes)
        assert outcomes[-1][1] == "ok"
        assert random_file.read_bytes() == test_guest.files[images.DATA_RANDOM_FILE]
        after = appliance_ids(pid)
        assert len(after) == 1 and not after & before  # the old one destroyed, a new one serves
        assert test_guest.name in os.listdir(mountpoint / "domains")
    assert appliance_ids(pid) == set()
    assert leftover_overlays({name for name, _ in before | after}, [test_guest.image.parent, POOL_DIR],
                             started) == []


def test_libvirtd_restarted_while_an_appliance_boots_leaves_no_overlay(nos_guest: images.Guest,
                                                                        tmp_path: Path) -> None:
    """libvirtd restarted while an appliance boots cold (its overlays made, not yet noted by virtmount):
    once connected again virtmount destroys it and deletes its throw-away overlays, which libvirt forgot;
    the next access boots a new appliance."""
    started = time.time()
    with own_mount(nos_guest.uri, tmp_path, "-o", "idle=600,fast_start=off") as (mountpoint, pid):
        sda = mountpoint / "domains" / nos_guest.name / "devices" / "sda"
        first_access = threading.Thread(target=lambda: errno_of(lambda: os.listdir(sda)), daemon=True)
        first_access.start()
        assert wait_until(lambda: bool(appliance_ids(pid)), 60) is not None, "no appliance started"
        [(name, _)] = appliance_ids(pid)

        def overlays_made() -> list[Path]:  # libvirt makes them as the domain starts, after it shows as active
            return [path for directory in (nos_guest.image.parent, POOL_DIR)
                    for path in directory.glob(f"*.TRANSIENT-{name}")]

        def resumed() -> bool:  # created (paused), channel opened and resumed: waiting for its daemon
            conn = libvirt.open(nos_guest.uri)
            try:
                return bool(conn.lookupByName(name).state()[0] == libvirt.VIR_DOMAIN_RUNNING)
            finally:
                conn.close()

        assert wait_until(resumed, 60) is not None, "the appliance was not resumed"
        overlays = overlays_made()
        assert len(overlays) == 2, overlays  # the guest's disk and the appliance root
        restart_libvirtd()
        first_access.join(NO_HANG_S)
        assert not first_access.is_alive(), "the first access hung"
        back = wait_until(lambda: listing_works(sda), timeout=300)
        assert back is not None, "the view did not come back"
        print(f"appliance {name} booting during the restart had {len(overlays)} overlay(s): {overlays}; "
              f"left after the restart: {[str(p) for p in overlays if p.exists()]}; devices/sda back {back:.1f} s "
              f"after libvirtd")
        assert overlays, "the appliance had no overlay yet: nothing was tested"
        assert (name, ) not in {(n, ) for n, _ in appliance_ids(pid)}
        assert [path for path in overlays if path.exists()] == []
    assert leftover_overlays({name}, [nos_guest.image.parent, POOL_DIR], started) == []


def test_tcp_connection_cut_and_restored(test_guest: images.Guest, tcp_uri: str, tmp_path: Path) -> None:
    """Through a proxy the test cuts: while cut, accesses answer EIO at once (none hangs); once it is
    restored, the mount re-opens its connection and the views come back by themselves."""
    with tcp_proxy(("127.0.0.1", 16509)) as proxy:
        uri = f"qemu+tcp://127.0.0.1:{proxy.port}/system"
        with own_mount(uri, tmp_path, "-o", "idle=600") as (mountpoint, pid):
            domain_dir = mountpoint / "domains" / test_guest.name
            random_file = domain_dir / "fs" / images.DATA_RANDOM_FILE.lstrip("/")
            assert random_file.read_bytes() == test_guest.files[images.DATA_RANDOM_FILE]
            before = appliance_ids(pid)
            assert len(before) == 1
            with reading(random_file, test_guest.files[images.DATA_RANDOM_FILE]) as reader:
                time.sleep(1)
                proxy.cut()
                time.sleep(3)
                started = time.monotonic()
                assert errno_of(lambda: os.listdir(domain_dir / "fs" / "etc")) == errno.EIO
                assert errno_of(lambda: os.listdir(mountpoint / "domains")) == errno.EIO
                assert time.monotonic() - started < 10
                proxy.restore()
                back = wait_until(lambda: listing_works(domain_dir / "fs" / "srv/data/many"), timeout=300)
                assert back is not None, "the view did not come back"
                time.sleep(1)
            outcomes = reader.finish()
            print(f"fs/ listed again {back:.1f} s after the proxy was restored; {len(outcomes)} reads: "
                  f"{sorted({o for _, o in outcomes})}, the slowest {max(s for s, _ in outcomes):.1f} s")
            assert_no_hang_and_only_eio(outcomes)
            assert outcomes[-1][1] == "ok"
            assert test_guest.name in os.listdir(mountpoint / "domains")
            assert wait_until(lambda: len(appliance_ids(pid)) == 1 and not appliance_ids(pid) & before, 60) is not None
        assert appliance_ids(pid) == set()


SILENT_LINK_EIO_S = 40.0  # libvirt's keep-alives give up after 5 s x (3 + 1) of silence (virt/connection.py)


def test_silent_link_is_noticed_by_keepalives_and_the_mount_recovers(test_guest: images.Guest, tcp_uri: str,
                                                                      tmp_path: Path) -> None:
    """A dead network path to a remote libvirtd (the proxy forwards nothing and closes nothing): libvirt's
    keep-alives notice it; the read in flight and a listing made meanwhile answer EIO within SILENT_LINK_EIO_S,
    not a hang, later accesses at once; once the path is back the mount re-opens its connection by itself
    and the appliance of the dead connection is gone (booting a new one is test_tcp_connection_cut_and_restored's)."""
    with tcp_proxy(("127.0.0.1", 16509)) as proxy:
        uri = f"qemu+tcp://127.0.0.1:{proxy.port}/system"
        mountpoint = tmp_path / "mnt"
        mountpoint.mkdir()
        log = mountpoint.with_suffix(".log")
        process = mount_foreground(uri, mountpoint, "idle=600")
        pid = process.pid
        try:
            domains = mountpoint / "domains"
            random_file = domains / test_guest.name / "fs" / images.DATA_RANDOM_FILE.lstrip("/")
            assert random_file.read_bytes() == test_guest.files[images.DATA_RANDOM_FILE]
            assert len(appliance_ids(pid)) == 1
            with reading(random_file, test_guest.files[images.DATA_RANDOM_FILE]) as reader:
                time.sleep(1)
                proxy.silence()
                silenced = time.monotonic()
                assert errno_of(lambda: os.listdir(domains)) == errno.EIO
                listing_failed = time.monotonic() - silenced
                noticed = wait_until(lambda: "lost the libvirt connection" in log.read_text(), SILENT_LINK_EIO_S)
                assert noticed is not None, log.read_text()
                noticed += listing_failed
                time.sleep(2)  # accesses while the path is still dead: EIO at once
                started = time.monotonic()
                assert errno_of(lambda: os.listdir(domains / test_guest.name / "fs" / "etc")) == errno.EIO
                assert errno_of(lambda: os.listdir(domains)) == errno.EIO
                assert time.monotonic() - started < 5
            outcomes = reader.finish()
            proxy.restore()
            back = wait_until(lambda: test_guest.name in listing(domains), timeout=120)
            assert back is not None, log.read_text()
            in_flight = max(seconds for seconds, outcome in outcomes if outcome == "EIO")
            print(f"silent link: noticed {noticed:.1f} s after it went silent (a listing made then answered EIO "
                  f"after {listing_failed:.1f} s, the slowest read {in_flight:.1f} s); domains/ listed again "
                  f"{back:.1f} s after the path came back; {len(outcomes)} reads: {sorted({o for _, o in outcomes})}")
            assert listing_failed < SILENT_LINK_EIO_S and in_flight < SILENT_LINK_EIO_S
            assert_no_hang_and_only_eio(outcomes)
            assert wait_until(lambda: appliance_ids(pid) == set(), 60) is not None  # auto-destroyed or destroyed
            assert process.poll() is None, log.read_text()  # alive (libvirt segfaulted it once)
        finally:
            unmount(mountpoint)


def listing(directory: Path) -> list[str]:
    try:
        return os.listdir(directory)
    except OSError:
        return []

def redefined_xml(conn: libvirt.virConnect, name: str, image: Path) -> str:
    """The persistent XML of domain ``name`` (same UUID) with its one disk replaced by ``image``."""
    domain_xml = ET.fromstring(conn.lookupByName(name).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    source = domain_xml.find("devices/disk/source")
    assert source is not None
    source.set("file", str(image))
    return ET.tostring(domain_xml, encoding="unicode")


def test_a_domain_whose_disk_and_definition_change_while_mounted(test_guest: images.Guest, nos_guest: images.Guest,
                                                                 tmp_path: Path) -> None:
    """The domain's disk truncated while served: no hang; removed: EIO with the mount alive, until the disk
    is back (retried after 10 s). Then defined again (same UUID) with another disk: the new disk is shown,
    not the old appliance's; then undefined: gone, and so is its appliance."""
    name = "virtmount-test-changing"
    disk = images.IMAGE_DIR / f"{name}-{os.getpid()}.qcow2"
    shutil.copyfile(nos_guest.image, disk)
    conn = libvirt.open(test_guest.uri)
    try:
        with contextlib.suppress(libvirt.libvirtError):
            conn.lookupByName(name).undefine()
        conn.defineXML(images.domain_xml(name, disk))
        with own_mount(test_guest.uri, tmp_path, "-o", "idle=600") as (mountpoint, pid):
            domain_dir = mountpoint / "domains" / name
            sda = domain_dir / "devices" / "sda"
            assert (sda / "hello.txt").read_bytes() == nos_guest.files["/hello.txt"]
            [first] = appliance_ids(pid)

            os.truncate(disk, 0)
            started = time.monotonic()
            errno_of(lambda: os.listdir(sda / "lost+found"))  # whatever the appliance still has, it answers
            assert time.monotonic() - started < NO_HANG_S
            disk.unlink()
            subprocess.run([str(Path(sys.executable).parent / "virtmount"), "release", str(mountpoint), name],
                           check=True, capture_output=True)
            assert errno_of(lambda: os.listdir(domain_dir / "devices")) == errno.EIO
            assert test_guest.name in os.listdir(mountpoint / "domains")
            shutil.copyfile(nos_guest.image, disk)
            back = wait_until(lambda: listing_works(sda), timeout=300)
            assert back is not None and first not in appliance_ids(pid)
            [second] = appliance_ids(pid)

            conn.defineXML(redefined_xml(conn, name, test_guest.image))
            assert wait_until(lambda: second not in appliance_ids(pid), timeout=60) is not None
            devices = wait_until(lambda: listing_works(domain_dir / "devices")
                                 and "vg0-data" in os.listdir(domain_dir / "devices"), timeout=300)
            assert devices is not None, os.listdir(domain_dir / "devices")
            target = domain_dir / "fs" / images.ROOT_TEST_FILE.lstrip("/")
            assert target.read_bytes() == test_guest.files[images.ROOT_TEST_FILE]

            conn.lookupByName(name).undefine()
            assert wait_until(lambda: appliance_ids(pid) == set(), timeout=60) is not None
            assert wait_until(lambda: errno_of(lambda: os.stat(domain_dir)) == errno.ENOENT, timeout=10) is not None
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            conn.lookupByName(name).undefine()
        conn.close()
        disk.unlink(missing_ok=True)


@contextlib.contextmanager
def full_pool(directory: Path, name: str, size_mib: int = 4) -> Iterator[None]:
    """A transient dir pool ``name`` on a tmpfs of ``size_mib``; with 4 MiB, no room for the appliance (its
    kernel alone is larger)."""
    directory.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m,mode=0755", "virtmount-test-full",
                    str(directory)], check=True)
    conn = libvirt.open("qemu:///system")
    try:
        pool = conn.storagePoolCreateXML(
            f"<pool type='dir'><name>{name}</name><target><path>{directory}</path></target></pool>", 0)
        try:
            yield
        finally:
            pool.destroy()
    finally:
        conn.close()
        subprocess.run(["umount", str(directory)], check=True)


def test_full_pool_is_a_clear_error_and_the_mount_keeps_working(test_guest: images.Guest, tmp_path: Path) -> None:
    """No room in the pool for the appliance: ENOSPC below the domain (again after the retry time),
    while the rest of the mount answers."""
    pool = f"virtmount-test-full-{os.getpid()}"
    with full_pool(tmp_path / "pool", pool), \
            own_mount(test_guest.uri, tmp_path, "-o", f"pool={pool}") as (mountpoint, pid):
        domain_dir = mountpoint / "domains" / test_guest.name
        assert errno_of(lambda: os.listdir(domain_dir / "fs")) == errno.ENOSPC
        assert (domain_dir / "domain.xml").read_text().startswith("<domain")
        status = subprocess.run([str(Path(sys.executable).parent / "virtmount"), "status", str(mountpoint)],
                                capture_output=True, text=True, check=True).stdout
        assert "No space left on device" in status, status
        time.sleep(11)  # past the retry time: a new attempt, the same answer
        assert errno_of(lambda: os.listdir(domain_dir / "devices")) == errno.ENOSPC
        assert appliance_ids(pid) == set()


@contextlib.contextmanager
def nearly_full_tmpfs(directory: Path, size_mib: int, image: Path) -> Iterator[Path]:
    """A copy of ``image`` on a tmpfs of ``size_mib`` at ``directory``, filled up until 64 KiB are left
    (a throw-away qcow2 overlay needs about 200 KiB); yields the copy."""
    directory.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m,mode=0755", "virtmount-test-full",
                    str(directory)], check=True)
    try:
        copy = directory / image.name
        shutil.copyfile(image, copy)
        with open(directory / "filler", "wb") as filler:
            os.posix_fallocate(filler.fileno(), 0, shutil.disk_usage(directory).free - 64 * 1024)
        yield copy
    finally:
        subprocess.run(["umount", "--lazy", str(directory)], check=True)
        directory.rmdir()


def test_no_room_for_the_overlays_beside_a_guest_image(nos_guest: images.Guest, test_guest: images.Guest,
                                                       tmp_path: Path) -> None:
    """A guest whose image lies on a full filesystem, where libvirt cannot make the appliance's throw-away
    overlay beside it: ENOSPC below that domain, again after the retry time, a log line naming the domain
    and the reason; the same mount serves another guest's files; nothing is left beside the image."""
    name = "virtmount-test-full-disk"
    directory = images.IMAGE_DIR / f"full-{os.getpid()}"
    with nearly_full_tmpfs(directory, 8, nos_guest.image) as image, \
            defined_domain(nos_guest.uri, name, image):
        mountpoint = tmp_path / "mnt"
        mountpoint.mkdir()
        log = mountpoint.with_suffix(".log")
        pid = mount_foreground(nos_guest.uri, mountpoint, "idle=600").pid
        try:
            domains = mountpoint / "domains"
            started = time.monotonic()
            assert errno_of(lambda: os.listdir(domains / name / "devices")) == errno.ENOSPC, log.read_text()
            failed_after = time.monotonic() - started
            lines = [line for line in log.read_text().splitlines()
                     if f"{name}: " in line and "No space left on device" in line]
            assert lines, log.read_text()
            assert sorted(os.listdir(directory)) == ["filler", image.name]
            assert (domains / nos_guest.name / "devices" / "sda" / "hello.txt").read_bytes() == \
                nos_guest.files["/hello.txt"]
            time.sleep(max(0.0, FAILED_BOOT_RETRY_S + 1 - (time.monotonic() - started)))
            assert errno_of(lambda: os.stat(domains / name / "devices" / "sda")) == errno.ENOSPC
            print(f"overlay beside the image: ENOSPC after {failed_after:.1f} s; the log line: {lines[0]}")
        finally:
            unmount(mountpoint)
        assert sorted(os.listdir(directory)) == ["filler", image.name]
        assert appliance_ids(pid) == set()
        assert not list(POOL_DIR.glob(f"*.TRANSIENT-{APPLIANCE_NAME_PREFIX}{name}-{pid}-*"))  # the appliance root's


def test_a_pool_without_room_for_a_saved_appliance_boots_cold(nos_guest: images.Guest, tmp_path: Path) -> None:
    """A pool with room for the appliance (~230 MB) but not for a saved one (its ~150 MB state): the first
    boot makes an appliance to save, the save fails for want of room, and the guest's appliance boots cold;
    nothing of the failed save is left in the pool."""
    pool = f"virtmount-test-small-{os.getpid()}"
    directory = images.IMAGE_DIR / pool  # QEMU (libvirt-qemu) must reach it: not below tmp_path
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    log = mountpoint.with_suffix(".log")
    with full_pool(directory, pool, size_mib=245):
        pid = mount_foreground(nos_guest.uri, mountpoint, "idle=600", f"pool={pool}").pid
        try:
            started = time.monotonic()
            hello = mountpoint / "domains" / nos_guest.name / "devices" / "sda" / "hello.txt"
            assert hello.read_bytes() == nos_guest.files["/hello.txt"], log.read_text()
            served = time.monotonic() - started
            failed_save = [line for line in log.read_text().splitlines() if "cannot save the appliance" in line]
            print(f"no room for a saved appliance: served after {served:.1f} s; {failed_save}; free in the pool: "
                  f"{shutil.disk_usage(directory).free // 2**20} MiB")
            assert failed_save and "No space left on device" in failed_save[0], log.read_text()
            assert "booting it cold" in log.read_text()
            assert not [name for name in os.listdir(directory) if "-saved-" in name], os.listdir(directory)
        finally:
            unmount(mountpoint)
        assert appliance_ids(pid) == set()
        assert not list(directory.glob("*.TRANSIENT-*"))
    directory.rmdir()
