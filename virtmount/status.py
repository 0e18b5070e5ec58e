"""What a mount is doing, as `virtmount status` shows it: the report, its JSON form and its table.

The mount itself serves the report as the hidden file ``MOUNTPOINT/.virtmount`` (looked up, never
listed), made afresh on each open, so the command needs no channel besides the mount.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

from .errors import VirtmountError

CONTROL_NAME = ".virtmount"


@dataclass(frozen=True)
class DiskStatus:
    """One disk an appliance holds, and how."""

    source: str  # path, device or network name as libvirt gives it
    format: str
    attach: str  # "read-only overlay", "read-write"


@dataclass(frozen=True)
class SourceStatus:
    """One domain or volume of the mount and its appliance."""

    path: str  # below the mount point, e.g. "domains/web1"
    state: str  # "off", "booting", "ready", "idle", "failed"
    detail: str = ""  # e.g. "booting for 12 s", "shut down in 48 s", "retried in 20 s: <reason>"
    appliance: str = ""  # the appliance domain's name while one runs
    accelerator: str = ""  # "KVM" or "TCG"
    boot_seconds: float | None = None
    restored: bool | None = None  # from a saved appliance (fast start) rather than booted cold
    disks: list[DiskStatus] = field(default_factory=list)
    open_files: int = 0
    calls_in_flight: int = 0
    calls_done: int = 0
    bytes_read: int = 0
    cached_entries: int = 0
    last_shutdown: str = ""  # e.g. "idle at 12:03:04", "released at 12:05:10"
    snapshot_taken: str = ""  # a running domain's view: when it was taken (ISO 8601, UTC)


@dataclass(frozen=True)
class MountStatus:
    uri: str
    host: str
    mountpoint: str
    options: list[str]
    pid: int
    started_at: float  # seconds since the epoch
    uptime_seconds: float
    cached_entries: int
    sources: list[SourceStatus]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1) + "\n"

    @staticmethod
    def from_json(text: str) -> MountStatus:
        data: dict[str, Any] = json.loads(text)
        sources = [SourceStatus(**{**source, "disks": [DiskStatus(**disk) for disk in source["disks"]]})
                   for source in data.pop("sources")]
        return MountStatus(**data, sources=sources)


def iso_time(epoch_seconds: float) -> str:
    """A point in time as snapshot-time files and the status give it: ISO 8601, UTC, to the millisecond."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch_seconds)) + f".{int(epoch_seconds % 1 * 1000):03d}Z"


def clock(epoch_seconds: float) -> str:
    """A wall-clock time as the status shows it (local time)."""
    return time.strftime("%H:%M:%S", time.localtime(epoch_seconds))


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def _size(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_table(status: MountStatus) -> str:
    """The report as `virtmount status` prints it."""
    lines = [
        f"{status.uri} on {status.mountpoint} (host {status.host}, pid {status.pid}, "
        f"up {_duration(status.uptime_seconds)} since {clock(status.started_at)})",
        f"options: {','.join(status.options) or '-'}; cached directory entries: {status.cached_entries}",
        "",
    ]
    header = ("SOURCE", "STATE", "ACCEL", "BOOT", "OPEN", "CALLS", "READ", "ENTRIES")
    rows = []
    for source in status.sources:
        boot = "-" if source.boot_seconds is None else \
            f"{source.boot_seconds:.1f} s{' (restored)' if source.restored else ''}"
        running = source.state in ("ready", "idle")
        rows.append((
            source.path,
            source.state + (f", {source.detail}" if source.detail else ""),
            source.accelerator or "-",
            boot,
            str(source.open_files) if running else "-",
            f"{source.calls_in_flight}/{source.calls_done}" if running else "-",
            _size(source.bytes_read) if running else "-",
            str(source.cached_entries) if running else "-",
        ))
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    for source in status.sources:
        if source.disks or source.last_shutdown:
            parts = ([f"appliance {source.appliance}"] if source.appliance else []) + \
                ([f"last shut down {source.last_shutdown}"] if source.last_shutdown else [])
            lines.append("")
            lines.append(f"{source.path}: {'; '.join(parts)}")
            if source.snapshot_taken:
                lines.append(f"  a point-in-time view of the running domain, taken {source.snapshot_taken}")
            for disk in source.disks:
                lines.append(f"  {disk.source} ({disk.format}, {disk.attach})")
    lines.append("")
    lines.append("CALLS: daemon calls in flight/done; READ: bytes received from the appliance")
    return "\n".join(lines)


class NotAVirtmount(VirtmountError):
    """The path is not the mount point of a running virtmount."""


def read_status(mountpoint: str) -> MountStatus:
    """The status that the virtmount mounted at ``mountpoint`` reports."""
    path = os.path.join(mountpoint, CONTROL_NAME)
    try:
        with open(path, "rb") as control:
            text = control.read().decode()
    except FileNotFoundError:
        raise NotAVirtmount(f"{mountpoint} is not a virtmount mount point") from None
    except OSError as exc:
        raise NotAVirtmount(f"cannot read the status of {mountpoint}: {exc.strerror}") from None
    try:
        return MountStatus.from_json(text)
    except (ValueError, KeyError, TypeError) as exc:
        raise NotAVirtmount(f"{mountpoint}: unreadable status ({exc})") from None
