"""Writes to a guest's files (``-o rw``): POSIX calls as guestfs daemon calls, and caches kept true.

Only a writable layout (a shut-off domain's or a volume's disks attached
read-write, see guestlayout.py) is written, and only its filesystems that
mounted read-write; everything else answers EROFS. The daemon acts on paths,
one call at a time, so each operation is a few calls in a row, and after
each, what the mount keeps is brought up to date before the reply:

- attributes: the nodes written (and their directories: mtime, ctime, link
  counts) are stat'ed again, so hard links, which share one node, all show
  the new link count; after a write or a setattr (which change no link count),
  the file's attributes are estimated instead and marked stale: the reply's
  estimate gets no cache time in the kernel, and the file is stat'ed again
  when its attributes are next shown (an untar makes four such calls a file
  and shows none of them);
- xattrs: the kernel asks for a file's ``security.capability`` before each
  write (pyfuse3 cannot take FUSE_HANDLE_KILLPRIV off it); a file made here
  has none until an xattr is set on it here, so that is answered without a call;
- listings: a directory whose entries changed is dropped from the listing
  cache, and every write counts on its source (``ServedSource.writes``), so
  listings, xattrs and file contents fetched ahead before a write are not kept;
- open files: their read-ahead is started afresh after a write or truncate;
- paths: a renamed directory's nodes below it get their new paths; a
  hard-linked node whose name went away takes another from a kept listing or
  its directory listed again; one whose other names are all in other
  directories has none until a lookup gives it one (ESTALE meanwhile).

The daemon reaches files by name only, so a file removed (or replaced by a
rename) while this mount has it open is renamed to ``.virtmount-hidden-<inode>``
in its directory instead, and removed at its last close, as NFS and libfuse do
(a mount killed meanwhile leaves it behind).

The kernel keeps its own caches right for what passes through this mount
(it updates or drops a written inode's attributes and its directory's), and
guest files are opened without ``keep_cache``. O_EXCL is the guest's own
(mknod fails with EEXIST). What the daemon lacks: no renameat2
(RENAME_EXCHANGE answers EINVAL; RENAME_NOREPLACE is checked here, by the
mount's single writer, not atomically in the guest) and no per-file fsync (fsync syncs the whole appliance: the daemon's ``sync`` also
flushes every disk's cache, so the data is in the host's image file).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from dataclasses import dataclass, replace
from typing import Awaitable, Callable, Iterable

from ..concurrency import gather
from ..guestfs.procs import Statns
from ..guestlayout import GuestLayout
from .guestview import GuestView
from .nodes import FileHandle, FsError, GuestNode, NodeTable

log = logging.getLogger(__name__)

NAME_MAX = 255
RENAME_NOREPLACE = 1  # linux/fs.h
RENAME_EXCHANGE = 2
UTIME_OMIT_NSEC = -2  # the daemon's utimens: leave this time alone
HIDDEN_PREFIX = b".virtmount-hidden-"
NS = 1_000_000_000


@dataclass(frozen=True)
class Caller:
    """Who asks (FUSE's request context): new files are theirs."""

    uid: int
    gid: int


@dataclass(frozen=True)
class AttributeChanges:
    """What a setattr asks for; None: leave alone. Times in nanoseconds."""

    size: int | None = None
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    atime_ns: int | None = None
    mtime_ns: int | None = None


class GuestWrites:
    """The write operations on guest nodes, for every writable source of the mount."""

    def __init__(self, view: GuestView, table: NodeTable,
                 open_handles: Callable[[GuestNode], Iterable[FileHandle]]) -> None:
        """``open_handles(node)``: the open file handles of ``node`` (their reading restarts after a write)."""
        self._view = view
        self._table = table
        self._open_handles = open_handles
        self._hidden: dict[GuestNode, GuestNode] = {}  # removed while open -> its directory (see closed)

    # --- checks and cache upkeep ---------------------------------------------------------

    async def writable_layout(self, node: GuestNode) -> GuestLayout:
        """The layout that writes ``node``'s filesystem; EROFS if it is not writable."""
        await self._view.boot_if_needed(node)
        layout = await self._view.layout_for(node)
        assert node.stat is not None and node.source is not None
        filesystem = layout.fs_by_dev.get(node.stat.st_dev)
        if filesystem is None or not layout.writable_filesystem(filesystem):
            raise FsError(errno.EROFS)
        if node.generation != layout.generation:  # seen by an earlier appliance: look again
            await self._restat(node, layout)
        if not node.path:
            raise FsError(errno.ESTALE, "no known name")
        return layout

    async def _restat(self, node: GuestNode, layout: GuestLayout) -> Statns:
        assert node.source is not None
        st = await self._view.guest_call(node.source, lambda: layout.client.lstatns(node.path))
        node.stat, node.generation, node.stale = st, layout.generation, False
        return st

    async def refresh(self, node: GuestNode) -> None:
        """The true attributes of a node whose attributes were estimated after a write; the estimate
        stays if the file has no name left to stat (removed while open)."""
        if not node.path:
            return
        try:
            await self._restat(node, await self._view.layout_for(node))
        except FsError as exc:
            log.debug("%r: attributes not read again after a write: %s", node.path, exc)

    @staticmethod
    def _estimate(node: GuestNode, size: int | None = None, mode: int | None = None, uid: int = -1, gid: int = -1,
                  atime_ns: int | None = None, mtime_ns: int | None = None) -> None:
        """Attributes after a call that changed only these (and ctime), without asking the daemon:
        marked stale, so they are never shown as they are (see the module's docstring)."""
        st = node.stat
        assert st is not None
        now_s, now_ns = divmod(time.time_ns(), NS)
        atime_s, atime_rest = (st.st_atime_sec, st.st_atime_nsec) if atime_ns is None else divmod(atime_ns, NS)
        mtime_s, mtime_rest = (st.st_mtime_sec, st.st_mtime_nsec) if mtime_ns is None else divmod(mtime_ns, NS)
        node.stat = replace(
            st, st_size=st.st_size if size is None else size,
            st_mode=st.st_mode if mode is None else stat.S_IFMT(st.st_mode) | stat.S_IMODE(mode),
            st_uid=st.st_uid if uid == -1 else uid, st_gid=st.st_gid if gid == -1 else gid,
            st_atime_sec=atime_s, st_atime_nsec=atime_rest, st_mtime_sec=mtime_s, st_mtime_nsec=mtime_rest,
            st_ctime_sec=now_s, st_ctime_nsec=now_ns)
        node.stale = True

    def _written(self, node: GuestNode) -> None:
        """Something of ``node``'s source changed: what was fetched ahead before is not kept."""
        assert node.source is not None
        node.source.writes += 1

    async def _entries_changed(self, directory: GuestNode, layout: GuestLayout) -> None:
        """A directory gained or lost entries: its listing goes, its attributes are read again."""
        self._written(directory)
        self._view.forget_listing(directory, layout)
        await self._restat(directory, layout)

    async def _entries_added(self, parent: GuestNode, layout: GuestLayout, name: bytes) -> GuestNode:
        """``name`` was made in ``parent``: its node, and the directory's new attributes (both stat'ed
        at once: the daemon answers in order, after the write)."""
        _, node = await gather(lambda: self._entries_changed(parent, layout),
                               lambda: self._new_node(parent, layout, name))
        assert isinstance(node, GuestNode)
        return node

    async def _new_node(self, parent: GuestNode, layout: GuestLayout, name: bytes) -> GuestNode:
        assert parent.source is not None
        path = _join(parent.path, name)
        st = await self._view.guest_call(parent.source, lambda: layout.client.lstatns(path))
        node = self._view.guest_node(parent.source, parent.view, layout, path, st)
        node.forget_what_was_read_of_the_file()  # its inode number may be a removed file's, reused
        return node

    def _restart_readers(self, node: GuestNode) -> None:
        for handle in self._open_handles(node):
            handle.data = None
            handle.reader = self._view.reader_for(node)

    async def _name_gone(self, node: GuestNode, parent: GuestNode, layout: GuestLayout, path: bytes) -> None:
        """``path`` (in ``parent``) no longer names ``node``: keep another of its names if one is known,
        and its new attributes (link count, ctime) if it still exists."""
        if node.path == path:
            node.path = await self._other_name(node, parent, path)
        if node.path:
            try:
                await self._restat(node, layout)
                return
            except FsError:
                node.path = b""
        if node.stat is not None:
            node.stat = replace(node.stat, st_nlink=max(0, node.stat.st_nlink - 1))

    async def _other_name(self, node: GuestNode, parent: GuestNode, gone: bytes) -> bytes:
        """Another path of a hard-linked node: from the kept listings, else from its directory listed
        again (hard links elsewhere are found by a later lookup); b"" if none is known."""
        if node.stat is None or stat.S_ISDIR(node.stat.st_mode) or node.stat.st_nlink < 2:
            return b""
        for siblings in self._view.kept_listings():
            for name, member in siblings.members:
                path = _join(siblings.directory, name)
                if member is node and path != gone:
                    return path
        self._written(parent)
        self._view.forget_listing(parent, await self._view.layout_for(parent))
        for name, listed in await self._view.list_directory(parent):
            if listed is node:
                return _join(parent.path, name)
        return b""

    def _moved(self, old: bytes, new: bytes) -> None:
        """A directory moved from ``old`` to ``new``: the nodes below it follow."""
        prefix = old + b"/"
        for node in self._table.guest_nodes():
            if node.path.startswith(prefix):
                node.path = new + node.path[len(old):]
        for siblings in self._view.kept_listings():
            if siblings.directory == old or siblings.directory.startswith(prefix):
                siblings.directory = new + siblings.directory[len(old):]

    async def _call(self, node: GuestNode, call: Callable[[], Awaitable[None]]) -> None:
        assert node.source is not None
        await self._view.guest_call(node.source, call)

    async def _own(self, parent: GuestNode, layout: GuestLayout, path: bytes, caller: Caller, mode: int) -> None:
        """Give a new file to the caller: the daemon made it as root (with the directory's group
        if that is set-group-ID, which stays so). chown clears set-user/group-ID bits: set them again."""
        assert parent.stat is not None
        group = parent.stat.st_gid if parent.stat.st_mode & stat.S_ISGID else caller.gid
        inherited_group = parent.stat.st_gid if parent.stat.st_mode & stat.S_ISGID else 0
        if caller.uid == 0 and group == inherited_group:
            return
        await self._call(parent, lambda: layout.client.lchown(caller.uid, group, path))
        if mode & (stat.S_ISUID | stat.S_ISGID) and not stat.S_ISLNK(mode):
            await self._call(parent, lambda: layout.client.chmod(stat.S_IMODE(mode), path))

    # --- namespace -----------------------------------------------------------------------

    async def mknod(self, parent: GuestNode, name: bytes, mode: int, rdev: int, caller: Caller) -> GuestNode:
        """A regular file, FIFO, socket or device node ``name`` in ``parent`` (EEXIST if it is there)."""
        layout = await self._parent_layout(parent, name)
        path = _join(parent.path, name)
        kind = stat.S_IFMT(mode) or stat.S_IFREG
        await self._call(parent, lambda: layout.client.mknod(kind | stat.S_IMODE(mode), os.major(rdev),
                                                             os.minor(rdev), path))
        await self._own(parent, layout, path, caller, mode)
        node = await self._entries_added(parent, layout, name)
        node.without_capability = True
        return node

    async def mkdir(self, parent: GuestNode, name: bytes, mode: int, caller: Caller) -> GuestNode:
        layout = await self._parent_layout(parent, name)
        path = _join(parent.path, name)
        await self._call(parent, lambda: layout.client.mkdir_mode(path, stat.S_IMODE(mode)))
        await self._own(parent, layout, path, caller, stat.S_IMODE(mode) & ~(stat.S_ISUID | stat.S_ISGID))
        return await self._entries_added(parent, layout, name)

    async def symlink(self, parent: GuestNode, name: bytes, target: bytes, caller: Caller) -> GuestNode:
        layout = await self._parent_layout(parent, name)
        path = _join(parent.path, name)
        await self._call(parent, lambda: layout.client.ln_s(target, path))
        await self._own(parent, layout, path, caller, stat.S_IFLNK)
        node = await self._entries_added(parent, layout, name)
        node.link_target = target
        return node

    async def link(self, node: GuestNode, parent: GuestNode, name: bytes) -> GuestNode:
        """A hard link ``name`` in ``parent`` to ``node`` (the same node: one inode number)."""
        layout = await self._parent_layout(parent, name)
        await self._same_filesystem(node, parent, layout)
        path = _join(parent.path, name)
        await self._call(parent, lambda: layout.client.ln(node.path, path))
        self._written(node)
        await self._restat(node, layout)
        return await self._entries_added(parent, layout, name)

    async def unlink(self, parent: GuestNode, name: bytes) -> None:
        layout = await self._parent_layout(parent, name)
        child = await self._view.lookup(parent, name)
        path = _join(parent.path, name)
        if not await self._hide_if_open(child, parent, layout, path):
            await self._call(parent, lambda: layout.client.rm(path))
            await self._name_gone(child, parent, layout, path)
        await self._entries_changed(parent, layout)

    async def _hide_if_open(self, node: GuestNode, parent: GuestNode, layout: GuestLayout, path: bytes) -> bool:
        """Rename a file about to lose its last name while open here; True if it was."""
        st = node.stat
        if st is None or not stat.S_ISREG(st.st_mode) or st.st_nlink > 1 or not self._open_handles(node):
            return False
        hidden = _join(parent.path, HIDDEN_PREFIX + str(st.st_ino).encode())
        await self._call(parent, lambda: layout.client.rename(path, hidden))
        node.path = hidden
        self._hidden[node] = parent
        return True

    async def closed(self, node: GuestNode) -> None:
        """A handle of ``node`` was released: at the last one, a hidden file goes (errors are logged)."""
        parent = self._hidden.get(node)
        if parent is None or self._open_handles(node):
            return
        del self._hidden[node]
        hidden = node.path
        try:
            layout = await self.writable_layout(node)
            await self._call(node, lambda: layout.client.rm(hidden))
            await self._entries_changed(parent, layout)
        except FsError as exc:
            log.warning("cannot remove %r, a file removed while it was open: %s", hidden, exc)
            return
        node.path = b""
        self._view.forget_kernel_entry(parent.inode, hidden.rpartition(b"/")[2])  # a listing may have shown it

    async def rmdir(self, parent: GuestNode, name: bytes) -> None:
        layout = await self._parent_layout(parent, name)
        child = await self._view.lookup(parent, name)
        path = _join(parent.path, name)
        await self._call(parent, lambda: layout.client.rmdir(path))
        await self._entries_changed(parent, layout)
        self._view.forget_listing(child, layout)
        child.path = b""

    async def rename(self, old_parent: GuestNode, old_name: bytes, new_parent: GuestNode, new_name: bytes,
                     flags: int) -> None:
        if flags & RENAME_EXCHANGE:
            raise FsError(errno.EINVAL, "the guestfs daemon cannot exchange two names atomically")
        if flags & ~RENAME_NOREPLACE:
            raise FsError(errno.EINVAL)
        layout = await self._parent_layout(old_parent, old_name)
        await self._parent_layout(new_parent, new_name)
        await self._same_filesystem(old_parent, new_parent, layout)
        moved = await self._view.lookup(old_parent, old_name)
        try:
            replaced: GuestNode | None = await self._view.lookup(new_parent, new_name)
        except FsError as exc:
            if exc.errno != errno.ENOENT:
                raise
            replaced = None
        if replaced is not None and flags & RENAME_NOREPLACE:
            raise FsError(errno.EEXIST)
        old, new = _join(old_parent.path, old_name), _join(new_parent.path, new_name)
        if replaced is moved:  # two names of one file: rename(2) does nothing
            return
        hidden = replaced is not None and await self._hide_if_open(replaced, new_parent, layout, new)
        await self._call(old_parent, lambda: layout.client.rename(old, new))
        if replaced is not None and not hidden:
            if replaced.stat is not None and stat.S_ISDIR(replaced.stat.st_mode):
                self._view.forget_listing(replaced, layout)
                replaced.path = b""
            else:
                await self._name_gone(replaced, new_parent, layout, new)
        await self._entries_changed(old_parent, layout)
        if new_parent is not old_parent:
            await self._entries_changed(new_parent, layout)
        if moved.stat is not None and stat.S_ISDIR(moved.stat.st_mode):
            self._moved(old, new)
        if moved.path == old or moved.path == b"":
            moved.path = new
        await self._restat(moved, layout)

    async def _parent_layout(self, parent: GuestNode, name: bytes) -> GuestLayout:
        if len(name) > NAME_MAX:
            raise FsError(errno.ENAMETOOLONG)
        if b"/" in name or name in (b"", b".", b".."):
            raise FsError(errno.EINVAL)
        layout = await self.writable_layout(parent)
        assert parent.stat is not None
        if not stat.S_ISDIR(parent.stat.st_mode):
            raise FsError(errno.ENOTDIR)
        return layout

    async def _same_filesystem(self, one: GuestNode, other: GuestNode, layout: GuestLayout) -> None:
        await self.writable_layout(one)
        assert one.stat is not None and other.stat is not None
        if one.source is not other.source or one.view != other.view or one.stat.st_dev != other.stat.st_dev:
            raise FsError(errno.EXDEV)

    # --- attributes and contents -----------------------------------------------------------

    async def setattr(self, node: GuestNode, changes: AttributeChanges) -> None:
        """Size first, then owner (which clears set-ID bits), then mode, then times (a truncate sets mtime).
        The attributes are then estimated (stale): an owner change that clears set-ID bits is stat'ed."""
        layout = await self.writable_layout(node)
        client, path = layout.client, node.path
        self._written(node)
        if changes.size is not None:
            size = changes.size
            await self._call(node, lambda: client.truncate_size(path, size))
            self._restart_readers(node)
            self._estimate(node, size=size, mtime_ns=time.time_ns())
        if changes.uid is not None or changes.gid is not None:
            uid, gid = _or_unchanged(changes.uid), _or_unchanged(changes.gid)
            await self._call(node, lambda: client.lchown(uid, gid, path))
            self._estimate(node, uid=uid, gid=gid)
            if node.stat is not None and node.stat.st_mode & (stat.S_ISUID | stat.S_ISGID):
                await self._restat(node, layout)
        if changes.mode is not None:
            mode = stat.S_IMODE(changes.mode)
            await self._call(node, lambda: client.chmod(mode, path))
            self._estimate(node, mode=mode)
        if changes.atime_ns is not None or changes.mtime_ns is not None:
            atime, mtime = _timespec(changes.atime_ns), _timespec(changes.mtime_ns)
            await self._call(node, lambda: client.utimens(path, atime, mtime))
            self._estimate(node, atime_ns=changes.atime_ns, mtime_ns=changes.mtime_ns)

    async def open_for_writing(self, node: GuestNode, handle: FileHandle, truncate: bool) -> None:
        """Make ``handle`` a writing handle of ``node`` (truncated first with O_TRUNC)."""
        layout = await self.writable_layout(node)
        assert node.stat is not None
        if stat.S_ISDIR(node.stat.st_mode):
            raise FsError(errno.EISDIR)
        handle.writable_in = layout.generation
        if truncate:
            await self.setattr(node, AttributeChanges(size=0))
        handle.data, handle.reader = None, self._view.reader_for(node)

    async def write(self, handle: FileHandle, offset: int, data: bytes) -> int:
        """pwrite until all of ``data`` is written; EIO once the appliance the file was opened in is gone."""
        node = handle.node
        assert isinstance(node, GuestNode) and node.source is not None
        layout = await self.writable_layout(node)
        if handle.writable_in != layout.generation:
            raise FsError(errno.EIO, "the appliance this file was opened in is gone")
        self._written(node)
        done = 0
        try:
            while done < len(data):
                chunk, at = data[done:], offset + done
                written = await self._view.guest_call(node.source, lambda: layout.client.pwrite(node.path, chunk, at))
                if written <= 0:
                    raise FsError(errno.EIO, f"pwrite wrote {written} bytes")
                done += written
        finally:
            self._restart_readers(node)
            if done:
                assert node.stat is not None
                self._estimate(node, size=max(node.stat.st_size, offset + done), mtime_ns=time.time_ns())
        return done

    async def fsync(self, node: GuestNode) -> None:
        """Return once everything written is on the guest's disks (the whole appliance is synced)."""
        layout = await self._view.layout_for(node)
        if layout.writable:
            assert node.source is not None
            await self._view.guest_call(node.source, lambda: layout.client.sync())

    async def setxattr(self, node: GuestNode, name: bytes, value: bytes) -> None:
        layout = await self.writable_layout(node)
        self._written(node)
        await self._call(node, lambda: layout.client.lsetxattr(name, value, node.path))
        node.xattrs, node.without_capability = None, False
        await self._restat(node, layout)  # an ACL changes the mode too

    async def removexattr(self, node: GuestNode, name: bytes) -> None:
        layout = await self.writable_layout(node)
        self._written(node)
        await self._call(node, lambda: layout.client.lremovexattr(name, node.path))
        node.xattrs = None
        await self._restat(node, layout)


def _or_unchanged(value: int | None) -> int:
    return -1 if value is None else value


def _timespec(ns: int | None) -> tuple[int, int]:
    if ns is None:
        return (0, UTIME_OMIT_NSEC)
    return divmod(ns, NS)


def _join(directory: bytes, name: bytes) -> bytes:
    return directory.rstrip(b"/") + b"/" + name
