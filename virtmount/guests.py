"""Per-domain appliance life cycle for the mount: boot on first use, mount the guest's views, idle shutdown.

Each domain gets at most one appliance. Concurrent first accesses wait for
the same boot. Inside the appliance every guest filesystem is mounted twice,
read-only: once in the guest OS's own layout under ``/fs`` (root first, then
its fstab mountpoints) and once on its own under ``/d/<name>``. After an idle
period (no access, no open files) the appliance is synced and destroyed; the
next access boots it again. A failed boot is remembered for a short while so
that a broken guest does not cost a boot attempt per system call.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import libvirt
import trio

from .appliance import Appliance, ApplianceSettings, boot_appliance
from .devicenames import COLD_BOOTED, DiskNaming
from .errors import VirtmountError
from .guestfs.client import GuestfsClient
from .guestfs.errors import GuestfsClientError, GuestfsError
from .inspection_cache import FstabFingerprint, InspectionCache, RememberedLayout
from .virt.provision import HostAppliance, provision
from .watchdog import WatchdogSource

log = logging.getLogger(__name__)

OS_VIEW = b"/fs"
DEVICES_DIR = b"/d"
FAILED_BOOT_RETRY_S = 30.0
_SKIPPED_FSTYPES = {"swap", "unknown", "luks", "crypto_LUKS", "LVM2_member"}


class GuestUnavailableError(Exception):
    """Files of this domain cannot be served now; ``errno`` says how the mount reports it."""

    def __init__(self, message: str, errno_value: int = errno.EIO) -> None:
        super().__init__(message)
        self.errno = errno_value


def device_view_name(device: str) -> str:
    """The name under devices/ of a guest device (in the guest's disk order): /dev/sda1 -> sda1, /dev/vg0/root -> vg0-root, btrfsvol:/dev/sda2/@ -> sda2-@."""
    name = device.removeprefix("btrfsvol:")
    name = name.removeprefix("/dev/mapper/").removeprefix("/dev/")
    return name.replace("/", "-")


@dataclass
class GuestLayout:
    """What one boot of a domain's appliance shows: its views and where they are mounted inside it."""

    client: GuestfsClient
    has_os: bool
    devices: dict[str, str] = field(default_factory=dict)  # view name -> guest device
    fs_by_dev: dict[int, str] = field(default_factory=dict)  # appliance st_dev -> filesystem name
    generation: int = 0
    devices_mounted: bool = False  # ``devices`` is complete (see mount_devices)
    remembered: RememberedLayout | None = None  # what the next boot may reuse; None: inspect again
    naming: DiskNaming = COLD_BOOTED  # how this appliance names the guest's disks

    def device_path(self, view_name: str) -> bytes:
        return DEVICES_DIR + b"/" + view_name.encode()

    def view_name(self, device: str) -> str:
        """The devices/ name (and filesystem name) of a device as the appliance names it."""
        return device_view_name(self.naming.to_guest(device))


async def _mount_read_only(client: GuestfsClient, device: str, fstype: str | None, mountpoint: bytes) -> None:
    """Mount ``device`` read-only; a dirty journal is not replayed (the disk is read-only).
    ``fstype`` None: asked of the appliance only if the plain read-only mount fails."""
    try:
        await client.mount_ro(device, mountpoint)
        return
    except GuestfsError as first_error:
        if fstype is None:
            fstype = await client.vfs_type(device)
        no_replay = {"ext3": "ro,noload", "ext4": "ro,noload", "xfs": "ro,norecovery"}.get(fstype)
        if no_replay is None:
            raise
        log.info("mounting %s read-only failed (%s); retrying without journal replay", device, first_error.message)
    await client.mount_options(no_replay, device, mountpoint)


async def lay_out_os(
    client: GuestfsClient,
    guest_name: str,
    generation: int,
    remembered: RememberedLayout | None = None,
    naming: DiskNaming = COLD_BOOTED,
) -> GuestLayout:
    """Mount the guest OS's filesystems in its own layout, from ``remembered`` if the disks still
    match it, else after inspecting them.

    The per-device views are mounted later, on first use (``mount_devices``):
    listing every filesystem costs seconds that the first look at fs/ need not wait for.
    """
    if remembered is not None:
        layout = await _lay_out_remembered(client, guest_name, generation, remembered, naming)
        if layout is not None:
            log.info("%s: disks unchanged since their last inspection; mounted as remembered", guest_name)
            return layout
        log.info("%s: the disks changed since the last inspection; inspecting again", guest_name)
    roots = await client.inspect_os()
    layout = GuestLayout(client=client, has_os=bool(roots), generation=generation, naming=naming)
    if not roots:
        return layout
    if len(roots) > 1:
        log.info("%s: several operating systems found; fs/ shows %s", guest_name, roots[0])
    mountpoints = await client.inspect_get_mountpoints(roots[0])
    await client.mkmountpoint(OS_VIEW)
    if not await _mount_in_os_view(client, guest_name, layout, "/", mountpoints["/"]):
        layout.has_os = False
        return layout
    await _mount_below_root(client, guest_name, layout, mountpoints)
    fstab = await _fstab_fingerprint(client)
    if fstab is not None:
        in_guest_order = {mountpoint: naming.to_guest(device) for mountpoint, device in mountpoints.items()}
        layout.remembered = RememberedLayout(mountpoints=in_guest_order, fstab=fstab)
    return layout


async def _lay_out_remembered(
    client: GuestfsClient, guest_name: str, generation: int, remembered: RememberedLayout, naming: DiskNaming
) -> GuestLayout | None:
    """The OS view as ``remembered`` says, or None (nothing left mounted) if the root device does not
    mount or its /etc/fstab is not the very file the inspection saw."""
    mountpoints = {mountpoint: naming.to_appliance(device) for mountpoint, device in remembered.mountpoints.items()}
    await client.mkmountpoint(OS_VIEW)
    root_device = mountpoints["/"]
    try:
        await _mount_read_only(client, root_device, None, OS_VIEW)
    except GuestfsError:
        await client.rmmountpoint(OS_VIEW)
        return None
    if await _fstab_fingerprint(client) != remembered.fstab:
        await client.umount(OS_VIEW)
        await client.rmmountpoint(OS_VIEW)
        return None
    layout = GuestLayout(client=client, has_os=True, generation=generation, remembered=remembered, naming=naming)
    layout.fs_by_dev[(await client.lstatns(OS_VIEW)).st_dev] = layout.view_name(root_device)
    await _mount_below_root(client, guest_name, layout, mountpoints)
    return layout


async def _mount_below_root(
    client: GuestfsClient, guest_name: str, layout: GuestLayout, mountpoints: dict[str, str]
) -> None:
    """The OS's mountpoints other than /, shortest first: /boot before /boot/efi."""
    for mountpoint in sorted((m for m in mountpoints if m != "/"), key=lambda m: (m.count("/"), m)):
        await _mount_in_os_view(client, guest_name, layout, mountpoint, mountpoints[mountpoint])


async def _mount_in_os_view(
    client: GuestfsClient, guest_name: str, layout: GuestLayout, mountpoint: str, device: str
) -> bool:
    """Mount ``device`` at the OS's ``mountpoint`` under the OS view; a failure is logged, not raised."""
    target = OS_VIEW if mountpoint == "/" else OS_VIEW + mountpoint.encode("utf-8", "surrogateescape")
    try:
        await _mount_read_only(client, device, None, target)
    except GuestfsError as exc:
        log.warning("%s: cannot mount %s at %s: %s", guest_name, device, mountpoint, exc.message)
        return False
    layout.fs_by_dev.setdefault((await client.lstatns(target)).st_dev, layout.view_name(device))
    return True


async def _fstab_fingerprint(client: GuestfsClient) -> FstabFingerprint | None:
    """The identity of the mounted OS's /etc/fstab, or None if it has none."""
    try:
        st = await client.lstatns(OS_VIEW + b"/etc/fstab")
    except GuestfsError:
        return None
    return FstabFingerprint(
        inode=st.st_ino,
        size=st.st_size,
        mtime_ns=st.st_mtime_sec * 1_000_000_000 + st.st_mtime_nsec,
        ctime_ns=st.st_ctime_sec * 1_000_000_000 + st.st_ctime_nsec,
    )


async def mount_devices(layout: GuestLayout, guest_name: str) -> None:
    """Mount every guest filesystem on its own, read-only, for the devices/ views."""
    client = layout.client
    filesystems = {device: fstype for device, fstype in (await client.list_filesystems()).items()
                   if fstype not in _SKIPPED_FSTYPES}
    await client.mkmountpoint(DEVICES_DIR)
    for device, fstype in sorted(filesystems.items()):
        view_name = layout.view_name(device)
        path = layout.device_path(view_name)
        await client.mkmountpoint(path)
        try:
            await _mount_read_only(client, device, fstype, path)
        except GuestfsError as exc:
            log.warning("%s: cannot mount %s (%s): %s", guest_name, device, fstype, exc.message)
            continue
        layout.devices[view_name] = device
        # a filesystem the OS view mounted already keeps its name (inode numbers depend on it)
        layout.fs_by_dev.setdefault((await client.lstatns(path)).st_dev, view_name)
    layout.devices_mounted = True


class GuestAppliance:
    """The appliance of one domain, booted on demand and shut down when idle."""

    def __init__(
        self,
        conn: libvirt.virConnect,
        guest_name: str,
        settings: ApplianceSettings,
        host_appliance: "HostApplianceSource",
        nursery: trio.Nursery,
        inspection_cache: InspectionCache | None = None,
        watchdogs: WatchdogSource | None = None,
    ) -> None:
        self.guest_name = guest_name
        self._inspection_cache = inspection_cache
        self._watchdogs = watchdogs  # None: appliances are never restored, always booted cold
        self._conn = conn
        self._settings = settings
        self._host_appliance = host_appliance
        self._nursery = nursery
        self._appliance: Appliance | None = None
        self._layout: GuestLayout | None = None
        self._booting: trio.Event | None = None
        self._failure: tuple[float, str] | None = None
        self._last_used = time.monotonic()
        self._open_handles = 0
        self._generation = 0
        self._boot_scope: trio.CancelScope | None = None
        self._devices_lock = trio.Lock()
        self._mounting_devices = False
        # Called after a running appliance is discarded: the disks may change before the next boot,
        # so what the kernel still caches of this guest's files must go.
        self.on_discard: Callable[[], None] | None = None

    @property
    def known_has_os(self) -> bool | None:
        """Whether the guest has an OS, if a boot has told us; None before that."""
        return None if self._layout is None else self._layout.has_os

    @property
    def running(self) -> bool:
        return self._appliance is not None

    @property
    def running_layout(self) -> GuestLayout | None:
        """The layout of the appliance running now, without booting one."""
        if self._layout is not None and self._appliance is not None and not self._layout.client.closed:
            return self._layout
        return None

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
                        await mount_devices(layout, self.guest_name)
                    except GuestfsClientError as exc:
                        log.error("%s: cannot list or mount the filesystems: %s", self.guest_name, exc)
                        raise GuestUnavailableError(f"cannot list or mount the filesystems: {exc}") from None
                    finally:
                        self._mounting_devices = False
                        self.touch()
        return layout

    async def _booted_layout(self) -> GuestLayout:
        self.touch()
        while True:
            if self._layout is not None and self._appliance is not None and not self._layout.client.closed:
                return self._layout
            if self._appliance is not None:  # the daemon connection broke: the appliance died
                log.warning("%s: appliance connection lost; it will be booted again", self.guest_name)
                await self._discard_appliance()
            if self._failure is not None:
                failed_at, message = self._failure
                if time.monotonic() - failed_at < FAILED_BOOT_RETRY_S:
                    raise GuestUnavailableError(message)
                self._failure = None
            if self._booting is None:
                self._booting = trio.Event()
                self._nursery.start_soon(self._boot, self._booting)
            await self._booting.wait()

    async def _boot(self, done: trio.Event) -> None:
        try:
            with trio.CancelScope() as self._boot_scope:
                host = await self._host_appliance.get()
                # the appliance's background tasks outlive this task: they run in the mount's nursery
                watchdog = await self._watchdogs.get() if self._watchdogs is not None else None
                appliance = await boot_appliance(
                    self._conn, self.guest_name, host, self._settings, self._nursery, watchdog)
                self._generation += 1
                try:
                    layout = await self._lay_out(appliance)
                except BaseException as exc:
                    await appliance.shutdown()
                    if isinstance(exc, (GuestfsClientError, VirtmountError)):
                        raise VirtmountError(f"appliance booted but the disks could not be mounted: {exc}") from None
                    raise
                self._appliance, self._layout = appliance, layout
                self.touch()
        except (VirtmountError, GuestfsClientError) as exc:
            message = str(exc)
            log.error("%s: %s", self.guest_name, message)
            self._failure = (time.monotonic(), message)
        finally:
            self._boot_scope = None
            self._booting = None
            done.set()

    async def _lay_out(self, appliance: Appliance) -> GuestLayout:
        """The OS view, from the layout remembered for these disks when it still holds."""
        cache, key = self._inspection_cache, appliance.disks_key
        remembered = cache.load(key) if cache is not None else None
        layout = await lay_out_os(appliance.client, self.guest_name, self._generation, remembered, appliance.naming)
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

    async def release(self) -> None:
        """Sync and shut the appliance down now (idle time reached, release asked, or unmount)."""
        if self._boot_scope is not None:
            self._boot_scope.cancel()
        await self._discard_appliance()
        self._failure = None

    async def _discard_appliance(self) -> None:
        appliance, self._appliance, self._layout = self._appliance, None, None
        if appliance is not None:
            log.info("%s: shutting the appliance down", self.guest_name)
            await appliance.shutdown()
            if self.on_discard is not None:
                self.on_discard()


class HostApplianceSource:
    """The appliance files on the host, provisioned once, on the first boot of the mount."""

    def __init__(self, conn: libvirt.virConnect, pool: str) -> None:
        self._conn = conn
        self._pool = pool
        self._result: HostAppliance | None = None
        self._lock = trio.Lock()

    async def get(self) -> HostAppliance:
        async with self._lock:
            if self._result is None:
                self._result = await provision(self._conn, self._pool)
            return self._result
