"""A shut-off domain as a source: its disks, found by the domain's UUID.

The mount resolves a domain's name to its UUID once, when the name is looked
up; every boot then finds the domain by that UUID, so a domain replaced
under the same name is never served under the old one's identity (and inode
numbers). cdrom and floppy devices are not served: they are install media
and boot floppies, not the guest's data. A disk that names a pool's volume
(``type='volume'``) is given as libvirt resolves it, a file or block device,
so that a file gets its throw-away overlay like any other (libvirt allows
overlays on ``type='file'`` disks only; a volume group spread over a
read-only disk and an overlaid one would not activate).
"""

from __future__ import annotations

import copy
import errno
import xml.etree.ElementTree as ET
from dataclasses import dataclass

import libvirt

from ..failures import errno_of
from ..virt.connection import libvirt_message, run_blocking
from ..virt.domainxml import read_guest_definition
from . import Attach, Source, SourceUnavailable, attach_mode, writable_attach

_SKIPPED_DEVICES = ("cdrom", "floppy")


@dataclass(frozen=True)
class DomainRef:
    """A domain known by name and UUID."""

    name: str
    uuid: str

    @property
    def identity(self) -> str:
        return self.uuid

    async def resolve(self, conn: libvirt.virConnect, attach: Attach) -> Source:
        try:
            domain = await run_blocking(conn.lookupByUUIDString, self.uuid)
            running = await run_blocking(domain.isActive)
            xml = await run_blocking(domain.XMLDesc, 0)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                raise SourceUnavailable(f"domain {self.name} ({self.uuid}) is gone", errno.ENOENT) from None
            raise SourceUnavailable(f"cannot read domain {self.name}: {libvirt_message(exc)}", errno_of(exc)) from None
        if running:
            raise SourceUnavailable(f"domain {self.name!r} is running; virtmount reads shut-off domains only for now")
        definition = read_guest_definition(xml)
        disks = tuple([await _as_resolved(conn, disk) for disk in definition.disks
                       if disk.get("device") not in _SKIPPED_DEVICES])
        return Source(identity=self.uuid, name=self.name, disks=disks,
                      attach=writable_attach(self.name, disks, attach), seclabels=definition.seclabels)

    async def gone(self, conn: libvirt.virConnect) -> str | None:
        try:
            await run_blocking(conn.lookupByUUIDString, self.uuid)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return f"domain {self.name} ({self.uuid}) was undefined"
        return None


async def _as_resolved(conn: libvirt.virConnect, disk: ET.Element) -> ET.Element:
    """A ``type='volume'`` disk of a file or block volume as a file or block disk; other disks as they are."""
    source = disk.find("source")
    if disk.get("type") != "volume" or source is None:
        return disk
    pool_name, volume_name = source.get("pool", ""), source.get("volume", "")
    try:
        volume = await run_blocking(lambda: conn.storagePoolLookupByName(pool_name).storageVolLookupByName(volume_name))
        kind, path = (await run_blocking(volume.info))[0], await run_blocking(volume.path)
    except libvirt.libvirtError as exc:
        raise SourceUnavailable(f"cannot find volume {volume_name} of pool {pool_name}: {libvirt_message(exc)}",
                                errno_of(exc)) from None
    attribute = {libvirt.VIR_STORAGE_VOL_FILE: "file", libvirt.VIR_STORAGE_VOL_BLOCK: "dev"}.get(kind)
    if attribute is None:
        return disk  # a network volume: libvirt resolves it
    resolved = copy.deepcopy(disk)
    resolved.set("type", "file" if attribute == "file" else "block")
    resolved_source = resolved.find("source")
    assert resolved_source is not None
    for name in ("pool", "volume", "mode"):
        resolved_source.attrib.pop(name, None)
    resolved_source.set(attribute, path)
    return resolved


async def domain_named(conn: libvirt.virConnect, name: str) -> DomainRef:
    """The domain called ``name`` now, by UUID; SourceUnavailable (ENOENT) if there is none."""
    try:
        domain = await run_blocking(conn.lookupByName, name)
        uuid = await run_blocking(domain.UUIDString)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            raise SourceUnavailable(f"no domain named {name!r}", errno.ENOENT) from None
        raise SourceUnavailable(f"cannot look up domain {name!r}: {libvirt_message(exc)}", errno_of(exc)) from None
    return DomainRef(name, uuid)


async def domain_source(conn: libvirt.virConnect, name: str, writable: bool = False) -> Source:
    """The disks of the shut-off domain called ``name`` (for one-off boots: inspect, tests, the bench)."""
    return await (await domain_named(conn, name)).resolve(conn, attach_mode(writable))
