"""Per-source appliance life cycle in a mount: boot on first use, mount the views, idle shutdown.

Each source (see sources/) gets at most one appliance. Concurrent first
accesses wait for the same boot, which resolves the source (its disks now)
and lays out its views (guestlayout.py). After an idle period (no access, no
open files) the appliance is synced and destroyed; the next access boots it
again. A failed boot is remembered for FAILED_BOOT_RETRY_S so that a broken
source does not cost a boot attempt per system call; whatever a boot meets
(libvirt, the daemon, a bug) ends that boot only, never the mount. While an
appliance serves, the mount asks libvirt at most every PRESENCE_CHECK_S
whether its source still exists (libvirt has no event for a deleted volume,
and QEMU keeps reading a deleted image file): a source found gone ends its
appliance and answers EIO.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from xml.etree import ElementTree as ET

import libvirt
import trio

from .accelerator import accelerator_name
from .appliance import Appliance, ApplianceSettings, boot_appliance
from .devicenames import RESTORED
from .errors import VirtmountError
from .failures import ErrnoError, errno_of, reason_of
from .guestfs.errors import GuestfsClientError
from .guestlayout import GuestLayout, lay_out_os, mount_devices
from .inspection_cache import InspectionCache
from .sources import Attach, Hold, Source, SourceRef, attach_mode
from .status import DiskStatus, SourceStatus, clock, iso_time
from .virt.link import LibvirtDown, LibvirtLink
from .virt.provision import HostAppliance, provision
from .watchdog import Watchdog, WatchdogSource

log = logging.getLogger(__name__)

FAILED_BOOT_RETRY_S = 10.0
PRESENCE_CHECK_S = 2.0


class GuestUnavailableError(ErrnoError):
    """Files of this source cannot be served now; ``errno`` says how the mount reports it."""


class SourceAppliance:
    """The appliance of one source, booted on demand and shut down when idle."""

    def __init__(
        self,
        link: LibvirtLink,
        source: SourceRef,
        settings: ApplianceSettings,
        host_appliance: "HostApplianceSource",
        nursery: trio.Nursery,
        inspection_cache: InspectionCache | None = None,
        watchdogs: WatchdogSource | None = None,
    ) -> None:
        self.source = source
        self.name = source.name
        self._inspection_cache = inspection_cache
        self._watchdogs = watchdogs  # None: appliances are never restored, always booted cold
        self._link = link
        self._settings = settings
        self._host_appliance = host_appliance
        self._nursery = nursery
        self._appliance: Appliance | None = None
        self._laying_out: Appliance | None = None  # booted, its filesystems not laid out yet
        self._layout: GuestLayout | None = None
        self._booting: trio.Event | None = None
        self._boot_started = 0.0
        self._failure: tuple[float, GuestUnavailableError] | None = None
        self._served: Source | None = None  # the disks the running appliance holds
        self._last_shutdown = ""
        self._last_used = time.monotonic()
        self._presence_checked_at = time.monotonic()
        self._open_handles = 0
        self._generation = 0
        self._boot_scope: trio.CancelScope | None = None
        self._hold_watch: trio.CancelScope | None = None  # the watch of the running appliance's hold
        self._devices_lock = trio.Lock()
        self._mounting_devices = False
        # Called after a running appliance is discarded: the disks may change before the next boot,
        # so what the kernel still caches of this source's files must go.
        self.on_discard: Callable[[], None] | None = None

    @property
    def known_has_os(self) -> bool | None:
        """Whether the guest has an OS, if a boot has told us; None before that."""
        return None if self._layout is None else self._layout.has_os

    @property
    def running(self) -> bool:
        return self._appliance is not None

    @property
    def booting(self) -> bool:
        return self._booting is not None

    @property
    def overlays(self) -> tuple[str, list[str]] | None:
        """The appliance's domain name and the throw-away overlays libvirt made for it: the running one's, or
        the one booted and still laying out the guest's filesystems."""
        appliance = self._appliance or self._laying_out
        return None if appliance is None or not appliance.owns_domain else (appliance.domain_name, appliance.overlays)

    @property
    def running_layout(self) -> GuestLayout | None:
        """The layout of the appliance running now, without booting one."""
        if self._layout is not None and self._appliance is not None and not self._layout.client.closed:
            return self._layout
        return None

    @property
    def snapshot_taken_at(self) -> float | None:
        """When the view the running appliance serves was taken (a running domain's point-in-time
        export), or None if it serves disks as they are, or nothing."""
        served = self._served
        if self._appliance is None or served is None or served.hold is None:
            return None
        return served.hold.taken_at

    @property
    def reads_disks_as_they_are(self) -> bool:
        """Whether the running appliance reads its source's disks directly (a shut-off domain's, a volume),
        not a point-in-time export nor a guest's own daemon."""
        served = self._served
        return self._appliance is not None and served is not None and served.hold is None and not served.own_daemon

    def touch(self) -> None:
        self._last_used = time.monotonic()

    def handle_opened(self) -> None:
        self._open_handles += 1
        self.touch()

    def handle_closed(self) -> None:
        self._open_handles -= 1
        self.touch()

    async def layout(self, *, with_devices: bool = False) -> GuestLayout:
        """The running appliance's layout, booting it first if needed (shared by concurrent callers);
        ``with_devices``: with every filesystem mounted for the devices/ views too."""
        layout = await self._booted_layout()
        if with_devices and not layout.devices_mounted:
            async with self._devices_lock:
                if not layout.devices_mounted:
                    self._mounting_devices = True  # takes seconds: not idle meanwhile
                    try:
                        await mount_devices(layout, self.name)
                    except GuestfsClientError as exc:
                        log.error("%s: cannot list or mount the filesystems: %s", self.name, reason_of(exc))
                        raise GuestUnavailableError(f"cannot list or mount the filesystems: {reason_of(exc)}",
                                                    errno_of(exc)) from None
                    finally:
                        self._mounting_devices = False
                        self.touch()
        return layout

    async def _booted_layout(self) -> GuestLayout:
        self.touch()
        while True:
            if (layout := self.running_layout) is not None:
                await self._check_presence()
                return layout
            if self._appliance is not None:  # the daemon connection broke: the appliance died
                log.warning("%s: appliance connection lost; it will be booted again", self.name)
                await self._discard_appliance("lost")
            if self._failure is not None:
                failed_at, failure = self._failure
                if time.monotonic() - failed_at < FAILED_BOOT_RETRY_S:
                    raise failure
                self._failure = None
            if self._booting is None:
                try:  # no boot while the connection is down: EIO now, boots again once it is back
                    self._link.ensure_up()
                except LibvirtDown as exc:
                    raise GuestUnavailableError(str(exc), errno_of(exc)) from None
                self._booting = trio.Event()
                self._boot_started = time.monotonic()
                self._nursery.start_soon(self._boot, self._booting)
            await self._booting.wait()

    async def _check_presence(self) -> None:
        """End the appliance with EIO if its source was deleted or undefined (checked at most every
        PRESENCE_CHECK_S; concurrent callers do not wait for the check)."""
        if time.monotonic() - self._presence_checked_at < PRESENCE_CHECK_S:
            return
        self._presence_checked_at = time.monotonic()
        try:
            conn = self._link.conn
        except LibvirtDown:
            return  # the connection's loss ends the appliance anyway
        reason = await self.source.gone(conn)
        if reason is None or self._appliance is None:
            return
        log.error("%s: %s while served; its appliance is shut down", self.name, reason)
        failure = GuestUnavailableError(reason)
        await self._discard_appliance(reason)
        self._failure = (time.monotonic(), failure)
        raise failure

    async def _boot(self, done: trio.Event) -> None:
        try:
            with trio.CancelScope() as self._boot_scope:
                host = await self._host_appliance.get()
                # the appliance's background tasks outlive this task: they run in the mount's nursery
                conn = self._link.conn  # one connection for the whole boot
                source = await self.source.resolve(conn, attach_mode(self._settings.writable))
                watchdog = None
                try:
                    watchdog = await self._watchdog_for(source)
                    log.info("%s: booting an appliance", self.name)
                    appliance = await boot_appliance(conn, source, host, self._settings, self._nursery,
                                                     watchdog if self._settings.fast_start else None)
                except BaseException:
                    await _let_go(source, watchdog)
                    raise
                self._served = source
                self._generation += 1
                self._laying_out = appliance
                try:
                    layout = await self._lay_out(appliance)
                except BaseException as exc:
                    await appliance.shutdown()
                    await _let_go(source, watchdog)
                    if isinstance(exc, (GuestfsClientError, VirtmountError, libvirt.libvirtError)):
                        raise GuestUnavailableError(
                            f"appliance booted but the disks could not be mounted: {reason_of(exc)}",
                            errno_of(exc)) from None
                    raise
                self._appliance, self._layout = appliance, layout
                self._presence_checked_at = time.monotonic()
                if source.hold is not None:
                    self._hold_watch = trio.CancelScope()
                    self._nursery.start_soon(self._end_when_broken, source.hold, self._hold_watch)
                log.info("%s: ready (%s)", self.name, "the guest's OS in fs/" if layout.has_os else "no OS found")
                self.touch()
        except Exception as exc:  # a boot's failure is the source's, never the mount's
            message = reason_of(exc)
            if isinstance(exc, (VirtmountError, GuestfsClientError, libvirt.libvirtError)):
                log.error("%s: %s", self.name, message)
            else:
                log.exception("%s: boot failed on an internal error", self.name)
            self._failure = (time.monotonic(), GuestUnavailableError(message, errno_of(exc)))
        finally:
            self._laying_out = None
            self._boot_scope = None
            self._booting = None
            done.set()

    async def _end_when_broken(self, hold: Hold, watch: trio.CancelScope) -> None:
        """End the appliance, answering EIO for a while, if what its source holds cannot go on;
        ``watch`` is cancelled when the appliance ends otherwise."""
        with watch:
            reason = await hold.broken()
        if watch.cancel_called:
            return
        self._hold_watch = None
        log.error("%s: %s", self.name, reason)
        failure = GuestUnavailableError(reason)
        await self._discard_appliance(reason)
        self._failure = (time.monotonic(), failure)

    async def _watchdog_for(self, source: Source) -> Watchdog | None:
        """The watchdog, told about what ``source`` holds on the host; None where there is none (it is
        needed for restored appliances and for holds)."""
        if self._watchdogs is None or not (self._settings.fast_start or source.hold is not None):
            return None
        watchdog = await self._watchdogs.get()
        if watchdog is not None and source.hold is not None:
            watchdog.watch(source.hold.watchdog_item)
        return watchdog

    async def _lay_out(self, appliance: Appliance) -> GuestLayout:
        """The OS view, from the layout remembered for these disks when it still holds."""
        cache, key = self._inspection_cache, appliance.disks_key
        remembered = cache.load(key) if cache is not None else None
        served = self._served
        writable = served is not None and served.attach is Attach.READ_WRITE
        layout = await lay_out_os(appliance.client, self.name, self._generation, remembered, appliance.naming,
                                  writable)
        if cache is not None and layout.remembered != remembered:
            if layout.remembered is None:
                cache.forget(key)
            else:
                cache.store(key, layout.remembered)
        return layout

    def idle_for(self) -> float:
        """Seconds since the last access, or 0 while files are open, a boot is under way or the
        devices/ views are being mounted."""
        if self._open_handles > 0 or self._booting is not None or self._mounting_devices:
            return 0.0
        return time.monotonic() - self._last_used

    async def release(self, why: str = "released") -> None:
        """Sync and shut the appliance down now (``why``: idle time reached, release asked, unmount)."""
        if self._boot_scope is not None:
            self._boot_scope.cancel()
        await self._discard_appliance(why)
        self._failure = None

    async def connection_lost(self) -> None:
        """The libvirt connection closed and took the daemon channel with it: calls in flight fail
        now (EIO), the appliance is dropped (mount.py destroys its domain once the connection is back)
        and the next access boots a new one, without waiting out an earlier boot failure."""
        if self._layout is not None:
            await self._layout.client.aclose()
        await self.release("the libvirt connection was lost")

    async def _discard_appliance(self, why: str) -> None:
        appliance, self._appliance, self._layout = self._appliance, None, None
        if self._hold_watch is not None:
            self._hold_watch.cancel()
            self._hold_watch = None
        if appliance is not None:
            self._last_shutdown = f"{why} at {clock(time.time())}"
            log.info("%s: shutting the appliance down (%s)", self.name, why)
            await appliance.shutdown()
            if self._served is not None and self._served.hold is not None:
                with trio.CancelScope(shield=True):  # a backup job left behind blocks the guest's own backups
                    await _let_go(self._served, await self._watchdogs.get() if self._watchdogs is not None else None)
            if self.on_discard is not None:
                self.on_discard()

    def status(self, path: str, idle_seconds: float, cached_entries: int) -> SourceStatus:
        """What this appliance is doing, for ``virtmount status`` (``path``: the source below the mount point)."""
        if self._booting is not None:
            return SourceStatus(path, "booting", f"for {time.monotonic() - self._boot_started:.0f} s",
                                last_shutdown=self._last_shutdown)
        if self._failure is not None:
            failed_at, failure = self._failure
            ago = time.monotonic() - failed_at
            retry_in = max(0.0, FAILED_BOOT_RETRY_S - ago)
            return SourceStatus(path, "failed", f"at {clock(time.time() - ago)}, retried in {retry_in:.0f} s: {failure}",
                                last_shutdown=self._last_shutdown)
        appliance, layout = self._appliance, self.running_layout
        if appliance is None or layout is None:
            return SourceStatus(path, "off", last_shutdown=self._last_shutdown)
        idle_for = self.idle_for()
        client = layout.client
        served = self._served
        return SourceStatus(
            path,
            "ready" if idle_for == 0.0 else "idle",
            f"{self._open_handles} open file(s)" if self._open_handles else
            f"shut down in {max(0.0, idle_seconds - idle_for):.0f} s" if idle_for else "",
            appliance=appliance.domain_name,
            accelerator=accelerator_name(appliance.accelerator),
            boot_seconds=round(appliance.boot_seconds, 1),
            restored=appliance.naming is RESTORED,
            disks=[] if served is None else [_disk_status(disk, served.attach.value) for disk in served.disks],
            open_files=self._open_handles,
            calls_in_flight=client.calls_in_flight,
            calls_done=client.calls_done,
            bytes_read=client.bytes_received,
            cached_entries=cached_entries,
            last_shutdown=self._last_shutdown,
            snapshot_taken="" if (taken := self.snapshot_taken_at) is None else iso_time(taken),
        )


async def _let_go(source: Source, watchdog: Watchdog | None) -> None:
    """Release what ``source`` holds on the host (after its appliance is gone) and tell the watchdog."""
    if source.hold is not None:
        await source.hold.release()
        if watchdog is not None:
            watchdog.unwatch(source.hold.watchdog_item)


def _disk_status(disk: ET.Element, attach: str) -> DiskStatus:
    source = disk.find("source")
    where = "?"
    if source is not None:
        where = next((source.get(a, "") for a in ("file", "dev", "volume", "name") if source.get(a)), "?")
        if source.get("pool"):
            where = f"{source.get('pool')}/{where}"
    driver = disk.find("driver")
    return DiskStatus(where, driver.get("type", "raw") if driver is not None else "raw", attach)


class HostApplianceSource:
    """The appliance files on the host, provisioned once, on the first boot of the mount."""

    def __init__(self, link: LibvirtLink, pool: str) -> None:
        self._link = link
        self._pool = pool
        self._result: HostAppliance | None = None
        self._lock = trio.Lock()

    async def get(self) -> HostAppliance:
        async with self._lock:
            if self._result is None:
                self._result = await provision(self._link.conn, self._pool)
            return self._result
