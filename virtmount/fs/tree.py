"""The virtual tree of one libvirt connection, independent of FUSE.

```
/domains/<name>/domain.xml              the domain's XML (libvirt only)
/volumes/<pool>/<volume>/volume.xml     the volume's XML (libvirt only), for every active pool
/domains/<name>/{fs,devices}/           served by the guest view (guestview.py)
/volumes/<pool>/<volume>/{fs,devices}/
```
Listing ``domains/``, ``volumes/`` and a pool asks libvirt only (kept for a
second). A name is resolved to its source's identity (domain UUID, volume
key) when it is looked up; a name that comes back with another identity is
another source. This class also routes each operation to the virtual nodes or
to the guest view. Everything here raises ``FsError(errno)``; ``operations``
turns that into FUSE replies.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Iterable, TypeVar

import libvirt
import trio

from ..lifecycle import SourceAppliance
from ..sources import SourceRef, SourceUnavailable
from ..sources.domain import DomainRef, domain_named
from ..sources.volume import VolumeRef
from ..status import CONTROL_NAME, SourceStatus
from ..failures import errno_of
from ..virt.connection import libvirt_message, run_blocking
from ..virt.domainxml import APPLIANCE_NAME_PREFIX
from ..virt.link import LibvirtDown, LibvirtLink
from .guestview import DEFAULT_CACHED_ENTRIES, GuestView, guest_attributes
from .guestwrites import AttributeChanges, Caller, GuestWrites
from .nodes import (Attributes, FileHandle, FsError, GuestNode, Node, NodeTable, ServedSource, VirtualDir,
                    VirtualFile, VirtualLink, is_entry_name)

log = logging.getLogger(__name__)

T = TypeVar("T")

RELEASE_XATTR = b"user.virtmount.release"
CAPABILITY_XATTR = b"security.capability"
LIST_TTL_S = 1.0


@dataclass(eq=False)
class PoolEntry:
    """One active storage pool: its directory and the volumes looked up in it."""

    name: str
    uuid: str
    directory: VirtualDir
    volumes: dict[str, ServedSource] = field(default_factory=dict)  # volume name -> source


class _Listed:
    """Names listed by libvirt, kept for LIST_TTL_S."""

    def __init__(self, fetch: Callable[[], Awaitable[list[str]]]) -> None:
        self._fetch = fetch
        self._names: list[str] = []
        self._at = -LIST_TTL_S

    async def names(self) -> list[str]:
        if time.monotonic() - self._at > LIST_TTL_S:
            self._names = await self._fetch()
            self._at = time.monotonic()
        return self._names


class ConnectionTree:
    """The whole tree of one libvirt connection."""

    def __init__(
        self,
        link: LibvirtLink,
        make_appliance: Callable[[SourceRef], SourceAppliance],
        nursery: trio.Nursery | None = None,
        cached_entries: int = DEFAULT_CACHED_ENTRIES,
        forget_kernel_entry: Callable[[int, bytes], None] | None = None,
        status_report: Callable[[], Awaitable[bytes]] | None = None,
    ) -> None:
        """``make_appliance`` makes the (not yet booted) appliance of a source; ``status_report``
        makes the content of the hidden control file (status.CONTROL_NAME); for the other arguments
        see ``GuestView``."""
        self._link = link
        self._make_appliance = make_appliance
        self._table = NodeTable()
        self.guests = GuestView(self._table, nursery, cached_entries, forget_kernel_entry)
        self.writes = GuestWrites(self.guests, self._table, self._open_handles_of)
        self._domains: dict[str, tuple[str, ServedSource]] = {}  # name -> (uuid, source)
        self._pools: dict[str, PoolEntry] = {}
        self._domain_names = _Listed(self._list_domain_names)
        self._pool_names = _Listed(self._list_pool_names)
        self._volume_names: dict[str, _Listed] = {}
        self._handles: dict[int, FileHandle] = {}
        self._next_handle = 1
        self._started_ns = time.time_ns()
        self.root = self._table.virtual_dir(children=self._root_children, child=self._root_child, inode=1)
        self.domains_dir = self._named_dirs(self._domain_names.names, self._domain_dir)
        self.volumes_dir = self._named_dirs(self._pool_names.names, self._pool_dir)
        self.control_file = None if status_report is None else self._table.virtual_file(status_report)

    # --- node table ------------------------------------------------------------

    def node(self, inode: int) -> Node:
        return self._table.node(inode)

    def count_lookup(self, node: Node) -> None:
        self._table.count_lookup(node)

    def forget(self, inode: int, count: int) -> None:
        self._table.forget(inode, count)

    async def source_statuses(self, idle_seconds: float) -> list[SourceStatus]:
        """What each domain of the connection (those never looked up are off) and each volume the
        mount has looked up is doing, by its path below the mount point."""
        cached = self.guests.cached_entries_of()
        try:
            names = set(await self._domain_names.names())
        except FsError:
            names = set()

        def status_of(path: str, source: ServedSource | None) -> SourceStatus:
            if source is None:
                return SourceStatus(path, "off")
            return source.appliance.status(path, idle_seconds, cached.get(source.identity, 0))

        statuses = [status_of(f"domains/{name}", self._domains[name][1] if name in self._domains else None)
                    for name in sorted(names | set(self._domains))]
        for pool_name, pool in sorted(self._pools.items()):
            statuses.extend(status_of(f"volumes/{pool_name}/{volume}", source)
                            for volume, source in sorted(pool.volumes.items()))
        return statuses

    def served_sources(self) -> Iterable[ServedSource]:
        """Every source known to the mount (for idle shutdown and unmount)."""
        sources = [source for _, source in self._domains.values()]
        for pool in self._pools.values():
            sources.extend(pool.volumes.values())
        return sources

    # --- root --------------------------------------------------------------------

    async def _root_children(self) -> list[tuple[bytes, Node]]:
        return [(b"domains", self.domains_dir), (b"volumes", self.volumes_dir)]

    async def _root_child(self, name: bytes) -> Node:
        for child_name, child in await self._root_children():
            if child_name == name:
                return child
        if name == CONTROL_NAME.encode() and self.control_file is not None:  # looked up, never listed
            return self.control_file
        raise FsError(errno.ENOENT)

    async def _libvirt(self, what: str, call: Callable[[], T], gone: tuple[int, ...] = ()) -> T:
        """A libvirt call in a thread; ENOENT for the error codes in ``gone``, EIO (logged) for others."""
        try:
            return await run_blocking(call)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() in gone:
                raise FsError(errno.ENOENT) from None
            log.error("cannot %s: %s", what, libvirt_message(exc))
            raise FsError(errno_of(exc)) from None
        except LibvirtDown as exc:
            log.debug("cannot %s: %s", what, exc)
            raise FsError(errno_of(exc)) from None

    # --- domains/ -------------------------------------------------------------------

    async def _list_domain_names(self) -> list[str]:
        """Names of the connection's domains, ours excluded."""
        names = await self._libvirt("list domains", lambda: [d.name() for d in self._link.conn.listAllDomains(0)])
        return sorted(n for n in names if not n.startswith(APPLIANCE_NAME_PREFIX))

    async def _domain_dir(self, name: str) -> Node:
        return (await self._domain_source(name)).directory

    async def _domain_source(self, name: str) -> ServedSource:
        """The source of a domain that exists now, by its UUID; ENOENT otherwise."""
        if name.startswith(APPLIANCE_NAME_PREFIX):
            raise FsError(errno.ENOENT)
        try:
            ref = await domain_named(self._link.conn, name)
        except LibvirtDown as exc:
            raise FsError(errno_of(exc)) from None
        except SourceUnavailable as exc:
            if exc.errno != errno.ENOENT:
                log.error("%s", exc)
            raise FsError(exc.errno) from None
        known = self._domains.get(name)
        if known is not None and known[0] == ref.uuid:
            return known[1]
        if known is not None:  # same name, new domain: start afresh
            await known[1].appliance.release()
        source = self._serve(ref, b"domain.xml", lambda: self._domain_xml(ref))
        self._domains[name] = (ref.uuid, source)
        return source

    async def _domain_xml(self, ref: DomainRef) -> bytes:
        def xml() -> str:
            return str(self._link.conn.lookupByUUIDString(ref.uuid).XMLDesc(0))
        return (await self._libvirt(f"read the XML of domain {ref.name}", xml, (libvirt.VIR_ERR_NO_DOMAIN,))).encode()

    def _named_dirs(self, names: Callable[[], Awaitable[list[str]]],
                    directory: Callable[[str], Awaitable[Node]]) -> VirtualDir:
        """A directory of the ``names`` libvirt lists, each a ``directory(name)``; a name gone by the
        time it is looked up is left out of the listing."""
        async def children() -> list[tuple[bytes, Node]]:
            entries: list[tuple[bytes, Node]] = []
            for name in await names():
                encoded = name.encode("utf-8", "surrogateescape")
                if not is_entry_name(encoded):
                    log.warning("libvirt named something %r, which cannot be a file name; not shown", name)
                    continue
                try:
                    entries.append((encoded, await directory(name)))
                except FsError:
                    continue
            return entries

        async def child(name: bytes) -> Node:
            return await directory(name.decode("utf-8", "surrogateescape"))

        return self._table.virtual_dir(children=children, child=child)

    def _serve(self, ref: SourceRef, description: bytes, content: Callable[[], Awaitable[bytes]]) -> ServedSource:
        return self.guests.serve(ref.name, ref.identity, self._make_appliance(ref),
                                 (description, self._table.virtual_file(content)))

    # --- volumes/ -------------------------------------------------------------------

    async def _list_pool_names(self) -> list[str]:
        names = await self._libvirt(
            "list storage pools",
            lambda: [p.name()
                     for p in self._link.conn.listAllStoragePools(libvirt.VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE)])
        for gone in set(self._pools) - set(names):
            await self._drop_pool(gone)
        return sorted(names)

    async def _pool_dir(self, name: str) -> Node:
        return (await self._pool_entry(name)).directory

    async def _pool_entry(self, name: str) -> PoolEntry:
        """An active pool's entry; ENOENT (and its volumes' appliances released) if it is not active."""
        def lookup() -> tuple[bool, str]:
            pool = self._link.conn.storagePoolLookupByName(name)
            return bool(pool.isActive()), pool.UUIDString()
        try:
            active, uuid = await self._libvirt(f"look up pool {name}", lookup, (libvirt.VIR_ERR_NO_STORAGE_POOL,))
        except FsError as exc:
            if exc.errno == errno.ENOENT:
                await self._drop_pool(name)
            raise
        known = self._pools.get(name)
        if not active or (known is not None and known.uuid != uuid):
            await self._drop_pool(name)
            if not active:
                raise FsError(errno.ENOENT)
            known = None
        if known is None:
            known = self._new_pool_entry(name, uuid)
            self._pools[name] = known
        return known

    async def _drop_pool(self, name: str) -> None:
        """A pool stopped or deleted: its volumes' appliances go (accesses below it then find it gone)."""
        pool = self._pools.pop(name, None)
        self._volume_names.pop(name, None)
        if pool is not None:
            log.info("pool %s is gone", name)
            for source in pool.volumes.values():
                await source.appliance.release()

    def _new_pool_entry(self, name: str, uuid: str) -> PoolEntry:
        async def list_volume_names() -> list[str]:
            def volume_names() -> list[str]:
                return [v.name() for v in self._link.conn.storagePoolLookupByName(name).listAllVolumes(0)]
            names = await self._libvirt(f"list the volumes of pool {name}", volume_names,
                                        (libvirt.VIR_ERR_NO_STORAGE_POOL, libvirt.VIR_ERR_OPERATION_INVALID))
            for gone in set(entry.volumes) - set(names):
                await entry.volumes.pop(gone).appliance.release()
            return sorted(names)

        async def volume_names() -> list[str]:
            await self._pool_entry(name)  # ENOENT once stopped
            return await listed.names()

        async def volume_dir(volume: str) -> Node:
            await self._pool_entry(name)
            return (await self._volume_source(entry, volume)).directory

        listed = self._volume_names[name] = _Listed(list_volume_names)
        entry = PoolEntry(name, uuid, self._named_dirs(volume_names, volume_dir))
        return entry

    async def _volume_source(self, pool: PoolEntry, volume: str) -> ServedSource:
        """The source of a volume that exists now, by its key; ENOENT otherwise."""
        def key() -> str:
            return str(self._link.conn.storagePoolLookupByName(pool.name).storageVolLookupByName(volume).key())
        vol_key = await self._libvirt(f"look up volume {pool.name}/{volume}", key,
                                      (libvirt.VIR_ERR_NO_STORAGE_VOL, libvirt.VIR_ERR_NO_STORAGE_POOL))
        ref = VolumeRef(pool.name, volume, vol_key)
        known = pool.volumes.get(volume)
        if known is not None and known.identity == ref.identity:
            return known
        if known is not None:  # same name, new volume
            await known.appliance.release()
        source = self._serve(ref, b"volume.xml", lambda: self._volume_xml(ref))
        pool.volumes[volume] = source
        return source

    async def _volume_xml(self, ref: VolumeRef) -> bytes:
        def xml() -> str:
            return str(self._link.conn.storageVolLookupByKey(ref.key).XMLDesc(0))
        return (await self._libvirt(f"read the XML of volume {ref.name}", xml,
                                    (libvirt.VIR_ERR_NO_STORAGE_VOL,))).encode()

    # --- operations -------------------------------------------------------------

    async def lookup(self, parent_inode: int, name: bytes) -> Node:
        """Find ``name`` in a directory; counts one kernel reference on success."""
        parent = self.node(parent_inode)
        if name == b".":
            child = parent
        elif isinstance(parent, VirtualDir):
            assert parent.child is not None
            child = await parent.child(name)
        elif isinstance(parent, GuestNode):
            child = await self.guests.lookup(parent, name)
        else:
            raise FsError(errno.ENOTDIR)
        self.count_lookup(child)
        return child

    async def getattr(self, inode: int) -> Attributes:
        node = self.node(inode)
        if isinstance(node, GuestNode):
            await self.guests.attributes_if_running(node)
        return await self.attributes(node)

    async def attributes(self, node: Node) -> Attributes:
        """A node's attributes as known now; a view root not booted yet shows as an empty directory."""
        if isinstance(node, GuestNode):
            if node.stale:
                await self.writes.refresh(node)
            if node.stat is None:
                return self._virtual_attributes(node.inode, stat.S_IFDIR | 0o555)
            return guest_attributes(node.inode, node.stat)
        if isinstance(node, VirtualFile):
            assert node.content is not None
            size = len(await node.content())
            return self._virtual_attributes(node.inode, stat.S_IFREG | 0o444, size)
        if isinstance(node, VirtualLink):
            return self._virtual_attributes(node.inode, stat.S_IFLNK | 0o777, len(node.target))
        return self._virtual_attributes(node.inode, stat.S_IFDIR | 0o555)

    def _virtual_attributes(self, inode: int, mode: int, size: int = 0) -> Attributes:
        return Attributes(
            inode=inode, mode=mode, nlink=2 if stat.S_ISDIR(mode) else 1, uid=os.getuid(), gid=os.getgid(),
            size=size, blocks=(size + 511) // 512,
            atime_ns=self._started_ns, mtime_ns=self._started_ns, ctime_ns=self._started_ns,
        )

    async def list_directory(self, inode: int) -> list[tuple[bytes, Node]]:
        """A directory's entries (without . and ..), in a stable order."""
        node = self.node(inode)
        if isinstance(node, VirtualDir):
            assert node.children is not None
            return await node.children()
        if isinstance(node, GuestNode):
            return await self.guests.list_directory(node)
        raise FsError(errno.ENOTDIR)

    async def readlink(self, inode: int) -> bytes:
        node = self.node(inode)
        if isinstance(node, VirtualLink):
            return node.target
        if not isinstance(node, GuestNode):
            raise FsError(errno.EINVAL)
        return await self.guests.readlink(node)

    async def open(self, inode: int, flags: int) -> int:
        node = self.node(inode)
        writing = flags & os.O_ACCMODE != os.O_RDONLY or bool(flags & os.O_TRUNC)
        if isinstance(node, VirtualFile) and not writing:
            assert node.content is not None
            handle = FileHandle(node, data=await node.content())
        elif isinstance(node, GuestNode):
            if writing:  # EROFS unless it is writable
                await self.writes.writable_layout(node)
            handle = await self.guests.open(node)
            if writing:
                try:
                    await self.writes.open_for_writing(node, handle, truncate=bool(flags & os.O_TRUNC))
                except BaseException:
                    self.guests.release(node)
                    raise
        elif isinstance(node, VirtualFile):
            raise FsError(errno.EROFS)
        else:
            raise FsError(errno.EISDIR)
        return self._keep_handle(handle)

    def _keep_handle(self, handle: FileHandle) -> int:
        number = self._next_handle
        self._next_handle += 1
        self._handles[number] = handle
        return number

    def _open_handles_of(self, node: GuestNode) -> list[FileHandle]:
        return [handle for handle in self._handles.values() if handle.node is node]

    def _handle(self, number: int) -> FileHandle:
        handle = self._handles.get(number)
        if handle is None:
            raise FsError(errno.EBADF)
        return handle

    def handle_inode(self, handle_number: int) -> int:
        return self._handle(handle_number).node.inode

    def writable(self, inode: int) -> bool:
        """Whether ``inode`` is a file of a filesystem written read-write now (no boot, no daemon call)."""
        node = self._table.get(inode)
        if not isinstance(node, GuestNode) or node.source is None or node.stat is None:
            return False
        layout = node.source.appliance.running_layout
        filesystem = None if layout is None else layout.fs_by_dev.get(node.stat.st_dev)
        return layout is not None and filesystem is not None and layout.writable_filesystem(filesystem)

    def _guest_node(self, inode: int) -> GuestNode:
        """A guest node to write to; the virtual tree is never written (EROFS)."""
        node = self.node(inode)
        if not isinstance(node, GuestNode):
            raise FsError(errno.EROFS)
        return node

    # --- writes (-o rw: guestwrites.py; EROFS where the source is read-only) --------------------

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int, caller: Caller) -> tuple[int, Node]:
        """Make a regular file and open it; counts one kernel reference on success."""
        node = await self.writes.mknod(self._guest_node(parent_inode), name, stat.S_IFREG | stat.S_IMODE(mode), 0,
                                       caller)
        self.count_lookup(node)
        return await self.open(node.inode, flags & ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC)), node

    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, caller: Caller) -> Node:
        node = await self.writes.mknod(self._guest_node(parent_inode), name, mode, rdev, caller)
        self.count_lookup(node)
        return node

    async def mkdir(self, parent_inode: int, name: bytes, mode: int, caller: Caller) -> Node:
        node = await self.writes.mkdir(self._guest_node(parent_inode), name, mode, caller)
        self.count_lookup(node)
        return node

    async def symlink(self, parent_inode: int, name: bytes, target: bytes, caller: Caller) -> Node:
        node = await self.writes.symlink(self._guest_node(parent_inode), name, target, caller)
        self.count_lookup(node)
        return node

    async def link(self, inode: int, new_parent_inode: int, new_name: bytes) -> Node:
        node = await self.writes.link(self._guest_node(inode), self._guest_node(new_parent_inode), new_name)
        self.count_lookup(node)
        return node

    async def unlink(self, parent_inode: int, name: bytes) -> None:
        await self.writes.unlink(self._guest_node(parent_inode), name)

    async def rmdir(self, parent_inode: int, name: bytes) -> None:
        await self.writes.rmdir(self._guest_node(parent_inode), name)

    async def rename(self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes, flags: int) -> None:
        await self.writes.rename(self._guest_node(old_parent), old_name, self._guest_node(new_parent), new_name, flags)

    async def setattr(self, inode: int, changes: AttributeChanges) -> Attributes:
        node = self._guest_node(inode)
        await self.writes.setattr(node, changes)
        assert node.stat is not None
        return guest_attributes(node.inode, node.stat)  # an estimate, given no cache time (operations.py)

    async def write(self, handle_number: int, offset: int, data: bytes) -> int:
        handle = self._handle(handle_number)
        if handle.writable_in is None:
            raise FsError(errno.EBADF)
        return await self.writes.write(handle, offset, data)

    async def fsync(self, inode: int) -> None:
        """Everything written to ``inode``'s source is on its disks when this returns."""
        node = self.node(inode)
        if isinstance(node, GuestNode) and node.stat is not None:
            await self.writes.fsync(node)

    async def removexattr(self, inode: int, name: bytes) -> None:
        await self.writes.removexattr(self._guest_node(inode), name)

    async def read(self, handle_number: int, offset: int, size: int) -> bytes:
        handle = self._handle(handle_number)
        if handle.data is not None:
            return handle.data[offset:offset + size]
        assert handle.reader is not None
        return await handle.reader.read(offset, size)

    def release(self, handle_number: int) -> GuestNode | None:
        """Close a handle; returns its guest node, for ``closed``."""
        handle = self._handles.pop(handle_number, None)
        if handle is not None and isinstance(handle.node, GuestNode):
            self.guests.release(handle.node)
            return handle.node
        return None

    async def closed(self, node: GuestNode) -> None:
        """After ``release``: a file removed while open goes with its last handle."""
        await self.writes.closed(node)

    async def listxattr(self, inode: int) -> list[bytes]:
        node = self.node(inode)
        if not isinstance(node, GuestNode) or self.guests.is_resting_view_root(node):
            return []
        return list(await self.guests.xattrs(node))

    async def getxattr(self, inode: int, name: bytes) -> bytes:
        """A guest file's xattr; on a source's directory, ``user.virtmount.release`` (never listed)
        shuts its appliance down, which works on read-only (``ro``) mounts too, unlike setxattr."""
        node = self.node(inode)
        if name == RELEASE_XATTR and await self._release(node):
            return b"released"
        if not isinstance(node, GuestNode) or self.guests.is_resting_view_root(node):
            raise FsError(errno.ENODATA)
        if name == CAPABILITY_XATTR and node.without_capability:
            raise FsError(errno.ENODATA)  # asked before each write to a new file: answered without a call
        value = (await self.guests.xattrs(node)).get(name)
        if value is None:
            raise FsError(errno.ENODATA)
        return value

    async def setxattr(self, inode: int, name: bytes, value: bytes) -> None:
        """A guest file's xattr (-o rw), or the release control on a source's directory:
        `setfattr -n user.virtmount.release domains/NAME` (or volumes/POOL/VOLUME)."""
        if name == RELEASE_XATTR and await self._release(self.node(inode)):
            return
        await self.writes.setxattr(self._guest_node(inode), name, value)

    async def _release(self, directory: Node) -> bool:
        """Shut down the appliance of the source whose directory this is; False if it is none."""
        for source in self.served_sources():
            if source.directory is directory:
                await source.appliance.release()
                return True
        return False

    async def statfs(self, inode: int) -> tuple[int, int, int, int, int, int, int, int]:
        """(bsize, frsize, blocks, bfree, bavail, files, ffree, namemax); zeros for the virtual tree
        and for a view root whose appliance is off (a file browser's look boots nothing)."""
        node = self.node(inode)
        if isinstance(node, GuestNode) and not self.guests.is_resting_view_root(node):
            sv = await self.guests.statvfs(node)
            return (sv.bsize, sv.frsize, sv.blocks, sv.bfree, sv.bavail, sv.files, sv.ffree, sv.namemax)
        return (4096, 4096, 0, 0, 0, 0, 0, 255)

    def prefetch_summary(self) -> str:
        return self.guests.prefetch_summary()

