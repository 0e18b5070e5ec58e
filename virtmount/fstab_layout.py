"""A Linux guest's layout read from its own /etc/fstab, instead of the daemon's ``inspect_os``.

``inspect_os`` costs ~10 s under TCG on the bench guest: it probes partition
types (parted, sgdisk, a ``udevadm settle`` around each), mounts and
unmounts every filesystem, and loads Augeas to read the fstab (3.4 s of it).
For the common Linux guest the layout is in one file: one ``blkid`` run lists
the filesystems, the likeliest root is mounted, and its fstab says where the
rest go. This is trusted only where it cannot differ from what the
inspection would show: every filesystem on the disks is ext2/3/4, XFS or
vfat (swap and LVM members aside), the fstab's "/" is the filesystem it was
read from, and it names every other filesystem on the disks (a filesystem it
does not name may be another OS's). Anything else (btrfs subvolumes, LUKS,
RAID, Windows, names that do not resolve) is left to ``inspect_os``.

This module only reads and decides; guestlayout.py mounts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

# Filesystems this path handles; any other content on the disks means inspect_os.
ROOT_TYPES = ("ext4", "xfs", "ext3", "ext2")
_FILESYSTEM_TYPES = {*ROOT_TYPES, "vfat"}
_NOT_FILESYSTEMS = {"swap", "LVM2_member"}
_MAX_ROOT_TRIES = 3

# The /dev/disk links naming a filesystem by a field blkid reports (see _BY_FIELD).
_BY_LINK = {"/dev/disk/by-uuid/": "UUID", "/dev/disk/by-label/": "LABEL", "/dev/disk/by-partuuid/": "PARTUUID",
            "/dev/disk/by-partlabel/": "PARTLABEL"}

# One shell run: every block device's blkid fields (appliance root included; the caller drops it).
LIST_COMMAND = b"blkid -c /dev/null -o export; echo virtmount-blkid-status $?"


@dataclass(frozen=True)
class BlockDevice:
    """One device blkid reported, named as the daemon names it (LVs as /dev/VG/LV)."""

    name: str
    fstype: str  # "" when blkid found no content (a partitioned disk, a BIOS boot partition)
    uuid: str = ""
    label: str = ""
    partuuid: str = ""
    partlabel: str = ""


# fstab's ways of naming a filesystem by a field blkid reports.
_BY_FIELD: dict[str, Callable[[BlockDevice], str]] = {
    "UUID": lambda device: device.uuid, "LABEL": lambda device: device.label,
    "PARTUUID": lambda device: device.partuuid, "PARTLABEL": lambda device: device.partlabel,
}


@dataclass(frozen=True)
class FstabEntry:
    spec: str
    mountpoint: str
    fstype: str
    options: str = "defaults"


def _unescape_blkid(value: str) -> str:
    """blkid -o export escapes shell-unsafe characters with a backslash."""
    return re.sub(r"\\(.)", r"\1", value)


def lv_path(mapper_name: str) -> str | None:
    """/dev/VG/LV for an LVM device-mapper name (VG-LV, each '-' inside a name doubled); None if it is
    not of that form."""
    parts = re.split(r"(?<!-)-(?!-)", mapper_name)
    if len(parts) != 2 or not all(parts):
        return None
    vg, lv = (part.replace("--", "-") for part in parts)
    return f"/dev/{vg}/{lv}"


def parse_blkid(output: bytes, appliance_root: str) -> list[BlockDevice] | None:
    """The guest's devices from LIST_COMMAND's output, without the appliance's root disk
    (``appliance_root``, e.g. /dev/sda); None if blkid failed or named a device this path cannot."""
    text = output.decode("utf-8", "surrogateescape")
    status = re.search(r"^virtmount-blkid-status (\d+)$", text, re.M)
    if status is None or status.group(1) not in ("0", "2"):  # 2: nothing found
        return None
    devices = []
    for block in text[:status.start()].split("\n\n"):
        fields = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
        name = _unescape_blkid(fields.get("DEVNAME", ""))
        if not name or re.fullmatch(re.escape(appliance_root) + r"\d*", name):
            continue
        if name.startswith("/dev/mapper/"):
            path = lv_path(name.removeprefix("/dev/mapper/"))
            if path is None:
                return None
            name = path
        elif not re.fullmatch(r"/dev/sd[a-z]+\d*", name):
            return None
        devices.append(BlockDevice(
            name=name, fstype=fields.get("TYPE", ""), uuid=_unescape_blkid(fields.get("UUID", "")),
            label=_unescape_blkid(fields.get("LABEL", "")), partuuid=fields.get("PARTUUID", ""),
            partlabel=_unescape_blkid(fields.get("PARTLABEL", ""))))
    return devices


def filesystems(devices: list[BlockDevice]) -> list[BlockDevice] | None:
    """The devices holding filesystems; None if any holds content this path leaves to inspect_os."""
    found = []
    for device in devices:
        if device.fstype in _FILESYSTEM_TYPES:
            found.append(device)
        elif device.fstype and device.fstype not in _NOT_FILESYSTEMS:
            return None
    return found


def only_disk(devices: list[BlockDevice]) -> str | None:
    """The guest's disk (/dev/sdb) when it has exactly one, else None."""
    disks = {match.group(1) for device in devices if (match := re.fullmatch(r"(/dev/sd[a-z]+)\d*", device.name))}
    return next(iter(disks)) if len(disks) == 1 else None


def root_candidates(found: list[BlockDevice]) -> list[BlockDevice]:
    """The filesystems that may be the root, likeliest first (a name or label saying root), at most
    a few: a guest whose root is not among them is inspected."""
    candidates = [device for device in found if device.fstype in ROOT_TYPES]

    def unlikeliness(device: BlockDevice) -> int:
        said = "root" in device.name.rsplit("/", 1)[-1].lower() or device.label in ("/", "root", "rootfs")
        return 0 if said else 1

    return sorted(candidates, key=unlikeliness)[:_MAX_ROOT_TRIES]


def _unescape_fstab(field: str) -> str:
    """fstab fields write space, tab, newline and backslash as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), field)


def parse_fstab(text: str) -> list[FstabEntry]:
    entries = []
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) < 3:
            continue
        entries.append(FstabEntry(*(_unescape_fstab(field) for field in fields[:4])))
    return entries


def resolve(spec: str, found: list[BlockDevice], first_disk: str | None) -> BlockDevice | None:
    """The filesystem an fstab device field names, or None. Kernel names (/dev/vda1, /dev/sda1)
    are resolved only where ``first_disk`` (the appliance's name of the guest's only disk) is given:
    with several disks their order depends on the buses."""
    key, value = None, ""
    if "=" in spec and spec.split("=", 1)[0] in _BY_FIELD:
        key, value = spec.split("=", 1)
        value = value.strip('"')
    for prefix, link_key in _BY_LINK.items():
        if spec.startswith(prefix):
            key, value = link_key, spec.removeprefix(prefix)
    if key is not None:
        get = _BY_FIELD[key]
        matches = [device for device in found if value and get(device).lower() == value.lower()]
        return matches[0] if len(matches) == 1 else None
    if spec.startswith("/dev/mapper/"):
        spec = lv_path(spec.removeprefix("/dev/mapper/")) or spec
    kernel_name = re.fullmatch(r"/dev/[shv]da(\d*)", spec)
    if kernel_name is not None:
        if first_disk is None:
            return None
        spec = first_disk + kernel_name.group(1)
    matches = [device for device in found if device.name == spec]
    return matches[0] if matches else None


def mountpoints(entries: list[FstabEntry], found: list[BlockDevice], root: BlockDevice,
                first_disk: str | None) -> dict[str, str] | None:
    """The OS's mountpoints (path -> device) from its fstab, read from ``root``; None unless "/" is
    ``root`` and every filesystem on the disks is named once (see the module's docstring). Entries
    that are not devices (tmpfs, proc, nfs, bind mounts) and swap are left out, as are devices that
    are not on the disks but would not be mounted at boot anyway (noauto: a CD-ROM drive) or are no
    filesystem of this path's kinds."""
    result: dict[str, str] = {}
    for entry in entries:
        if not entry.mountpoint.startswith("/") or entry.fstype in ("swap", "none"):
            continue
        if not (entry.spec.startswith("/dev/") or entry.spec.split("=", 1)[0] in _BY_FIELD):
            continue
        device = resolve(entry.spec, found, first_disk)
        if device is None:
            mounted_at_boot = "noauto" not in entry.options.split(",")
            if mounted_at_boot and entry.fstype in (*_FILESYSTEM_TYPES, "auto"):
                return None
            continue
        mountpoint = entry.mountpoint.rstrip("/") or "/"
        if mountpoint in result or device.name in result.values():
            return None
        result[mountpoint] = device.name
    if result.get("/") != root.name:
        return None
    if {device.name for device in found} != set(result.values()):
        return None
    return result
