"""libvirt pull-mode backup jobs as virtmount uses them: a point-in-time NBD export of a running domain.

A job exports each disk read-only over NBD on a UNIX socket on the host; the
guest's QEMU copies what the guest overwrites into a qcow2 scratch volume per
disk, so the export stays as it was at the job's start. No checkpoint is made.

Everything virtmount makes for a job is named so that it can be found again:
scratch volumes ``virtmount-scratch-<owner>-<domain uuid>-<target>.qcow2`` in
virtmount's pool (``owner``: client host name and process id), sockets
``<domain uuid>.sock`` in a directory volume of the same pool owned by the
QEMU user. A job whose scratch volumes are not named so is someone else's and
is never touched. The functions here block (plain libvirt calls): the watchdog
process calls them as they are, the mount through ``run_blocking``.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass

import libvirt

log = logging.getLogger(__name__)

SCRATCH_PREFIX = "virtmount-scratch-"
# A job begins only with this much free in the scratch pool, and is ended when less is left: QEMU's
# copy-before-write fails the guest's own writes when a scratch volume cannot grow.
SCRATCH_RESERVE_BYTES = 128 << 20
SOCKET_PATH_MAX = 107  # sun_path holds 108 bytes, the last a NUL
SOCKET_DIR_PREFIX = "virtmount-nbd-"
JOB_END_TIMEOUT_S = 30.0
_SCRATCH_NAME = re.compile(
    re.escape(SCRATCH_PREFIX) + r"(?P<owner>.+)-(?P<uuid>[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})"
    r"-(?P<target>[^-/]+)\.qcow2$")


def this_owner() -> str:
    """Who makes a job: this client's host name and process id."""
    return f"{socket.gethostname()}.{os.getpid()}"


def owner_is_gone(owner: str) -> bool:
    """Whether ``owner`` (see ``this_owner``) is a process of this host that no longer exists."""
    host, _, pid = owner.rpartition(".")
    if host != socket.gethostname() or not pid.isdigit():
        return False  # another client's: it may be alive
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def scratch_name(owner: str, uuid: str, target: str) -> str:
    return f"{SCRATCH_PREFIX}{owner}-{uuid}-{target}.qcow2"


def scratch_owner(path: str) -> str | None:
    """The owner named in a scratch volume's file name, or None if it is not virtmount's."""
    match = _SCRATCH_NAME.match(os.path.basename(path))
    return None if match is None else match.group("owner")


def scratch_volume_xml(name: str, capacity: int) -> str:
    volume = ET.Element("volume")
    ET.SubElement(volume, "name").text = name
    ET.SubElement(volume, "capacity", unit="bytes").text = str(capacity)
    ET.SubElement(ET.SubElement(volume, "target"), "format", type="qcow2")
    return ET.tostring(volume, encoding="unicode")


def socket_dir_xml(name: str, dac_label: tuple[str, str] | None) -> str:
    """A directory volume for the sockets, owned by the QEMU user (``dac_label``: uid, gid) and closed to others."""
    volume = ET.Element("volume")
    ET.SubElement(volume, "name").text = name
    ET.SubElement(volume, "capacity").text = "0"
    target = ET.SubElement(volume, "target")
    ET.SubElement(target, "format", type="dir")
    permissions = ET.SubElement(target, "permissions")
    ET.SubElement(permissions, "mode").text = "0700" if dac_label else "0755"
    if dac_label:
        ET.SubElement(permissions, "owner").text = dac_label[0]
        ET.SubElement(permissions, "group").text = dac_label[1]
    return ET.tostring(volume, encoding="unicode")


def socket_dir_name(dac_label: tuple[str, str] | None) -> str:
    return SOCKET_DIR_PREFIX + ("-".join(dac_label) if dac_label else "root")


def dac_label(live_domain_xml: str) -> tuple[str, str] | None:
    """The uid and gid the domain's QEMU runs as (its DAC label, ``+64055:+64055``), or None if it has none."""
    root = ET.fromstring(live_domain_xml)
    for seclabel in root.findall("./seclabel"):
        if seclabel.get("model") == "dac":
            label = seclabel.findtext("label") or seclabel.findtext("imagelabel") or ""
            user, _, group = label.partition(":")
            if user and group:
                return user.lstrip("+"), group.lstrip("+")
    return None


@dataclass(frozen=True)
class ExportedDisk:
    """One disk of the job: its target in the guest (the NBD export name) and its scratch file."""

    target: str
    scratch_path: str


def backup_xml(socket_path: str, disks: list[ExportedDisk]) -> str:
    """The ``<domainbackup mode='pull'>`` for ``disks``; every other disk of the domain is left out."""
    backup = ET.Element("domainbackup", mode="pull")
    ET.SubElement(backup, "server", transport="unix", socket=socket_path)
    listed = ET.SubElement(backup, "disks")
    for disk in disks:
        element = ET.SubElement(listed, "disk", name=disk.target, backup="yes", type="file")
        ET.SubElement(element, "scratch", file=disk.scratch_path)
        ET.SubElement(element, "driver", type="qcow2")
    return ET.tostring(backup, encoding="unicode")


def export_disk(socket_path: str, target: str) -> ET.Element:
    """The appliance's ``<disk>`` that reads the export of ``target``: NBD over the job's socket, read-only."""
    disk = ET.Element("disk", type="network", device="disk")
    ET.SubElement(disk, "driver", name="qemu", type="raw")
    source = ET.SubElement(disk, "source", protocol="nbd", name=target)
    ET.SubElement(source, "host", transport="unix", socket=socket_path)
    ET.SubElement(disk, "readonly")
    return disk


def job_scratch_paths(job_xml: str) -> list[str]:
    """The scratch files of a running backup job (from ``virDomainBackupGetXMLDesc``)."""
    root = ET.fromstring(job_xml)
    return [s.get("file", "") for s in root.findall("./disks/disk/scratch") if s.get("file")]


def job_owner(job_xml: str) -> str | None:
    """The virtmount that made a job, or None if any of its scratch files is not virtmount's (someone else's job)."""
    owners = {scratch_owner(path) for path in job_scratch_paths(job_xml)}
    if len(owners) != 1 or None in owners:
        return None
    return owners.pop()


def current_job_xml(domain: libvirt.virDomain) -> str | None:
    """The domain's backup job, or None if it has none."""
    try:
        return str(domain.backupGetXMLDesc(0))
    except libvirt.libvirtError as exc:
        if exc.get_error_code() in (libvirt.VIR_ERR_NO_DOMAIN_BACKUP, libvirt.VIR_ERR_OPERATION_INVALID):
            return None
        raise


def pool_available(conn: libvirt.virConnect, pool_name: str) -> int:
    """Bytes free in a pool now (libvirt updates a pool's free space when it is refreshed)."""
    pool = conn.storagePoolLookupByName(pool_name)
    pool.refresh(0)
    return int(pool.info()[3])


def end_job(conn: libvirt.virConnect, domain: libvirt.virDomain, owner: str) -> bool:
    """End ``owner``'s backup job on ``domain`` (if it has one) and delete its scratch volumes; False if none."""
    job = current_job_xml(domain)
    if job is None or job_owner(job) != owner:
        return False
    try:
        domain.abortJob()
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_OPERATION_INVALID:  # ended meanwhile
            raise
    deadline = time.monotonic() + JOB_END_TIMEOUT_S
    while current_job_xml(domain) is not None:  # the job ends a moment after the abort returns
        if time.monotonic() > deadline:
            raise libvirt.libvirtError(f"the backup job did not end within {JOB_END_TIMEOUT_S:.0f} s of its abort")
        time.sleep(0.05)
    delete_scratch(conn, job_scratch_paths(job))
    return True


def delete_scratch(conn: libvirt.virConnect, paths: list[str]) -> None:
    """Delete scratch volumes by path; those already gone are skipped."""
    for path in paths:
        try:
            conn.storageVolLookupByPath(path).delete(0)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_NO_STORAGE_VOL:
                raise


def end_leftover_jobs(conn: libvirt.virConnect, pool_name: str, ours_too: bool = False) -> list[str]:
    """End the jobs and delete the scratch volumes of virtmounts of this host that died (``ours_too``: and
    this process's own, whose appliances went with a lost connection); the domains cleaned."""
    def stale(owner: str) -> bool:
        return owner_is_gone(owner) or (ours_too and owner == this_owner())

    cleaned: list[str] = []
    for domain in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
        try:
            job = current_job_xml(domain)
            owner = None if job is None else job_owner(job)
            if owner is not None and stale(owner) and end_job(conn, domain, owner):
                cleaned.append(str(domain.name()))
        except libvirt.libvirtError as exc:
            log.warning("cannot check domain %s for a leftover backup job: %s", domain.name(), exc)
    try:
        pool = conn.storagePoolLookupByName(pool_name)
        pool.refresh(0)
        in_use = set()
        for domain in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
            job = current_job_xml(domain)
            in_use.update(job_scratch_paths(job) if job is not None else [])
        leftovers = [volume.path() for volume in pool.listAllVolumes(0)
                     if (owner := scratch_owner(volume.name())) is not None and stale(owner)
                     and volume.path() not in in_use]
        delete_scratch(conn, leftovers)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_NO_STORAGE_POOL:
            log.warning("cannot delete leftover scratch volumes from pool %s: %s", pool_name, exc)
    return cleaned
