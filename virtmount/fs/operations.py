"""The pyfuse3 adapter: FUSE requests -> the model, and the only place errors become FUSEError.

Writes go to the tree (guestwrites.py), which answers EROFS for everything
that is not a writable source's filesystem (the virtual tree, running
domains, read-only mounts). Directory handles hold a snapshot of the listing
so that readdir offsets are stable cookies.
"""

from __future__ import annotations

import errno
import logging
import os
from typing import Awaitable, Callable, Sequence, TypeVar

import libvirt
import pyfuse3

from ..errors import VirtmountError
from ..failures import errno_of, reason_of
from ..guestfs.errors import GuestfsClientError
from .guestwrites import AttributeChanges, Caller
from .nodes import Attributes, FsError, GuestNode, Node
from .tree import ConnectionTree

log = logging.getLogger(__name__)

T = TypeVar("T")

# Guest files change only through this mount while an appliance holds the disks, and the kernel
# updates or drops what it caches of what it writes itself.
GUEST_CACHE_TIMEOUT_S = 60.0
VIRTUAL_CACHE_TIMEOUT_S = 1.0  # domains come and go


def entry_attributes(attributes: Attributes, timeout: float) -> pyfuse3.EntryAttributes:
    """What lookup, getattr and readdir tell the kernel about a node (also used by the bench's mirror)."""
    entry = pyfuse3.EntryAttributes()
    entry.st_ino = attributes.inode
    entry.generation = 0
    entry.entry_timeout = timeout
    entry.attr_timeout = timeout
    entry.st_mode = attributes.mode
    entry.st_nlink = attributes.nlink
    entry.st_uid = attributes.uid
    entry.st_gid = attributes.gid
    entry.st_rdev = attributes.rdev
    entry.st_size = attributes.size
    entry.st_blksize = attributes.blksize
    entry.st_blocks = attributes.blocks
    entry.st_atime_ns = attributes.atime_ns
    entry.st_mtime_ns = attributes.mtime_ns
    entry.st_ctime_ns = attributes.ctime_ns
    return entry


class Operations(pyfuse3.Operations):
    """FUSE request handlers over a ``ConnectionTree``."""

    enable_acl = True  # the kernel evaluates POSIX ACLs read from the guest's xattrs

    def __init__(self, tree: ConnectionTree) -> None:
        super().__init__()
        self._tree = tree
        self._listings: dict[int, list[tuple[bytes, Node]]] = {}
        self._listing_inodes: dict[int, int] = {}  # directory handle -> its inode (for fsyncdir)
        self._next_dir_handle = 1

    async def _guarded(self, operation: Callable[[], Awaitable[T]]) -> T:
        try:
            return await operation()
        except FsError as exc:
            if exc.errno == errno.EIO:
                log.debug("EIO: %s", exc)
            raise pyfuse3.FUSEError(exc.errno) from None
        except pyfuse3.FUSEError:
            raise
        except (VirtmountError, GuestfsClientError, libvirt.libvirtError) as exc:  # not turned into FsError below
            log.error("%s", reason_of(exc))
            raise pyfuse3.FUSEError(errno_of(exc)) from None
        except Exception:
            log.exception("internal error")
            raise pyfuse3.FUSEError(errno.EIO) from None

    def _timeout(self, node: Node) -> float:
        if isinstance(node, GuestNode) and node.stale:
            return 0  # estimated attributes (after a write): the kernel asks again when it needs them
        if isinstance(node, GuestNode) and node.stat is not None:
            return GUEST_CACHE_TIMEOUT_S
        return VIRTUAL_CACHE_TIMEOUT_S

    async def _entry(self, node: Node) -> pyfuse3.EntryAttributes:
        """Attributes for lookup and getattr: view roots boot their appliance to show the real ones."""
        return entry_attributes(await self._tree.getattr(node.inode), self._timeout(node))

    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return await self._new_entry(lambda: self._tree.lookup(parent_inode, name))

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for inode, count in inode_list:
            try:
                self._tree.forget(inode, count)
            except Exception:
                log.exception("forget of inode %d failed", inode)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return await self._guarded(lambda: self._entry(self._tree.node(inode)))

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return await self._guarded(lambda: self._tree.readlink(inode))

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        async def run() -> int:
            listing = await self._tree.list_directory(inode)
            handle = self._next_dir_handle
            self._next_dir_handle += 1
            self._listings[handle] = listing
            self._listing_inodes[handle] = inode
            return handle
        return await self._guarded(run)

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        async def run() -> None:
            listing = self._listings.get(fh)
            if listing is None:
                raise FsError(errno.EBADF)
            for index in range(start_id, len(listing)):
                name, node = listing[index]
                entry = entry_attributes(await self._tree.attributes(node), self._timeout(node))
                if not pyfuse3.readdir_reply(token, name, entry, index + 1):
                    break
                self._tree.count_lookup(node)
        await self._guarded(run)

    async def releasedir(self, fh: int) -> None:
        self._listings.pop(fh, None)
        self._listing_inodes.pop(fh, None)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        async def run() -> pyfuse3.FileInfo:
            return self._file_info(inode, await self._tree.open(inode, flags))
        return await self._guarded(run)

    def _file_info(self, inode: int, handle: int) -> pyfuse3.FileInfo:
        info = pyfuse3.FileInfo(fh=handle)
        if self._tree.node(inode) is self._tree.control_file:
            info.direct_io = True  # made afresh on each open: its size is not known beforehand
        else:
            # read-only guest content is static while mounted; a writable source's is read afresh
            # on each open, so that nothing the kernel kept from before a write can be served
            info.keep_cache = not self._tree.writable(inode)
        return info

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return await self._guarded(lambda: self._tree.read(fh, off, size))

    async def release(self, fh: int) -> None:
        node = self._tree.release(fh)
        if node is not None:
            try:
                await self._tree.closed(node)
            except Exception:
                log.exception("release of handle %d failed", fh)

    async def flush(self, fh: int) -> None:
        """Nothing is ever held back: each write reaches the guest before it is answered (and fsync
        syncs the disks). ENOSYS makes the kernel stop sending FLUSH on every close(2)
        (fc->no_flush), which saves a request per file opened, as much as the read of a small file."""
        raise pyfuse3.FUSEError(errno.ENOSYS)

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        # pyfuse3 does not pass the inode; report the mount as a whole (nothing to write to)
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = 4096
        data.f_blocks = data.f_bfree = data.f_bavail = 0
        data.f_files = data.f_ffree = data.f_favail = 0
        data.f_namemax = 255
        return data

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return await self._guarded(lambda: self._tree.listxattr(inode))

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        return await self._guarded(lambda: self._tree.getxattr(inode, name))

    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._guarded(lambda: self._tree.setxattr(inode, name, value))

    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._guarded(lambda: self._tree.removexattr(inode, name))

    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        return not mode & os.W_OK or self._tree.writable(inode)

    # --- writes ------------------------------------------------------------------------------

    async def _new_entry(self, make: Callable[[], Awaitable[Node]]) -> pyfuse3.EntryAttributes:
        """The entry of the node ``make`` looks up or makes (one kernel reference counted); the reference
        is given back if its attributes cannot be had."""
        async def run() -> pyfuse3.EntryAttributes:
            node = await make()  # counted one kernel reference
            try:
                return await self._entry(node)
            except BaseException:
                self._tree.forget(node.inode, 1)
                raise
        return await self._guarded(run)

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        async def run() -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
            handle, node = await self._tree.create(parent_inode, name, mode, flags, _caller(ctx))
            try:
                return self._file_info(node.inode, handle), await self._entry(node)
            except BaseException:
                self._tree.release(handle)
                self._tree.forget(node.inode, 1)
                raise
        return await self._guarded(run)

    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return await self._new_entry(lambda: self._tree.mknod(parent_inode, name, mode, rdev, _caller(ctx)))

    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return await self._new_entry(lambda: self._tree.mkdir(parent_inode, name, mode, _caller(ctx)))

    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return await self._new_entry(lambda: self._tree.symlink(parent_inode, name, target, _caller(ctx)))

    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return await self._new_entry(lambda: self._tree.link(inode, new_parent_inode, new_name))

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._guarded(lambda: self._tree.unlink(parent_inode, name))

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._guarded(lambda: self._tree.rmdir(parent_inode, name))

    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes,
                     flags: int, ctx: pyfuse3.RequestContext) -> None:
        await self._guarded(lambda: self._tree.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags))

    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                      fh: int | None, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        changes = AttributeChanges(
            size=attr.st_size if fields.update_size else None,
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
        )

        async def run() -> pyfuse3.EntryAttributes:
            node = self._tree.node(inode)
            return entry_attributes(await self._tree.setattr(inode, changes), self._timeout(node))
        return await self._guarded(run)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return await self._guarded(lambda: self._tree.write(fh, off, buf))

    async def fsync(self, fh: int, datasync: bool) -> None:
        await self._guarded(lambda: self._tree.fsync(self._tree.handle_inode(fh)))

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        inode = self._listing_inodes.get(fh)
        if inode is not None:
            await self._guarded(lambda: self._tree.fsync(inode))


def _caller(ctx: pyfuse3.RequestContext) -> Caller:
    return Caller(ctx.uid, ctx.gid)
