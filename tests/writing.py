"""Helpers for the -o rw tests: a scratch guest of one's own, the system calls Python lacks, and an
independent reader of a guest image (libguestfs, its own appliance)."""

from __future__ import annotations

import ctypes
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests import images

AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
UTIME_OMIT = (1 << 30) - 2

_libc = ctypes.CDLL(None, use_errno=True)


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def renameat2(old: Path, new: Path, flags: int) -> None:
    """renameat2(2); OSError with its errno."""
    if _libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags) != 0:
        number = ctypes.get_errno()
        raise OSError(number, os.strerror(number), str(old))


def utimensat(path: Path, atime: tuple[int, int], mtime: tuple[int, int]) -> None:
    """utimensat(2) without following a symlink; a nanoseconds field of UTIME_OMIT leaves that time alone."""
    times = (_Timespec * 2)(_Timespec(*atime), _Timespec(*mtime))
    if _libc.utimensat(AT_FDCWD, os.fsencode(path), times, 0x100) != 0:  # AT_SYMLINK_NOFOLLOW
        number = ctypes.get_errno()
        raise OSError(number, os.strerror(number), str(path))


@dataclass(frozen=True)
class ScratchGuest:
    """A shut-off domain whose only disk is a qcow2 overlay of a cached test image: writes to it never
    reach the shared cached image."""

    name: str
    uri: str
    disk: Path
    spec: images.ImageSpec


def make_scratch_guest(uri: str, name: str, spec: images.ImageSpec) -> ScratchGuest:
    base = images.build(spec)
    disk = base.parent / f"{name}-{os.getpid()}.qcow2"
    disk.unlink(missing_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base), str(disk)],
                   check=True)
    images.ensure_domain(uri, name, disk)
    return ScratchGuest(name, uri, disk, spec)


def remove_scratch_guest(guest: ScratchGuest) -> None:
    subprocess.run(["virsh", "-q", "-c", guest.uri, "destroy", guest.name], capture_output=True)
    subprocess.run(["virsh", "-q", "-c", guest.uri, "undefine", guest.name], capture_output=True)
    guest.disk.unlink(missing_ok=True)


def guestfs_handle(disk: Path, *, readonly: bool) -> Any:
    """A libguestfs handle (direct backend, TCG) with ``disk`` added; not launched yet."""
    handle = images.new_handle()
    handle.add_drive_opts(str(disk), format="qcow2", readonly=readonly)
    return handle
