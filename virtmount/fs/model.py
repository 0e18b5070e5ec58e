"""The filesystem model: the tree of a libvirt connection, independent of FUSE.

```
/domains/<name>/domain.xml      the domain's XML (libvirt only)
/domains/<name>/fs/             the guest OS as it sees itself (absent when no OS was found)
/domains/<name>/devices/<fs>/   each guest filesystem on its own
```
Everything here raises ``FsError(errno)``; ``operations`` turns that into
FUSE replies. Guest nodes are addressed by their path inside the appliance;
their attributes come from the appliance in batches (a directory listing
fetches the attributes and link targets of all its entries at once) and are
kept while the kernel holds a reference (lookup count) to the node.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Hashable, Iterable, TypeVar

import libvirt
import trio

from ..concurrency import gather
from ..guestfs.errors import ConnectionLost, GuestfsClientError, GuestfsError, GuestfsTimeout
from ..guestfs.procs import PREAD_MAX, Statns, Xattr
from ..guests import OS_VIEW, GuestAppliance, GuestLayout, GuestUnavailableError
from ..virt.connection import libvirt_message, run_blocking
from ..virt.domainxml import APPLIANCE_NAME_PREFIX
from .inodes import InodeNumbers
from .listings import ListingCache
from .prefetch import Prefetcher
from .readahead import LARGEST_WINDOW, ReadAhead

log = logging.getLogger(__name__)

T = TypeVar("T")

RELEASE_XATTR = b"user.virtmount.release"
# XFS keeps POSIX ACLs under these names and lists them to root beside system.posix_acl_*;
# they are the same ACLs in XFS's on-disk form, so they are not shown a second time.
XFS_INTERNAL_ACL_XATTRS = frozenset({b"trusted.SGI_ACL_FILE", b"trusted.SGI_ACL_DEFAULT"})
DOMAIN_LIST_TTL_S = 1.0
OS_VIEW_NAME = "fs"

# Walk-ahead: how many directories may be listed before anyone asked (they go into the listing
# cache at once; this bounds the speculative daemon work), and how many calls at once.
LISTINGS_AHEAD = 512
LISTING_CALLS_AHEAD = 6
# Read-ahead across files: once two files of a directory were opened, the contents of its other
# small files are fetched too (one pread each), up to this many bytes held at a time.
SMALL_FILE_MAX = 256 * 1024
CONTENTS_AHEAD_BYTES = 16 * 1024 * 1024
CONTENT_CALLS_AHEAD = 8
# Listings fetched ahead bring their entries' xattrs too while a walker is reading xattrs.
XATTR_DEMAND_S = 10.0
# The largest pread a file read sends (read-ahead windows grow up to it): see readahead.LARGEST_WINDOW.
READ_CALL_MAX = min(LARGEST_WINDOW, PREAD_MAX)
# Entries of directory listings kept for the life of their appliance (see listings.py).
DEFAULT_CACHED_ENTRIES = 100_000


class FsError(Exception):
    """A filesystem operation fails with ``errno``."""

    def __init__(self, errno_value: int, message: str = "") -> None:
        super().__init__(errno_value, message or os.strerror(errno_value))
        self.errno = errno_value


@dataclass
class Attributes:
    """What stat(2) shows for a node; times in nanoseconds."""

    inode: int
    mode: int
    nlink: int = 1
    uid: int = 0
    gid: int = 0
    rdev: int = 0
    size: int = 0
    blksize: int = 4096
    blocks: int = 0
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0


@dataclass(eq=False, slots=True)
class Node:
    inode: int
    lookups: int = 0


@dataclass(eq=False, slots=True)
class VirtualDir(Node):
    """A directory virtmount makes up; ``children`` lists it, ``child`` looks one name up."""

    children: Callable[[], Awaitable[list[tuple[bytes, Node]]]] | None = None
    child: Callable[[bytes], Awaitable[Node]] | None = None


@dataclass(eq=False, slots=True)
class DomainXmlFile(Node):
    domain: DomainEntry | None = None


@dataclass(eq=False, slots=True)
class Siblings:
    """One guest directory listing: kept in the listing cache, its entries' xattrs fetched together."""

    directory: bytes
    members: list[tuple[bytes, GuestNode]] = field(default_factory=list)
    opened: set[int] = field(default_factory=set)  # inodes of the files opened so far
    contents_wanted: bool = False
    _by_name: dict[bytes, GuestNode] | None = None

    def __len__(self) -> int:
        return len(self.members)

    def find(self, name: bytes) -> GuestNode | None:
        if self._by_name is None:
            self._by_name = dict(self.members)
        return self._by_name.get(name)


@dataclass(eq=False, slots=True)
class GuestNode(Node):
    """A file or directory inside a guest, seen through one view of its appliance."""

    domain: DomainEntry | None = None
    view: str = ""
    path: bytes = b""  # inside the appliance, e.g. b"/fs/etc/passwd"
    stat: Statns | None = None  # None for a view root before its appliance booted
    generation: int = 0  # the appliance boot that produced ``stat``
    link_target: bytes | None = None
    xattrs: dict[bytes, bytes] | None = None
    siblings: Siblings | None = None  # the listing this node was last seen in


@dataclass(eq=False)
class DomainEntry:
    """One domain: its virtual nodes and its appliance."""

    name: str
    uuid: str
    appliance: GuestAppliance
    directory: VirtualDir
    xml_file: DomainXmlFile
    devices_dir: VirtualDir
    view_roots: dict[str, GuestNode] = field(default_factory=dict)


@dataclass
class FileHandle:
    node: Node
    data: bytes | None = None  # whole content, for virtual files
    reader: ReadAhead | None = None  # for guest files


def guest_attributes(inode: int, st: Statns) -> Attributes:
    return Attributes(
        inode=inode,
        mode=st.st_mode,
        nlink=st.st_nlink,
        uid=st.st_uid,
        gid=st.st_gid,
        rdev=st.st_rdev,
        size=st.st_size,
        blksize=st.st_blksize or 4096,
        blocks=st.st_blocks,
        atime_ns=st.st_atime_sec * 1_000_000_000 + st.st_atime_nsec,
        mtime_ns=st.st_mtime_sec * 1_000_000_000 + st.st_mtime_nsec,
        ctime_ns=st.st_ctime_sec * 1_000_000_000 + st.st_ctime_nsec,
    )


def _guest_errno(exc: GuestfsClientError) -> int:
    if isinstance(exc, GuestfsError) and exc.errno:
        return exc.errno
    return errno.EIO


class ConnectionTree:
    """The whole tree of one libvirt connection."""

    def __init__(
        self,
        conn: libvirt.virConnect,
        make_appliance: Callable[[str], GuestAppliance],
        nursery: trio.Nursery | None = None,
        cached_entries: int = DEFAULT_CACHED_ENTRIES,
        forget_kernel_entry: Callable[[int, bytes], None] | None = None,
    ) -> None:
        """``nursery`` runs the speculative fetches; without one, nothing is fetched ahead.
        ``cached_entries`` bounds the directory entries kept in the listing cache.
        ``forget_kernel_entry(parent inode, name)`` drops what the kernel caches of an entry and
        everything below it; it is called for a domain's views when its appliance goes away."""
        self._conn = conn
        self._forget_kernel_entry = forget_kernel_entry
        self._make_appliance = make_appliance
        self._numbers = InodeNumbers()
        self._nodes: dict[int, Node] = {}
        self._domains: dict[str, DomainEntry] = {}
        self._domain_names: list[str] = []
        self._domain_names_at = -DOMAIN_LIST_TTL_S
        self._handles: dict[int, FileHandle] = {}
        self._next_handle = 1
        self._started_ns = time.time_ns()
        self._xattrs_wanted_at = -XATTR_DEMAND_S
        self._nursery = nursery
        self._listings: ListingCache[Siblings] = ListingCache(cached_entries)
        self._listings_ahead: Prefetcher[Siblings] | None = None
        self._contents_ahead: Prefetcher[bytes] | None = None
        if nursery is not None:
            self._listings_ahead = Prefetcher(
                nursery, concurrency=LISTING_CALLS_AHEAD, budget=LISTINGS_AHEAD, name="listing ahead")
            self._contents_ahead = Prefetcher(
                nursery, concurrency=CONTENT_CALLS_AHEAD, budget=CONTENTS_AHEAD_BYTES, name="content ahead")
        self.root = self._virtual_dir(children=self._root_children, child=self._root_child, inode=1)
        self.domains_dir = self._virtual_dir(children=self._domain_dirs, child=self._domain_dir)

    # --- node table ------------------------------------------------------------

    def _virtual_dir(self, *, children: Callable[[], Awaitable[list[tuple[bytes, Node]]]],
                     child: Callable[[bytes], Awaitable[Node]], inode: int | None = None) -> VirtualDir:
        node = VirtualDir(inode or self._numbers.new_virtual(), children=children, child=child)
        node.lookups = 1  # virtual nodes live as long as the mount
        self._nodes[node.inode] = node
        return node

    def node(self, inode: int) -> Node:
        try:
            return self._nodes[inode]
        except KeyError:
            raise FsError(errno.ESTALE) from None

    def count_lookup(self, node: Node) -> None:
        """The kernel now holds one more reference to ``node``.

        A listing (cached or fetched ahead) may carry a node the kernel forgot, or a
        newer object for an inode the kernel holds: the newer one takes over, with
        the references counted so far.
        """
        registered = self._nodes.get(node.inode)
        if registered is not node:  # a cached node the kernel forgot, or a newer object
            node.lookups = registered.lookups if registered is not None else 0
        node.lookups += 1
        self._nodes[node.inode] = node

    def forget(self, inode: int, count: int) -> None:
        node = self._nodes.get(inode)
        if node is None or not isinstance(node, GuestNode):
            return
        node.lookups -= count
        if node.lookups <= 0 and node not in (node.domain.view_roots.values() if node.domain else ()):
            del self._nodes[inode]

    # --- the virtual part ----------------------------------------------------

    async def _root_children(self) -> list[tuple[bytes, Node]]:
        return [(b"domains", self.domains_dir)]

    async def _root_child(self, name: bytes) -> Node:
        if name == b"domains":
            return self.domains_dir
        raise FsError(errno.ENOENT)

    async def _list_domain_names(self) -> list[str]:
        """Names of the connection's domains (ours excluded), cached for a second."""
        if time.monotonic() - self._domain_names_at > DOMAIN_LIST_TTL_S:
            try:
                domains = await run_blocking(self._conn.listAllDomains, 0)
                names = await run_blocking(lambda: sorted(d.name() for d in domains))
            except libvirt.libvirtError as exc:
                log.error("cannot list domains: %s", libvirt_message(exc))
                raise FsError(errno.EIO) from None
            self._domain_names = [n for n in names if not n.startswith(APPLIANCE_NAME_PREFIX)]
            self._domain_names_at = time.monotonic()
        return self._domain_names

    async def _domain_dirs(self) -> list[tuple[bytes, Node]]:
        entries: list[tuple[bytes, Node]] = []
        for name in await self._list_domain_names():
            try:
                entry = await self._domain_entry(name)
            except FsError:
                continue  # vanished between listing and lookup
            entries.append((name.encode(), entry.directory))
        return entries

    async def _domain_dir(self, name: bytes) -> Node:
        return (await self._domain_entry(name.decode("utf-8", "surrogateescape"))).directory

    async def _domain_entry(self, name: str) -> DomainEntry:
        """The entry of a domain that exists now; ENOENT otherwise."""
        if name.startswith(APPLIANCE_NAME_PREFIX):
            raise FsError(errno.ENOENT)
        try:
            domain = await run_blocking(self._conn.lookupByName, name)
            uuid = await run_blocking(domain.UUIDString)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                raise FsError(errno.ENOENT) from None
            log.error("cannot look up domain %s: %s", name, libvirt_message(exc))
            raise FsError(errno.EIO) from None
        entry = self._domains.get(name)
        if entry is not None and entry.uuid == uuid:
            return entry
        if entry is not None:  # same name, new domain: start afresh
            await entry.appliance.release()
        entry = self._new_domain_entry(name, uuid)
        self._domains[name] = entry
        return entry

    def _new_domain_entry(self, name: str, uuid: str) -> DomainEntry:
        entry_box: list[DomainEntry] = []

        async def domain_children() -> list[tuple[bytes, Node]]:
            entry = entry_box[0]
            children: list[tuple[bytes, Node]] = [(b"domain.xml", entry.xml_file)]
            if entry.appliance.known_has_os is not False:
                children.append((b"fs", self._view_root_node(entry, OS_VIEW_NAME)))
            children.append((b"devices", entry.devices_dir))
            return children

        async def domain_child(child: bytes) -> Node:
            entry = entry_box[0]
            if child == b"domain.xml":
                return entry.xml_file
            if child == b"devices":
                return entry.devices_dir
            if child == b"fs":
                return await self._view_root(entry, OS_VIEW_NAME)
            raise FsError(errno.ENOENT)

        async def device_children() -> list[tuple[bytes, Node]]:
            layout = await self._layout(entry_box[0], with_devices=True)
            return [(view.encode(), await self._view_root(entry_box[0], view)) for view in sorted(layout.devices)]

        async def device_child(child: bytes) -> Node:
            layout = await self._layout(entry_box[0], with_devices=True)
            view = child.decode("utf-8", "surrogateescape")
            if view not in layout.devices:
                raise FsError(errno.ENOENT)
            return await self._view_root(entry_box[0], view)

        xml_file = DomainXmlFile(self._numbers.new_virtual(), lookups=1)
        self._nodes[xml_file.inode] = xml_file
        entry = DomainEntry(
            name=name,
            uuid=uuid,
            appliance=self._make_appliance(name),
            directory=self._virtual_dir(children=domain_children, child=domain_child),
            xml_file=xml_file,
            devices_dir=self._virtual_dir(children=device_children, child=device_child),
        )
        xml_file.domain = entry
        entry_box.append(entry)
        entry.appliance.on_discard = lambda: self._forget_views_in_kernel(entry)
        return entry

    def _forget_views_in_kernel(self, entry: DomainEntry) -> None:
        """The next appliance may see other disk contents: the kernel must ask again, not within
        its cache timeout answer from what the last appliance showed."""
        if self._forget_kernel_entry is not None:
            for view in (b"fs", b"devices"):
                self._forget_kernel_entry(entry.directory.inode, view)

    async def _domain_xml(self, entry: DomainEntry) -> bytes:
        try:
            domain = await run_blocking(self._conn.lookupByUUIDString, entry.uuid)
            return (await run_blocking(domain.XMLDesc, 0)).encode()
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                raise FsError(errno.ENOENT) from None
            raise FsError(errno.EIO) from None

    # --- the guest part ----------------------------------------------------------

    async def _layout(self, entry: DomainEntry, *, with_devices: bool = False) -> GuestLayout:
        try:
            return await entry.appliance.layout(with_devices=with_devices)
        except GuestUnavailableError as exc:
            raise FsError(exc.errno, str(exc)) from None

    def _view_path(self, layout: GuestLayout, view: str) -> bytes:
        return OS_VIEW if view == OS_VIEW_NAME else layout.device_path(view)

    def _view_root_node(self, entry: DomainEntry, view: str) -> GuestNode:
        """The root directory of a view (fs/ or one device), without booting anything.

        View roots get virtual inode numbers (the kernel may see them before
        any appliance runs); their attributes are the guest directory's once booted.
        """
        root = entry.view_roots.get(view)
        if root is None:
            root = GuestNode(self._numbers.new_virtual(), lookups=1, domain=entry, view=view)
            entry.view_roots[view] = root
            self._nodes[root.inode] = root
        return root

    async def _view_root(self, entry: DomainEntry, view: str) -> GuestNode:
        """The root directory node of a view with its attributes, booting the appliance if needed."""
        root = self._view_root_node(entry, view)
        layout = await self._layout(entry, with_devices=view != OS_VIEW_NAME)
        if root.stat is not None and root.generation == layout.generation:
            return root
        if view == OS_VIEW_NAME and not layout.has_os:
            raise FsError(errno.ENOENT)
        if view != OS_VIEW_NAME and view not in layout.devices:
            raise FsError(errno.ENOENT)
        path = self._view_path(layout, view)
        root.stat = await self._guest_call(entry, lambda: layout.client.lstatns(path))
        root.path = path
        root.generation = layout.generation
        return root

    def _guest_node(self, entry: DomainEntry, view: str, layout: GuestLayout, path: bytes, st: Statns) -> GuestNode:
        """The node for a guest file, reusing the existing one (hard links share it)."""
        filesystem = layout.fs_by_dev.get(st.st_dev, f"dev{st.st_dev}")
        prefix = self._numbers.filesystem_prefix(entry.uuid, view, filesystem)
        inode = self._numbers.guest_inode(prefix, st.st_ino)
        node = self._nodes.get(inode)
        if isinstance(node, GuestNode):
            node.path = path if stat.S_ISDIR(st.st_mode) or node.path == b"" else node.path
            if node.generation != layout.generation:  # a new boot: the guest may have run since
                node.xattrs = node.link_target = node.siblings = None
        else:
            node = GuestNode(inode, domain=entry, view=view, path=path)
        node.stat = st
        node.generation = layout.generation
        return node

    async def _guest_call(self, entry: DomainEntry, call: Callable[[], Awaitable[T]]) -> T:
        entry.appliance.touch()
        try:
            return await call()
        except GuestfsError as exc:
            raise FsError(_guest_errno(exc), str(exc)) from None
        except (ConnectionLost, GuestfsTimeout) as exc:
            log.error("%s: appliance stopped answering: %s", entry.name, exc)
            raise FsError(errno.EIO) from None

    async def _guest_layout_for(self, node: GuestNode) -> GuestLayout:
        assert node.domain is not None
        return await self._layout(node.domain)

    async def _list_guest_dir(self, node: GuestNode) -> list[tuple[bytes, Node]]:
        """All entries of a guest directory with attributes and link targets (cached, fetched
        ahead or fetched now); its subdirectories are then listed ahead of the walker."""
        assert node.domain is not None
        layout = await self._guest_layout_for(node)
        siblings = await self._listing(node.domain, node.view, layout, node.path, node.inode)
        self._list_ahead(node.domain, node.view, layout, siblings)
        return list(siblings.members)

    async def _listing(self, entry: DomainEntry, view: str, layout: GuestLayout,
                       path: bytes, inode: int) -> Siblings:
        """The listing of one directory of this boot: fetched ahead (maybe still on its way), cached,
        or fetched now; kept in the listing cache as the most recently used."""
        key = (inode, layout.generation)
        siblings = None
        if self._listings_ahead is not None:  # claimed even when cached, to free its place ahead
            siblings = await self._listings_ahead.claim(key)
        if siblings is None:
            siblings = self._listings.get(key)
        if siblings is None:
            siblings = await self._fetch_listing(entry, view, layout, path)
        self._listings.put(key, siblings)
        return siblings

    def _list_ahead(self, entry: DomainEntry, view: str, layout: GuestLayout, siblings: Siblings) -> None:
        """Wish for the listings of the subdirectories in ``siblings`` not cached yet, first ones
        first; for cached ones, their xattrs while a walker reads xattrs."""
        if self._listings_ahead is None:
            return
        xattrs_wanted = self._xattrs_in_demand()
        wishes: list[tuple[Hashable, Callable[[], Awaitable[Siblings]], int]] = []
        for _, child in siblings.members:
            if child.stat is None or not stat.S_ISDIR(child.stat.st_mode):
                continue
            key = (child.inode, layout.generation)
            cached = self._listings.get(key)
            if cached is None:
                fetch = functools.partial(self._listing_ahead, entry, view, layout, child.path, child.inode)
                wishes.append((key, fetch, 1))
            elif xattrs_wanted and any(member.xattrs is None for _, member in cached.members):
                wishes.append((_xattrs_key(cached),
                               functools.partial(self._xattrs_ahead, entry, layout, cached), 1))
        self._listings_ahead.want(wishes)

    def _xattrs_in_demand(self) -> bool:
        return time.monotonic() - self._xattrs_wanted_at < XATTR_DEMAND_S

    async def _xattrs_ahead(self, entry: DomainEntry, layout: GuestLayout, siblings: Siblings) -> Siblings:
        """The xattrs of a cached listing's entries, fetched before anyone asked."""
        _still_running(layout)
        await self._fetch_sibling_xattrs(entry, layout, siblings)
        return siblings

    async def _listing_ahead(self, entry: DomainEntry, view: str, layout: GuestLayout,
                             path: bytes, inode: int) -> Siblings:
        """A listing fetched before anyone asked (with xattrs while they are in demand);
        its own subdirectories are wished for in turn, so the walk runs ahead depth first."""
        _still_running(layout)
        siblings = await self._fetch_listing(entry, view, layout, path)
        self._listings.put((inode, layout.generation), siblings)
        if self._xattrs_in_demand():
            await self._fetch_sibling_xattrs(entry, layout, siblings)
        self._list_ahead(entry, view, layout, siblings)
        return siblings

    async def _fetch_listing(self, entry: DomainEntry, view: str, layout: GuestLayout, path: bytes) -> Siblings:
        """Entries of the guest directory ``path`` with attributes and link targets: three daemon
        calls (readdir, then lstatnslist and readlinklist sent together) per thousand entries."""
        client = layout.client
        dirents = await self._guest_call(entry, lambda: client.readdir(path))
        names = [d.name for d in dirents if d.name not in (b".", b"..")]
        links = [d.name for d in dirents if d.ftyp == "l"]
        stats, targets = await gather(
            lambda: self._guest_call(entry, lambda: client.lstatnslist(path, names)),
            lambda: self._guest_call(entry, lambda: client.readlinklist(path, links)) if links else _no_targets(),
        )
        target_of = dict(zip(links, targets))
        siblings = Siblings(path)
        by_inode: dict[int, GuestNode] = {}  # hard links within the directory share one node
        # by name: most walkers (ls, rsync, file browsers) go in that order, and readdir-order
        # walkers (find, tar) then do too, so the directories listed ahead are the next ones wanted
        for name, st in sorted(zip(names, stats), key=lambda named: named[0]):
            if st is None:
                log.warning("%s: cannot stat %r in %r", entry.name, name, path)
                continue
            child = self._guest_node(entry, view, layout, _join(path, name), st)
            child = by_inode.setdefault(child.inode, child)
            if stat.S_ISLNK(st.st_mode) and target_of.get(name):
                child.link_target = target_of[name]
            child.siblings = siblings
            siblings.members.append((name, child))
        return siblings

    async def _lookup_guest(self, parent: GuestNode, name: bytes) -> GuestNode:
        """The child ``name``: from the parent's cached listing if there is one, else one lstat."""
        assert parent.domain is not None
        layout = await self._guest_layout_for(parent)
        siblings = self._listings.get((parent.inode, layout.generation))
        if siblings is not None:
            child = siblings.find(name)
            if child is None:
                raise FsError(errno.ENOENT)
            registered = self._nodes.get(child.inode)  # a hard link the kernel holds already
            if isinstance(registered, GuestNode) and registered.generation == child.generation:
                return registered
            return child
        path = _join(parent.path, name)
        st = await self._guest_call(parent.domain, lambda: layout.client.lstatns(path))
        return self._guest_node(parent.domain, parent.view, layout, path, st)

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
            await self._boot_view_root_if_needed(parent)
            assert parent.stat is not None
            if not stat.S_ISDIR(parent.stat.st_mode):
                raise FsError(errno.ENOTDIR)
            if b"/" in name or name == b"..":
                raise FsError(errno.ENOENT)
            child = await self._lookup_guest(parent, name)
        else:
            raise FsError(errno.ENOTDIR)
        self.count_lookup(child)
        return child

    async def _boot_view_root_if_needed(self, node: GuestNode) -> None:
        if node.stat is None:
            assert node.domain is not None
            await self._view_root(node.domain, node.view)

    async def getattr(self, inode: int) -> Attributes:
        node = self.node(inode)
        if isinstance(node, GuestNode):
            await self._boot_view_root_if_needed(node)
        return await self.attributes(node)

    async def attributes(self, node: Node) -> Attributes:
        """A node's attributes as known now; a view root not booted yet shows as an empty directory."""
        if isinstance(node, GuestNode):
            if node.stat is None:
                return self._virtual_attributes(node.inode, stat.S_IFDIR | 0o555)
            return guest_attributes(node.inode, node.stat)
        if isinstance(node, DomainXmlFile):
            assert node.domain is not None
            size = len(await self._domain_xml(node.domain))
            return self._virtual_attributes(node.inode, stat.S_IFREG | 0o444, size)
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
            await self._boot_view_root_if_needed(node)
            assert node.stat is not None
            if stat.S_ISDIR(node.stat.st_mode):
                return await self._list_guest_dir(node)
        raise FsError(errno.ENOTDIR)

    async def readlink(self, inode: int) -> bytes:
        node = self.node(inode)
        if not isinstance(node, GuestNode) or node.stat is None or not stat.S_ISLNK(node.stat.st_mode):
            raise FsError(errno.EINVAL)
        if node.link_target is None:
            layout = await self._guest_layout_for(node)
            assert node.domain is not None
            node.link_target = await self._guest_call(node.domain, lambda: layout.client.readlink(node.path))
        assert node.link_target is not None
        return node.link_target

    async def open(self, inode: int, flags: int) -> int:
        node = self.node(inode)
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & (os.O_TRUNC | os.O_CREAT):
            raise FsError(errno.EROFS)
        handle = FileHandle(node)
        if isinstance(node, DomainXmlFile):
            assert node.domain is not None
            handle.data = await self._domain_xml(node.domain)
        elif isinstance(node, GuestNode):
            assert node.stat is not None and node.domain is not None
            if stat.S_ISDIR(node.stat.st_mode):
                raise FsError(errno.EISDIR)
            if stat.S_ISREG(node.stat.st_mode) and node.stat.st_size == 0:
                handle.data = b""  # nothing to read in an empty file of a guest filesystem
            elif self._contents_ahead is not None:
                handle.data = await self._contents_ahead.claim((node.inode, node.generation))
            if handle.data is None:
                handle.reader = self._guest_reader(node)
            node.domain.appliance.handle_opened()
            self._read_siblings_ahead(node)
        else:
            raise FsError(errno.EISDIR)
        number = self._next_handle
        self._next_handle += 1
        self._handles[number] = handle
        return number

    async def read(self, handle_number: int, offset: int, size: int) -> bytes:
        handle = self._handles.get(handle_number)
        if handle is None:
            raise FsError(errno.EBADF)
        if handle.data is not None:
            return handle.data[offset:offset + size]
        assert handle.reader is not None
        return await handle.reader.read(offset, size)

    def _guest_reader(self, node: GuestNode) -> ReadAhead:
        assert node.domain is not None
        entry = node.domain

        async def fetch(offset: int, size: int) -> bytes:
            layout = await self._layout(entry)
            return await self._guest_call(entry, lambda: layout.client.pread(node.path, size, offset))

        return ReadAhead(fetch, READ_CALL_MAX, self._nursery)

    def _read_siblings_ahead(self, node: GuestNode) -> None:
        """On the second file opened in a listing, wish for the contents of its other small files."""
        siblings = node.siblings
        if self._contents_ahead is None or siblings is None or siblings.contents_wanted:
            return
        siblings.opened.add(node.inode)
        if len(siblings.opened) < 2:
            return
        siblings.contents_wanted = True
        assert node.domain is not None
        entry = node.domain
        wishes = []
        for _, member in siblings.members:  # by name already
            st = member.stat
            if (member.inode not in siblings.opened and st is not None and stat.S_ISREG(st.st_mode)
                    and 0 < st.st_size <= SMALL_FILE_MAX):
                fetch = functools.partial(self._content_ahead, entry, member.path, st.st_size, member.generation)
                wishes.append(((member.inode, member.generation), fetch, st.st_size))
        self._contents_ahead.want(wishes)

    async def _content_ahead(self, entry: DomainEntry, path: bytes, size: int, generation: int) -> bytes:
        """The whole content of a small file, if the appliance that listed it still runs."""
        layout = entry.appliance.running_layout
        if layout is None or layout.generation != generation:
            raise FsError(errno.EIO, "appliance gone")
        data = await self._guest_call(entry, lambda: layout.client.pread(path, size + 1, 0))
        if len(data) != size:
            raise FsError(errno.EIO, f"{path!r} has {len(data)} bytes, not {size}")
        return data

    def release(self, handle_number: int) -> None:
        handle = self._handles.pop(handle_number, None)
        if handle is not None and isinstance(handle.node, GuestNode) and handle.node.domain is not None:
            handle.node.domain.appliance.handle_closed()

    async def _xattrs(self, node: GuestNode) -> dict[bytes, bytes]:
        """A node's xattrs; the first asked for in a directory brings those of all its entries."""
        self._xattrs_wanted_at = time.monotonic()
        if node.xattrs is None:
            assert node.domain is not None
            layout = await self._guest_layout_for(node)
            siblings = node.siblings
            if siblings is None:
                found = await self._guest_call(node.domain, lambda: layout.client.lgetxattrs(node.path))
                node.xattrs = _shown_xattrs(found)
            else:
                if self._listings_ahead is not None:  # fetched ahead, or on its way
                    await self._listings_ahead.claim(_xattrs_key(siblings))
                if node.xattrs is None:
                    await self._fetch_sibling_xattrs(node.domain, layout, siblings)
                    self._list_ahead(node.domain, node.view, layout, siblings)  # xattrs are in demand now
                if node.xattrs is None:  # not in that listing any more (e.g. a hard link seen elsewhere)
                    node.siblings = None
                    return await self._xattrs(node)
        return node.xattrs

    async def _fetch_sibling_xattrs(self, entry: DomainEntry, layout: GuestLayout, siblings: Siblings) -> None:
        """The xattrs of every entry of a listing that has none yet, in one lxattrlist per thousand."""
        wanted = [(name, member) for name, member in siblings.members if member.xattrs is None]
        if not wanted:
            return
        names = [name for name, _ in wanted]
        lists = await self._guest_call(entry, lambda: layout.client.lxattrlist(siblings.directory, names))
        for (_, member), xattrs in zip(wanted, lists):
            if xattrs is not None:  # None: listing failed; the node asks again on its own
                member.xattrs = _shown_xattrs(xattrs)

    async def listxattr(self, inode: int) -> list[bytes]:
        node = self.node(inode)
        if not isinstance(node, GuestNode):
            return []
        return list(await self._xattrs(node))

    async def getxattr(self, inode: int, name: bytes) -> bytes:
        node = self.node(inode)
        if not isinstance(node, GuestNode):
            raise FsError(errno.ENODATA)
        value = (await self._xattrs(node)).get(name)
        if value is None:
            raise FsError(errno.ENODATA)
        return value

    async def setxattr(self, inode: int, name: bytes) -> None:
        """Only the release control is writable: `setfattr -n user.virtmount.release domains/NAME`."""
        node = self.node(inode)
        if name == RELEASE_XATTR:
            for entry in self._domains.values():
                if entry.directory is node:
                    await entry.appliance.release()
                    return
        raise FsError(errno.EROFS)

    async def statfs(self, inode: int) -> tuple[int, int, int, int, int, int, int, int]:
        """(bsize, frsize, blocks, bfree, bavail, files, ffree, namemax)."""
        node = self.node(inode)
        if isinstance(node, GuestNode):
            layout = await self._guest_layout_for(node)
            assert node.domain is not None
            sv = await self._guest_call(node.domain, lambda: layout.client.statvfs(node.path))
            return (sv.bsize, sv.frsize, sv.blocks, sv.bfree, sv.bavail, sv.files, sv.ffree, sv.namemax)
        return (4096, 4096, 0, 0, 0, 0, 0, 255)

    def prefetch_summary(self) -> str:
        """How much of the speculative work was used, for the log."""
        parts = []
        for name, prefetcher in (("listings", self._listings_ahead), ("file contents", self._contents_ahead)):
            if prefetcher is not None:
                parts.append(f"{name} fetched ahead: {prefetcher.fetched}, used: {prefetcher.hits}")
        return "; ".join(parts) or "nothing fetched ahead"

    def domain_entries(self) -> Iterable[DomainEntry]:
        return list(self._domains.values())


def _shown_xattrs(xattrs: Iterable[Xattr]) -> dict[bytes, bytes]:
    return {x.name: x.value for x in xattrs if x.name not in XFS_INTERNAL_ACL_XATTRS}


def _still_running(layout: GuestLayout) -> None:
    """Work fetched ahead is for the appliance that listed it; once that one is gone, it is dropped."""
    if layout.client.closed:
        raise FsError(errno.EIO, "appliance gone")


def _xattrs_key(siblings: Siblings) -> tuple[str, int]:
    """The prefetch key of fetching the xattrs of a listing's entries."""
    return ("xattrs", id(siblings))


async def _no_targets() -> list[bytes]:
    return []


def _join(directory: bytes, name: bytes) -> bytes:
    return directory.rstrip(b"/") + b"/" + name
