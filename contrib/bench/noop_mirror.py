#!/usr/bin/env python3
"""A no-op pyfuse3 filesystem that mirrors a recorded tree: the floor under any pyfuse3 + trio filesystem.

The bench walks the same tree through guestmount, through virtmount, and then
through this mirror. The mirror answers every request from memory: names, modes,
sizes and link targets recorded from virtmount's mount; no xattrs (getxattr is
ENODATA, as for the guest's unlabelled files); no file contents. It is mounted
like virtmount (``default_permissions``, POSIX ACLs handled by the kernel, its
kernel cache timeouts for guest files) and serves requests the same way: pyfuse3's request loop
in trio. So its time for ``find`` or ``ls -lR`` is what pyfuse3 and trio cost
for that walk's requests with nothing behind them, and any pyfuse3 filesystem,
virtmount included, needs at least that long.

    noop_mirror.py record ROOT SNAPSHOT       # lstat every path under ROOT (and readlink)
    noop_mirror.py serve SNAPSHOT MOUNTPOINT  # foreground; unmount with fusermount3 -u
"""

from __future__ import annotations

import errno
import json
import os
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import pyfuse3
import trio

from virtmount.fs.nodes import Attributes
from virtmount.fs.operations import GUEST_CACHE_TIMEOUT_S, Operations, entry_attributes


@dataclass
class Entry:
    """One recorded path: what lstat showed, its link target and (directories) children by name."""

    attributes: Attributes
    target: bytes | None = None
    children: dict[bytes, int] = field(default_factory=dict)


def _row(path: bytes, top: bytes) -> list[object]:
    st = os.lstat(path)
    target = os.readlink(path) if stat.S_ISLNK(st.st_mode) else None
    return [os.fsdecode(os.path.relpath(path, top)), st.st_mode, st.st_size, st.st_nlink, st.st_uid, st.st_gid,
            st.st_mtime_ns, None if target is None else os.fsdecode(target)]


def record(root: Path, snapshot: Path) -> int:
    """Write the shape of the tree under ``root`` to ``snapshot`` (JSON); returns the number of paths."""
    top = os.fsencode(root)
    rows = [_row(top, top)]
    for directory, subdirs, files in os.walk(top):  # top-down: a directory's row comes before its entries'
        subdirs.sort()
        rows += [_row(os.path.join(directory, name), top) for name in sorted(subdirs + files)]
    snapshot.write_text(json.dumps(rows))
    return len(rows)


def load(snapshot: Path) -> dict[int, Entry]:
    """Inode -> entry for a recorded tree; the root (".") is inode 1."""
    entries: dict[int, Entry] = {}
    by_path: dict[bytes, int] = {}
    for relative, mode, size, nlink, uid, gid, mtime_ns, target in json.loads(snapshot.read_text()):
        path = os.fsencode(relative)
        inode = pyfuse3.ROOT_INODE if path == b"." else len(entries) + 2
        attributes = Attributes(inode, mode, nlink=nlink, uid=uid, gid=gid, size=size, blocks=(size + 511) // 512,
                                atime_ns=mtime_ns, mtime_ns=mtime_ns, ctime_ns=mtime_ns)
        entries[inode] = Entry(attributes, None if target is None else os.fsencode(target))
        by_path[path] = inode
        if path != b".":
            parent, _, name = path.rpartition(b"/")
            entries[by_path[parent or b"."]].children[name] = inode
    return entries


class MirrorOperations(pyfuse3.Operations):
    """Read-only answers from the recorded tree; every request is served without waiting for anything."""

    enable_acl = Operations.enable_acl  # as virtmount: the kernel asks for ACLs through getxattr

    def __init__(self, entries: dict[int, Entry]) -> None:
        super().__init__()
        self._entries = entries
        self._listings: dict[int, list[tuple[bytes, int]]] = {}
        self._next_handle = 1

    def _entry(self, inode: int) -> Entry:
        entry = self._entries.get(inode)
        if entry is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return entry

    def _attributes(self, entry: Entry) -> pyfuse3.EntryAttributes:
        return entry_attributes(entry.attributes, GUEST_CACHE_TIMEOUT_S)  # as virtmount's guest files

    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        inode = self._entry(parent_inode).children.get(name)
        if inode is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attributes(self._entries[inode])

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attributes(self._entry(inode))

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        target = self._entry(inode).target
        if target is None:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return target

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        handle = self._next_handle
        self._next_handle += 1
        self._listings[handle] = list(self._entry(inode).children.items())
        return handle

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        listing = self._listings[fh]
        for index in range(start_id, len(listing)):
            name, inode = listing[index]
            if not pyfuse3.readdir_reply(token, name, self._attributes(self._entries[inode]), index + 1):
                break

    async def releasedir(self, fh: int) -> None:
        self._listings.pop(fh, None)

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        raise pyfuse3.FUSEError(errno.ENODATA)

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return []

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        pass  # every inode lives as long as the mount


def serve(snapshot: Path, mountpoint: Path) -> None:
    operations = MirrorOperations(load(snapshot))
    options = {"fsname=noop-mirror", "subtype=noop-mirror", "default_permissions"}  # as virtmount's
    pyfuse3.init(operations, str(mountpoint), options)
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=False)


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "record":
        print(record(Path(argv[1]), Path(argv[2])))
        return 0
    if len(argv) == 3 and argv[0] == "serve":
        serve(Path(argv[1]), Path(argv[2]))
        return 0
    print("usage: noop_mirror.py record ROOT SNAPSHOT | serve SNAPSHOT MOUNTPOINT", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
