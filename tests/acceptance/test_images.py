"""Sanity checks of the test fixtures themselves, independent of virtmount:
the domains are defined and shut off, and libguestfs (read-only, direct
backend) reads back exactly what tests/images.py promises."""

from __future__ import annotations

import stat
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Iterator

import libvirt
import pytest

from tests import images

pytestmark = pytest.mark.acceptance


def _check_domain(uri: str, guest: images.Guest) -> None:
    conn = libvirt.open(uri)
    try:
        dom = conn.lookupByName(guest.name)
        assert dom.isPersistent()
        assert dom.state()[0] == libvirt.VIR_DOMAIN_SHUTOFF
        root = ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
        assert root.get("type") == "qemu"
        disks = root.findall("./devices/disk")
        assert len(disks) == 1
        assert disks[0].find("source").get("file") == str(guest.image)  # type: ignore[union-attr]
        assert disks[0].find("driver").get("type") == "qcow2"  # type: ignore[union-attr]
        assert disks[0].find("target").get("dev") == "vda"  # type: ignore[union-attr]
    finally:
        conn.close()


def test_domains_defined_and_shut_off(
    test_guest: images.Guest, nos_guest: images.Guest
) -> None:
    for guest in (test_guest, nos_guest):
        assert guest.image.is_file()
        _check_domain(guest.uri, guest)


def test_tcp_uri_sees_the_domain(tcp_uri: str, test_guest: images.Guest) -> None:
    _check_domain(tcp_uri, test_guest)


def _read(g: Any, path: str) -> bytes:
    """Whole file via pread: ~2 ms a call here, while read_file/cat (which
    use the FileOut download path) take ~300 ms even for tiny files."""
    data = b""
    while chunk := g.pread(path, 1024 * 1024, len(data)):
        data += chunk
    return data


def _open_readonly(image: Path) -> Any:  # a guestfs.GuestFS
    g = images.new_handle()
    g.add_drive_opts(str(image), format="qcow2", readonly=True)
    g.launch()
    return g


@pytest.fixture(scope="module")
def standard_fs(test_guest: images.Guest) -> Iterator:
    """The standard image opened read-only, inspected, mounted as the guest would."""
    g = _open_readonly(test_guest.image)
    try:
        roots = g.inspect_os()
        # Mount parents first (sorted by mountpoint length).
        mps = g.inspect_get_mountpoints(roots[0]) if roots else {}
        for mp, dev in sorted(mps.items(), key=lambda kv: len(kv[0])):
            g.mount_ro(dev, mp)
        yield g, roots
    finally:
        g.close()


def test_standard_inspection(standard_fs, test_guest: images.Guest) -> None:
    g, roots = standard_fs
    want = test_guest.inspection
    assert want is not None
    assert roots == [want.root]
    r = roots[0]
    assert g.inspect_get_type(r) == want.os_type == images.EXPECTED_OS_TYPE == "linux"
    assert g.inspect_get_distro(r) == want.distro == "debian"
    assert g.inspect_get_major_version(r) == want.major == 12
    assert g.inspect_get_minor_version(r) == want.minor
    assert g.inspect_get_product_name(r) == want.product_name
    assert g.inspect_get_hostname(r) == want.hostname
    assert dict(g.inspect_get_mountpoints(r)) == dict(want.mountpoints)
    assert dict(want.mountpoints) == images.EXPECTED_MOUNTPOINTS


def test_standard_filesystems(standard_fs, test_guest: images.Guest) -> None:
    g, _ = standard_fs
    for fs in test_guest.spec.filesystems:
        assert g.vfs_type(fs.device) == fs.fstype
        assert g.vfs_label(fs.device) == fs.label
        assert g.vfs_uuid(fs.device) == fs.uuid


def test_standard_files(standard_fs, test_guest: images.Guest) -> None:
    g, _ = standard_fs
    spec = test_guest.spec
    assert spec.files[images.ROOT_TEST_FILE].startswith(b"virtmount standard")
    assert len(spec.files[images.DATA_RANDOM_FILE]) > 3 * images.MiB
    for path, content in spec.files.items():
        assert _read(g, path) == content, path
        st = g.lstatns(path)
        assert stat.S_ISREG(st["st_mode"]), path
        assert stat.S_IMODE(st["st_mode"]) == spec.modes.get(path, 0o644), path
        assert (st["st_uid"], st["st_gid"]) == spec.owners.get(path, (0, 0)), path
        assert st["st_mtime_sec"] == images.FILE_MTIME, path
    assert len(g.ls(images.MANY_DIR)) == sum(
        1 for p in spec.files if p.startswith(images.MANY_DIR + "/")
    )


def test_standard_links_and_xattrs(standard_fs, test_guest: images.Guest) -> None:
    g, _ = standard_fs
    spec = test_guest.spec
    for path, target in spec.symlinks.items():
        assert stat.S_ISLNK(g.lstatns(path)["st_mode"]), path
        assert g.readlink(path) == target, path
    for path, existing in spec.hardlinks.items():
        a, b = g.lstatns(path), g.lstatns(existing)
        assert (a["st_ino"], a["st_dev"]) == (b["st_ino"], b["st_dev"])
        assert a["st_nlink"] == 2
    for path, attrs in spec.xattrs.items():
        for name, value in attrs.items():
            assert g.lgetxattr(path, name) == value
    for d in spec.dirs:
        st = g.lstatns(d)
        assert stat.S_ISDIR(st["st_mode"]), d
        assert stat.S_IMODE(st["st_mode"]) == spec.modes.get(d, 0o755), d


def test_noos_image(nos_guest: images.Guest) -> None:
    g = _open_readonly(nos_guest.image)
    try:
        assert nos_guest.inspection is None
        assert g.inspect_os() == []
        (fs,) = nos_guest.spec.filesystems
        assert g.list_partitions() == []
        assert g.vfs_type(fs.device) == fs.fstype == "ext4"
        g.mount_ro(fs.device, "/")
        for path, content in nos_guest.files.items():
            assert _read(g, path) == content
    finally:
        g.close()
