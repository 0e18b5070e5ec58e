"""A running domain as a source: a point-in-time export of its disks through libvirt's pull-mode backup.

A second QEMU cannot open a running guest's images (QEMU's image locking), so
the appliance reads them through a backup job instead (virt/backup.py): each
disk is exported read-only over NBD on a UNIX socket on the host, frozen at
the job's start, while the guest keeps running and writing (what it
overwrites goes to a scratch volume in virtmount's pool). The appliance, a
domain on the same host, holds the exports as read-only network disks, so
nothing is ever written to the guest's disks and dirty journals are not
replayed (guestlayout.py mounts such filesystems without replay).

A running domain that carries its own guestfs daemon on a ``type='unix'``
channel named ``org.libguestfs.channel.0`` is served through that channel
instead (``Source.own_daemon``): no job, no appliance. With ``-o rw`` it is
written through that daemon (the guest's own, which sees its disks as the
guest set them up); point-in-time views are always read-only.

When the guest agent answers, the guest's filesystems are frozen for the
job's start only (freeze, begin, thaw, each bounded in time); otherwise the
view is crash-consistent. The job, its scratch volumes and the watchdog's
knowledge of them are the source's ``Hold``: released after the appliance.
"""

from __future__ import annotations

import errno
import logging
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

import libvirt
import trio

from ..virt import backup
from ..failures import errno_of
from ..virt.connection import libvirt_message, run_blocking
from ..virt.domainxml import DAEMON_CHANNEL, read_guest_definition
from ..watchdog import backup_item
from . import Attach, Source, SourceUnavailable
from .domain import DomainRef

log = logging.getLogger(__name__)

AGENT_CHANNEL = "org.qemu.guest_agent.0"
FREEZE_TIMEOUT_S = 10.0  # a guest agent that does not freeze in time gives a crash-consistent view
THAW_TIMEOUT_S = 30.0
SCRATCH_CHECK_S = 2.0  # how often a held job's scratch pool is looked at (libvirt has no event for it)


@dataclass(frozen=True)
class AnyStateDomainRef:
    """A domain served from its disks while shut off, from a point-in-time export while running
    (the state at each boot decides); ``pool``: where the sockets go (virtmount's own pool, whose
    path is short enough for a socket address), ``scratch_pool``: where scratch volumes go."""

    domain: DomainRef
    pool: str
    scratch_pool: str

    @property
    def identity(self) -> str:
        return self.domain.identity

    @property
    def name(self) -> str:
        return self.domain.name

    async def resolve(self, conn: libvirt.virConnect, attach: Attach) -> Source:
        try:
            domain = await run_blocking(conn.lookupByUUIDString, self.domain.uuid)
            running = await run_blocking(domain.isActive)
        except libvirt.libvirtError:
            running = False  # the shut-off path says what is wrong
        if not running:
            return await self.domain.resolve(conn, attach)
        try:
            own_daemon = _has_guestfs_channel(str(await run_blocking(domain.XMLDesc, 0)))
        except libvirt.libvirtError as exc:
            raise SourceUnavailable(f"cannot read running domain {self.name}: {libvirt_message(exc)}",
                                    errno_of(exc)) from None
        if own_daemon:  # reached through its channel as it is: no job, no appliance; written with -o rw
            return Source(identity=self.identity, name=self.name, disks=(), attach=attach, own_daemon=True)
        return await snapshot_source(conn, domain, self.domain, self.pool, self.scratch_pool)

    async def gone(self, conn: libvirt.virConnect) -> str | None:
        return await self.domain.gone(conn)


def _has_guestfs_channel(live_xml: str) -> bool:
    """Whether the domain carries a guestfs daemon's channel that libvirt can open (``type='unix'``)."""
    try:
        root = ET.fromstring(live_xml)
    except ET.ParseError as exc:
        raise SourceUnavailable(f"the XML of the running domain does not parse: {exc}") from None
    return any(channel.get("type") == "unix" and channel.find(f"./target[@name='{DAEMON_CHANNEL}']") is not None
               for channel in root.findall("./devices/channel"))


@dataclass
class BackupJob:
    """A running backup job of virtmount's, and how to end it."""

    conn: libvirt.virConnect
    domain: libvirt.virDomain
    domain_name: str
    uuid: str
    owner: str
    scratch_paths: list[str]
    scratch_pool: str
    taken_at: float = field(default_factory=time.time)

    @property
    def watchdog_item(self) -> str:
        return backup_item(self.uuid, self.owner)

    async def broken(self) -> str:
        """Returns only when the scratch pool has less than SCRATCH_RESERVE_BYTES free: the job must
        end before a scratch volume cannot grow, since QEMU would then fail the guest's own writes."""
        while True:
            await trio.sleep(SCRATCH_CHECK_S)
            try:
                available = await run_blocking(backup.pool_available, self.conn, self.scratch_pool)
            except libvirt.libvirtError as exc:  # e.g. a volume being made in the pool: next time
                log.debug("%s: cannot look at scratch pool %s: %s", self.domain_name, self.scratch_pool,
                          libvirt_message(exc))
                continue
            if available < backup.SCRATCH_RESERVE_BYTES:
                return (f"scratch pool {self.scratch_pool} has {available >> 20} MiB free, less than "
                        f"{backup.SCRATCH_RESERVE_BYTES >> 20} MiB: the view is ended before the guest's writes "
                        f"could fail")

    async def release(self) -> None:
        with trio.CancelScope(shield=True):
            try:
                ended = await run_blocking(backup.end_job, self.conn, self.domain, self.owner)
                if not ended:  # the guest shut down (its job ended with it): only the scratch is left
                    await run_blocking(backup.delete_scratch, self.conn, self.scratch_paths)
                log.info("%s: backup job ended, scratch deleted", self.domain_name)
            except libvirt.libvirtError as exc:
                log.error("%s: cannot end the backup job or delete its scratch: %s", self.domain_name,
                          libvirt_message(exc))


async def snapshot_source(conn: libvirt.virConnect, domain: libvirt.virDomain, ref: DomainRef, pool_name: str,
                          scratch_pool_name: str) -> Source:
    """Begin a backup job on the running ``domain`` and return its exports as the source's disks (its socket
    in ``pool_name``, its scratch volumes in ``scratch_pool_name``)."""
    try:
        live_xml = str(await run_blocking(domain.XMLDesc, 0))
        existing = await run_blocking(backup.current_job_xml, domain)
    except libvirt.libvirtError as exc:
        raise SourceUnavailable(f"cannot read running domain {ref.name}: {libvirt_message(exc)}",
                                errno_of(exc)) from None
    if existing is not None:
        raise SourceUnavailable(f"a backup job is already running on {ref.name}", errno.EBUSY)
    targets = _exportable_targets(live_xml, ref.name)
    if not targets:
        raise SourceUnavailable(f"running domain {ref.name} has no disk that can be exported")
    owner = backup.this_owner()
    try:
        pool = await run_blocking(conn.storagePoolLookupByName, pool_name)
        scratch_pool = await run_blocking(conn.storagePoolLookupByName, scratch_pool_name)
        available = await run_blocking(backup.pool_available, conn, scratch_pool_name)
        if available < backup.SCRATCH_RESERVE_BYTES:
            raise SourceUnavailable(f"scratch pool {scratch_pool_name} has {available >> 20} MiB free; a view of "
                                    f"running domain {ref.name} needs at least {backup.SCRATCH_RESERVE_BYTES >> 20} MiB "
                                    "there (see the scratch_pool option)")
        socket_path = await _socket_path(pool, backup.dac_label(live_xml), ref.uuid)
        disks = [backup.ExportedDisk(target, await _scratch(scratch_pool, domain,
                                                            backup.scratch_name(owner, ref.uuid, target)))
                 for target in targets]
    except libvirt.libvirtError as exc:
        await _delete_made_scratch(conn, scratch_pool_name, owner, ref.uuid)
        raise SourceUnavailable(f"cannot prepare the backup of {ref.name}: {libvirt_message(exc)}",
                                errno_of(exc)) from None
    job = BackupJob(conn, domain, ref.name, ref.uuid, owner, [d.scratch_path for d in disks], scratch_pool_name)
    try:
        await _begin(domain, ref.name, backup.backup_xml(socket_path, disks), _agent_connected(live_xml))
    except libvirt.libvirtError as exc:
        await run_blocking(backup.delete_scratch, conn, job.scratch_paths)
        message = libvirt_message(exc)
        if await run_blocking(backup.current_job_xml, domain) is not None:
            raise SourceUnavailable(f"a backup job is already running on {ref.name}", errno.EBUSY) from None
        raise SourceUnavailable(f"cannot begin the backup of {ref.name}: {message}", errno_of(exc)) from None
    except BaseException:
        await job.release()
        raise
    exports = tuple(backup.export_disk(socket_path, target) for target in targets)
    return Source(identity=ref.uuid, name=ref.name, disks=exports,
                  attach=Attach.READ_ONLY_OVERLAY, hold=job)


def _exportable_targets(live_xml: str, name: str) -> list[str]:
    """The guest's disks a backup can export: cdroms, floppies and read-only disks are skipped (logged)."""
    targets = []
    for disk in read_guest_definition(live_xml).disks:
        target = disk.find("target")
        dev = target.get("dev", "?") if target is not None else "?"
        if disk.get("device") in ("cdrom", "floppy") or disk.find("readonly") is not None:
            log.info("%s: disk %s is not exported (%s)", name, dev, disk.get("device") if disk.get("device") != "disk"
                     else "read-only")
            continue
        targets.append(dev)
    return targets


def _agent_connected(live_xml: str) -> bool:
    """Whether the guest agent's channel is connected now (libvirt tracks it in the live XML)."""
    root = ET.fromstring(live_xml)
    return any(t.get("name") == AGENT_CHANNEL and t.get("state") == "connected"
               for t in root.findall("./devices/channel/target"))


async def _socket_path(pool: libvirt.virStoragePool, dac_label: tuple[str, str] | None, uuid: str) -> str:
    """The job's socket: in a directory volume of the pool that only the QEMU user can enter (made once)."""
    name = backup.socket_dir_name(dac_label)
    try:
        directory = await run_blocking(pool.storageVolLookupByName, name)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_NO_STORAGE_VOL:
            raise
        directory = await run_blocking(pool.createXML, backup.socket_dir_xml(name, dac_label), 0)
    path = f"{await run_blocking(directory.path)}/{uuid}.sock"
    if len(path.encode()) > backup.SOCKET_PATH_MAX:
        raise SourceUnavailable(f"the socket path {path} is longer than the {backup.SOCKET_PATH_MAX} bytes a UNIX "
                                "socket address holds; use a pool with a shorter path (the pool option)")
    return path


async def _scratch(pool: libvirt.virStoragePool, domain: libvirt.virDomain, name: str) -> str:
    """A new qcow2 scratch volume as large as the disk (``name`` ends in the disk's target)."""
    target = name.removesuffix(".qcow2").rsplit("-", 1)[1]
    capacity = (await run_blocking(domain.blockInfo, target))[0]
    volume = await run_blocking(pool.createXML, backup.scratch_volume_xml(name, capacity), 0)
    return str(await run_blocking(volume.path))


async def _delete_made_scratch(conn: libvirt.virConnect, pool_name: str, owner: str, uuid: str) -> None:
    """Delete the scratch volumes of a job that could not be prepared."""
    try:
        pool = await run_blocking(conn.storagePoolLookupByName, pool_name)
        volumes = await run_blocking(pool.listAllVolumes, 0)
        prefix = backup.scratch_name(owner, uuid, "")[:-len(".qcow2")]
        await run_blocking(backup.delete_scratch, conn, [v.path() for v in volumes if v.name().startswith(prefix)])
    except libvirt.libvirtError as exc:
        log.warning("cannot delete the scratch volumes in pool %s: %s", pool_name, libvirt_message(exc))


async def _begin(domain: libvirt.virDomain, name: str, job_xml: str, agent: bool) -> None:
    """Begin the job; with an agent, between a freeze and a thaw of the guest's filesystems, each bounded."""
    frozen = False
    started = time.monotonic()
    if agent:
        with trio.move_on_after(FREEZE_TIMEOUT_S):
            try:
                await trio.to_thread.run_sync(domain.fsFreeze, None, 0, abandon_on_cancel=True)
                frozen = True
            except libvirt.libvirtError as exc:
                log.warning("%s: the guest agent did not freeze the filesystems (%s); the view is crash-consistent",
                            name, libvirt_message(exc))
        if not frozen and time.monotonic() - started >= FREEZE_TIMEOUT_S:
            log.warning("%s: the guest agent did not freeze the filesystems within %.0f s; the view is "
                        "crash-consistent", name, FREEZE_TIMEOUT_S)
    else:
        log.info("%s: no guest agent; the view is crash-consistent", name)
    begun = time.monotonic()
    try:
        await run_blocking(domain.backupBegin, job_xml, None, libvirt.VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL)
    finally:
        if agent:  # a freeze that timed out may still happen: thaw in any case
            with trio.CancelScope(shield=True), trio.move_on_after(THAW_TIMEOUT_S):
                try:
                    await trio.to_thread.run_sync(domain.fsThaw, None, 0, abandon_on_cancel=True)
                except libvirt.libvirtError as exc:
                    if frozen:
                        log.error("%s: cannot thaw the guest's filesystems: %s", name, libvirt_message(exc))
        log.info("%s: backup job began in %.3f s%s", name, time.monotonic() - begun,
                 f"; filesystems frozen for {time.monotonic() - started:.3f} s" if frozen else "")
