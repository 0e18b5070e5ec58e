"""Start-up and shut-down of a mount, in one place.

Order on the way up: check the mount point, connect, remove leftover
appliances and backup jobs, mount FUSE, report readiness. While serving: when
the libvirt connection is lost, drop the appliances; once it is re-opened,
destroy what they left on the host (virt/link.py re-opens it). On the way down
(fusermount3 -u, SIGTERM, SIGINT or SIGHUP): stop serving, sync and destroy
every appliance, unmount, close the connection.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import Callable, Iterable

import libvirt
import pyfuse3
import trio

from .appliance import ApplianceSettings, overlays_being_made, take_unconfirmed_ends
from .config import Config
from .domainevents import Change, domain_changes
from .errors import UsageError, VirtmountError
from .fs.nodes import ServedSource
from .fs.tree import ConnectionTree
from .fs.operations import Operations
from .leftovers import end_leftover_backup_jobs, remove_leftover_appliances
from .lifecycle import HostApplianceSource, SourceAppliance
from .sources import SourceRef
from .sources.domain import DomainRef
from .sources.running import AnyStateDomainRef
from .inspection_cache import InspectionCache
from .status import MountStatus
from .watchdog import WatchdogSource
from .virt.connection import close_connection, libvirt_message, open_connection, run_blocking, uses_embedded_driver
from .virt.domainxml import APPLIANCE_NAME_PREFIX, appliance_client, appliance_owner
from .virt.link import LibvirtDown, LibvirtLink
from .virt.overlays import delete_leftover_overlays_logged, transient_overlays

log = logging.getLogger(__name__)

IDLE_CHECK_INTERVAL_S = 2.0
UNMOUNT_CHECK_INTERVAL_S = 1.0
TERMINATE_GRACE_S = 5.0  # after a signal or an unmount, how long requests being answered may take to finish


def check_mountpoint(path: str) -> str:
    """The absolute mount point, or a UsageError saying what is wrong with it."""
    absolute = os.path.abspath(path)
    if not os.path.exists(absolute):
        raise UsageError(f"mount point {path} does not exist")
    if not os.path.isdir(absolute):
        raise UsageError(f"mount point {path} is not a directory")
    if os.path.ismount(absolute):
        raise UsageError(f"mount point {path} is busy: something is already mounted there")
    if not os.access(absolute, os.W_OK | os.X_OK):
        raise UsageError(f"mount point {path} is not writable by you")
    return absolute


async def _follow_domain_changes(link: LibvirtLink, tree: ConnectionTree, nursery: trio.Nursery,
                                 task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Domains that start, stop, or are undefined or defined anew end the appliances whose view that
    makes wrong (end_appliances_after). Registered again on each connection the link re-opens."""
    while True:
        conn = await link.connected()
        with trio.CancelScope() as scope:
            try:
                async with domain_changes(conn, lambda: not link.holds(conn)) as changes:
                    task_status.started()
                    task_status = trio.TASK_STATUS_IGNORED
                    nursery.start_soon(_cancel_when_lost, link, conn, scope)
                    async for uuid, change in changes:
                        end_appliances_after(change, uuid, tree.served_sources(), nursery)
            except libvirt.libvirtError as exc:  # e.g. the connection closed as we registered
                log.warning("cannot follow domain events: %s", libvirt_message(exc))
        task_status.started()
        task_status = trio.TASK_STATUS_IGNORED
        await link.wait_lost(conn)


async def _cancel_when_lost(link: LibvirtLink, conn: libvirt.virConnect, scope: trio.CancelScope) -> None:
    await link.wait_lost(conn)
    scope.cancel()


def end_appliances_after(change: Change, uuid: str, sources: Iterable[ServedSource], nursery: trio.Nursery) -> None:
    """End the appliances of domain ``uuid`` whose view ``change`` makes wrong: a stop ends a point-in-time
    view, a start the view of the disks as they are, a (re)definition any (see domainevents.py)."""
    for source in sources:
        appliance = source.appliance
        if source.identity != uuid or not (appliance.running or appliance.booting):
            continue
        if change is Change.STOPPED and appliance.snapshot_taken_at is None:
            continue  # a shut-off domain's appliance holds its disks as they are: nothing ended
        if change is Change.STARTED and not appliance.reads_disks_as_they_are:
            continue  # a point-in-time view, or the guest's own daemon: still right
        log.info("%s: the domain %s; its appliance ends", source.name, change.value)
        nursery.start_soon(appliance.release, f"the domain {change.value}")


async def _destroy_own_appliances(conn: libvirt.virConnect) -> list[tuple[str, list[str]]]:
    """After the connection is re-opened: appliances of ours from before are unreachable (their daemon
    channel went with the old connection) and, if libvirtd restarted, no longer auto-destroyed. Returns
    each one's name and throw-away overlays, which libvirt may have forgotten too: an appliance that was
    still booting when the connection went had not noted them yet (virt/overlays.py)."""
    destroyed: list[tuple[str, list[str]]] = []
    try:
        domains = await run_blocking(conn.listAllDomains, libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
    except libvirt.libvirtError as exc:
        log.warning("cannot list the appliances of the lost connection: %s", libvirt_message(exc))
        return destroyed
    for domain in domains:
        try:
            name = await run_blocking(domain.name)
            if not name.startswith(APPLIANCE_NAME_PREFIX):
                continue
            xml = await run_blocking(domain.XMLDesc, 0)
            if appliance_owner(xml) == str(os.getpid()):
                log.info("destroying appliance %s of the lost connection", name)
                await run_blocking(domain.destroy)
                destroyed.append((name, transient_overlays(xml)))
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                log.warning("cannot destroy an appliance of the lost connection: %s", libvirt_message(exc))
    return destroyed


async def _shut_down_idle_appliances(tree: ConnectionTree, idle_seconds: float) -> None:
    while True:
        await trio.sleep(IDLE_CHECK_INTERVAL_S)
        for source in tree.served_sources():
            if source.appliance.running and source.appliance.idle_for() >= idle_seconds:
                log.info("%s: idle for %.0f s", source.name, idle_seconds)
                await source.appliance.release("idle")


def _mountinfo_path(path: str) -> str:
    """A path as /proc/self/mountinfo writes it (space, tab, newline and backslash octal-escaped)."""
    return "".join(f"\\{ord(c):03o}" if c in " \t\n\\" else c for c in path)


def is_mounted_here(mountpoint: str) -> bool:
    """Whether ``mountpoint`` is a mount point in this process's namespace, without touching the mount."""
    wanted = _mountinfo_path(mountpoint)
    with open("/proc/self/mountinfo") as mountinfo:
        return any(line.split(" ", 5)[4] == wanted for line in mountinfo)


async def _stop_fuse_loop(fuse_loop: trio.CancelScope, why: str) -> None:
    """Stop serving: let the requests being answered finish, for TERMINATE_GRACE_S at most (one may
    wait for a boot that takes minutes, or never ends), then abandon the others."""
    pyfuse3.terminate()
    await trio.sleep(TERMINATE_GRACE_S)
    log.info("requests still unanswered %.0f s after %s are abandoned", TERMINATE_GRACE_S, why)
    fuse_loop.cancel()


async def _terminate_when_unmounted(mountpoint: str, fuse_loop: trio.CancelScope) -> None:
    """Stop serving once fusermount3 -u took the mount away.

    The kernel ends the FUSE session only when the last copy of the mount goes.
    libvirt starts QEMU in a private mount namespace that copies the host's
    mounts, ours included; where mounts do not propagate (private mounts),
    the appliances keep our mount alive and the session would never end.
    """
    while is_mounted_here(mountpoint):
        await trio.sleep(UNMOUNT_CHECK_INTERVAL_S)
    log.info("%s was unmounted", mountpoint)
    await _stop_fuse_loop(fuse_loop, "the unmount")


async def _terminate_on_signal(fuse_loop: trio.CancelScope,
                               task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        task_status.started()  # from now on a signal unmounts cleanly
        async for signum in signals:
            log.info("received %s: unmounting", signal.Signals(signum).name)
            await _stop_fuse_loop(fuse_loop, signal.Signals(signum).name)
            return


def _fuse_options(uri: str, config: Config) -> set[str]:
    """What libfuse is told: the URI as the source (as mount(8) and df show it), the type
    fuse.virtmount, the kernel's own permission checks, and the standard flags given.
    Guest disks are not trusted: their device nodes and set-user-ID files never act here."""
    source = uri.replace("\\", "\\\\").replace(",", "\\,")  # libfuse splits options at unescaped commas
    options = {f"fsname={source}", "subtype=virtmount", "default_permissions", "nodev", "nosuid"}
    if config.allow_other:
        options.add("allow_other")
    return options | set(config.kernel_flags)


async def serve(uri: str, mountpoint: str, config: Config, on_ready: Callable[[], None]) -> None:
    """Mount ``uri`` at ``mountpoint`` and serve until unmounted or signalled."""
    conn = await open_connection(uri)
    link = LibvirtLink(uri, conn)
    try:
        await remove_leftover_appliances(conn)
        await end_leftover_backup_jobs(conn, config.appliance.scratch_pool_name)
        async with trio.open_nursery() as nursery:
            host_appliance = HostApplianceSource(link, config.appliance.pool)
            inspection_cache = None if config.inspection_cache is None else InspectionCache(config.inspection_cache)
            # restores and backup jobs need a watchdog, which needs a client of its own: the embedded driver has none
            watchdogs = None if await run_blocking(uses_embedded_driver, conn) else WatchdogSource(uri)

            def make_appliance(source: SourceRef, settings: ApplianceSettings = config.appliance) -> SourceAppliance:
                if isinstance(source, DomainRef):  # running domains are served from a point-in-time export
                    source = AnyStateDomainRef(source, settings.pool, settings.scratch_pool_name)
                return SourceAppliance(link, source, settings, host_appliance, nursery, inspection_cache, watchdogs)

            serving = False

            def forget_kernel_entry(parent_inode: int, name: bytes) -> None:
                if serving:  # the kernel connection exists only between init and close
                    pyfuse3.invalidate_entry_async(parent_inode, name, ignore_enoent=True)

            started_at, started = time.time(), time.monotonic()
            host = await run_blocking(conn.getHostname)

            async def status_report() -> bytes:
                return MountStatus(
                    uri=uri, host=host, mountpoint=mountpoint, options=list(config.given), pid=os.getpid(),
                    started_at=started_at, uptime_seconds=round(time.monotonic() - started, 1),
                    cached_entries=tree.guests.cached_entries, sources=await tree.source_statuses(config.idle_seconds),
                ).to_json().encode()

            tree = ConnectionTree(link, make_appliance, nursery, config.cached_entries, forget_kernel_entry,
                                  status_report)
            try:
                pyfuse3.init(Operations(tree), mountpoint, _fuse_options(uri, config))
            except RuntimeError as exc:
                raise VirtmountError(f"cannot mount on {mountpoint}: {exc}") from None
            try:
                fuse_loop = trio.CancelScope()
                await nursery.start(_terminate_on_signal, fuse_loop)  # before readiness: systemd may stop us at once
                nursery.start_soon(_terminate_when_unmounted, mountpoint, fuse_loop)
                nursery.start_soon(_shut_down_idle_appliances, tree, config.idle_seconds)
                await nursery.start(_follow_domain_changes, link, tree, nursery)

                lost_overlays: list[tuple[str, list[str]]] = []  # (appliance, its throw-away overlays)

                async def connection_lost() -> None:
                    lost_overlays.extend(overlays_being_made.items())  # appliances starting: not noted yet
                    for source in tree.served_sources():
                        if (overlays := source.appliance.overlays) is not None:
                            lost_overlays.append(overlays)
                        nursery.start_soon(source.appliance.connection_lost)

                async def reopened(conn: libvirt.virConnect) -> None:
                    lost_overlays.extend(await _destroy_own_appliances(conn))
                    lost_overlays.extend(take_unconfirmed_ends())  # ended while the connection was down
                    for name, paths in lost_overlays:
                        await delete_leftover_overlays_logged(conn, name, paths, "libvirt after a restart")
                    lost_overlays.clear()
                    await end_leftover_backup_jobs(conn, config.appliance.scratch_pool_name, ours_too=True)

                await nursery.start(link.keep_open, connection_lost, reopened)
                on_ready()
                log.info("mounted %s on %s", uri, mountpoint)
                serving = True
                with fuse_loop:
                    await pyfuse3.main()
            finally:
                serving = False
                with trio.CancelScope(shield=True):
                    async with trio.open_nursery() as shutdowns:
                        for source in tree.served_sources():
                            shutdowns.start_soon(source.appliance.release, "unmount")
                    if watchdogs is not None:
                        watchdogs.close()
                    pyfuse3.close(unmount=is_mounted_here(mountpoint))
                log.info("%s", tree.prefetch_summary())
                nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            try:
                await close_connection(link.conn)
            except LibvirtDown:
                pass  # unmounted while the connection was down
    log.info("unmounted %s", mountpoint)

