"""Writes through the tree with a fake daemon: which calls, in which order, which errno, and what the
caches show afterwards (the in-memory guest of test_tree.py, its daemon taught the write calls)."""

from __future__ import annotations

import errno
import os
import stat
from typing import Any

import pytest

from tests.unit.test_tree import (SDA1_DEV, FakeGuestClient, FakeInode, GuestLayout, World, fs_error, guest,
                                  guest_filesystems, make_layout, make_world, read_dir)
from virtmount.fs.guestwrites import RENAME_EXCHANGE, RENAME_NOREPLACE, AttributeChanges, Caller

ROOT = Caller(0, 0)
USER = Caller(1000, 1000)


class WritingClient(FakeGuestClient):
    """The fake daemon with the write calls: each is recorded, and those that make or remove names
    change the in-memory guest so that the stat'ing afterwards finds what the real daemon would."""

    next_ino = 500

    def _parent(self, path: bytes) -> tuple[FakeInode, bytes, Any]:
        directory, _, name = path.rpartition(b"/")
        fs, parent = self._resolve(directory, "write")
        return parent, name, fs

    async def mknod(self, mode: int, major: int, minor: int, path: bytes) -> None:
        self._record("mknod", path, mode)
        parent, name, fs = self._parent(path)
        if name in parent.entries:
            raise OSError(errno.EEXIST, "exists")
        self.next_ino += 1
        fs.inodes[self.next_ino] = FakeInode(self.next_ino, mode)
        parent.entries[name] = self.next_ino

    async def rm(self, path: bytes) -> None:
        self._record("rm", path)
        parent, name, _ = self._parent(path)
        del parent.entries[name]

    async def rename(self, old: bytes, new: bytes) -> None:
        self._record("rename", old, new)
        old_parent, old_name, _ = self._parent(old)
        new_parent, new_name, _ = self._parent(new)
        new_parent.entries[new_name] = old_parent.entries.pop(old_name)

    async def lchown(self, owner: int, group: int, path: bytes) -> None:
        self._record("lchown", path, owner, group)

    async def chmod(self, mode: int, path: bytes) -> None:
        self._record("chmod", path, mode)

    async def truncate_size(self, path: bytes, size: int) -> None:
        self._record("truncate_size", path, size)

    async def utimens(self, path: bytes, atime: tuple[int, int], mtime: tuple[int, int]) -> None:
        self._record("utimens", path, atime, mtime)

    async def pwrite(self, path: bytes, content: bytes, offset: int) -> int:
        self._record("pwrite", path, content, offset)
        return len(content)

    async def lsetxattr(self, xattr: bytes, value: bytes, path: bytes) -> None:
        self._record("lsetxattr", path, xattr, value)
        self._resolve(path, "lsetxattr")[1].xattrs[xattr] = value

    def writes(self) -> list[str]:
        return [name for name, _ in self.calls if name not in ("lstatns", "readdir", "lstatnslist", "readlinklist")]


@pytest.fixture
def writable() -> World:
    world = make_world()
    world.client = WritingClient(*guest_filesystems())
    layout = world.results["alpha"]
    assert isinstance(layout, GuestLayout)
    layout.client = world.client  # type: ignore[assignment]
    layout.writable = True
    return world


async def test_a_read_only_source_answers_erofs_and_sends_nothing() -> None:
    world = make_world()  # its layout is read-only, as a running domain's (or any without -o rw)
    tree = world.tree
    etc = await guest(world, b"fs", b"etc")
    hostname = await guest(world, b"fs", b"etc", b"hostname")
    calls = len(world.client.calls)
    assert await fs_error(tree.mkdir(etc.inode, b"new", 0o755, ROOT)) == errno.EROFS
    assert await fs_error(tree.create(etc.inode, b"new", 0o644, os.O_WRONLY, ROOT)) == errno.EROFS
    assert await fs_error(tree.unlink(etc.inode, b"hostname")) == errno.EROFS
    assert await fs_error(tree.rename(etc.inode, b"hostname", etc.inode, b"h", 0)) == errno.EROFS
    assert await fs_error(tree.setattr(hostname.inode, AttributeChanges(size=0))) == errno.EROFS
    assert await fs_error(tree.removexattr(hostname.inode, b"user.comment")) == errno.EROFS
    assert len(world.client.calls) == calls


async def test_a_new_file_is_the_caller_s_with_its_set_id_bits(writable: World) -> None:
    client = writable.client
    assert isinstance(client, WritingClient)
    etc = await guest(writable, b"fs", b"etc")
    await read_dir(writable.tree, etc)  # a kept listing, which the create must drop
    handle, node = await writable.tree.create(etc.inode, b"new", 0o4755, os.O_WRONLY, USER)
    assert client.writes() == ["mknod", "lchown", "chmod"]  # chown clears set-ID bits: chmod after it
    assert client.args_of("mknod")[-1] == (b"/fs/etc/new", stat.S_IFREG | 0o4755)
    assert client.args_of("lchown")[-1] == (b"/fs/etc/new", 1000, 1000)
    assert b"new" in await read_dir(writable.tree, etc)
    writable.tree.release(handle)
    # root's files need no chown
    client.calls.clear()
    await writable.tree.mknod(etc.inode, b"fifo", stat.S_IFIFO | 0o600, 0, ROOT)
    assert client.writes() == ["mknod"]
    assert await fs_error(writable.tree.mknod(etc.inode, b"n" * 256, stat.S_IFREG, 0, ROOT)) == errno.ENAMETOOLONG


async def test_setattr_truncates_then_chowns_then_chmods_then_sets_times(writable: World) -> None:
    client = writable.client
    assert isinstance(client, WritingClient)
    hostname = await guest(writable, b"fs", b"etc", b"hostname")
    client.calls.clear()
    reply = await writable.tree.setattr(hostname.inode, AttributeChanges(size=1, mode=0o600, uid=7, atime_ns=None,
                                                                         mtime_ns=1_600_000_000_000_000_005))
    assert client.writes() == ["truncate_size", "lchown", "chmod", "utimens"]
    assert client.args_of("lchown")[-1] == (b"/fs/etc/hostname", 7, -1)  # -1: the group stays
    assert client.args_of("utimens")[-1] == (b"/fs/etc/hostname", (0, -2), (1_600_000_000, 5))  # -2: UTIME_OMIT
    # the reply is an estimate, not read back; the kernel gets it with no cache time
    assert [name for name, _ in client.calls if name == "lstatns"] == []
    assert (reply.size, stat.S_IMODE(reply.mode), reply.uid, reply.mtime_ns) == (1, 0o600, 7, 1_600_000_000_000_000_005)
    assert hostname.stale
    # read back when next shown, once
    client.calls.clear()
    await writable.tree.getattr(hostname.inode)
    await writable.tree.getattr(hostname.inode)
    assert [name for name, _ in client.calls] == ["lstatns"] and not hostname.stale


async def test_a_write_estimates_the_size_and_the_next_stat_reads_it_back(writable: World) -> None:
    client = writable.client
    assert isinstance(client, WritingClient)
    hostname = await guest(writable, b"fs", b"etc", b"hostname")
    assert hostname.stat is not None
    size = hostname.stat.st_size
    handle = await writable.tree.open(hostname.inode, os.O_WRONLY)
    client.calls.clear()
    assert await writable.tree.write(handle, size + 10, b"abc") == 3
    assert [name for name, _ in client.calls] == ["pwrite"]
    assert hostname.stale and hostname.stat.st_size == size + 13
    await writable.tree.getattr(hostname.inode)
    assert [name for name, _ in client.calls] == ["pwrite", "lstatns"] and not hostname.stale
    writable.tree.release(handle)


async def test_a_new_file_s_capability_asked_before_each_write_is_answered_without_a_call(writable: World) -> None:
    client = writable.client
    assert isinstance(client, WritingClient)
    tree = writable.tree
    etc = await guest(writable, b"fs", b"etc")
    hostname = await guest(writable, b"fs", b"etc", b"hostname")
    handle, new = await tree.create(etc.inode, b"new", 0o644, os.O_WRONLY, ROOT)
    client.calls.clear()
    assert await fs_error(tree.getxattr(new.inode, b"security.capability")) == errno.ENODATA
    assert client.calls == []
    # an existing file's is asked for; so is a new file's once an xattr was set on it here
    assert await fs_error(tree.getxattr(hostname.inode, b"security.capability")) == errno.ENODATA
    assert [name for name, _ in client.calls] == ["lgetxattrs"]
    await tree.setxattr(new.inode, b"security.capability", b"\x01\x00\x00\x02")
    client.calls.clear()
    assert await tree.getxattr(new.inode, b"security.capability") == b"\x01\x00\x00\x02"
    assert [name for name, _ in client.calls] == ["lgetxattrs"]
    tree.release(handle)


async def test_a_new_file_s_capability_is_asked_for_after_a_new_boot(writable: World) -> None:
    """The guest may have run between two appliances and given the file a capability."""
    client = writable.client
    assert isinstance(client, WritingClient)
    etc = await guest(writable, b"fs", b"etc")
    handle, new = await writable.tree.create(etc.inode, b"new", 0o644, os.O_WRONLY, ROOT)
    writable.tree.release(handle)
    _, inode = client._resolve(b"/fs/etc/new", "test")
    inode.xattrs[b"security.capability"] = b"\x01\x00\x00\x02"
    writable.appliance("alpha").result = make_layout(client, generation=2)
    assert await guest(writable, b"fs", b"etc", b"new") is new
    assert await writable.tree.getxattr(new.inode, b"security.capability") == b"\x01\x00\x00\x02"


async def test_renames_the_daemon_cannot_do_atomically_are_refused_before_any_call(writable: World) -> None:
    client = writable.client
    assert isinstance(client, WritingClient)
    etc = await guest(writable, b"fs", b"etc")
    boot = await guest(writable, b"fs", b"boot")
    client.calls.clear()
    tree = writable.tree
    assert await fs_error(tree.rename(etc.inode, b"hostname", etc.inode, b"passwd", RENAME_EXCHANGE)) == errno.EINVAL
    assert await fs_error(tree.rename(etc.inode, b"hostname", etc.inode, b"passwd", RENAME_NOREPLACE)) == errno.EEXIST
    assert await fs_error(tree.rename(etc.inode, b"hostname", boot.inode, b"h", 0)) == errno.EXDEV
    assert "rename" not in client.writes()
    await tree.rename(etc.inode, b"hostname", etc.inode, b"name", 0)
    moved = await guest(writable, b"fs", b"etc", b"name")
    assert moved.path == b"/fs/etc/name" and moved.stat is not None and moved.stat.st_dev == SDA1_DEV
    assert await fs_error(guest(writable, b"fs", b"etc", b"hostname")) == errno.ENOENT
