"""Throw-away overlays that libvirt forgot, found and deleted through the storage API.

libvirt makes a ``<transient/>`` disk's overlay beside its image, named
``IMAGE.TRANSIENT-DOMAIN``, and deletes it when the domain ends. A libvirtd
restarted while the domain runs forgets that (libvirt 9.0): destroyed after
the restart, the domain leaves its overlays behind, and the next domain of the
same name (a restored appliance always has its saved name) cannot start that
disk ("Overlay file … already exists"). The host may be remote, so files go
through the storage API: the active pool whose directory holds them, or a
transient dir pool made for that directory and removed again.
"""

from __future__ import annotations

import logging
import os
import xml.etree.ElementTree as ET

import libvirt

from .connection import libvirt_message, pool_directory, run_blocking

log = logging.getLogger(__name__)


def transient_overlays(domain_xml: str) -> list[str]:
    """The paths of the throw-away overlays libvirt made (or makes as it starts) for the domain's
    ``<transient/>`` file disks (a running domain's XML names the overlay as the disk's source, its
    image as the backing store)."""
    root = ET.fromstring(domain_xml)
    return disk_overlays(root.findtext("name", ""), root.findall("./devices/disk"))


def disk_overlays(domain_name: str, disks: list[ET.Element]) -> list[str]:
    """The throw-away overlays of those of ``disks`` that are ``<transient/>`` files, in domain ``domain_name``."""
    suffix = f".TRANSIENT-{domain_name}"
    paths = []
    for disk in disks:
        source = disk.find("source")
        path = "" if source is None else source.get("file", "")
        if disk.find("transient") is not None and path:
            paths.append(path if path.endswith(suffix) else path + suffix)
    return paths


def delete_leftover_overlays(conn: libvirt.virConnect, domain_name: str, paths: list[str]) -> list[str]:
    """Delete those of ``paths`` that still exist and that no running domain called ``domain_name``
    has as a disk (blocking); the paths deleted.

    A saved appliance is restored under its saved name, so a domain of that name may run again
    meanwhile, for another process and other disks: only the overlays it uses stay. (Before, any
    domain of that name kept them all; the likeliest cause of the one overlay a make test run left
    behind, after a libvirtd restart followed at once by the next test's restore.) Not covered: that
    domain plugging in the very same image at this moment (its overlay made, its disk not yet in its
    XML); the overlay then goes and its hot-plug fails, so that appliance boots cold."""
    in_use = _overlays_in_use(conn, domain_name)
    deleted = []
    for path in paths:
        if path in in_use:
            continue  # the disk of a domain of that name started since
        try:
            if _delete_file(conn, path):
                deleted.append(path)
        except libvirt.libvirtError as exc:
            log.warning("cannot delete the leftover overlay %s: %s", path, libvirt_message(exc))
    return deleted


async def delete_leftover_overlays_logged(conn: libvirt.virConnect, domain_name: str, paths: list[str],
                                         left_by: str) -> None:
    """delete_leftover_overlays in a thread, each deletion logged as left by ``left_by``; a libvirt
    error is logged, not raised (the overlays stay for ``virtmount gc``)."""
    try:
        deleted = await run_blocking(delete_leftover_overlays, conn, domain_name, paths)
    except libvirt.libvirtError as exc:
        log.warning("%s: cannot look for its leftover overlays: %s", domain_name, libvirt_message(exc))
        return
    for path in deleted:
        log.info("%s: deleted the overlay %s, left behind by %s", domain_name, path, left_by)


def _overlays_in_use(conn: libvirt.virConnect, domain_name: str) -> set[str]:
    """The throw-away overlays of the domain called ``domain_name`` now; empty if there is no such domain."""
    try:
        xml = conn.lookupByName(domain_name).XMLDesc(0)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
            raise
        return set()
    return set(transient_overlays(xml))


def _delete_file(conn: libvirt.virConnect, path: str) -> bool:
    directory, name = os.path.split(path)
    pool = _pool_of(conn, directory)
    made = pool is None
    if pool is None:
        pool = conn.storagePoolCreateXML(dir_pool_xml(f"virtmount-cleanup-{os.getpid()}", directory), 0)
    try:
        pool.refresh(0)
        try:
            volume = pool.storageVolLookupByName(name)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_STORAGE_VOL:
                return False
            raise
        volume.delete(0)
        return True
    finally:
        if made:
            pool.destroy()


def _pool_of(conn: libvirt.virConnect, directory: str) -> libvirt.virStoragePool | None:
    """The active dir or fs pool whose directory is ``directory``."""
    for pool in conn.listAllStoragePools(libvirt.VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE):
        if pool_directory(pool) == directory.rstrip("/"):
            return pool
    return None


def dir_pool_xml(name: str, directory: str) -> str:
    """A transient dir pool's XML, to reach a directory's files through the storage API."""
    pool = ET.Element("pool", type="dir")
    ET.SubElement(pool, "name").text = name
    ET.SubElement(ET.SubElement(pool, "target"), "path").text = directory
    return ET.tostring(pool, encoding="unicode")
