"""Issue 14, never two writers: where libvirt's lock manager is configured (``lock_manager = "lockd"``,
virtlockd running), the appliance of a ``-o rw`` mount takes the guest's disk lease as any domain
would: virtlockd holds it while the appliance runs, another domain that plugs the disk in is refused
by lockd, and the lease is gone with the appliance.

libvirt takes a starting domain's leases only when its CPUs start, after QEMU has opened the images, so
on one host QEMU's own image lock refuses ``virsh start`` first ("Failed to get "write" lock"); a disk
hot-plugged into a running domain is leased before QEMU opens it, so lockd's refusal shows there.

This test rewrites /etc/libvirt/qemu.conf and restarts the system libvirtd twice (the previous file is
put back, and virtlockd stopped if the test started it): run it alone, under ``flock -x
/tmp/virtmount-libvirtd.lock`` where others run tests under ``flock -s`` on the same machine.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path
from typing import Iterator

import libvirt
import pytest

from tests import images
from tests.acceptance.helpers import wait_until
from tests.acceptance.test_faults import restart_libvirtd
from tests.acceptance.test_mount import own_mount
from tests.writing import make_scratch_guest, remove_scratch_guest

pytestmark = pytest.mark.acceptance

QEMU_CONF = Path("/etc/libvirt/qemu.conf")
GUEST = "virtmount-test-writing-lockd"
HOLDER = "virtmount-test-writing-lockd-holder"  # a paused, diskless domain that tries to plug the disk in
HOLDER_XML = f"""<domain type='qemu'><name>{HOLDER}</name><memory unit='MiB'>64</memory>
<os><type arch='x86_64'>hvm</type></os><devices><controller type='scsi' model='virtio-scsi'/></devices></domain>"""


def _virtlockd_pids() -> list[int]:
    found = subprocess.run(["pgrep", "-x", "virtlockd"], capture_output=True, text=True).stdout.split()
    return [int(pid) for pid in found]


@contextlib.contextmanager
def lockd_configured() -> Iterator[None]:
    """libvirtd running with ``lock_manager = "lockd"`` (and virtlockd); afterwards qemu.conf as it was,
    libvirtd restarted on it, and virtlockd stopped again if it was not running before."""
    before = QEMU_CONF.read_bytes()
    had_virtlockd = bool(_virtlockd_pids())
    try:
        QEMU_CONF.write_bytes(before + b'\n# virtmount test_lockd (removed when it ends)\nlock_manager = "lockd"\n')
        if not had_virtlockd:
            subprocess.run(["virtlockd", "-d"], check=True)
        restart_libvirtd()
        yield
    finally:
        QEMU_CONF.write_bytes(before)
        restart_libvirtd()
        if not had_virtlockd:
            for pid in _virtlockd_pids():
                os.kill(pid, signal.SIGTERM)
            assert wait_until(lambda: not _virtlockd_pids(), 30) is not None, "virtlockd did not stop"


def _virtlockd_holds(path: Path) -> bool:
    """Whether virtlockd holds a write lock on ``path`` (/proc/locks: its pid and the file's inode)."""
    st = os.stat(path)
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids = {str(pid) for pid in _virtlockd_pids()}
    return any(fields[3] == "WRITE" and fields[4] in pids and fields[5] == inode
               for fields in (line.split() for line in Path("/proc/locks").read_text().splitlines()))


def _plug_in_refusal(uri: str, disk: Path) -> str:
    """libvirt's error when a paused domain of our own hot-plugs ``disk`` read-write ("" if it worked)."""
    conn = libvirt.open(uri)
    try:
        holder = conn.createXML(HOLDER_XML, libvirt.VIR_DOMAIN_START_PAUSED | libvirt.VIR_DOMAIN_START_AUTODESTROY)
        try:
            holder.attachDeviceFlags(f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
                                     f"<source file='{disk}'/><target dev='sda' bus='scsi'/></disk>",
                                     libvirt.VIR_DOMAIN_AFFECT_LIVE)
            return ""
        except libvirt.libvirtError as exc:
            return str(exc)
        finally:
            holder.destroy()
    finally:
        conn.close()


def _start(uri: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["virsh", "-c", uri, "start", GUEST], capture_output=True, text=True, timeout=300)


def test_a_writing_appliance_holds_the_guests_lockd_lease(libvirtd: str, tmp_path: Path) -> None:
    with lockd_configured():
        guest = make_scratch_guest(libvirtd, GUEST, images.STANDARD)
        try:
            with own_mount(libvirtd, tmp_path, "-o", "rw,idle=600") as (mountpoint, _):
                fs = mountpoint / "domains" / GUEST / "fs"
                assert (fs / "etc" / "virtmount-test").read_bytes()  # the appliance holds the disk
                (fs / "written-under-lockd").write_bytes(b"one writer")
                assert _virtlockd_holds(guest.disk), "virtlockd holds no lease on the guest's disk"
                plugged = _plug_in_refusal(libvirtd, guest.disk)
                assert f"Lockspace resource '{guest.disk}' is locked" in plugged, plugged
                print(f"another domain plugging the disk in while the appliance writes: {plugged}")
                refused = _start(libvirtd)  # QEMU's image lock comes first (see the docstring)
                assert refused.returncode != 0 and "lock" in refused.stderr, refused
                assert (fs / "written-under-lockd").read_bytes() == b"one writer"  # the writer carries on
            assert wait_until(lambda: not _virtlockd_holds(guest.disk), 30) is not None, "the lease outlived the appliance"
            started = _start(libvirtd)  # the mount is gone, and its leases with it
            assert started.returncode == 0, started.stderr
            subprocess.run(["virsh", "-q", "-c", libvirtd, "destroy", GUEST], check=True, capture_output=True)
        finally:
            remove_scratch_guest(guest)
