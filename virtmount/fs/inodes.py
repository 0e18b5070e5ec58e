"""Inode numbers: stable for guest files, distinct across filesystems and views.

A guest file's number is ``prefix << 40 | guest inode``, where the 24-bit
prefix is derived from (domain UUID, view, filesystem) by hashing. The same
guest file thus has the same number after a remount (backup tools keyed on
inode numbers stay valid), hard links share a number (``rsync -H`` sees them),
and two filesystems never clash. A directory seen in both ``fs/`` and
``devices/…`` gets two numbers, because the kernel allows one path per
directory inode. Prefix 0 holds the virtual nodes (directories and files
virtmount makes up); guest inode numbers that do not fit in 40 bits, and the
rare hash collision, fall back to numbers allocated in a reserved prefix.
"""

from __future__ import annotations

import hashlib
import itertools

import pyfuse3

GUEST_INODE_BITS = 40
_GUEST_INODE_LIMIT = 1 << GUEST_INODE_BITS
_PREFIX_LIMIT = 1 << (64 - GUEST_INODE_BITS)
_OVERFLOW_PREFIX = _PREFIX_LIMIT - 1


class InodeNumbers:
    """Hands out inode numbers: stable ones for guest files, sequential ones for virtual nodes."""

    def __init__(self) -> None:
        self._virtual = itertools.count(pyfuse3.ROOT_INODE + 1)
        self._prefix_owner: dict[int, tuple[str, str, str]] = {}
        self._prefix_of: dict[tuple[str, str, str], int] = {}
        self._overflow: dict[tuple[int, int], int] = {}
        self._overflow_next = itertools.count(1)

    def new_virtual(self) -> int:
        return next(self._virtual)

    def filesystem_prefix(self, domain_uuid: str, view: str, filesystem: str) -> int:
        """The prefix of one filesystem as seen in one view of one domain (stable across runs)."""
        key = (domain_uuid, view, filesystem)
        prefix = self._prefix_of.get(key)
        if prefix is not None:
            return prefix
        salt = 0
        while True:
            digest = hashlib.sha256(f"{domain_uuid}\0{view}\0{filesystem}\0{salt}".encode()).digest()
            prefix = int.from_bytes(digest[:3], "big") % _PREFIX_LIMIT
            if prefix not in (0, _OVERFLOW_PREFIX) and prefix not in self._prefix_owner:
                break
            salt += 1
        self._prefix_owner[prefix] = key
        self._prefix_of[key] = prefix
        return prefix

    def guest_inode(self, prefix: int, guest_ino: int) -> int:
        """The mount's number for inode ``guest_ino`` of the filesystem with ``prefix``."""
        if 0 <= guest_ino < _GUEST_INODE_LIMIT:
            return (prefix << GUEST_INODE_BITS) | guest_ino
        key = (prefix, guest_ino)
        number = self._overflow.get(key)
        if number is None:
            number = (_OVERFLOW_PREFIX << GUEST_INODE_BITS) | next(self._overflow_next)
            self._overflow[key] = number
        return number
