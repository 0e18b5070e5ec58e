"""Issue 3: mount a libvirt connection read-only (real libvirtd, QEMU, appliance and FUSE)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import libvirt
import pytest

from tests import images
from tests.acceptance.conftest import unmount
from tests.acceptance.helpers import (appliances_of, appliances_serving, assert_one_line_error, run_virtmount,
                                     wait_until)
from virtmount.virt.domainxml import APPLIANCE_NAME_PREFIX

pytestmark = pytest.mark.acceptance


def _mount_pid(mountpoint: Path) -> int:
    found = subprocess.run(["pgrep", "-f", f"virtmount .*{mountpoint}$"], capture_output=True, text=True)
    pids = [int(p) for p in found.stdout.split()]
    assert len(pids) == 1, found
    return pids[0]


def _appliances_of(pid: int, uri: str = "qemu:///system") -> list[str]:
    return appliances_of(pid, uri)


@contextlib.contextmanager
def own_mount(uri: str, tmp_path: Path, *options: str) -> Iterator[tuple[Path, int]]:
    """A mount of its own for tests that watch appliances come and go; yields (mountpoint, pid)."""
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    result = run_virtmount(*options, uri, str(mountpoint))
    assert result.returncode == 0, result.stderr
    try:
        yield mountpoint, _mount_pid(mountpoint)
    finally:
        if os.path.ismount(mountpoint):
            unmount(mountpoint)


@contextlib.contextmanager
def defined_domain(uri: str, name: str, image: Path) -> Iterator[None]:
    conn = libvirt.open(uri)
    try:
        with contextlib.suppress(libvirt.libvirtError):
            conn.lookupByName(name).undefine()
        conn.defineXML(images.domain_xml(name, image))
        yield
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            conn.lookupByName(name).undefine()
        conn.close()


def _errno_of(action: object) -> int | None:
    try:
        action()  # type: ignore[operator]
    except OSError as exc:
        return exc.errno
    return None


# --- the tree ------------------------------------------------------------------------


def test_tree_of_a_domain(mounted: Path, test_guest: images.Guest) -> None:
    domain_dir = mounted / "domains" / test_guest.name
    assert test_guest.name in os.listdir(mounted / "domains")
    assert sorted(os.listdir(domain_dir)) == ["devices", "domain.xml", "fs"]
    conn = libvirt.open(test_guest.uri)
    try:
        expected_xml = conn.lookupByName(test_guest.name).XMLDesc(0)
    finally:
        conn.close()
    assert (domain_dir / "domain.xml").read_text() == expected_xml
    assert not any(name.startswith("virtmount-appliance-") for name in os.listdir(mounted / "domains"))


def test_guest_files_through_fs_and_devices(mounted: Path, test_guest: images.Guest) -> None:
    fs = mounted / "domains" / test_guest.name / "fs"
    for path, content in test_guest.files.items():
        assert (fs / path.lstrip("/")).read_bytes() == content, path
    devices = mounted / "domains" / test_guest.name / "devices"
    assert sorted(os.listdir(devices)) == ["sda1", "vg0-data", "vg0-root"]
    assert (devices / "vg0-data" / "hello.txt").read_bytes() == test_guest.files[images.DATA_TEST_FILE]
    boot_name = images.BOOT_TEST_FILE.removeprefix("/boot/")
    assert (devices / "sda1" / boot_name).read_bytes() == test_guest.files[images.BOOT_TEST_FILE]


def test_guest_without_os_has_devices_and_no_fs(mounted: Path, nos_guest: images.Guest) -> None:
    domain_dir = mounted / "domains" / nos_guest.name
    assert (domain_dir / "devices" / "sda" / "hello.txt").read_bytes() == nos_guest.files["/hello.txt"]
    assert _errno_of(lambda: os.stat(domain_dir / "fs")) == errno.ENOENT
    assert sorted(os.listdir(domain_dir)) == ["devices", "domain.xml"]


def test_everything_that_would_write_fails_with_erofs(mounted: Path, test_guest: images.Guest) -> None:
    fs = mounted / "domains" / test_guest.name / "fs"
    existing = fs / images.ROOT_TEST_FILE.lstrip("/")
    assert existing.exists()
    attempts = {
        "open for writing": lambda: open(existing, "r+b"),
        "create": lambda: open(fs / "etc" / "new-file", "xb"),
        "truncate": lambda: os.truncate(existing, 0),
        "mkdir": lambda: os.mkdir(fs / "new-dir"),
        "unlink": lambda: os.unlink(existing),
        "rename": lambda: os.rename(existing, fs / "etc" / "moved"),
        "chmod": lambda: os.chmod(existing, 0o600),
        "chown": lambda: os.chown(existing, 1, 1),
        "utime": lambda: os.utime(existing, (0, 0)),
        "symlink": lambda: os.symlink("x", fs / "etc" / "new-link"),
        "hard link": lambda: os.link(existing, fs / "etc" / "new-hard-link"),
        "setxattr": lambda: os.setxattr(existing, "user.x", b"1"),
        "removexattr": lambda: os.removexattr(existing, "user.x"),
        "mkdir in the virtual tree": lambda: os.mkdir(mounted / "domains" / "new"),
    }
    results = {what: _errno_of(action) for what, action in attempts.items()}
    assert results == {what: errno.EROFS for what in attempts}
    assert existing.read_bytes() == test_guest.files[images.ROOT_TEST_FILE]


def test_domains_appear_and_disappear_while_mounted(mounted: Path, nos_guest: images.Guest) -> None:
    name = "virtmount-test-appearing"
    domains = mounted / "domains"
    with defined_domain(nos_guest.uri, name, nos_guest.image):
        assert wait_until(lambda: name in os.listdir(domains), 10) is not None
        assert (domains / name / "domain.xml").read_text().count(f"<name>{name}</name>") == 1
    assert wait_until(lambda: name not in os.listdir(domains), 10) is not None
    # the kernel may keep the entry for its cache time (1 s for the virtual tree)
    assert wait_until(lambda: _errno_of(lambda: os.stat(domains / name)) == errno.ENOENT, 3) is not None


def test_broken_guest_gives_eio_and_the_rest_keeps_working(mounted: Path, test_guest: images.Guest) -> None:
    name = "virtmount-test-broken"
    with defined_domain(test_guest.uri, name, images.IMAGE_DIR / "no-such-image.qcow2"):
        domain_dir = mounted / "domains" / name
        assert wait_until(lambda: domain_dir.exists(), 10) is not None
        assert (domain_dir / "domain.xml").exists()
        assert _errno_of(lambda: os.listdir(domain_dir / "fs")) == errno.EIO
        assert _errno_of(lambda: os.listdir(domain_dir / "devices")) == errno.EIO
        fs = mounted / "domains" / test_guest.name / "fs"
        assert (fs / images.ROOT_TEST_FILE.lstrip("/")).read_bytes() == test_guest.files[images.ROOT_TEST_FILE]
    assert os.path.ismount(mounted)


# --- inode numbers -----------------------------------------------------------------------


def _inode_map(fs: Path, paths: list[str]) -> dict[str, tuple[int, int]]:
    return {path: (os.lstat(fs / path.lstrip("/")).st_ino, os.lstat(fs / path.lstrip("/")).st_nlink) for path in paths}


def test_inode_numbers_are_stable_across_remounts_and_distinct_across_filesystems(
    mounted: Path, test_guest: images.Guest, tmp_path: Path
) -> None:
    paths = ["/", "/boot", "/srv/data", "/etc", *sorted(test_guest.files)]
    fs = mounted / "domains" / test_guest.name / "fs"
    first = _inode_map(fs, paths)
    # the roots of /, /boot and /srv/data are on three filesystems: distinct numbers
    assert len({first["/"][0], first["/boot"][0], first["/srv/data"][0]}) == 3
    # the same guest file has one number per view, and views do not collide
    devices = mounted / "domains" / test_guest.name / "devices"
    data_name = images.DATA_TEST_FILE.removeprefix("/srv/data/")
    assert os.lstat(devices / "vg0-data" / data_name).st_ino != first[images.DATA_TEST_FILE][0]
    with own_mount(test_guest.uri, tmp_path) as (other, _pid):
        second = _inode_map(other / "domains" / test_guest.name / "fs", paths[1:])
    assert second == {path: first[path] for path in paths[1:]}


def test_fast_start_shows_what_a_cold_boot_shows_and_ends_with_its_mount(
    test_guest: images.Guest, tmp_path: Path
) -> None:
    """Settings of its own (memory=1000) give this test a saved appliance no other test holds: the
    first boot saves it (unless the host has it from an earlier run) and restores it, the boot after
    an idle shutdown restores it again, and a cold boot shows the same names and inode numbers."""
    settings = f"memory=1000,inspection_cache={tmp_path / 'layouts'}"
    paths = ["/boot", "/srv/data", "/etc", *sorted(test_guest.files)]  # the view root's number is the tree's
    saved_prefix = APPLIANCE_NAME_PREFIX + "saved-"
    views = ["sda1", "vg0-data", "vg0-root"]
    (tmp_path / "fast").mkdir()
    with own_mount(test_guest.uri, tmp_path / "fast", "-o", f"{settings},idle=3") as (mountpoint, pid):
        domain_dir = mountpoint / "domains" / test_guest.name
        fast = _inode_map(domain_dir / "fs", paths)
        for path, content in test_guest.files.items():
            assert (domain_dir / "fs" / path.lstrip("/")).read_bytes() == content, path
        [restored] = _appliances_of(pid)
        assert restored.startswith(saved_prefix)
        assert sorted(os.listdir(domain_dir / "devices")) == views
        assert wait_until(lambda: _appliances_of(pid) == [], 30) is not None
        target = domain_dir / "fs" / images.BOOT_TEST_FILE.lstrip("/")
        assert target.read_bytes() == test_guest.files[images.BOOT_TEST_FILE]
        assert _appliances_of(pid) == [restored]
    (tmp_path / "cold").mkdir()
    with own_mount(test_guest.uri, tmp_path / "cold", "-o", f"{settings},fast_start=off") as (mountpoint, pid):
        domain_dir = mountpoint / "domains" / test_guest.name
        assert _inode_map(domain_dir / "fs", paths) == fast
        [cold] = _appliances_of(pid)
        assert not cold.startswith(saved_prefix)
        assert sorted(os.listdir(domain_dir / "devices")) == views
    # a restored appliance cannot be auto-destroyed: it must end when its channel closes
    (tmp_path / "killed").mkdir()
    with own_mount(test_guest.uri, tmp_path / "killed", "-o", settings) as (mountpoint, pid):
        os.listdir(mountpoint / "domains" / test_guest.name / "fs")
        assert _appliances_of(pid) == [restored]
        os.kill(pid, signal.SIGKILL)
        assert wait_until(lambda: _appliances_of(pid) == [], 60) is not None
        subprocess.run(["fusermount3", "-u", str(mountpoint)], check=True)


# --- appliance life cycle ---------------------------------------------------------------


def test_listing_domains_boots_nothing(libvirtd: str, test_guest: images.Guest, tmp_path: Path) -> None:
    with own_mount(libvirtd, tmp_path) as (mountpoint, pid):
        domain_dir = mountpoint / "domains" / test_guest.name
        assert test_guest.name in os.listdir(mountpoint / "domains")
        assert "fs" in os.listdir(domain_dir)
        os.stat(domain_dir / "domain.xml")
        (domain_dir / "domain.xml").read_bytes()
        time.sleep(1)
        assert _appliances_of(pid) == []
        # the first access below fs/ boots one appliance, shared by fs/ and devices/
        os.listdir(domain_dir / "fs")
        os.listdir(domain_dir / "devices")
        assert len(_appliances_of(pid)) == 1


def test_idle_appliance_boots_again_from_the_remembered_layout_while_it_holds(
    test_guest: images.Guest, tmp_path: Path
) -> None:
    """Three boots in one mount: the first inspects and remembers, the second mounts what was
    remembered (a doctored memory shows that no inspection ran), the third finds the memory no longer
    matches the guest's /etc/fstab and inspects again. Each boot's fs/ is looked up afresh: what the
    kernel cached of the last appliance's files is dropped when it shuts down."""
    layouts = tmp_path / "layouts"
    with own_mount(test_guest.uri, tmp_path, "-o", f"idle=3,inspection_cache={layouts}") as (mountpoint, pid):
        fs = mountpoint / "domains" / test_guest.name / "fs"
        root_file, boot_file = fs / images.ROOT_TEST_FILE.lstrip("/"), fs / images.BOOT_TEST_FILE.lstrip("/")
        assert root_file.read_bytes() == test_guest.files[images.ROOT_TEST_FILE]
        boot_fs_root = os.stat(fs / "boot").st_ino
        assert len(_appliances_of(pid)) == 1
        [remembered_file] = layouts.iterdir()
        remembered = json.loads(remembered_file.read_text())
        assert test_guest.spec.inspection is not None
        # in the guest's own disk order (/dev/sda1), whether the appliance was restored or not
        assert remembered["mountpoints"] == dict(test_guest.spec.inspection.mountpoints)

        def next_boot_remembers(doctored: dict[str, Any]) -> None:
            assert wait_until(lambda: _appliances_of(pid) == [], 30) is not None
            remembered_file.write_text(json.dumps(doctored))
            # boots it again; not by listing fs/, which would refresh the kernel's entries there anyway
            assert root_file.name in os.listdir(root_file.parent)
            assert _appliances_of(pid) != []

        without_boot = {**remembered, "mountpoints": {m: d for m, d in remembered["mountpoints"].items() if m != "/boot"}}
        next_boot_remembers(without_boot)
        assert not boot_file.exists()  # /boot of the root filesystem, as the doctored memory says
        assert os.stat(fs / "boot").st_ino != boot_fs_root

        fstab_edited = {**without_boot, "fstab": {**remembered["fstab"], "ctime_ns": remembered["fstab"]["ctime_ns"] + 1}}
        next_boot_remembers(fstab_edited)
        assert boot_file.read_bytes() == test_guest.files[images.BOOT_TEST_FILE]
        assert os.stat(fs / "boot").st_ino == boot_fs_root
        assert json.loads(remembered_file.read_text()) == remembered


def test_release_shuts_one_domain_down_now(mounted: Path, test_guest: images.Guest) -> None:
    fs = mounted / "domains" / test_guest.name / "fs"
    os.listdir(fs)
    pid = _mount_pid(mounted)
    assert appliances_serving(test_guest.name, pid) != []
    result = run_virtmount("release", str(mounted), test_guest.name)
    assert result.returncode == 0, result.stderr
    assert appliances_serving(test_guest.name, pid) == []
    # ... and the next access boots it again
    assert (fs / images.ROOT_TEST_FILE.lstrip("/")).read_bytes() == test_guest.files[images.ROOT_TEST_FILE]


def test_a_file_below_devices_reads_again_after_its_appliance_ended(mounted: Path, test_guest: images.Guest) -> None:
    """A file below devices/ that was open when its appliance ended reads from the next appliance, which
    mounts the devices for it. (The soak run found reads below devices/ answering EIO, "you must call mount
    first", after an appliance died: the next one mounted the devices only when a device's root was looked up.)"""
    device = mounted / "domains" / test_guest.name / "devices" / "sda1"
    target = device / images.BOOT_TEST_FILE.removeprefix("/boot/")
    expected = test_guest.files[images.BOOT_TEST_FILE]
    assert target.read_bytes() == expected
    pid = _mount_pid(mounted)
    fd = os.open(target, os.O_RDONLY)  # opened, not read: its reads go to the appliance
    try:
        result = run_virtmount("release", str(mounted), test_guest.name)
        assert result.returncode == 0, result.stderr
        assert appliances_serving(test_guest.name, pid) == []
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # not from the kernel's page cache either
        assert os.pread(fd, len(expected) + 1, 0) == expected
    finally:
        os.close(fd)
    assert target.name in os.listdir(device)


def test_release_of_an_unknown_domain_is_an_error(mounted: Path) -> None:
    assert_one_line_error(run_virtmount("release", str(mounted), "no-such-domain"), "cannot release no-such-domain")


def test_sigterm_syncs_destroys_and_unmounts(test_guest: images.Guest, tmp_path: Path) -> None:
    with own_mount(test_guest.uri, tmp_path) as (mountpoint, pid):
        os.listdir(mountpoint / "domains" / test_guest.name / "fs")
        assert len(_appliances_of(pid)) == 1
        os.kill(pid, signal.SIGTERM)
        assert wait_until(lambda: not os.path.exists(f"/proc/{pid}"), 120) is not None
        assert not os.path.ismount(mountpoint)
        assert _appliances_of(pid) == []


def test_sigkill_leaves_no_appliance_running(test_guest: images.Guest, tmp_path: Path) -> None:
    with own_mount(test_guest.uri, tmp_path) as (mountpoint, pid):
        os.listdir(mountpoint / "domains" / test_guest.name / "fs")
        assert len(_appliances_of(pid)) == 1
        os.kill(pid, signal.SIGKILL)
        assert wait_until(lambda: _appliances_of(pid) == [], 60) is not None
        subprocess.run(["fusermount3", "-u", str(mountpoint)], check=True)


# --- bad input ------------------------------------------------------------------------------


def test_bad_mountpoints_and_options(mounted: Path, libvirtd: str, tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        ((libvirtd, str(tmp_path / "missing")), "does not exist"),
        ((libvirtd, str(a_file)), "is not a directory"),
        ((libvirtd, str(mounted)), "is busy"),
        (("-o", "nonsense", libvirtd, str(empty)), "unknown option 'nonsense'"),
        (("-o", "idle=-1", libvirtd, str(empty)), "idle must be greater than 0"),
        (("not-a-uri", str(empty)), "is not a libvirt URI"),
        (("qemu+tcp://127.0.0.1:1/system", str(empty)), "cannot connect to"),
    ]
    for args, message in cases:
        assert_one_line_error(run_virtmount(*args), message)
    assert not os.path.ismount(empty)
