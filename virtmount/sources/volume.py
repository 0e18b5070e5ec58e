"""A storage volume as a source: one disk, found by the volume's key.

The disk is built from the volume's XML: a file volume becomes
``<disk type='file'>``, a block volume (logical, disk, iSCSI, SCSI, mpath
pools) ``<disk type='block'>``, anything else (network pools such as rbd or
gluster) ``<disk type='volume'>`` naming the pool and volume, which libvirt
turns into the network disk with the pool's hosts and auth. The format is
the one libvirt reports in ``<target><format>`` and is never probed from the
content; a volume without one is raw. A partition of a disk pool reports its
partition type there (``none``, ``linux``, ...): its content is raw. QEMU
follows a backing chain from the image itself, as libvirt does for a guest.
"""

from __future__ import annotations

import errno
import xml.etree.ElementTree as ET
from dataclasses import dataclass

import libvirt

from ..failures import errno_of
from ..virt.connection import libvirt_message, run_blocking
from . import Attach, Source, SourceUnavailable, writable_attach

# Volume formats libvirt reports under other names than QEMU's block drivers.
_QEMU_FORMAT = {"iso": "raw", "vhd": "vpc", "none": "raw"}
# Partition types a disk pool reports as a volume's format: its content is raw.
_PARTITION_TYPES = ("linux", "fat16", "fat32", "linux-swap", "linux-lvm", "linux-raid")
# Formats no QEMU block driver reads as a disk (an extended partition holds only other partitions).
_NOT_A_DISK = ("dir", "fat", "ploop", "extended")


@dataclass(frozen=True)
class VolumeRef:
    """A volume known by its pool, name and key."""

    pool: str
    volume: str
    key: str

    @property
    def identity(self) -> str:
        return "volume:" + self.key

    @property
    def name(self) -> str:
        return f"{self.pool}/{self.volume}"

    async def resolve(self, conn: libvirt.virConnect, attach: Attach) -> Source:
        try:
            volume = await run_blocking(conn.storageVolLookupByKey, self.key)
            pool = await run_blocking(volume.storagePoolLookupByVolume)
            active = await run_blocking(pool.isActive)
            xml = await run_blocking(volume.XMLDesc, 0)
            pool_name = await run_blocking(pool.name)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() in (libvirt.VIR_ERR_NO_STORAGE_VOL, libvirt.VIR_ERR_NO_STORAGE_POOL):
                raise SourceUnavailable(f"volume {self.name} is gone", errno.ENOENT) from None
            raise SourceUnavailable(f"cannot read volume {self.name}: {libvirt_message(exc)}", errno_of(exc)) from None
        if not active:
            raise SourceUnavailable(f"the pool of volume {self.name} is not active", errno.ENOENT)
        disk = volume_disk(xml, pool_name)
        return Source(identity=self.identity, name=self.name, disks=(disk,),
                      attach=writable_attach(self.name, (disk,), attach))

    async def gone(self, conn: libvirt.virConnect) -> str | None:
        try:
            await run_blocking(conn.storageVolLookupByKey, self.key)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() in (libvirt.VIR_ERR_NO_STORAGE_VOL, libvirt.VIR_ERR_NO_STORAGE_POOL):
                return f"volume {self.name} was deleted"
        return None


def volume_disk(volume_xml: str, pool_name: str) -> ET.Element:
    """The ``<disk>`` element that holds the volume described by ``volume_xml`` (of pool ``pool_name``)."""
    try:
        volume = ET.fromstring(volume_xml)
    except ET.ParseError as exc:
        raise SourceUnavailable(f"the volume XML does not parse: {exc}") from None
    name = volume.findtext("name") or "?"
    path = volume.findtext("./target/path")
    fmt = volume.find("./target/format")
    reported = (fmt.get("type") if fmt is not None else None) or "raw"
    if reported in _NOT_A_DISK:
        raise SourceUnavailable(f"volume {pool_name}/{name} has format {reported!r}, which is not a disk image")
    kind = volume.get("type", "file")
    if kind == "file" and path:
        disk = ET.Element("disk", type="file", device="disk")
        source = ET.Element("source", file=path)
    elif kind == "block" and path:
        disk = ET.Element("disk", type="block", device="disk")
        source = ET.Element("source", dev=path)
    else:
        disk = ET.Element("disk", type="volume", device="disk")
        source = ET.Element("source", pool=pool_name, volume=name)
    qemu_format = "raw" if kind == "block" and reported in _PARTITION_TYPES else _QEMU_FORMAT.get(reported, reported)
    ET.SubElement(disk, "driver", name="qemu", type=qemu_format)
    encryption = volume.find("./target/encryption")
    if encryption is not None:
        source.append(encryption)
    disk.append(source)
    return disk
