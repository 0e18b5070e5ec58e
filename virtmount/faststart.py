"""The saved appliance that makes boots fast: what it is called, where it lives, how it is restored.

A cold boot spends ~20 s under TCG in firmware, kernel and the appliance's
init before its daemon answers. A saved appliance is back in under a second;
plugging the guest's disks in and scanning them for LVM costs a few seconds
more. The saved appliance holds only its own root disk. It is made once per
host, appliance version and settings (boot one, then ``virDomainSave`` into
the appliance's storage pool) and kept there for every later boot and mount.

libvirt restores a saved domain only under the name and UUID it was saved
with, so one saved appliance serves one appliance at a time. Appliances that
run at once (several guests, several mounts) therefore each take a saved
appliance of their own, from up to ``SLOTS`` per settings: the first boot that
finds every existing one in use saves the next (~150 MB in the pool), and a
boot that finds all ``SLOTS`` in use boots cold. Each restore runs on a new
overlay of its saved root disk (replaced at the next restore), so the saved
memory and disk always match. (libvirt's own throw-away overlays,
``<transient/>``, change the device set, which a restore refuses.) A restored
domain cannot be auto-destroyed, but it ends by itself when its daemon
channel closes (the daemon reads EOF and the appliance powers off), which
happens when virtmount exits or dies.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from xml.etree import ElementTree as ET

from .errors import VirtmountError
from .virt.domainxml import APPLIANCE_NAME_PREFIX, BASE_KERNEL_ARGS, METADATA_NAMESPACE, appliance_marker
from .virt.provision import HostAppliance


# Run in a freshly booted appliance just before it is saved. The kernel modules of the filesystems guests
# commonly use are loaded once, not at each restore's first mount (under TCG here the first XFS mount of
# a restored appliance took 1.4-1.9 s, 0.6-0.9 s with the module loaded; ext4 is loaded at boot). udev is
# told not to activate LVM volume groups on the disks plugged into a restored appliance (the appliance's
# lvm.conf: event activation off): take_disks_command activates them once, and udev's own pvscan and
# vgchange on top of it cost ~1 s more under TCG (the daemon's own lvm commands read a copy of the
# configuration made when it started, so they are unchanged). Part of the identity.
WARM_UP = (b"modprobe -a xfs btrfs vfat >/dev/null 2>&1; "
           b"printf 'global {\\n\\tevent_activation = 0\\n}\\n' >> /etc/lvm/lvmlocal.conf; true")

# Saved appliances per settings, for appliances running at the same time (each ~150 MB in the pool).
SLOTS = 4


class FastStartUnavailable(VirtmountError):
    """No fast start this time (saved appliance in use, missing, or unusable): boot cold."""


class SlotInUse(FastStartUnavailable):
    """This saved appliance is running (restored, or being saved) for another appliance: try the next."""


@dataclass(frozen=True)
class SavedAppliance:
    """Names and host paths of one saved appliance (beside the appliance's volumes in its pool)."""

    name: str  # its domain name, which every restore keeps

    @staticmethod
    def for_boot(host: HostAppliance, domain_type: str, memory_mib: int, vcpus: int,
                 kernel_args: str, verbose: bool, emulator: str = "", slot: int = 0) -> SavedAppliance:
        """The saved appliance ``slot`` (0 to SLOTS - 1) for these files and settings: any change (the
        accelerator included) makes another set."""
        identity = "\0".join([host.kernel_path, host.initrd_path, host.root_path, host.root_uuid, BASE_KERNEL_ARGS,
                              domain_type, str(memory_mib), str(vcpus), kernel_args, str(verbose), emulator,
                              WARM_UP.decode()])
        digest = hashlib.sha256(identity.encode("utf-8", "surrogateescape")).hexdigest()[:16]
        return SavedAppliance(name=f"{APPLIANCE_NAME_PREFIX}saved-{digest}" + (f"-{slot}" if slot else ""))

    def state_path(self, host: HostAppliance) -> str:
        """The saved memory and device state, written by libvirtd."""
        return self.path(host, f"{self.name}.state")

    @property
    def root_volume(self) -> str:
        """The root disk as it was when saved: an overlay of the appliance root (volume name)."""
        return f"{self.name}-root.qcow2"

    @property
    def run_volume(self) -> str:
        """The root disk of the restored appliance: an overlay of ``root_volume`` (volume name)."""
        return f"{self.name}-run.qcow2"

    def path(self, host: HostAppliance, volume: str) -> str:
        return os.path.join(os.path.dirname(host.root_path), volume)


def overlay_volume_xml(name: str, backing_path: str, capacity: int) -> str:
    """A qcow2 volume whose reads fall through to ``backing_path`` and which takes the writes."""
    volume = ET.Element("volume")
    ET.SubElement(volume, "name").text = name
    ET.SubElement(volume, "capacity", unit="bytes").text = str(capacity)
    target = ET.SubElement(volume, "target")
    ET.SubElement(target, "format", type="qcow2")
    backing = ET.SubElement(volume, "backingStore")
    ET.SubElement(backing, "path").text = backing_path
    ET.SubElement(backing, "format", type="qcow2")
    return ET.tostring(volume, encoding="unicode")


def restore_xml(saved_xml: str, root_path: str, run_path: str, guest_name: str, owner: str) -> str:
    """The saved domain's XML for one restore: marked as ``guest_name``'s appliance run by ``owner``,
    and its root disk (saved as ``root_path``) on ``run_path``, so that the saved root stays as saved."""
    domain = ET.fromstring(saved_xml)
    metadata = domain.find("metadata")
    if metadata is None:
        metadata = ET.SubElement(domain, "metadata")
    for old in metadata.findall(f"{{{METADATA_NAMESPACE}}}appliance"):
        metadata.remove(old)
    metadata.append(appliance_marker(guest_name, owner))
    roots = [disk for disk in domain.findall("./devices/disk")
             if (source := disk.find("source")) is not None and source.get("file") == root_path]
    if len(roots) != 1:
        raise FastStartUnavailable(f"the saved appliance has {len(roots)} root disks at {root_path}")
    source = roots[0].find("source")
    assert source is not None
    source.set("file", run_path)
    ET.register_namespace("virtmount", METADATA_NAMESPACE)
    return ET.tostring(domain, encoding="unicode")


@dataclass(frozen=True)
class TakenDisks:
    """What a restored appliance reported after its guest disks were plugged in (see take_disks_command)."""

    clock_set: bool
    disks_seen: int  # guest disks udev had announced when the wait ended
    lvm_error: str | None  # None: every volume group was activated


def take_disks_command(guest_disks: int, now: float, timeout_s: float) -> bytes:
    """One shell command for a restored appliance whose guest disks were just hot-plugged: set its
    clock (its saved state carries the time it was saved at), wait up to ``timeout_s`` until udev has
    announced all ``guest_disks`` disks behind its root (the kernel announces a disk only after reading its
    partition table), then activate the disks' LVM volume groups as the appliance's init does at boot.

    One daemon call instead of a date, polled list_devices (each a ``udevadm settle``) and lvm_scan
    (pvscan, then vgchange): under TCG here that took 3.3 s on the bench guest, mostly in the settles
    and the second LVM command. The wait uses shell built-ins (a fork costs ~0.1 s under TCG)."""
    return b"".join([
        b"date -u -s @%.6f >/dev/null 2>&1 && echo virtmount-clock-set; " % now,
        b"want=%d; read up rest < /proc/uptime; deadline=$((${up%%.*} + %d)); " % (guest_disks + 1, int(timeout_s)),
        b"while :; do seen=0; for disk in /sys/block/sd*; do [ -r $disk/dev ] || continue; read dev < $disk/dev; ",
        b"[ -e /run/udev/data/b$dev ] && seen=$((seen + 1)); done; [ $seen -ge $want ] && break; ",
        b"read up rest < /proc/uptime; [ ${up%.*} -ge $deadline ] && break; sleep 0.05; done; ",
        b"echo virtmount-disks-seen $((seen - 1)); ",
        b"[ $seen -ge $want ] || exit 0; ",
        b"if lvm_out=$(lvm vgchange -ay 2>&1); then echo virtmount-lvm-ok; ",
        b"else echo virtmount-lvm-failed; echo \"$lvm_out\"; fi",
    ])


def parse_taken_disks(output: bytes) -> TakenDisks:
    """What ``take_disks_command`` printed; a line missing means its step did not happen."""
    lines = output.decode("utf-8", "replace").splitlines()
    seen = next((line.split()[1] for line in lines if line.startswith("virtmount-disks-seen ")), "-1")
    lvm_error: str | None = "not tried"
    if "virtmount-lvm-ok" in lines:
        lvm_error = None
    elif "virtmount-lvm-failed" in lines:
        after = lines[lines.index("virtmount-lvm-failed") + 1:]
        lvm_error = " ".join(line.strip() for line in after if line.strip())[:500] or "vgchange failed"
    return TakenDisks(clock_set="virtmount-clock-set" in lines,
                      disks_seen=int(seen) if seen.lstrip("-").isdigit() else -1, lvm_error=lvm_error)
