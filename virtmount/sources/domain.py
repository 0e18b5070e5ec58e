"""A shut-off domain as a source: its disks, found by the domain's UUID.

The mount resolves a domain's name to its UUID once, when the name is looked
up; every boot then finds the domain by that UUID, so a domain replaced
under the same name is never served under the old one's identity (and inode
numbers). cdrom and floppy devices are not served: they are install media
and boot floppies, not the guest's data.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

import libvirt

from ..virt.connection import libvirt_message, run_blocking
from ..virt.domainxml import read_guest_definition
from . import Attach, Source, SourceUnavailable, attach_mode

_SKIPPED_DEVICES = ("cdrom", "floppy")


@dataclass(frozen=True)
class DomainRef:
    """A domain known by name and UUID."""

    name: str
    uuid: str
    kind: str = "domain"

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
            raise SourceUnavailable(f"cannot read domain {self.name}: {libvirt_message(exc)}") from None
        if running:
            raise SourceUnavailable(f"domain {self.name!r} is running; virtmount reads shut-off domains only for now")
        definition = read_guest_definition(xml)
        disks = tuple(disk for disk in definition.disks if disk.get("device") not in _SKIPPED_DEVICES)
        return Source(kind=self.kind, identity=self.uuid, name=self.name, disks=disks, attach=attach,
                      seclabels=definition.seclabels)


async def domain_named(conn: libvirt.virConnect, name: str) -> DomainRef:
    """The domain called ``name`` now, by UUID; SourceUnavailable (ENOENT) if there is none."""
    try:
        domain = await run_blocking(conn.lookupByName, name)
        uuid = await run_blocking(domain.UUIDString)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            raise SourceUnavailable(f"no domain named {name!r}", errno.ENOENT) from None
        raise SourceUnavailable(f"cannot look up domain {name!r}: {libvirt_message(exc)}") from None
    return DomainRef(name, uuid)


async def domain_source(conn: libvirt.virConnect, name: str, writable: bool = False) -> Source:
    """The disks of the shut-off domain called ``name`` (for one-off boots: inspect, tests, the bench)."""
    return await (await domain_named(conn, name)).resolve(conn, attach_mode(writable))
