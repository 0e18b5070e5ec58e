"""One running libguestfs appliance: boot it as a libvirt domain beside a guest, talk to it, shut it down.

The appliance domain is created paused with auto-destroy (so a killed client
leaves nothing running), its console and daemon channel are opened through
the libvirt connection, and only then is it resumed, so neither the boot log
nor the daemon's launch flag can be missed.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import time
from dataclasses import dataclass, replace
from xml.etree import ElementTree as ET

import libvirt
import trio

from .accelerator import Accelerator, AcceleratorPlan, accelerator_name, plan_accelerators
from .devicenames import COLD_BOOTED, RESTORED
from .failures import ErrnoError, errno_of
from .guestfs.client import GuestfsClient
from .guestfs.errors import ConnectionLost, GuestfsClientError, GuestfsError, GuestfsTimeout
from .faststart import (
    SLOTS,
    WARM_UP,
    FastStartUnavailable,
    SavedAppliance,
    SlotInUse,
    overlay_volume_xml,
    parse_taken_disks,
    restore_xml,
    take_disks_command,
)
from .inspection_cache import disks_identity
from .sources import Attach, Source
from .virt.connection import domain_exists, libvirt_message, run_blocking, uses_embedded_driver
from .virt.console import ConsoleLog
from .virt.domainxml import (
    APPLIANCE_NAME_PREFIX,
    DAEMON_CHANNEL,
    ApplianceSpec,
    GuestDefinition,
    appliance_disk,
    build_appliance_xml,
)
from .virt.overlays import delete_leftover_overlays_logged, disk_overlays, transient_overlays
from .virt.provision import HostAppliance, delete_volume
from .virt.stream import LibvirtByteStream
from .watchdog import Watchdog

log = logging.getLogger(__name__)

_SHUTDOWN_SYNC_TIMEOUT_S = 60.0

# The throw-away overlays libvirt makes as this process starts an appliance or plugs disks into one, by
# domain name, until the appliance is up and has noted them (Appliance.overlays). If the connection is lost
# meanwhile and libvirtd restarted, libvirt forgets them: mount.py deletes them once connected again.
overlays_being_made: dict[str, list[str]] = {}
# The throw-away overlays of appliances that this process ended but libvirt did not confirm ending (its
# connection was down, e.g. libvirtd restarting): such an appliance powers off by itself once its daemon
# channel closed, and a libvirtd restarted meanwhile no longer knows the overlays. mount.py deletes them
# once connected again (take_unconfirmed_ends).
_unconfirmed_ends: dict[str, list[str]] = {}


def take_unconfirmed_ends() -> list[tuple[str, list[str]]]:
    """The appliances (name, throw-away overlays) whose end libvirt did not confirm, forgotten here."""
    ends = list(_unconfirmed_ends.items())
    _unconfirmed_ends.clear()
    return ends


@dataclass(frozen=True)
class ApplianceSettings:
    """How appliances are booted; every field is a user setting (see ``virtmount --help``)."""

    accelerator: Accelerator = "auto"
    memory_mib: int = 1024
    vcpus: int = 1
    boot_timeout: float = 300.0
    call_timeout: float = 120.0
    pool: str = "virtmount"
    scratch_pool: str = ""  # where running domains' backup jobs keep their scratch volumes; "": ``pool``
    writable: bool = False
    verbose: bool = False
    extra_kernel_args: str = ""
    emulator: str = ""  # the QEMU binary on the host; "" for libvirt's choice
    fast_start: bool = True  # restore a saved appliance and plug the disks in (faststart.py)

    @property
    def scratch_pool_name(self) -> str:
        return self.scratch_pool or self.pool


class BootFailed(ErrnoError):
    """The appliance domain could not be created or its daemon never answered; ``reason`` says why
    in a few words (the message also says which appliance and what its console showed). Its errno is
    libvirt's error's where libvirt refused (e.g. ENOSPC: no room for an overlay), else EIO."""

    def __init__(self, message: str, reason: str = "", *, silent: bool = False, errno_value: int = errno.EIO) -> None:
        super().__init__(message, errno_value)
        self.reason = reason or message
        self.silent = silent  # its console printed nothing within its window (see accelerator.py)


def _appliance_name(guest_name: str) -> str:
    return f"{APPLIANCE_NAME_PREFIX}{guest_name}-{os.getpid()}-{secrets.token_hex(3)}"


class Appliance:
    """A booted appliance domain and the client of its daemon."""

    def __init__(self, guest_name: str, domain: libvirt.virDomain, client: GuestfsClient, console: ConsoleLog,
                 owns_domain: bool = True) -> None:
        self.guest_name = guest_name
        self.owns_domain = owns_domain  # False: the guest's own daemon, whose domain is never destroyed
        self.domain = domain
        self.client = client
        self.console = console
        self.domain_name = str(domain.name())
        self.boot_seconds = 0.0
        self.accelerator = ""  # the libvirt domain type it runs under (accelerator.KVM or TCG)
        self.disks_key = ""  # identifies the guest's disk set (inspection_cache.disks_identity)
        self.naming = COLD_BOOTED  # how its daemon names the guest's disks (devicenames.py)
        self.watchdog: Watchdog | None = None  # ends it if virtmount dies (restored appliances only)
        self.overlays: list[str] = []  # libvirt's throw-away overlays of its disks (virt/overlays.py)

    async def shutdown(self) -> None:
        """Sync and unmount inside the appliance, then destroy its domain; never raises."""
        with trio.CancelScope(shield=True):
            with trio.move_on_after(_SHUTDOWN_SYNC_TIMEOUT_S):
                try:
                    await self.client.internal_autosync()
                except GuestfsClientError as exc:
                    log.warning("appliance for %s: final sync failed: %s", self.guest_name, exc)
            await self.client.aclose()
            if self.owns_domain and not await _destroy_quietly(self.domain) and self.overlays:
                _unconfirmed_ends[self.domain_name] = self.overlays
            if self.watchdog is not None:
                self.watchdog.unwatch(await run_blocking(self.domain.name))


async def _destroy_quietly(domain: libvirt.virDomain) -> bool:
    """Destroy an appliance's domain; whether libvirt said it is gone (destroyed, or ended already)."""
    try:
        await run_blocking(domain.destroy)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() in (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_OPERATION_INVALID):
            return True
        log.warning("could not destroy appliance domain: %s", libvirt_message(exc))
        return False
    return True


def _spec(name: str, guest: GuestDefinition, host: HostAppliance, settings: ApplianceSettings, domain_type: str,
          root_overlay: str = "") -> ApplianceSpec:
    return ApplianceSpec(
        name=name,
        guest=guest,
        kernel_path=host.kernel_path,
        initrd_path=host.initrd_path,
        root_path=host.root_path,
        root_uuid=host.root_uuid,
        domain_type=domain_type,
        memory_mib=settings.memory_mib,
        vcpus=settings.vcpus,
        writable=settings.writable,
        verbose=settings.verbose,
        extra_kernel_args=settings.extra_kernel_args,
        emulator=settings.emulator,
        owner=str(os.getpid()),
        root_overlay=root_overlay,
    )


async def boot_appliance(
    conn: libvirt.virConnect,
    source: Source,
    host_appliance: HostAppliance,
    settings: ApplianceSettings,
    nursery: trio.Nursery,
    watchdog: Watchdog | None = None,
) -> Appliance:
    """Boot an appliance holding ``source``'s disks and wait until its daemon answers.

    Background tasks (the daemon client's reader, the console reader) run in
    ``nursery``; ``Appliance.shutdown`` ends them. Only with a ``watchdog`` (which ends
    restored appliances if this process dies; mount.py makes one where fast start is wanted and
    possible) may it be restored rather than booted cold.
    """
    if source.own_daemon:
        return await _attach_to_own_daemon(conn, source, settings, nursery)
    guest_name = source.name
    definition = GuestDefinition(name=source.name, disks=source.disks, seclabels=source.seclabels)
    settings = replace(settings, writable=source.attach is Attach.READ_WRITE)  # the source says how
    uri = await run_blocking(conn.getURI)
    disks_key = disks_identity(uri, source.identity, [ET.tostring(disk, encoding="unicode") for disk in source.disks])
    plan = await plan_accelerators(conn, settings.accelerator, settings.emulator)
    # A guest's own security labels apply to the whole appliance domain, which a restore cannot change.
    # Many disks are restored too: 100 disks plugged into a restored appliance were ready in 38 s here,
    # a cold boot with them took 85 s.
    if watchdog is not None and not definition.seclabels:
        try:
            appliance = await _fast_boot(conn, definition, host_appliance, settings, plan, nursery, watchdog)
        except FastStartUnavailable as exc:
            log.info("appliance for %s: no fast start (%s); booting it cold", guest_name, exc)
        else:
            appliance.disks_key = disks_key
            await _note_overlays(appliance)
            return appliance
    failure: BootFailed | None = None
    order = plan.domain_types  # a failed KVM leaves the plan (after the fast path, perhaps already)
    for attempt, domain_type in enumerate(order):
        spec = _spec(_appliance_name(guest_name.replace("/", "_")), definition, host_appliance, settings, domain_type)
        try:
            appliance = await _boot_once(conn, spec, settings, nursery, plan.first_output_window(domain_type))
        except BootFailed as exc:
            failure = exc
            plan.failed(domain_type, exc.reason, silent=exc.silent)
            if attempt + 1 < len(order):
                log.info("%s; trying %s", exc, accelerator_name(order[attempt + 1]))
            continue
        plan.worked(domain_type)
        appliance.disks_key = disks_key
        await _note_overlays(appliance)
        return appliance
    assert failure is not None
    if settings.accelerator == "kvm":
        raise BootFailed(f"{failure}; if KVM does not work on this host, use -o accel=tcg", failure.reason,
                         errno_value=failure.errno)
    raise failure


async def _note_overlays(appliance: Appliance) -> None:
    """Remember where libvirt put the appliance's throw-away overlays: a libvirtd restart makes it forget."""
    try:
        appliance.overlays = transient_overlays(await run_blocking(appliance.domain.XMLDesc, 0))
    except libvirt.libvirtError as exc:
        log.debug("%s: cannot read its XML: %s", appliance.domain_name, libvirt_message(exc))


async def _attach_to_own_daemon(
    conn: libvirt.virConnect, source: Source, settings: ApplianceSettings, nursery: trio.Nursery
) -> Appliance:
    """The guestfs daemon a running domain carries itself, reached through its channel: nothing is booted.
    The daemon sends its launch flag when the channel opens."""
    started = time.monotonic()
    try:
        domain = await run_blocking(conn.lookupByUUIDString, source.identity)
        raw_channel = LibvirtByteStream.new_stream(conn)
        await run_blocking(domain.openChannel, DAEMON_CHANNEL, raw_channel, 0)
        uri = await run_blocking(conn.getURI)
    except libvirt.libvirtError as exc:
        raise BootFailed(f"cannot open the guestfs channel of {source.name}: {libvirt_message(exc)}") from None
    channel = LibvirtByteStream(raw_channel, f"guestfs channel of {source.name}")
    channel.start()
    client = GuestfsClient(channel, call_timeout=settings.call_timeout, require_launch_flag=True)
    client.start(nursery)
    try:
        await client.wait_for_launch(settings.call_timeout)
    except GuestfsClientError as exc:
        await client.aclose()
        raise BootFailed(f"the guestfs daemon of {source.name} did not answer on its channel: {exc}") from None
    except BaseException:
        with trio.CancelScope(shield=True):
            await client.aclose()
        raise
    appliance = Appliance(source.name, domain, client, ConsoleLog(source.name), owns_domain=False)
    appliance.disks_key = disks_identity(uri, source.identity + ":own-daemon", [])
    appliance.boot_seconds = time.monotonic() - started
    log.info("%s: reached its own guestfs daemon in %.1f s", source.name, appliance.boot_seconds)
    return appliance


# Saved appliances (appliance root, slot) this process is making or restoring: a second boot does
# not wait for one, it takes the next.
_saved_appliances_busy: set[tuple[str, int]] = set()
# Saves that failed, by state path: (when, why); not tried again for SAVE_RETRY_S.
_failed_saves: dict[str, tuple[float, str]] = {}
SAVE_RETRY_S = 600.0
# The wait for plugged-in disks to show: udev took 0.3 s a disk here for 100 disks.
_DEVICES_PLUGGED_TIMEOUT_S = 60.0
_DEVICES_PLUGGED_TIMEOUT_PER_DISK_S = 1.0
_RESTORED_ANSWER_TIMEOUT_S = 60.0  # a restored daemon answers within a second; a cold boot may take minutes


async def _fast_boot(
    conn: libvirt.virConnect,
    definition: GuestDefinition,
    host: HostAppliance,
    settings: ApplianceSettings,
    plan: AcceleratorPlan,
    nursery: trio.Nursery,
    watchdog: Watchdog,
) -> Appliance:
    """Restore a saved appliance for these settings, the first of the SLOTS not in use (saving one
    first if there is none yet, with the first accelerator that boots), then plug the guest's disks in.
    FastStartUnavailable: nothing is left running."""
    for slot in range(SLOTS):
        if (host.root_path, slot) in _saved_appliances_busy:
            continue
        _saved_appliances_busy.add((host.root_path, slot))
        try:
            started = time.monotonic()
            saved, domain, domain_type = await _restore(conn, definition, host, settings, plan, nursery, watchdog,
                                                        slot)
            break
        except SlotInUse:
            continue
        finally:
            _saved_appliances_busy.discard((host.root_path, slot))
    else:
        raise FastStartUnavailable(f"the {SLOTS} saved appliances are all in use")
    what = f"appliance for {definition.name} (restored)"
    try:
        appliance = await _attach_and_resume(conn, domain, definition.name, what, settings, nursery, restored=True)
    except BootFailed as exc:
        watchdog.unwatch(saved.name)
        await _forget_saved_appliance(conn, saved, host, settings)
        raise FastStartUnavailable(str(exc)) from None
    plan.worked(domain_type)
    appliance.naming = RESTORED
    appliance.watchdog = watchdog
    appliance.accelerator = domain_type
    log.info("%s: plugging %d disk(s) in", what, len(definition.disks))
    try:
        await _plug_in_guest_disks(appliance, definition, settings)
    except (libvirt.libvirtError, GuestfsClientError, FastStartUnavailable) as exc:
        await _end_half_plugged(conn, appliance)
        reason = libvirt_message(exc) if isinstance(exc, libvirt.libvirtError) else str(exc)
        raise FastStartUnavailable(f"cannot plug the guest's disks in: {reason}") from None
    except BaseException:
        with trio.CancelScope(shield=True):
            await _end_half_plugged(conn, appliance)
        raise
    appliance.boot_seconds = time.monotonic() - started
    log.info("%s ready in %.1f s as %s", what, appliance.boot_seconds, saved.name)
    return appliance


async def _restore(
    conn: libvirt.virConnect,
    definition: GuestDefinition,
    host: HostAppliance,
    settings: ApplianceSettings,
    plan: AcceleratorPlan,
    nursery: trio.Nursery,
    watchdog: Watchdog,
    slot: int,
) -> tuple[SavedAppliance, libvirt.virDomain, str]:
    """Saved appliance ``slot`` restored, paused (made first if there is none): it, its domain, its
    domain type. SlotInUse if it runs for another appliance."""
    saved, saved_xml, domain_type = await _saved_appliance(conn, host, settings, plan, nursery, slot)
    if await _domain_exists(conn, saved.name):
        raise SlotInUse(f"the saved appliance {saved.name} is in use")
    await _replace_overlay(conn, settings.pool, saved.run_volume, saved.path(host, saved.root_volume))
    try:
        xml = restore_xml(saved_xml, saved.path(host, saved.root_volume), saved.path(host, saved.run_volume),
                          definition.name, str(os.getpid()))
        watchdog.watch(saved.name)
        log.info("appliance for %s: restoring the saved appliance %s", definition.name, saved.name)
        await run_blocking(conn.restoreFlags, saved.state_path(host), xml, libvirt.VIR_DOMAIN_SAVE_PAUSED)
        domain = await run_blocking(conn.lookupByName, saved.name)
    except libvirt.libvirtError as exc:
        watchdog.unwatch(saved.name)
        if await _domain_exists(conn, saved.name):
            raise SlotInUse(f"the saved appliance {saved.name} is in use") from None
        await _forget_saved_appliance(conn, saved, host, settings)  # stale (e.g. QEMU upgraded)
        raise FastStartUnavailable(f"cannot restore the saved appliance: {libvirt_message(exc)}") from None
    return saved, domain, domain_type


async def _saved_appliance(
    conn: libvirt.virConnect,
    host: HostAppliance,
    settings: ApplianceSettings,
    plan: AcceleratorPlan,
    nursery: trio.Nursery,
    slot: int,
) -> tuple[SavedAppliance, str, str]:
    """Saved appliance ``slot`` (its domain XML, its domain type) for the first of the plan's accelerators that
    has one or boots to make one: an accelerator that does not boot never gets one. SlotInUse if another
    appliance is being saved into it."""
    failure = FastStartUnavailable("no accelerator to boot with")
    for domain_type in plan.domain_types:
        saved = SavedAppliance.for_boot(host, domain_type, settings.memory_mib, settings.vcpus,
                                        settings.extra_kernel_args, settings.verbose, settings.emulator, slot)
        if (saved_xml := await _saved_domain_xml(conn, saved.state_path(host))) is not None:
            return saved, saved_xml, domain_type
        if await _domain_exists(conn, saved.name):
            raise SlotInUse(f"the saved appliance {saved.name} is being made")
        try:
            await _save_appliance(conn, saved, host, settings, domain_type, plan, nursery)
        except FastStartUnavailable as exc:
            log.info("%s", exc)
            failure = exc
            continue
        if (saved_xml := await _saved_domain_xml(conn, saved.state_path(host))) is not None:
            return saved, saved_xml, domain_type
        failure = FastStartUnavailable(f"the saved appliance {saved.state_path(host)} cannot be read back")
    raise failure


async def _saved_domain_xml(conn: libvirt.virConnect, state_path: str) -> str | None:
    """The domain XML inside a saved appliance, or None if there is none (or it is unreadable)."""
    try:
        return str(await run_blocking(conn.saveImageGetXMLDesc, state_path, 0))
    except libvirt.libvirtError:
        return None


async def _domain_exists(conn: libvirt.virConnect, name: str) -> bool:
    """Whether a saved appliance's domain runs; when libvirt cannot say, it is taken to (another slot
    or a cold boot is tried, and nothing of the saved appliance is forgotten)."""
    try:
        return await run_blocking(domain_exists, conn, name)
    except libvirt.libvirtError:
        return True


async def _save_appliance(
    conn: libvirt.virConnect,
    saved: SavedAppliance,
    host: HostAppliance,
    settings: ApplianceSettings,
    domain_type: str,
    plan: AcceleratorPlan,
    nursery: trio.Nursery,
) -> None:
    """Boot an appliance with its root disk only, on a root overlay of its own, and save it. A save that
    failed (e.g. no room in the pool for the ~150 MB state) is not tried again for SAVE_RETRY_S: each try
    costs a whole extra boot."""
    state_path = saved.state_path(host)
    if (failed := _failed_saves.get(state_path)) is not None and time.monotonic() - failed[0] < SAVE_RETRY_S:
        raise FastStartUnavailable(f"saving an appliance failed {time.monotonic() - failed[0]:.0f} s ago "
                                   f"({failed[1]}); tried again {SAVE_RETRY_S:.0f} s after that")
    await _replace_overlay(conn, settings.pool, saved.root_volume, host.root_path)
    spec = _spec(saved.name, GuestDefinition(name="(saved appliance)", disks=()), host, settings, domain_type,
                 root_overlay=saved.path(host, saved.root_volume))
    try:
        appliance = await _boot_once(conn, spec, settings, nursery, plan.first_output_window(domain_type))
    except BootFailed as exc:
        plan.failed(domain_type, exc.reason, silent=exc.silent)
        await _delete_volumes(conn, settings.pool, [saved.root_volume])
        raise FastStartUnavailable(str(exc)) from None
    failure = ""
    try:
        await appliance.client.debug_sh(WARM_UP)
    except GuestfsClientError as exc:  # saved all the same (restores pay for what it did not do), or not at all
        log.warning("%s: the warm-up before saving failed: %s", saved.name, exc)
    try:
        with trio.CancelScope(shield=True):
            await run_blocking(appliance.domain.save, state_path)
    except libvirt.libvirtError as exc:
        failure = libvirt_message(exc)
    finally:
        await appliance.client.aclose()
        await _destroy_quietly(appliance.domain)
    if failure:
        _failed_saves[state_path] = (time.monotonic(), failure)
        await _delete_volumes(conn, settings.pool, [os.path.basename(state_path), saved.root_volume])
        raise FastStartUnavailable(f"cannot save the appliance into pool {settings.pool}: {failure}")
    log.info("saved a booted appliance as %s for fast starts", saved.state_path(host))


async def _replace_overlay(conn: libvirt.virConnect, pool_name: str, name: str, backing_path: str) -> None:
    """(Re)create the volume ``name`` in the pool as an empty qcow2 overlay of ``backing_path``."""
    await _delete_volumes(conn, pool_name, [name])
    try:
        pool = await run_blocking(conn.storagePoolLookupByName, pool_name)
        backing = await run_blocking(conn.storageVolLookupByPath, backing_path)
        capacity = (await run_blocking(backing.info))[1]
        await run_blocking(pool.createXML, overlay_volume_xml(name, backing_path, capacity), 0)
    except libvirt.libvirtError as exc:
        raise FastStartUnavailable(f"cannot make the overlay {name}: {libvirt_message(exc)}") from None


async def _forget_saved_appliance(
    conn: libvirt.virConnect, saved: SavedAppliance, host: HostAppliance, settings: ApplianceSettings
) -> None:
    """Delete a saved appliance that did not come back, so that the next boot saves a new one."""
    log.warning("the saved appliance %s did not come back; it will be made again", saved.name)
    await _delete_volumes(conn, settings.pool,
                          [os.path.basename(saved.state_path(host)), saved.root_volume, saved.run_volume])


async def _delete_volumes(conn: libvirt.virConnect, pool_name: str, names: list[str]) -> None:
    try:
        pool = await run_blocking(conn.storagePoolLookupByName, pool_name)
        await run_blocking(pool.refresh, 0)
        for name in names:
            await run_blocking(delete_volume, pool, name)
    except libvirt.libvirtError as exc:
        log.warning("cannot delete %s from pool %s: %s", ", ".join(names), pool_name, libvirt_message(exc))


async def _end_half_plugged(conn: libvirt.virConnect, appliance: Appliance) -> None:
    """Destroy a restored appliance whose disks were being plugged in, then delete the overlays of theirs
    still there. libvirt deletes the overlays of the disks in the domain's definition only, and a cancelled
    boot abandons an attach in its thread: the destroy cuts it short after libvirt made the disk's overlay
    and before the disk joined the definition (the destroy waits for the attach, so whatever it made is
    there by then)."""
    await appliance.shutdown()
    await delete_leftover_overlays_logged(conn, appliance.domain_name, appliance.overlays, "an interrupted hot-plug")


async def _plug_in_guest_disks(appliance: Appliance, definition: GuestDefinition, settings: ApplianceSettings) -> None:
    """Attach the guest's disks behind the root (sdb, sdc, … as in a cold boot), set the appliance's
    clock, wait until it sees the disks and activate their LVM volumes as its init does at boot."""
    disks = [appliance_disk(disk, index + 1, settings.writable) for index, disk in enumerate(definition.disks)]
    overlays_being_made[appliance.domain_name] = disk_overlays(appliance.domain_name, disks)
    try:
        for disk in disks:
            xml = ET.tostring(disk, encoding="unicode")
            await run_blocking(appliance.domain.attachDeviceFlags, xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)
    finally:
        appliance.overlays = overlays_being_made.pop(appliance.domain_name)
    what = f"appliance for {definition.name} (restored)"
    if not definition.disks:
        await _set_clock(appliance.client, what)
        return
    wait = _DEVICES_PLUGGED_TIMEOUT_S + _DEVICES_PLUGGED_TIMEOUT_PER_DISK_S * len(disks)
    command = take_disks_command(len(disks), time.time(), wait)
    taken = parse_taken_disks(await appliance.client.debug_sh(command, timeout=wait + 60))
    if not taken.clock_set:
        log.warning("%s: could not set its clock; files it writes get times in the past", what)
    if taken.disks_seen < len(disks):
        raise FastStartUnavailable(f"the appliance saw {max(taken.disks_seen, 0)} of the guest's {len(disks)} disk(s) "
                                   f"within {wait:.0f} s")
    if taken.lvm_error is not None:
        raise FastStartUnavailable(f"cannot activate the guest's LVM volumes: {taken.lvm_error}")


class _SilentConsole(Exception):
    """A fresh appliance printed nothing on its console within its window."""

    def __init__(self, seconds: float) -> None:
        super().__init__(seconds)
        self.seconds = seconds


# Most telling first: the line that names why a boot failed.
_TELLING_CONSOLE_WORDS = ("kernel panic", "error", "failed", "not found", "cannot")


def _console_summary(console: ConsoleLog) -> str:
    """The telling console lines of a failed boot: the one naming the failure, and the very last."""
    tail = console.tail(40)
    if not tail:
        return "; the console printed nothing"
    shown = [tail[-1]]
    for word in _TELLING_CONSOLE_WORDS:
        telling = [line for line in tail if word in line.lower()]
        if telling:
            if telling[-1] != tail[-1]:
                shown.insert(0, telling[-1])
            break
    return f"; last console lines: {' | '.join(shown)}"


async def _boot_once(
    conn: libvirt.virConnect,
    spec: ApplianceSpec,
    settings: ApplianceSettings,
    nursery: trio.Nursery,
    first_output_window: float | None = None,
) -> Appliance:
    """Boot one appliance cold; ``first_output_window``: seconds after which a console that printed
    nothing means the appliance is not booting (see accelerator.py)."""
    what = f"appliance for {spec.guest.name} ({accelerator_name(spec.domain_type)})"
    flags = libvirt.VIR_DOMAIN_START_PAUSED
    if not uses_embedded_driver(conn):
        flags |= libvirt.VIR_DOMAIN_START_AUTODESTROY
    started = time.monotonic()
    log.info("%s: starting %s", what, spec.name)
    xml = build_appliance_xml(spec)
    overlays_being_made[spec.name] = transient_overlays(xml)
    try:
        try:
            domain = await run_blocking(conn.createXML, xml, flags)
        except libvirt.libvirtError as exc:
            raise BootFailed(f"cannot start {what}: {libvirt_message(exc)}", libvirt_message(exc),
                             errno_value=errno_of(exc)) from None
        appliance = await _attach_and_resume(conn, domain, spec.guest.name, what, settings, nursery, restored=False,
                                             first_output_window=first_output_window)
        appliance.overlays = overlays_being_made[spec.name]
    finally:
        del overlays_being_made[spec.name]
    appliance.boot_seconds = time.monotonic() - started
    appliance.accelerator = spec.domain_type
    log.info("%s booted in %.1f s as %s", what, appliance.boot_seconds, spec.name)
    return appliance


async def _set_clock(client: GuestfsClient, what: str) -> None:
    """A restored appliance's clock goes on from when its state was saved: set it to now, or what it
    writes gets times in the past (a failure is logged: reading needs no clock)."""
    try:
        await client.debug_sh(b"date -u -s @%.6f" % time.time(), timeout=_RESTORED_ANSWER_TIMEOUT_S)
    except GuestfsError as exc:
        log.warning("%s: could not set its clock (%s); files it writes get times in the past", what, exc)


async def _attach_and_resume(
    conn: libvirt.virConnect,
    domain: libvirt.virDomain,
    guest_name: str,
    what: str,
    settings: ApplianceSettings,
    nursery: trio.Nursery,
    *,
    restored: bool,
    first_output_window: float | None = None,
) -> Appliance:
    """Open the console and the daemon channel of a paused appliance, resume it and wait until its
    daemon answers: the launch flag of a fresh boot, or a ping for a restored one (whose daemon
    sent its flag before it was saved). A fresh boot whose console stays silent for
    ``first_output_window`` seconds has failed. The domain is destroyed if that fails."""
    console = ConsoleLog(await run_blocking(domain.name))
    client: GuestfsClient | None = None
    try:
        console_stream = console.attach(conn, domain)
        nursery.start_soon(console.collect, console_stream)
        raw_channel = LibvirtByteStream.new_stream(conn)
        await run_blocking(domain.openChannel, DAEMON_CHANNEL, raw_channel, 0)
        channel = LibvirtByteStream(raw_channel, f"daemon channel of {what}")
        channel.start()
        client = GuestfsClient(channel, call_timeout=settings.call_timeout, require_launch_flag=not restored)
        client.start(nursery)
        await run_blocking(domain.resume)
        if restored:
            await client.ping_daemon(timeout=min(settings.boot_timeout, _RESTORED_ANSWER_TIMEOUT_S))
        else:
            if first_output_window is not None:
                log.info("%s: waiting up to %.0f s for its first console output", what, first_output_window)
                with trio.move_on_after(first_output_window):
                    await console.first_output.wait()
                if not console.first_output.is_set():
                    raise _SilentConsole(first_output_window)
            log.info("%s: waiting up to %.0f s for its daemon", what, settings.boot_timeout)
            await client.wait_for_launch(settings.boot_timeout)
    except (libvirt.libvirtError, GuestfsClientError, _SilentConsole) as exc:
        if isinstance(exc, _SilentConsole):
            reason = f"no console output in {exc.seconds:.0f} s"
        elif isinstance(exc, libvirt.libvirtError):
            reason = libvirt_message(exc)
        elif isinstance(exc, GuestfsTimeout):
            reason = f"its daemon did not answer within {settings.boot_timeout:.0f} s"
        elif isinstance(exc, ConnectionLost):
            reason = "it stopped before its daemon answered"
        else:
            reason = f"its daemon answered with an error: {exc}"
        if client is not None:
            await client.aclose()
        await _destroy_quietly(domain)
        await trio.sleep(0.2)  # let the console reader take the last output
        last = "" if isinstance(exc, _SilentConsole) else _console_summary(console)
        raise BootFailed(f"{what} failed to {'resume' if restored else 'boot'}: {reason}{last}", reason,
                         silent=isinstance(exc, _SilentConsole),
                         errno_value=errno_of(exc) if isinstance(exc, libvirt.libvirtError) else errno.EIO) from None
    except BaseException:
        with trio.CancelScope(shield=True):
            if client is not None:
                await client.aclose()
            await _destroy_quietly(domain)
        raise
    return Appliance(guest_name, domain, client, console)
