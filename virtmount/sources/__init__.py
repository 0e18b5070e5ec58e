"""Sources: what one appliance serves.

A source is a set of disks exactly as libvirt describes them (``<disk>``
elements), resolved once from a stable identity (a domain's UUID, a storage
volume's key), with how the appliance attaches them. Releasing a source is
the end of its appliance: the appliance domain is transient and
auto-destroyed, and libvirt deletes the throw-away overlays with it; a
source that keeps something else on the host (a backup job) has a ``Hold``,
released after its appliance.

Each kind of source is one module: ``domain.py`` (a shut-off domain's disks),
``volume.py`` (one storage volume), ``running.py`` (a running domain's
point-in-time export). The mount knows a source by a
``SourceRef`` (identity and display name, cheap to make from a
listing) and resolves it into a ``Source`` at each boot of its appliance.
"""

from __future__ import annotations

import enum
import errno
import logging
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Protocol

import libvirt

from ..failures import ErrnoError

log = logging.getLogger(__name__)


class Attach(enum.Enum):
    """How the appliance holds a source's disks."""

    # Read-only: file images behind a throw-away overlay (``<transient shareBacking='yes'/>``; XFS and
    # ext4 write even when mounted read-only), block and network disks ``<readonly/>``.
    READ_ONLY_OVERLAY = "read-only overlay"
    READ_WRITE = "read-write"


def attach_mode(writable: bool) -> Attach:
    """The attach mode the ``rw`` setting asks for."""
    return Attach.READ_WRITE if writable else Attach.READ_ONLY_OVERLAY


def writable_attach(name: str, disks: tuple[ET.Element, ...], wanted: Attach) -> Attach:
    """``wanted``, unless a disk cannot be written safely: read-only or shareable in the guest's XML
    (written by no one, or by several machines), or not a file or block device (network disks:
    QEMU's image locking, which keeps a second writer out, covers local files and devices only).
    Such a source is served read-only (EROFS), with a log line."""
    if wanted is not Attach.READ_WRITE:
        return wanted
    for disk in disks:
        source = disk.find("source")
        where = "?" if source is None else source.get("file") or source.get("dev") or source.get("name") or "?"
        if disk.find("readonly") is not None or disk.find("shareable") is not None:
            why = "is read-only or shareable in the guest's XML"
        elif disk.get("type") not in ("file", "block"):
            why = f"is a {disk.get('type')} disk, which no image lock guards against a second writer"
        else:
            continue
        log.warning("%s: served read-only: its disk %s %s", name, where, why)
        return Attach.READ_ONLY_OVERLAY
    return wanted


class Hold(Protocol):
    """Something a resolved source keeps on the host until it is released (a running domain's backup job)."""

    @property
    def watchdog_item(self) -> str:
        """How the watchdog names it, to end it if virtmount dies (see watchdog.py)."""
        ...

    @property
    def taken_at(self) -> float:
        """When the view it gives was taken (wall clock)."""
        ...

    async def broken(self) -> str:
        """Returns only if it cannot go on (its scratch pool filling up), saying why; the appliance is
        then ended (and this released) at once."""
        ...

    async def release(self) -> None:
        """End it; never raises (logged)."""
        ...


@dataclass(frozen=True)
class Source:
    """The disks one appliance serves, as resolved for one boot."""

    identity: str  # stable across remounts: the domain's UUID, "volume:" + the volume's key
    name: str  # for logs and the appliance's metadata, e.g. "web1" or "default/disk.qcow2"
    disks: tuple[ET.Element, ...]
    attach: Attach
    seclabels: tuple[ET.Element, ...] = field(default=())
    hold: Hold | None = None  # released after the appliance is gone (or its boot failed)
    own_daemon: bool = False  # served by the domain's own guestfs daemon on its channel: no appliance, no disks


class SourceUnavailable(ErrnoError):
    """The source cannot be served now; ``errno`` says how the mount reports it (ENOENT: it is gone)."""


class SourceRef(Protocol):
    """A source as the mount knows it before any boot."""

    @property
    def identity(self) -> str: ...

    @property
    def name(self) -> str: ...

    async def resolve(self, conn: libvirt.virConnect, attach: Attach) -> Source:
        """The source's disks now; SourceUnavailable if it cannot be served."""
        ...

    async def gone(self, conn: libvirt.virConnect) -> str | None:
        """Why the source no longer exists (deleted, undefined), or None if it still does or libvirt
        cannot tell now; asked while its appliance serves it, since libvirt has no event for a
        deleted volume."""
        ...
