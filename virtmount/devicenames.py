"""How an appliance names the guest's disks, and the names users see.

A cold-booted appliance's daemon numbers the guest's disks as the guest orders
them: it hides its own root and renumbers the rest at start-up (libguestfs
daemon/device-name-translation.c), so the first guest disk is ``/dev/sda``.
A restored appliance (faststart.py) got the guest's disks plugged in after
its daemon started: the daemon does not renumber those, and its own root is
``sda``, so the first guest disk is ``/dev/sdb`` there. Names shown to users
(devices/, ``virtmount inspect``), remembered between boots, and those inode
numbers derive from are always the guest's order; calls to the daemon use the
appliance's names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .virt.domainxml import scsi_disk_name

_SCSI_DISK = re.compile(r"/dev/sd([a-z]+)")


def _disk_index(letters: str) -> int:
    """sda -> 0, sdz -> 25, sdaa -> 26 (the inverse of scsi_disk_name)."""
    index = 0
    for letter in letters:
        index = index * 26 + (ord(letter) - ord("a") + 1)
    return index - 1


def _shift(name: str, by: int) -> str:
    def shifted(match: re.Match[str]) -> str:
        index = _disk_index(match.group(1)) + by
        return match.group(0) if index < 0 else "/dev/" + scsi_disk_name(index)

    return _SCSI_DISK.sub(shifted, name) if by else name


@dataclass(frozen=True)
class DiskNaming:
    """``first_guest_disk``: the index of the guest's first disk among the appliance's sdX names."""

    first_guest_disk: int = 0

    def to_guest(self, appliance_name: str) -> str:
        """/dev/sdb1 -> /dev/sda1 in a restored appliance; btrfsvol:/dev/sdc2/@ -> btrfsvol:/dev/sdb2/@;
        LVs, md and mapper names unchanged."""
        return _shift(appliance_name, -self.first_guest_disk)

    def to_appliance(self, guest_name: str) -> str:
        return _shift(guest_name, self.first_guest_disk)


COLD_BOOTED = DiskNaming(0)
RESTORED = DiskNaming(1)
