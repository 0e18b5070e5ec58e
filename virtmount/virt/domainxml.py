"""Reading a guest's domain XML and building the appliance domain XML from it.

The appliance is a transient libvirt domain that holds the guest's disks
exactly as the guest's XML gives them (source, format, encryption, seclabel,
auth) so that libvirt's secrets, locking and sVirt apply to it, plus the
libguestfs appliance kernel, initrd and root, and the daemon's channel.
"""

from __future__ import annotations

import copy
import socket
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

from ..errors import VirtmountError

DAEMON_CHANNEL = "org.libguestfs.channel.0"
METADATA_NAMESPACE = "https://virtmount.org/xmlns/appliance/1"
APPLIANCE_NAME_PREFIX = "virtmount-appliance-"

# Kernel command line used by libguestfs 1.48 for its appliance (see lib/appliance-kcmdline.c),
# plus early console output: a booting kernel prints within ~0.1 s of its start under KVM (the
# sign that accelerator.py waits for), where libguestfs's ``quiet`` alone keeps the console silent
# until the appliance's init runs (~5 s under TCG).
BASE_KERNEL_ARGS = (
    "panic=1 console=ttyS0 earlyprintk=ttyS0 edd=off udevtimeout=6000 udev.event-timeout=6000 "
    "no_timer_check printk.time=1 cgroup_disable=memory usbcore.nousb cryptomgr.notests tsc=reliable "
    "8250.nr_uarts=1 selinux=0 TERM=xterm"
)
# After ``quiet`` (which the appliance's init also reads), keep the kernel's notices on the console:
# "Kernel command line: ..." is one, printed as soon as the early console exists.
_QUIET_BUT_NOTICES = "quiet loglevel=6"

# <driver> attributes that only make sense on virtio-blk; the appliance puts every disk on virtio-scsi.
_VIRTIO_BLK_ONLY_DRIVER_ATTRS = ("iothread", "queues", "queue_size", "ats", "iommu", "packed", "page_per_vq", "event_idx", "ioeventfd")
# Children of <disk> that describe how the guest sees the disk, not what the disk is.
_GUEST_PLACEMENT_ELEMENTS = ("target", "address", "alias", "boot", "geometry", "iotune", "mirror", "transient")


class DomainXmlError(VirtmountError):
    """The guest's XML cannot be turned into an appliance."""


@dataclass(frozen=True)
class GuestDefinition:
    """What the appliance needs from a guest's XML."""

    name: str
    disks: tuple[ET.Element, ...]
    seclabels: tuple[ET.Element, ...] = field(default=())


def read_guest_definition(domain_xml: str) -> GuestDefinition:
    """Pick out the guest's disks that have a source, and its security labels."""
    try:
        root = ET.fromstring(domain_xml)
    except ET.ParseError as exc:
        raise DomainXmlError(f"domain XML does not parse: {exc}") from None
    name = root.findtext("name") or "?"
    disks = tuple(
        copy.deepcopy(disk)
        for disk in root.findall("./devices/disk")
        if disk.find("source") is not None and _has_source_location(disk)
    )
    seclabels = tuple(copy.deepcopy(label) for label in root.findall("./seclabel"))
    return GuestDefinition(name=name, disks=disks, seclabels=seclabels)


_SOURCE_LOCATION_ATTRIBUTES = ("file", "dev", "dir", "name", "pool", "volume")


def _has_source_location(disk: ET.Element) -> bool:
    """Whether a disk's <source> names something (an empty cdrom has only startupPolicy)."""
    source = disk.find("source")
    assert source is not None
    return any(source.get(attr) for attr in _SOURCE_LOCATION_ATTRIBUTES) or source.find("host") is not None


def scsi_disk_name(index: int) -> str:
    """sda, sdb, …, sdz, sdaa, … — the names the appliance's kernel gives its disks in order."""
    letters = ""
    index += 1
    while index:
        index, remainder = divmod(index - 1, 26)
        letters = chr(ord("a") + remainder) + letters
    return "sd" + letters


@dataclass(frozen=True)
class ApplianceSpec:
    """Everything that decides the appliance domain's XML."""

    name: str
    guest: GuestDefinition
    kernel_path: str
    initrd_path: str
    root_path: str
    root_uuid: str
    domain_type: str  # "kvm" or "qemu" (TCG)
    memory_mib: int = 1024
    vcpus: int = 1
    writable: bool = False
    verbose: bool = False
    extra_kernel_args: str = ""
    emulator: str = ""  # the QEMU binary on the host; "" for libvirt's default
    owner: str = ""  # the process id of the virtmount that runs it (metadata, for tools and tests)
    # A persistent overlay of root_path to boot from and write to (the appliance to be saved,
    # see faststart.py); empty: a throw-away overlay made and deleted by libvirt.
    root_overlay: str = ""


def kernel_command_line(spec: ApplianceSpec) -> str:
    args = [BASE_KERNEL_ARGS, f"root=UUID={spec.root_uuid}"]
    args.append("guestfs_verbose=1" if spec.verbose else _QUIET_BUT_NOTICES)
    if spec.extra_kernel_args:
        args.append(spec.extra_kernel_args)
    return " ".join(args)


def appliance_disk(guest_disk: ET.Element, index: int, writable: bool) -> ET.Element:
    """A guest disk as the appliance holds it: same source and format, on virtio-scsi unit ``index``."""
    disk = copy.deepcopy(guest_disk)
    for tag in _GUEST_PLACEMENT_ELEMENTS:
        for child in disk.findall(tag):
            disk.remove(child)
    if disk.get("device") != "lun":
        # cdrom and floppy images are read as plain disks: the daemon lists only disks
        disk.set("device", "disk")
    driver = disk.find("driver")
    if driver is not None:
        for attr in _VIRTIO_BLK_ONLY_DRIVER_ATTRS:
            driver.attrib.pop(attr, None)
        if writable and driver.get("cache") == "unsafe":
            # a written disk must honour the appliance's flushes: fsync returns once data is on the host
            driver.attrib.pop("cache")
    if not writable and disk.find("readonly") is None:
        if disk.get("type") == "file":
            # The guest's image stays untouched but the appliance sees a writable disk: XFS and
            # ext4 write (log replay, unmount records) even when mounted read-only, and a truly
            # read-only device makes such mounts fail. libguestfs does the same with snapshot=on.
            _append_throwaway_overlay(disk)
        else:
            ET.SubElement(disk, "readonly")
    _append_target(disk, index)
    return disk


def _append_throwaway_overlay(disk: ET.Element) -> None:
    """A writable overlay deleted when the domain ends; shareBacking opens the image read-only,
    so several appliances (or a guest's appliance and libguestfs tools) can hold it at once."""
    ET.SubElement(disk, "transient", shareBacking="yes")


def _append_target(disk: ET.Element, index: int) -> None:
    ET.SubElement(disk, "target", dev=scsi_disk_name(index), bus="scsi")
    ET.SubElement(disk, "address", type="drive", controller="0", bus="0", target="0", unit=str(index))


def _root_disk(spec: ApplianceSpec, index: int) -> ET.Element:
    disk = ET.Element("disk", type="file", device="disk")
    ET.SubElement(disk, "driver", name="qemu", type="qcow2", cache="unsafe")
    ET.SubElement(disk, "source", file=spec.root_overlay or spec.root_path)
    _append_target(disk, index)
    if not spec.root_overlay:
        _append_throwaway_overlay(disk)
    return disk


def build_appliance_xml(spec: ApplianceSpec) -> str:
    """The transient appliance domain for ``spec`` as an XML string."""
    domain = ET.Element("domain", type=spec.domain_type)
    ET.SubElement(domain, "name").text = spec.name
    metadata = ET.SubElement(domain, "metadata")
    metadata.append(appliance_marker(spec.guest.name, spec.owner))
    ET.SubElement(domain, "memory", unit="MiB").text = str(spec.memory_mib)
    ET.SubElement(domain, "vcpu").text = str(spec.vcpus)

    os_element = ET.SubElement(domain, "os")
    ET.SubElement(os_element, "type", arch="x86_64").text = "hvm"
    ET.SubElement(os_element, "kernel").text = spec.kernel_path
    ET.SubElement(os_element, "initrd").text = spec.initrd_path
    ET.SubElement(os_element, "cmdline").text = kernel_command_line(spec)

    features = ET.SubElement(domain, "features")
    ET.SubElement(features, "acpi")
    if spec.domain_type == "kvm":
        ET.SubElement(domain, "cpu", mode="host-passthrough")
    else:
        ET.SubElement(domain, "cpu", mode="maximum")
    clock = ET.SubElement(domain, "clock", offset="utc")
    ET.SubElement(clock, "timer", name="rtc", tickpolicy="catchup")
    ET.SubElement(clock, "timer", name="pit", tickpolicy="delay")
    ET.SubElement(clock, "timer", name="hpet", present="no")
    for event in ("on_poweroff", "on_reboot", "on_crash"):
        ET.SubElement(domain, event).text = "destroy"

    devices = ET.SubElement(domain, "devices")
    if spec.emulator:
        ET.SubElement(devices, "emulator").text = spec.emulator
    ET.SubElement(devices, "controller", type="scsi", index="0", model="virtio-scsi")
    ET.SubElement(devices, "controller", type="usb", model="none")
    for index, guest_disk in enumerate(spec.guest.disks):
        devices.append(appliance_disk(guest_disk, index, spec.writable))
    devices.append(_root_disk(spec, len(spec.guest.disks)))

    serial = ET.SubElement(devices, "serial", type="pty")
    ET.SubElement(serial, "target", port="0")
    console = ET.SubElement(devices, "console", type="pty")
    ET.SubElement(console, "target", type="serial", port="0")
    channel = ET.SubElement(devices, "channel", type="unix")
    ET.SubElement(channel, "source", mode="bind")
    ET.SubElement(channel, "target", type="virtio", name=DAEMON_CHANNEL)
    rng = ET.SubElement(devices, "rng", model="virtio")
    ET.SubElement(rng, "backend", model="random").text = "/dev/urandom"
    ET.SubElement(devices, "memballoon", model="none")

    for label in spec.guest.seclabels:
        domain.append(copy.deepcopy(label))
    ET.register_namespace("virtmount", METADATA_NAMESPACE)
    return ET.tostring(domain, encoding="unicode")


def appliance_marker(guest_name: str, owner: str) -> ET.Element:
    """The metadata element of an appliance domain: the guest it serves, the process that runs it and
    that process's host (the client)."""
    return ET.Element(f"{{{METADATA_NAMESPACE}}}appliance", guest=guest_name, owner=owner,
                      client=socket.gethostname())


def _marker_attribute(domain_xml: str, attribute: str) -> str | None:
    try:
        root = ET.fromstring(domain_xml)
    except ET.ParseError:
        return None
    marker = root.find(f"./metadata/{{{METADATA_NAMESPACE}}}appliance")
    return None if marker is None else marker.get(attribute)


def appliance_guest_name(domain_xml: str) -> str | None:
    """The guest an appliance domain serves, or None if the domain is not one of ours."""
    return _marker_attribute(domain_xml, "guest")


def appliance_owner(domain_xml: str) -> str | None:
    """The process id of the virtmount that runs an appliance domain, or None."""
    return _marker_attribute(domain_xml, "owner")


def appliance_client(domain_xml: str) -> str | None:
    """The host name of the client whose virtmount runs an appliance domain, or None if not recorded."""
    return _marker_attribute(domain_xml, "client")

