"""Issue 16, item 5: confinement. Only those who may enter get in; the appliance runs as the guest's own
XML says; encrypted disks open through the host's libvirt secrets, whose value no client can read.

Real mounts, libvirtd, QEMU and appliances. Other users are played with setpriv (nobody, and uid 1000,
which owns /srv/data/owned.txt, mode 0600, in the standard guest). Mount points are in a directory of
/tmp that every user may traverse.
"""

from __future__ import annotations

import base64
import shutil
import subprocess
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Iterator

import libvirt
import pytest

from tests import images
from tests.acceptance.test_mount import own_mount
from tests.volumes import virsh
from virtmount.virt.domainxml import APPLIANCE_NAME_PREFIX, appliance_guest_name

pytestmark = pytest.mark.acceptance

NOBODY = 65534
GUEST_OWNER = 1000  # owner of /srv/data/owned.txt in the standard guest (tests/images.py)
OWNED_FILE = "/srv/data/owned.txt"
SECLABEL_GUEST = "virtmount-test-seclabel"
LUKS_GUEST = "virtmount-test-luks"
SECRET_UUID = "5c1e0a7e-7e57-4c0f-9d1e-000000000016"
PASSPHRASE = "virtmount test passphrase"


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory of /tmp that every user may traverse (pytest's own are the owner's only)."""
    top = Path(tempfile.mkdtemp(prefix="virtmount-confinement-", dir="/tmp"))
    top.chmod(0o755)
    try:
        yield top
    finally:
        shutil.rmtree(top, ignore_errors=True)  # own_mount has unmounted by then


def as_user(uid: int, *command: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *command],
                          capture_output=True, timeout=300, stdin=subprocess.DEVNULL)


def denied(result: subprocess.CompletedProcess[bytes]) -> bool:
    return result.returncode != 0 and b"Permission denied" in result.stderr


def test_without_allow_other_only_the_mounting_user_enters(test_guest: images.Guest, open_dir: Path) -> None:
    with own_mount(test_guest.uri, open_dir, "-o", "ro") as (mountpoint, _):
        assert test_guest.name in [p.name for p in (mountpoint / "domains").iterdir()]
        assert denied(as_user(NOBODY, "ls", str(mountpoint / "domains")))
        assert denied(as_user(GUEST_OWNER, "stat", str(mountpoint)))


def test_with_allow_other_the_guests_modes_hold_for_other_users(test_guest: images.Guest, open_dir: Path) -> None:
    with own_mount(test_guest.uri, open_dir, "-o", "ro,allow_other") as (mountpoint, _):
        fs = mountpoint / "domains" / test_guest.name / "fs"
        readable = str(fs / images.ROOT_TEST_FILE.lstrip("/"))
        owned = str(fs / OWNED_FILE.lstrip("/"))
        assert as_user(NOBODY, "cat", readable).stdout == test_guest.files[images.ROOT_TEST_FILE]
        assert denied(as_user(NOBODY, "cat", owned))
        assert as_user(GUEST_OWNER, "cat", owned).stdout == test_guest.files[OWNED_FILE]
        assert denied(as_user(GUEST_OWNER, "ls", str(fs / "root")))  # mode 0700, root's
        refused = as_user(NOBODY, "touch", str(fs / "tmp" / "new"))  # mode 1777 lets it past the check
        assert refused.returncode != 0 and b"Read-only file system" in refused.stderr
        assert Path(owned).read_bytes() == test_guest.files[OWNED_FILE]  # root passes every mode check


def _appliance_of(conn: libvirt.virConnect, guest: str) -> libvirt.virDomain:
    [domain] = [d for d in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
                if d.name().startswith(APPLIANCE_NAME_PREFIX) and appliance_guest_name(d.XMLDesc(0)) == guest]
    return domain


def _qemu_uid(domain_name: str) -> int:
    pid = Path(f"/run/libvirt/qemu/{domain_name}.pid").read_text().strip()
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(fields["Uid"].split()[0])


def test_the_appliance_runs_under_the_guests_seclabel(nos_guest: images.Guest, tmp_path: Path) -> None:
    """The guest's XML says QEMU runs as root (a static DAC label; libvirt's default user here is
    libvirt-qemu) and that libvirt relabels nothing of it: the appliance does the same, and the guest's
    image keeps its owner. (libvirt allows a disk's own label only where the domain relabels.)"""
    xml = images.domain_xml(SECLABEL_GUEST, nos_guest.image).replace(
        "</devices>", "</devices>\n  <seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel>")
    images.ensure_domain_xml(nos_guest.uri, SECLABEL_GUEST, xml)
    image_owner = nos_guest.image.stat().st_uid
    conn = libvirt.open(nos_guest.uri)
    try:
        with own_mount(nos_guest.uri, tmp_path) as (mountpoint, _):
            hello = mountpoint / "domains" / SECLABEL_GUEST / "devices" / "sda" / "hello.txt"
            assert hello.read_bytes() == images.NOOS_FILES["/hello.txt"]
            appliance = _appliance_of(conn, SECLABEL_GUEST)
            live = ET.fromstring(appliance.XMLDesc(0))
            labels = [(s.get("model"), s.get("type"), s.get("relabel"), s.findtext("label"))
                      for s in live.findall("seclabel")]
            assert ("dac", "static", "no", "+0:+0") in labels, labels
            assert _qemu_uid(appliance.name()) == 0
            assert nos_guest.image.stat().st_uid == image_owner
        other = _appliance_uid_of_plain_guest(nos_guest, tmp_path)
        assert other != 0, "the default QEMU user here is root: the test shows nothing"
    finally:
        conn.close()
        virsh(nos_guest.uri, "undefine", SECLABEL_GUEST, check=False)


def _appliance_uid_of_plain_guest(nos_guest: images.Guest, tmp_path: Path) -> int:
    """The user QEMU runs as for a guest without a seclabel (libvirt's default)."""
    (tmp_path / "plain").mkdir()
    conn = libvirt.open(nos_guest.uri)
    try:
        with own_mount(nos_guest.uri, tmp_path / "plain") as (mountpoint, _):
            (mountpoint / "domains" / nos_guest.name / "devices" / "sda" / "hello.txt").read_bytes()
            return _qemu_uid(_appliance_of(conn, nos_guest.name).name())
    finally:
        conn.close()


def _encrypt(plain: Path, image: Path) -> None:
    """``plain`` copied into a LUKS-encrypted qcow2 ``image`` keyed by PASSPHRASE. qemu-img's key-stretching
    benchmark fails now and then on these machines ("Unable to get accurate CPU usage", in 0.01 s; 2 of 8
    tries with an appliance running, measured): such a failure is tried again."""
    for attempt in range(10):
        image.unlink(missing_ok=True)
        made = subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "qcow2",
                               "--object", f"secret,id=sec0,data={PASSPHRASE}",
                               "-o", "encrypt.format=luks,encrypt.key-secret=sec0", str(plain), str(image)],
                              capture_output=True, text=True, timeout=300)
        if made.returncode == 0:
            return
        assert "Unable to get accurate CPU usage" in made.stderr, made.stderr
        time.sleep(0.5)
    raise AssertionError(f"qemu-img could not encrypt {plain} in {attempt + 1} tries: {made.stderr}")


def test_an_encrypted_disk_opens_through_the_hosts_secret(nos_guest: images.Guest, tcp_uri: str,
                                                          tmp_path: Path) -> None:
    """A LUKS-encrypted qcow2 whose key is a private libvirt secret on the host: read over qemu+tcp, while
    no client (virtmount included) can read the key."""
    image = images.IMAGE_DIR / "confinement-luks.qcow2"
    _encrypt(nos_guest.image, image)
    secret_xml = tmp_path / "secret.xml"
    secret_xml.write_text(f"<secret ephemeral='no' private='yes'><uuid>{SECRET_UUID}</uuid>"
                          f"<usage type='volume'><volume>{image}</volume></usage></secret>")
    virsh(nos_guest.uri, "secret-undefine", SECRET_UUID, check=False)
    virsh(nos_guest.uri, "secret-define", str(secret_xml))
    try:
        virsh(nos_guest.uri, "secret-set-value", SECRET_UUID, "--base64",
              base64.b64encode(PASSPHRASE.encode()).decode())
        xml = images.domain_xml(LUKS_GUEST, image).replace(
            "/>\n      <target dev='vda'",
            f"><encryption format='luks'><secret type='passphrase' uuid='{SECRET_UUID}'/></encryption></source>\n"
            "      <target dev='vda'")
        images.ensure_domain_xml(nos_guest.uri, LUKS_GUEST, xml)
        with own_mount(tcp_uri, tmp_path) as (mountpoint, _):
            hello = mountpoint / "domains" / LUKS_GUEST / "devices" / "sda" / "hello.txt"
            assert hello.read_bytes() == images.NOOS_FILES["/hello.txt"]
        refused = virsh(tcp_uri, "secret-get-value", SECRET_UUID, check=False)
        assert refused.returncode != 0 and "private" in refused.stderr, refused
        assert PASSPHRASE.encode() not in image.read_bytes()  # encrypted at rest, not just labelled so
    finally:
        virsh(nos_guest.uri, "undefine", LUKS_GUEST, check=False)
        virsh(nos_guest.uri, "secret-undefine", SECRET_UUID, check=False)
        image.unlink(missing_ok=True)
