"""A test guest that really runs and keeps writing: the host's kernel, a busybox initramfs, one data disk.

Its init loads the virtio and ext4 modules, mounts its data disk (``vda``, ext4
without a journal, mounted ``sync``) at /data and appends a line with a counter
to ``/data/counter`` every 100 ms, forever. A second disk (``vdb``, ext4 with
/hello.txt) is never mounted by the guest: its image must stay bit for bit the same. It runs the guest
agent (the host's qemu-ga with its libraries, on ``org.qemu.guest_agent.0``), so views of it freeze
/data for the job's start; it has no guestfs daemon. It boots in a few seconds under TCG.

Built once and cached (like tests/images.py) under
``$VIRTMOUNT_TEST_IMAGES/running-<hash>/``: kernel, initramfs, data-empty.qcow2, quiet.qcow2; the
hash covers this file and the host's kernel. Every boot gets a fresh data.qcow2 copied from
data-empty.qcow2: the guest is always stopped hard (destroy) in the middle of its writes, and its
journal-less ext4, reused, once showed a block of garbage in /counter in CI.

Usage::

    from tests import running_guest
    guest = running_guest.start("qemu:///system")    # defines and starts it if needed
    running_guest.disk_checksum(guest.quiet_disk)     # sha256 of an image file as the host sees it
"""

from __future__ import annotations

import gzip
import hashlib
import shutil
import subprocess
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import libvirt
import trio

from tests.images import IMAGE_DIR, locked
from virtmount.virt.connection import close_connection, open_connection, run_blocking
from virtmount.virt.domainxml import ApplianceSpec, GuestDefinition, build_appliance_xml
from virtmount.virt.provision import provision

NAME = "virtmount-test-run-writer"
QUIET_CONTENT = b"this disk is never written\n"  # /hello.txt on the second disk (vdb), which the guest never mounts
UUID = "2195c483-9297-4564-b89b-b8496d906dec"  # fixed, so that a changed definition replaces the old one
CONSOLE_LOG = f"/var/log/libvirt/qemu/{NAME}-console.log"
COUNTER_FILE = "/counter"  # on the data disk, the only filesystem: devices/vda/counter
# The newest kernel installed in /boot (the running one may be the host's, without modules here).
KERNEL_RELEASE = max((p.name.removeprefix("vmlinuz-") for p in Path("/boot").glob("vmlinuz-*")), default="none")
# In load order (each after those it depends on).
_MODULES = ("virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev", "virtio_pci", "virtio_blk",
            "virtio_console", "crc16", "mbcache", "jbd2", "crc32c_generic", "ext4")
AGENT = "/usr/sbin/qemu-ga"
AGENT_CHANNEL = "org.qemu.guest_agent.0"
SILENT_AGENT_FLAG = "virtmount_agent=silent"  # on the kernel command line: the agent channel is held open, mute
_INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in {modules}; do insmod /lib/$m.ko 2>/dev/null; done
while [ ! -b /dev/vda ]; do sleep 0.1; done
mkdir -p /data
mount -t ext4 -o sync /dev/vda /data
mkdir -p /var/run /run
for port in /sys/class/virtio-ports/*; do
  [ "$(cat $port/name)" = {agent_channel} ] || continue
  if grep -q {silent_flag} /proc/cmdline; then
    cat /dev/${{port##*/}} > /dev/null &  # the channel is open (connected) and nothing ever answers: a hung agent
  else
    qemu-ga -d -m virtio-serial -p /dev/${{port##*/}}
  fi
done
echo "virtmount-test-run-writer: writing"
i=0
while true; do
  i=$((i+1))
  echo "$i" >> /data/counter
  usleep 100000
done
"""


@dataclass(frozen=True)
class RunningGuest:
    name: str
    uri: str
    data_disk: Path  # vda, written all the time
    quiet_disk: Path  # vdb, never written by the guest


def _kernel() -> Path:
    return Path(f"/boot/vmlinuz-{KERNEL_RELEASE}")


def _module_path(module: str) -> Path:
    out = subprocess.run(["modinfo", "-k", KERNEL_RELEASE, "-F", "filename", module], check=True,
                         capture_output=True, text=True)
    return Path(out.stdout.strip())


def _cache_dir() -> Path:
    digest = hashlib.sha256(Path(__file__).read_bytes() + str(_kernel()).encode()).hexdigest()[:12]
    return IMAGE_DIR / f"running-{digest}"


def _initramfs() -> bytes:
    """A gzipped newc cpio: busybox, the modules, /init (made with the cpio tool from a staging tree)."""
    with tempfile.TemporaryDirectory() as staging:
        root = Path(staging)
        for sub in ("bin", "lib", "proc", "sys", "dev", "data"):
            (root / sub).mkdir()
        shutil.copy("/bin/busybox", root / "bin" / "busybox")
        shutil.copy(AGENT, root / "bin" / "qemu-ga")
        for library in _libraries(AGENT):  # at the same paths as on the host, where the loader looks
            (root / library.parent.relative_to("/")).mkdir(parents=True, exist_ok=True)
            shutil.copy(library, root / library.relative_to("/"))
        for module in _MODULES:
            shutil.copy(_module_path(module), root / "lib" / f"{module}.ko")
        init = root / "init"
        init.write_text(_INIT.format(modules=" ".join(_MODULES), agent_channel=AGENT_CHANNEL,
                                 silent_flag=SILENT_AGENT_FLAG))
        init.chmod(0o755)
        files = subprocess.run(["find", "."], cwd=root, check=True, capture_output=True).stdout
        archive = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=root, input=files, check=True,
                                 capture_output=True).stdout
    return gzip.compress(archive)


def _libraries(executable: str) -> list[Path]:
    """The shared libraries ``executable`` loads, and the loader, as ldd lists them."""
    out = subprocess.run(["ldd", executable], check=True, capture_output=True, text=True).stdout
    return [Path(word) for line in out.splitlines() for word in line.split() if word.startswith("/")]


def build() -> Path:
    """The cached directory with kernel, initramfs and data disk (built on first use)."""
    target = _cache_dir()
    with locked("running"):
        if (target / "data-empty.qcow2").exists():
            return target
        for stale in IMAGE_DIR.glob("running-*"):
            shutil.rmtree(stale, ignore_errors=True)
        work = Path(tempfile.mkdtemp(dir=IMAGE_DIR, prefix=".running-"))
        try:
            shutil.copy(_kernel(), work / "kernel")
            (work / "initramfs.gz").write_bytes(_initramfs())
            raw = work / "data.raw"
            with open(raw, "wb") as image:
                image.truncate(64 * 1024 * 1024)
            subprocess.run(["mkfs.ext4", "-q", "-F", "-O", "^has_journal,^metadata_csum", "-L", "rundata",
                            str(raw)], check=True, capture_output=True)
            subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(work / "data-empty.qcow2")],
                           check=True, capture_output=True)
            with tempfile.TemporaryDirectory() as content:
                (Path(content) / "hello.txt").write_bytes(QUIET_CONTENT)
                subprocess.run(["mkfs.ext4", "-q", "-F", "-d", content, "-L", "quiet", str(raw)], check=True,
                               capture_output=True)
            subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(work / "quiet.qcow2")],
                           check=True, capture_output=True)
            raw.unlink()
            for path in work.iterdir():
                path.chmod(0o644)
            work.chmod(0o755)
            work.rename(target)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    return target


def domain_xml(directory: Path, silent_agent: bool = False) -> str:
    """The writer's definition; with ``silent_agent`` its agent channel is opened but never answered."""
    domain = ET.Element("domain", type="qemu")
    ET.SubElement(domain, "name").text = NAME
    ET.SubElement(domain, "uuid").text = UUID
    ET.SubElement(domain, "memory", unit="MiB").text = "192"
    ET.SubElement(domain, "vcpu").text = "1"
    os_element = ET.SubElement(domain, "os")
    ET.SubElement(os_element, "type", arch="x86_64").text = "hvm"
    ET.SubElement(os_element, "kernel").text = str(directory / "kernel")
    ET.SubElement(os_element, "initrd").text = str(directory / "initramfs.gz")
    ET.SubElement(os_element, "cmdline").text = "console=ttyS0 panic=-1" + (
        f" {SILENT_AGENT_FLAG}" if silent_agent else "")
    ET.SubElement(domain, "on_poweroff").text = "destroy"
    ET.SubElement(domain, "on_reboot").text = "destroy"
    devices = ET.SubElement(domain, "devices")
    disk = ET.SubElement(devices, "disk", type="file", device="disk")
    ET.SubElement(disk, "driver", name="qemu", type="qcow2")
    ET.SubElement(disk, "source", file=str(directory / "data.qcow2"))
    ET.SubElement(disk, "target", dev="vda", bus="virtio")
    quiet = ET.SubElement(devices, "disk", type="file", device="disk")
    ET.SubElement(quiet, "driver", name="qemu", type="qcow2")
    ET.SubElement(quiet, "source", file=str(directory / "quiet.qcow2"))
    ET.SubElement(quiet, "target", dev="vdb", bus="virtio")
    agent = ET.SubElement(devices, "channel", type="unix")
    ET.SubElement(agent, "target", type="virtio", name=AGENT_CHANNEL)
    serial = ET.SubElement(devices, "serial", type="pty")
    ET.SubElement(serial, "target", port="0")
    ET.SubElement(serial, "log", file=CONSOLE_LOG, append="off")
    ET.SubElement(devices, "memballoon", model="none")
    return ET.tostring(domain, encoding="unicode")


def define(uri: str, silent_agent: bool = False) -> RunningGuest:
    """The writer domain defined (shut off if it was not running) on its cached disk."""
    directory = build()
    conn = libvirt.open(uri)
    try:
        conn.defineXML(domain_xml(directory, silent_agent))
    finally:
        conn.close()
    return RunningGuest(NAME, uri, directory / "data.qcow2", directory / "quiet.qcow2")


def start(uri: str, timeout: float = 120, silent_agent: bool = False) -> RunningGuest:
    """The writer domain running and writing (started if it was not; a running one keeps its agent)."""
    guest = define(uri, silent_agent)
    conn = libvirt.open(uri)
    try:
        domain = conn.lookupByName(NAME)
        if not domain.isActive():
            shutil.copyfile(guest.data_disk.with_name("data-empty.qcow2"), guest.data_disk)
            domain.create()
    finally:
        conn.close()
    wait_until_writing(guest, timeout)
    return guest


def wait_until_writing(guest: RunningGuest, timeout: float = 120) -> None:
    """Wait until the data disk's image changes twice (the guest's QEMU locks it: its content cannot be read)."""
    deadline = time.monotonic() + timeout
    seen = {guest.data_disk.stat().st_mtime_ns}
    while len(seen) < 3:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{guest.name} did not start writing within {timeout:.0f} s")
        time.sleep(0.5)
        seen.add(guest.data_disk.stat().st_mtime_ns)


def stop(guest: RunningGuest) -> None:
    conn = libvirt.open(guest.uri)
    try:
        domain = conn.lookupByName(guest.name)
        if domain.isActive():
            domain.destroy()
    finally:
        conn.close()


def domain_state(uri: str, name: str = NAME) -> int:
    """The domain's libvirt state (VIR_DOMAIN_RUNNING, VIR_DOMAIN_PAUSED, ...)."""
    conn = libvirt.open(uri)
    try:
        return int(conn.lookupByName(name).state()[0])
    finally:
        conn.close()


def disk_checksum(image_path: Path) -> str:
    """sha256 of a disk image file, read on the host (qcow2 metadata included)."""
    digest = hashlib.sha256()
    with open(image_path, "rb") as image:
        while chunk := image.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def backup_job(uri: str, name: str = NAME) -> str | None:
    """The domain's backup job XML, None if it has none."""
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # "no backup job" is an answer, not an error
    conn = libvirt.open(uri)
    try:
        return str(conn.lookupByName(name).backupGetXMLDesc(0))
    except libvirt.libvirtError:
        return None
    finally:
        conn.close()


def scratch_volumes(uri: str, pool: str = "virtmount") -> list[str]:
    """virtmount's scratch volumes in ``pool`` (after a refresh)."""
    conn = libvirt.open(uri)
    try:
        storage = conn.storagePoolLookupByName(pool)
        storage.refresh(0)
        return sorted(v.name() for v in storage.listAllVolumes(0) if v.name().startswith("virtmount-scratch-"))
    finally:
        conn.close()


GUESTFSD_NAME = "virtmount-test-run-guestfsd"


def start_guestfsd_domain(uri: str, image: Path, writable: bool = False) -> None:
    """The libguestfs appliance booted as an ordinary transient domain holding the qcow2 ``image`` (written if
    ``writable``, else behind a throw-away overlay): a running domain whose daemon is guestfsd itself, on
    ``org.libguestfs.channel.0`` (it powers off when its one client goes)."""
    async def create() -> None:
        conn = await open_connection(uri)
        try:
            host = await provision(conn, "virtmount")
            disk = ET.Element("disk", type="file", device="disk")
            ET.SubElement(disk, "driver", name="qemu", type="qcow2")
            ET.SubElement(disk, "source", file=str(image))
            spec = ApplianceSpec(name=GUESTFSD_NAME, guest=GuestDefinition(GUESTFSD_NAME, (disk,)),
                                 kernel_path=host.kernel_path, initrd_path=host.initrd_path, root_path=host.root_path,
                                 root_uuid=host.root_uuid, domain_type="qemu", memory_mib=512,
                                 writable=writable)
            await run_blocking(conn.createXML, build_appliance_xml(spec), 0)
        finally:
            await close_connection(conn)
    trio.run(create)


def exists(uri: str, name: str) -> bool:
    """Whether a domain ``name`` exists (defined, or transient and running)."""
    conn = libvirt.open(uri)
    try:
        return name in (domain.name() for domain in conn.listAllDomains(0))
    finally:
        conn.close()


def destroy(uri: str, name: str) -> None:
    """Destroy a running domain, if it runs."""
    conn = libvirt.open(uri)
    try:
        conn.lookupByName(name).destroy()
    except libvirt.libvirtError:
        pass
    finally:
        conn.close()
