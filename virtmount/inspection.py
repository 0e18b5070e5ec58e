"""What is on a guest's disks: operating systems and filesystems, asked of a booted appliance."""

from __future__ import annotations

from dataclasses import dataclass, field

import trio

from .appliance import ApplianceSettings, boot_appliance
from .sources.domain import domain_source
from .devicenames import COLD_BOOTED, DiskNaming
from .guestfs.client import GuestfsClient
from .guestfs.errors import GuestfsError
from .virt.connection import close_connection, open_connection
from .virt.provision import provision


@dataclass(frozen=True)
class Filesystem:
    device: str
    fstype: str
    size: int | None  # bytes; None where the daemon cannot tell (e.g. btrfs subvolumes)
    mountpoint: str | None = None  # where the guest's OS mounts it, if an OS was found


@dataclass(frozen=True)
class OperatingSystem:
    root: str
    type: str
    distro: str
    product_name: str
    major_version: int
    minor_version: int
    hostname: str
    mountpoints: dict[str, str] = field(default_factory=dict)  # mountpoint -> device


@dataclass(frozen=True)
class InspectionReport:
    guest: str
    operating_systems: list[OperatingSystem]
    filesystems: list[Filesystem]


async def inspect_guest(client: GuestfsClient, guest_name: str, naming: DiskNaming = COLD_BOOTED) -> InspectionReport:
    """Inspect the disks attached to ``client``'s appliance; device names in the guest's disk order."""
    systems = []
    for root in await client.inspect_os():
        mountpoints = await client.inspect_get_mountpoints(root)
        systems.append(
            OperatingSystem(
                root=naming.to_guest(root),
                type=await client.inspect_get_type(root),
                distro=await client.inspect_get_distro(root),
                product_name=await client.inspect_get_product_name(root),
                major_version=await client.inspect_get_major_version(root),
                minor_version=await client.inspect_get_minor_version(root),
                hostname=await client.inspect_get_hostname(root),
                mountpoints={mountpoint: naming.to_guest(device) for mountpoint, device in mountpoints.items()},
            )
        )
    mounted_at = {device: mountpoint for system in systems for mountpoint, device in system.mountpoints.items()}
    filesystems = []
    for device, fstype in (await client.list_filesystems()).items():
        shown = naming.to_guest(device)
        filesystems.append(Filesystem(shown, fstype, await _size_or_none(client, device), mounted_at.get(shown)))
    filesystems.sort(key=lambda fs: fs.device)
    return InspectionReport(guest_name, systems, filesystems)


async def _size_or_none(client: GuestfsClient, device: str) -> int | None:
    if not device.startswith("/dev/"):
        return None
    try:
        return await client.blockdev_getsize64(device)
    except GuestfsError:
        return None


def human_size(size: int | None) -> str:
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "K", "M", "G", "T"):
        if value < 1024 or unit == "T":
            return f"{value:.0f}{unit}" if unit == "B" or value >= 10 else f"{value:.1f}{unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_report(report: InspectionReport) -> str:
    """The report as the `virtmount inspect` command prints it."""
    lines = []
    if not report.operating_systems:
        lines.append(f"{report.guest}: no operating system found")
    for system in report.operating_systems:
        lines.append(
            f"{report.guest}: {system.product_name} ({system.type}, {system.distro} "
            f"{system.major_version}.{system.minor_version}), root {system.root}, hostname {system.hostname}"
        )
    lines.append("")
    header = ("DEVICE", "TYPE", "SIZE", "MOUNTPOINT")
    rows = [(fs.device, fs.fstype, human_size(fs.size), fs.mountpoint or "-") for fs in report.filesystems]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(3)]
    for row in [header, *rows]:
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths)) + "  " + row[3])
    return "\n".join(lines)


async def inspect_domain(uri: str, guest_name: str, settings: ApplianceSettings) -> InspectionReport:
    """Library entry point: boot an appliance for a shut-off domain, inspect it, shut it down."""
    conn = await open_connection(uri)
    try:
        host_appliance = await provision(conn, settings.pool)
        async with trio.open_nursery() as nursery:
            source = await domain_source(conn, guest_name, settings.writable)
            appliance = await boot_appliance(conn, source, host_appliance, settings, nursery)
            try:
                return await inspect_guest(appliance.client, guest_name, appliance.naming)
            finally:
                await appliance.shutdown()
    finally:
        await close_connection(conn)
