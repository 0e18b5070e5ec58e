"""What one appliance shows of its source's disks, and where it mounts them inside the appliance.

Read-only (the default), every guest filesystem is mounted twice: once in
the guest OS's own layout under ``/fs`` (root first, then its fstab
mountpoints; from the inspection cache when the disks still match) and once
on its own under ``/d/<name>`` for the devices/ views. Writable (``-o rw``),
each filesystem is mounted once, read-write, with its journal replayed as the
guest would: a filesystem of the OS view is shown in devices/ as a link to
its place in fs/ (two mounts would be two views whose caches cannot follow
each other's writes); one that does not mount read-write is mounted read-only
and answers EROFS. Swap, LVM members, LUKS containers and unrecognised
content are not filesystems and are not shown.
"""

from __future__ import annotations

import logging
import stat
from dataclasses import dataclass, field

from . import fstab_layout
from .devicenames import COLD_BOOTED, RESTORED, DiskNaming
from .guestfs.client import GuestfsClient
from .guestfs.errors import GuestfsError
from .guestfs.procs import Statns
from .inspection_cache import FstabFingerprint, RememberedLayout

log = logging.getLogger(__name__)

OS_VIEW = b"/fs"
DEVICES_DIR = b"/d"
_SKIPPED_FSTYPES = {"swap", "unknown", "luks", "crypto_LUKS", "LVM2_member"}


def device_view_name(device: str) -> str:
    """The name under devices/ of a guest device (in the guest's disk order): /dev/sda1 -> sda1, /dev/vg0/root -> vg0-root, btrfsvol:/dev/sda2/@ -> sda2-@."""
    name = device.removeprefix("btrfsvol:")
    name = name.removeprefix("/dev/mapper/").removeprefix("/dev/")
    return name.replace("/", "-")


@dataclass
class GuestLayout:
    """What one boot of a source's appliance shows: its views and where they are mounted inside it."""

    client: GuestfsClient
    has_os: bool
    devices: dict[str, str] = field(default_factory=dict)  # view name -> guest device
    fs_by_dev: dict[int, str] = field(default_factory=dict)  # appliance st_dev -> filesystem name
    generation: int = 0
    devices_mounted: bool = False  # ``devices`` is complete (see mount_devices)
    remembered: RememberedLayout | None = None  # what the next boot may reuse; None: inspect again
    naming: DiskNaming = COLD_BOOTED  # how this appliance names the guest's disks
    writable: bool = False  # filesystems are mounted read-write, once (see the module's docstring)
    read_only_filesystems: set[str] = field(default_factory=set)  # of a writable layout: mounted read-only
    os_mountpoints: dict[str, str] = field(default_factory=dict)  # view name -> the OS's mountpoint ("/boot")

    def device_path(self, view_name: str) -> bytes:
        return DEVICES_DIR + b"/" + view_name.encode()

    def device_link(self, view_name: str) -> bytes | None:
        """Where devices/<view_name> links to in a writable layout, relative to devices/: its
        filesystem's place in fs/; None where it is a directory of its own."""
        mountpoint = self.os_mountpoints.get(view_name) if self.writable else None
        if mountpoint is None:
            return None
        return b"../fs" + (b"" if mountpoint == "/" else mountpoint.encode("utf-8", "surrogateescape"))

    def writable_filesystem(self, filesystem: str) -> bool:
        """Whether files of this filesystem (a name from ``fs_by_dev``) may be written."""
        return self.writable and filesystem in self.fs_by_dev.values() \
            and filesystem not in self.read_only_filesystems

    def view_name(self, device: str) -> str:
        """The devices/ name (and filesystem name) of a device as the appliance names it."""
        return device_view_name(self.naming.to_guest(device))


async def _mount(layout: GuestLayout, device: str, fstype: str | None, mountpoint: bytes) -> None:
    """Mount ``device`` read-write in a writable layout (read-only, and noted so, if that fails),
    else read-only."""
    if layout.writable:
        try:
            await layout.client.mount(device, mountpoint)
            return
        except GuestfsError as exc:
            log.warning("cannot mount %s read-write (%s); it is served read-only", device, exc.message)
            layout.read_only_filesystems.add(layout.view_name(device))
    await _mount_read_only(layout.client, device, fstype, mountpoint)


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
    writable: bool = False,
) -> GuestLayout:
    """Mount the guest OS's filesystems in its own layout (read-write if ``writable``), from
    ``remembered`` if the disks still match it, else after inspecting them.

    The per-device views are mounted later, on first use (``mount_devices``):
    listing every filesystem costs seconds that the first look at fs/ need not wait for.
    """
    if writable:
        await client.umask(0)  # files are made with exactly the mode asked for
    if remembered is not None:
        layout = await _lay_out_remembered(client, guest_name, generation, remembered, naming, writable)
        if layout is not None:
            log.info("%s: disks unchanged since their last inspection; mounted as remembered", guest_name)
            return layout
        log.info("%s: the disks changed since the last inspection; inspecting again", guest_name)
    if naming == RESTORED and not writable:
        layout = await _lay_out_from_fstab(client, guest_name, generation, naming)
        if layout is not None:
            log.info("%s: laid out as its own /etc/fstab says", guest_name)
            return layout
    try:
        roots = await client.inspect_os()
    except GuestfsError as exc:
        # one damaged filesystem fails the whole inspection: the others stay readable in devices/
        log.warning("%s: inspection failed (%s); fs/ is not shown, devices/ is", guest_name, exc)
        await client.umount_all()  # a failed inspection leaves the filesystem it was reading mounted
        roots = []
    layout = GuestLayout(client=client, has_os=bool(roots), generation=generation, naming=naming, writable=writable)
    if not roots:
        return layout
    if len(roots) > 1:
        log.info("%s: several operating systems found; fs/ shows %s", guest_name, roots[0])
    mountpoints = await client.inspect_get_mountpoints(roots[0])
    await client.mkmountpoint(OS_VIEW)
    if not await _mount_in_os_view(client, guest_name, layout, "/", mountpoints.get("/", roots[0])):
        layout.has_os = False
        return layout
    await _mount_below_root(client, guest_name, layout, mountpoints)
    _remember(layout, mountpoints, await _fstab_fingerprint(client))
    return layout


def _remember(layout: GuestLayout, mountpoints: dict[str, str], fstab: FstabFingerprint | None) -> None:
    """What the next boot may reuse of a layout found now: its mountpoints in the guest's disk order;
    nothing for an OS without /etc/fstab."""
    if fstab is not None:
        in_guest_order = {mountpoint: layout.naming.to_guest(device) for mountpoint, device in mountpoints.items()}
        layout.remembered = RememberedLayout(mountpoints=in_guest_order, fstab=fstab)


async def _note_root(layout: GuestLayout, device: str) -> None:
    """Record ``device``, mounted at the OS view, as the OS's root filesystem."""
    layout.fs_by_dev[(await layout.client.lstatns(OS_VIEW)).st_dev] = layout.view_name(device)
    layout.os_mountpoints[layout.view_name(device)] = "/"


async def _lay_out_remembered(
    client: GuestfsClient, guest_name: str, generation: int, remembered: RememberedLayout, naming: DiskNaming,
    writable: bool,
) -> GuestLayout | None:
    """The OS view as ``remembered`` says, or None (nothing left mounted) if the root device does not
    mount or its /etc/fstab is not the very file the inspection saw."""
    mountpoints = {mountpoint: naming.to_appliance(device) for mountpoint, device in remembered.mountpoints.items()}
    await client.mkmountpoint(OS_VIEW)
    root_device = mountpoints["/"]
    layout = GuestLayout(client=client, has_os=True, generation=generation, remembered=remembered, naming=naming,
                         writable=writable)
    try:
        await _mount(layout, root_device, None, OS_VIEW)
    except GuestfsError:
        await client.rmmountpoint(OS_VIEW)
        return None
    if await _fstab_fingerprint(client) != remembered.fstab:
        await client.umount(OS_VIEW)
        await client.rmmountpoint(OS_VIEW)
        return None
    await _note_root(layout, root_device)
    await _mount_below_root(client, guest_name, layout, mountpoints)
    return layout


async def _lay_out_from_fstab(
    client: GuestfsClient, guest_name: str, generation: int, naming: DiskNaming
) -> GuestLayout | None:
    """The OS view as the guest's own /etc/fstab says, where that is sure to be what inspect_os would
    find (fstab_layout.py); else None, with nothing left mounted. Only for a restored appliance, whose
    kernel names the guest's disks as its daemon does (sdb, sdc, … behind its own root, sda); only
    read-only: the root candidates are mounted to be looked at."""
    try:
        devices = fstab_layout.parse_blkid(await client.debug_sh(fstab_layout.LIST_COMMAND), "/dev/sda")
    except GuestfsError as exc:
        log.info("%s: cannot list the filesystems with blkid (%s)", guest_name, exc)
        return None
    if devices is None:
        return None
    found = fstab_layout.filesystems(devices)
    if not found:
        return None
    first_disk = fstab_layout.only_disk(devices)
    await client.mkmountpoint(OS_VIEW)
    for candidate in fstab_layout.root_candidates(found):
        try:
            await _mount_read_only(client, candidate.name, candidate.fstype, OS_VIEW)
        except GuestfsError:
            continue
        fstab = await _fstab_stat(client)
        planned = await _fstab_mountpoints(client, fstab, found, candidate, first_disk) if fstab else None
        if fstab is None or planned is None:
            await client.umount(OS_VIEW)
            continue
        layout = GuestLayout(client=client, has_os=True, generation=generation, naming=naming)
        await _note_root(layout, candidate.name)
        await _mount_below_root(client, guest_name, layout, planned)
        _remember(layout, planned, _fingerprint(fstab))
        return layout
    await client.rmmountpoint(OS_VIEW)
    return None


_FSTAB_MAX_BYTES = 1 << 20


async def _fstab_mountpoints(
    client: GuestfsClient, fstab: Statns, found: list[fstab_layout.BlockDevice], root: fstab_layout.BlockDevice,
    first_disk: str | None,
) -> dict[str, str] | None:
    """The mountpoints that the fstab (``fstab``: its lstat) of the filesystem mounted at the OS view
    gives, if that is the root (fstab_layout.mountpoints); None if it is not a regular file or not
    the root's."""
    if not stat.S_ISREG(fstab.st_mode) or fstab.st_size > _FSTAB_MAX_BYTES:
        return None
    try:
        text = (await client.download(OS_VIEW + b"/etc/fstab")).decode("utf-8", "surrogateescape")
    except GuestfsError:
        return None
    return fstab_layout.mountpoints(fstab_layout.parse_fstab(text), found, root, first_disk)


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
        await _mount(layout, device, None, target)
    except GuestfsError as exc:
        log.warning("%s: cannot mount %s at %s: %s", guest_name, device, mountpoint, exc.message)
        return False
    layout.fs_by_dev.setdefault((await client.lstatns(target)).st_dev, layout.view_name(device))
    layout.os_mountpoints.setdefault(layout.view_name(device), mountpoint)
    return True


async def _fstab_stat(client: GuestfsClient) -> Statns | None:
    """The lstat of the mounted OS's /etc/fstab, or None if it has none."""
    try:
        return await client.lstatns(OS_VIEW + b"/etc/fstab")
    except GuestfsError:
        return None


def _fingerprint(fstab: Statns) -> FstabFingerprint:
    return FstabFingerprint(
        inode=fstab.st_ino,
        size=fstab.st_size,
        mtime_ns=fstab.st_mtime_sec * 1_000_000_000 + fstab.st_mtime_nsec,
        ctime_ns=fstab.st_ctime_sec * 1_000_000_000 + fstab.st_ctime_nsec,
    )


async def _fstab_fingerprint(client: GuestfsClient) -> FstabFingerprint | None:
    """The identity of the mounted OS's /etc/fstab, or None if it has none."""
    fstab = await _fstab_stat(client)
    return None if fstab is None else _fingerprint(fstab)


async def mount_devices(layout: GuestLayout, guest_name: str) -> None:
    """Mount every guest filesystem on its own for the devices/ views: read-only, or in a writable
    layout read-write, except those of the OS view (their views link to fs/)."""
    client = layout.client
    found = await client.list_filesystems()
    filesystems = {device: fstype for device, fstype in found.items() if fstype not in _SKIPPED_FSTYPES}
    for device, fstype in sorted(found.items()):
        if device not in filesystems:
            log.info("%s: %s (%s) is not a mountable filesystem; not shown", guest_name, device, fstype)
    if not filesystems:
        log.warning("%s: no filesystem found on the disks (%s); devices/ is empty", guest_name,
                    ", ".join(f"{device}: {fstype}" for device, fstype in sorted(found.items())) or "nothing readable")
    await client.mkmountpoint(DEVICES_DIR)
    for device, fstype in sorted(filesystems.items()):
        view_name = layout.view_name(device)
        if layout.device_link(view_name) is not None:
            layout.devices[view_name] = device
            continue
        path = layout.device_path(view_name)
        await client.mkmountpoint(path)
        try:
            await _mount(layout, device, fstype, path)
            root = await client.lstatns(path)
        except GuestfsError as exc:
            log.warning("%s: cannot mount %s (%s): %s", guest_name, device, fstype, exc.message)
            continue
        layout.devices[view_name] = device
        # a filesystem the OS view mounted already keeps its name (inode numbers depend on it)
        layout.fs_by_dev.setdefault(root.st_dev, view_name)
    layout.devices_mounted = True


