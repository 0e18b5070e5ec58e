"""The pyfuse3 adapter: FUSE requests -> the model, and the only place errors become FUSEError.

Read-only semantics: everything that would write answers EROFS (except the
release control, see ``model.RELEASE_XATTR``). Directory handles hold a
snapshot of the listing so that readdir offsets are stable cookies.
"""

from __future__ import annotations

import errno
import logging
import os
from typing import Any, Awaitable, Callable, NoReturn, Sequence, TypeVar

import libvirt
import pyfuse3

from ..errors import VirtmountError
from ..failures import errno_of, reason_of
from ..guestfs.errors import GuestfsClientError

from .nodes import Attributes, FsError, GuestNode, Node
from .tree import ConnectionTree

log = logging.getLogger(__name__)

T = TypeVar("T")

GUEST_CACHE_TIMEOUT_S = 60.0  # guest files do not change while an appliance holds the disks
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


async def _read_only(*_args: Any) -> NoReturn:
    raise pyfuse3.FUSEError(errno.EROFS)


class Operations(pyfuse3.Operations):
    """FUSE request handlers over a ``ConnectionTree``."""

    enable_acl = True  # the kernel evaluates POSIX ACLs read from the guest's xattrs

    def __init__(self, tree: ConnectionTree) -> None:
        super().__init__()
        self._tree = tree
        self._listings: dict[int, list[tuple[bytes, Node]]] = {}
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
        if isinstance(node, GuestNode) and node.stat is not None:
            return GUEST_CACHE_TIMEOUT_S
        return VIRTUAL_CACHE_TIMEOUT_S

    async def _entry(self, node: Node) -> pyfuse3.EntryAttributes:
        """Attributes for lookup and getattr: view roots boot their appliance to show the real ones."""
        return entry_attributes(await self._tree.getattr(node.inode), self._timeout(node))

    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        async def run() -> pyfuse3.EntryAttributes:
            node = await self._tree.lookup(parent_inode, name)
            try:
                return await self._entry(node)
            except BaseException:
                self._tree.forget(node.inode, 1)
                raise
        return await self._guarded(run)

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

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        async def run() -> pyfuse3.FileInfo:
            handle = await self._tree.open(inode, flags)
            info = pyfuse3.FileInfo(fh=handle)
            if self._tree.node(inode) is self._tree.control_file:
                info.direct_io = True  # made afresh on each open: its size is not known beforehand
            else:
                info.keep_cache = True  # guest content is static while mounted
            return info
        return await self._guarded(run)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return await self._guarded(lambda: self._tree.read(fh, off, size))

    async def release(self, fh: int) -> None:
        self._tree.release(fh)

    async def flush(self, fh: int) -> None:
        """Nothing is ever written back. ENOSYS makes the kernel stop sending FLUSH on every close(2)
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
        await self._guarded(lambda: self._tree.setxattr(inode, name))

    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        return not mode & os.W_OK

    setattr = _read_only  # type: ignore[assignment]
    mknod = _read_only  # type: ignore[assignment]
    mkdir = _read_only  # type: ignore[assignment]
    unlink = _read_only  # type: ignore[assignment]
    rmdir = _read_only  # type: ignore[assignment]
    symlink = _read_only  # type: ignore[assignment]
    rename = _read_only  # type: ignore[assignment]
    link = _read_only  # type: ignore[assignment]
    write = _read_only  # type: ignore[assignment]
    create = _read_only  # type: ignore[assignment]
    removexattr = _read_only  # type: ignore[assignment]
