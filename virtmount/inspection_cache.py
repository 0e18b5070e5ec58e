"""Remembering where a guest's OS mounts its filesystems, so that the next boot need not inspect again.

``inspect_os`` is the slowest step of a first access after the boot itself
(about 15 s under TCG on the benchmark guest): the daemon mounts and probes
every filesystem. What the OS view needs from it is small: the devices of the
root and the fstab mountpoints. They are kept on the client, one JSON file per guest
disk set, and trusted only after the next boot has checked them: the root
device must mount and its ``/etc/fstab`` must be the very same file (inode,
size, modification and change times to the nanosecond). Guests without an
``/etc/fstab`` (Windows, or no OS) are always inspected.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from .cachedir import cache_dir

log = logging.getLogger(__name__)

_FORMAT_VERSION = 1


@dataclass(frozen=True)
class FstabFingerprint:
    """Identity of a guest's /etc/fstab: any edit, replacement or new image changes it."""

    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int


@dataclass(frozen=True)
class RememberedLayout:
    """What an earlier inspection found: the OS's mountpoints (path -> device, in the guest's disk
    order, see devicenames.py), "/" among them."""

    mountpoints: dict[str, str]
    fstab: FstabFingerprint


def _parse(text: str) -> RememberedLayout | None:
    """A stored layout, or None if it is not one this version wrote."""
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("version") != _FORMAT_VERSION:
        return None
    mountpoints, fstab = data.get("mountpoints"), data.get("fstab")
    if not isinstance(mountpoints, dict) or not isinstance(fstab, dict):
        return None
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in mountpoints.items()) or "/" not in mountpoints:
        return None
    numbers = [fstab.get(name) for name in ("inode", "size", "mtime_ns", "ctime_ns")]
    if not all(type(n) is int for n in numbers):
        return None
    return RememberedLayout(mountpoints=mountpoints, fstab=FstabFingerprint(*cast(list[int], numbers)))


def disks_identity(uri: str, domain_uuid: str, disk_xml: list[str]) -> str:
    """A key for one guest's disk set: the same domain with other disks is another key."""
    digest = hashlib.sha256()
    for part in (uri, domain_uuid, *disk_xml):
        digest.update(part.encode("utf-8", "surrogateescape") + b"\0")
    return digest.hexdigest()


def default_directory() -> Path:
    """$XDG_CACHE_HOME/virtmount/inspection, or ~/.cache/virtmount/inspection."""
    return cache_dir() / "inspection"


class InspectionCache:
    """Remembered layouts in a directory; unreadable or damaged entries count as absent."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}.json"

    def load(self, key: str) -> RememberedLayout | None:
        try:
            text = self._path(key).read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.debug("cannot read the remembered layout %s: %s", self._path(key), exc)
            return None
        layout = _parse(text)
        if layout is None:
            log.debug("ignoring the damaged or outdated remembered layout %s", self._path(key))
        return layout

    def store(self, key: str, layout: RememberedLayout) -> None:
        """Write atomically; a cache that cannot be written only costs the next boot an inspection."""
        data = {
            "version": _FORMAT_VERSION,
            "mountpoints": layout.mountpoints,
            "fstab": {
                "inode": layout.fstab.inode,
                "size": layout.fstab.size,
                "mtime_ns": layout.fstab.mtime_ns,
                "ctime_ns": layout.fstab.ctime_ns,
            },
        }
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, temporary = tempfile.mkstemp(dir=self.directory, prefix=".tmp-")
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as out:
                    json.dump(data, out)
                os.replace(temporary, self._path(key))
            except BaseException:
                os.unlink(temporary)
                raise
        except OSError as exc:
            log.warning("cannot remember the guest layout in %s: %s", self.directory, exc)

    def forget(self, key: str) -> None:
        try:
            self._path(key).unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot forget the remembered layout %s: %s", self._path(key), exc)
