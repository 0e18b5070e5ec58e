"""The guest view: what every source's fs/ and devices/ show, served from its appliance.

One piece of code for all kinds of source (sources/): guest nodes addressed by
their path inside the appliance, with stable inode numbers (inodes.py);
directory listings fetched with their entries' attributes and link targets
in batches and kept while the appliance runs (listings.py); subdirectories
listed ahead of a walker, whole subtrees listed at once once a walker is seen
(subtreewalks.py, guestfs/subtree.py), small files' contents read ahead once two files of
a directory were opened, xattrs fetched for whole listings (prefetch.py);
large files read in growing windows (readahead.py). Errors become
``FsError(errno)``.
"""

from __future__ import annotations

import errno
import functools
import logging
import stat
import time
from typing import Awaitable, Callable, Hashable, Iterable, TypeVar

import trio

from ..concurrency import gather
from ..failures import errno_of, reason_of
from ..guestfs.errors import GuestfsClientError, GuestfsError
from ..guestfs.procs import PREAD_MAX, Statns, Statvfs, Xattr
from ..guestfs.subtree import list_subtree
from ..guestfs.subtree_xattrs import subtree_xattrs
from ..guestlayout import OS_VIEW, GuestLayout
from ..lifecycle import GuestUnavailableError, SourceAppliance
from ..status import iso_time
from .listings import ListingCache
from .nodes import Attributes, FileHandle, FsError, GuestNode, Node, NodeTable, ServedSource, Siblings, is_entry_name
from .prefetch import Prefetcher
from .readahead import LARGEST_WINDOW, ReadAhead
from .subtreewalks import SubtreeWalk, SubtreeWalks

log = logging.getLogger(__name__)

T = TypeVar("T")

# XFS keeps POSIX ACLs under these names and lists them to root beside system.posix_acl_*;
# they are the same ACLs in XFS's on-disk form, so they are not shown a second time.
XFS_INTERNAL_ACL_XATTRS = frozenset({b"trusted.SGI_ACL_FILE", b"trusted.SGI_ACL_DEFAULT"})
OS_VIEW_NAME = "fs"
SNAPSHOT_TIME_NAME = b"snapshot-time"  # beside fs/ while a running domain's point-in-time view is served

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
# The most output of one subtree walk (guestfs/subtree.py), ~60,000 entries: less than the listings kept.
SUBTREE_BYTES = 8 * 1024 * 1024


class GuestView:
    """Serves the fs/ and devices/ views of every source in the mount."""

    def __init__(
        self,
        table: NodeTable,
        nursery: trio.Nursery | None = None,
        cached_entries: int = DEFAULT_CACHED_ENTRIES,
        forget_kernel_entry: Callable[[int, bytes], None] | None = None,
    ) -> None:
        """``nursery`` runs the speculative fetches; without one, nothing is fetched ahead.
        ``cached_entries`` bounds the directory entries kept in the listing cache.
        ``forget_kernel_entry(parent inode, name)`` drops what the kernel caches of an entry and
        everything below it; it is called for a source's views when its appliance goes away."""
        self._table = table
        self._forget_kernel_entry = forget_kernel_entry
        self._xattrs_wanted_at = -XATTR_DEMAND_S
        self._nursery = nursery
        self._listings: ListingCache[Siblings] = ListingCache(cached_entries)
        self._walks = SubtreeWalks()
        self._listings_ahead: Prefetcher[Siblings] | None = None
        self._contents_ahead: Prefetcher[bytes] | None = None
        if nursery is not None:
            self._listings_ahead = Prefetcher(
                nursery, concurrency=LISTING_CALLS_AHEAD, budget=LISTINGS_AHEAD, name="listing ahead")
            self._contents_ahead = Prefetcher(
                nursery, concurrency=CONTENT_CALLS_AHEAD, budget=CONTENTS_AHEAD_BYTES, name="content ahead")

    def serve(self, name: str, identity: str, appliance: SourceAppliance,
              description: tuple[bytes, Node]) -> ServedSource:
        """The directory of a source: ``description`` (e.g. domain.xml and its file node), fs/ (unless
        a boot found no OS) and devices/."""
        box: list[ServedSource] = []

        async def snapshot_time() -> bytes:
            taken = box[0].appliance.snapshot_taken_at
            return b"" if taken is None else iso_time(taken).encode() + b"\n"

        snapshot_file = self._table.virtual_file(snapshot_time)

        async def source_children() -> list[tuple[bytes, Node]]:
            source = box[0]
            children: list[tuple[bytes, Node]] = [description]
            if source.appliance.snapshot_taken_at is not None:
                children.append((SNAPSHOT_TIME_NAME, snapshot_file))
            if source.appliance.known_has_os is not False:
                children.append((b"fs", self._view_root_node(source, OS_VIEW_NAME)))
            children.append((b"devices", source.devices_dir))
            return children

        async def source_child(child: bytes) -> Node:
            source = box[0]
            if child == description[0]:
                return description[1]
            if child == SNAPSHOT_TIME_NAME and source.appliance.snapshot_taken_at is not None:
                return snapshot_file
            if child == b"devices":
                return source.devices_dir
            if child == b"fs":
                if source.appliance.known_has_os is False:
                    raise FsError(errno.ENOENT)
                if source.appliance.running_layout is None:
                    # no boot for a look at the source's directory (ls -l, file browsers' probes):
                    # the first look inside fs/ boots
                    return self._view_root_node(source, OS_VIEW_NAME)
                return await self._view_root(source, OS_VIEW_NAME)
            raise FsError(errno.ENOENT)

        async def device_children() -> list[tuple[bytes, Node]]:
            layout = await self._layout(box[0], with_devices=True)
            return [(view.encode(), await self._device_entry(box[0], layout, view)) for view in sorted(layout.devices)]

        async def device_child(child: bytes) -> Node:
            layout = await self._layout(box[0], with_devices=True)
            view = child.decode("utf-8", "surrogateescape")
            if view not in layout.devices:
                raise FsError(errno.ENOENT)
            return await self._device_entry(box[0], layout, view)

        source = ServedSource(
            name=name,
            identity=identity,
            appliance=appliance,
            directory=self._table.virtual_dir(children=source_children, child=source_child),
            devices_dir=self._table.virtual_dir(children=device_children, child=device_child),
        )
        box.append(source)
        appliance.on_discard = lambda: self._forget_views_in_kernel(source)
        return source

    async def _device_entry(self, source: ServedSource, layout: GuestLayout, view: str) -> Node:
        """devices/<view>: its own view root, or (writable layouts) a link to its filesystem in fs/."""
        target = layout.device_link(view)
        if target is None:
            return await self._view_root(source, view)
        link = source.device_links.get(view)
        if link is None or link.target != target:
            link = source.device_links[view] = self._table.virtual_link(target)
        return link

    def _forget_views_in_kernel(self, source: ServedSource) -> None:
        """The next appliance may see other disk contents: the kernel must ask again, not within
        its cache timeout answer from what the last appliance showed."""
        if self._forget_kernel_entry is not None:
            for view in (b"fs", b"devices"):
                self._forget_kernel_entry(source.directory.inode, view)

    async def _layout(self, source: ServedSource, *, with_devices: bool = False) -> GuestLayout:
        try:
            return await source.appliance.layout(with_devices=with_devices)
        except GuestUnavailableError as exc:
            raise FsError(exc.errno, str(exc)) from None

    def _view_path(self, layout: GuestLayout, view: str) -> bytes:
        return OS_VIEW if view == OS_VIEW_NAME else layout.device_path(view)

    def _view_root_node(self, source: ServedSource, view: str) -> GuestNode:
        """The root directory of a view (fs/ or one device), without booting anything.

        View roots get virtual inode numbers (the kernel may see them before
        any appliance runs); their attributes are the guest directory's once booted.
        """
        root = source.view_roots.get(view)
        if root is None:
            root = GuestNode(self._table.numbers.new_virtual(), lookups=1, source=source, view=view)
            source.view_roots[view] = root
            self._table.add(root)
        return root

    async def _view_root(self, source: ServedSource, view: str) -> GuestNode:
        """The root directory node of a view with its attributes, booting the appliance if needed."""
        root = self._view_root_node(source, view)
        layout = await self._layout(source, with_devices=view != OS_VIEW_NAME)
        if root.stat is not None and root.generation == layout.generation:
            return root
        if view == OS_VIEW_NAME and not layout.has_os:
            raise FsError(errno.ENOENT)
        if view != OS_VIEW_NAME and view not in layout.devices:
            raise FsError(errno.ENOENT)
        path = self._view_path(layout, view)
        root.stat, root.stale = await self._guest_call(source, lambda: layout.client.lstatns(path)), False
        root.path = path
        root.generation = layout.generation
        return root

    def _guest_node(self, source: ServedSource, view: str, layout: GuestLayout, path: bytes, st: Statns) -> GuestNode:
        """The node for a guest file, reusing the existing one (hard links share it)."""
        filesystem = layout.fs_by_dev.get(st.st_dev, f"dev{st.st_dev}")
        prefix = self._table.numbers.filesystem_prefix(source.identity, view, filesystem)
        inode = self._table.numbers.guest_inode(prefix, st.st_ino)
        node = self._table.get(inode)
        if isinstance(node, GuestNode):
            node.path = path if stat.S_ISDIR(st.st_mode) or node.path == b"" else node.path
            if node.generation != layout.generation:  # a new boot: the guest may have run since
                node.forget_what_was_read_of_the_file()
                node.siblings = None
        else:
            node = GuestNode(inode, source=source, view=view, path=path)
        node.stat, node.stale = st, False
        node.generation = layout.generation
        return node

    async def _guest_call(self, source: ServedSource, call: Callable[[], Awaitable[T]]) -> T:
        source.appliance.touch()
        try:
            return await call()
        except GuestfsError as exc:
            raise FsError(errno_of(exc), str(exc)) from None
        except GuestfsClientError as exc:
            log.error("%s: appliance stopped answering: %s", source.name, reason_of(exc))
            raise FsError(errno_of(exc)) from None

    async def _guest_layout_for(self, node: GuestNode) -> GuestLayout:
        """The layout that serves ``node``: for a devices/ node, with the devices mounted (a new appliance,
        booted after the last one died or went idle, mounts them only when asked)."""
        assert node.source is not None
        return await self._layout(node.source, with_devices=node.view != OS_VIEW_NAME)

    async def _list_guest_dir(self, node: GuestNode) -> list[tuple[bytes, Node]]:
        """All entries of a guest directory with attributes and link targets (cached, fetched
        ahead or fetched now); its subdirectories are then listed ahead of the walker."""
        assert node.source is not None
        layout = await self._guest_layout_for(node)
        siblings = await self._listing(node.source, node.view, layout, node)
        self._list_ahead(node.source, node.view, layout, siblings)
        return list(siblings.members)

    async def _listing(self, source: ServedSource, view: str, layout: GuestLayout, node: GuestNode) -> Siblings:
        """The listing of one directory of this boot: fetched ahead (maybe still on its way), cached,
        from a subtree walk (maybe still on its way), or fetched now; kept in the listing cache as
        the most recently used."""
        key = (node.inode, layout.generation)
        siblings = None
        if self._listings_ahead is not None:  # claimed even when cached, to free its place ahead
            if self._listings_ahead.wished(key):
                self._walk_if_walker(source, view, layout, node)
            siblings = await self._listings_ahead.claim(key)
        if siblings is None:
            siblings = self._listings.get(key)
        walk = None if siblings is not None else self._walks.covering((source.identity, layout.generation), node.path)
        if walk is not None:
            await walk.done.wait()
            siblings = self._listings.get(key)
        if siblings is None:
            writes = source.writes
            siblings = await self._fetch_listing(source, view, layout, node.path)
            if source.writes != writes:  # the directory may have changed meanwhile: serve it, do not keep it
                return siblings
        self._listings.put(key, siblings)
        return siblings

    def _list_ahead(self, source: ServedSource, view: str, layout: GuestLayout, siblings: Siblings) -> None:
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
            if cached is None and self._walks.covering((source.identity, layout.generation), child.path) is not None:
                continue  # a subtree walk lists it
            if cached is None:
                fetch = functools.partial(self._listing_ahead, source, view, layout, child.path, child.inode)
                wishes.append((key, fetch, 1))
            elif xattrs_wanted and any(member.xattrs is None for _, member in cached.members) \
                    and not self._walk_brings_xattrs(source, layout, cached):
                wishes.append((_xattrs_key(cached),
                               functools.partial(self._xattrs_ahead, source, layout, cached), 1))
        self._listings_ahead.want(wishes)

    def _walk_brings_xattrs(self, source: ServedSource, layout: GuestLayout, siblings: Siblings) -> bool:
        """Whether a subtree walk that gave this listing is still to dump its xattrs."""
        walk = self._walks.covering((source.identity, layout.generation), siblings.directory)
        return walk is not None and not walk.xattrs_done.is_set()

    def _xattrs_in_demand(self) -> bool:
        return time.monotonic() - self._xattrs_wanted_at < XATTR_DEMAND_S

    async def _xattrs_ahead(self, source: ServedSource, layout: GuestLayout, siblings: Siblings) -> Siblings:
        """The xattrs of a cached listing's entries, fetched before anyone asked."""
        _still_running(layout)
        await self._fetch_sibling_xattrs(source, layout, siblings)
        return siblings

    async def _listing_ahead(self, source: ServedSource, view: str, layout: GuestLayout,
                             path: bytes, inode: int) -> Siblings:
        """A listing fetched before anyone asked (with xattrs while they are in demand);
        its own subdirectories are wished for in turn, so the walk runs ahead depth first."""
        _still_running(layout)
        if self._walks.covering((source.identity, layout.generation), path) is not None:
            raise FsError(errno.EAGAIN, "listed by a subtree walk")  # forgotten: the walk brings it
        writes = source.writes
        siblings = await self._fetch_listing(source, view, layout, path)
        if source.writes != writes:
            raise FsError(errno.EAGAIN, "written to meanwhile")
        self._listings.put((inode, layout.generation), siblings)
        if self._xattrs_in_demand():
            await self._fetch_sibling_xattrs(source, layout, siblings)
        self._list_ahead(source, view, layout, siblings)
        return siblings

    def _walk_if_walker(self, source: ServedSource, view: str, layout: GuestLayout, node: GuestNode) -> None:
        """A walker went into ``node``, which was wished for ahead: if that makes a walk (subtreewalks.py),
        list the whole subtree of its parent (whose listing holds ``node``) in the background."""
        parent = node.siblings
        walk = self._walks.claimed((source.identity, layout.generation), node.path)
        if walk is None:
            return
        if self._nursery is None or parent is None or parent.directory != walk.start:
            walk.done.set()
            return
        self._nursery.start_soon(self._walk_subtree, source, view, layout, walk, parent)

    async def _walk_subtree(self, source: ServedSource, view: str, layout: GuestLayout, walk: SubtreeWalk,
                            start: Siblings) -> None:
        """List every directory below ``walk.start`` in one walk, then, if a walker was reading xattrs when
        it began, their entries' xattrs in one dump. Only a walk that a reader of xattrs started dumps them:
        one that began without (find) would make a reader who came meanwhile (ls -lR after find) wait for
        the whole dump instead of a directory's call."""
        xattrs_wanted = self._xattrs_in_demand()
        try:
            try:
                walked = await self._keep_walk_listings(source, view, layout, walk, start)
            finally:
                walk.done.set()
            if walked is not None and xattrs_wanted:
                await self._walk_xattrs(source, layout, walk, walked)
        finally:
            walk.xattrs_done.set()

    async def _keep_walk_listings(self, source: ServedSource, view: str, layout: GuestLayout, walk: SubtreeWalk,
                                  start: Siblings) -> list[Siblings] | None:
        """The listings of a walk, kept where none was kept yet; None if the walk failed (walks are then
        turned off for this appliance) or the source was written to meanwhile."""
        writes = source.writes
        try:
            _still_running(layout)
            subtree = await list_subtree(layout.client, walk.start, self._walks.blksizes(walk.appliance),
                                         SUBTREE_BYTES)
        except (GuestfsClientError, FsError) as exc:
            log.info("%s: cannot list %r as a whole (%s); listing it directory by directory", source.name,
                     walk.start, exc)
            self._walks.turn_off(walk.appliance)
            return None
        if source.writes != writes:  # what it listed may have changed meanwhile
            log.debug("%s: written to during the walk of %r; its listings are not kept", source.name, walk.start)
            return None
        walked: list[Siblings] = []
        directories = {child.path: child for _, child in start.members
                       if child.stat is not None and stat.S_ISDIR(child.stat.st_mode)}
        for path, entries in subtree.listings.items():
            node = directories.pop(path, None)
            if node is None:
                continue  # the start itself (listed already), or below a directory not listed
            key = (node.inode, layout.generation)
            siblings = self._listings.get(key)
            if siblings is None:
                siblings = self._siblings_of(source, view, layout, path,
                                             [(e.name, e.st, e.link_target) for e in entries])
                self._listings.put(key, siblings)
            walk.listed.add(path)
            walked.append(siblings)
            directories.update((child.path, child) for _, child in siblings.members
                               if child.stat is not None and stat.S_ISDIR(child.stat.st_mode))
        log.info("%s: listed %r as a whole: %d directories, %d entries%s", source.name, walk.start,
                 len(walk.listed), subtree.entries, "" if subtree.complete else " (cut)")
        return walked

    async def _walk_xattrs(self, source: ServedSource, layout: GuestLayout, walk: SubtreeWalk,
                           walked: list[Siblings]) -> None:
        """The xattrs of every entry of the listings a walk gave, from one dump of its subtree; left to
        each directory if the dump fails or is cut."""
        writes = source.writes
        try:
            _still_running(layout)
            dump = await subtree_xattrs(layout.client, walk.start, SUBTREE_BYTES)
        except (GuestfsClientError, FsError) as exc:
            log.info("%s: cannot read the xattrs of %r as a whole (%s)", source.name, walk.start, exc)
            return
        if dump is None or source.writes != writes:
            log.info("%s: the xattrs of %r come directory by directory (%s)", source.name, walk.start,
                     "written to meanwhile" if dump is not None else "the dump failed or was cut")
            return
        below = len(walk.start.rstrip(b"/")) + 1
        for siblings in walked:
            directory = siblings.directory[below:] + b"/"
            for name, member in siblings.members:
                if member.xattrs is None:
                    member.xattrs = _shown_xattrs(dump.get(directory + name, ()))
        log.info("%s: read the xattrs of %r as a whole: %d entries have some", source.name, walk.start, len(dump))

    async def _fetch_listing(self, source: ServedSource, view: str, layout: GuestLayout, path: bytes) -> Siblings:
        """Entries of the guest directory ``path`` with attributes and link targets: three daemon
        calls (readdir, then lstatnslist and readlinklist sent together) per thousand entries."""
        client = layout.client
        dirents = await self._guest_call(source, lambda: client.readdir(path))
        names = [d.name for d in dirents if is_entry_name(d.name)]
        if refused := [d.name for d in dirents if d.name not in (b".", b"..") and not is_entry_name(d.name)]:
            log.warning("%s: the appliance listed impossible names in %r, left out: %r", source.name, path, refused)
        links = [d.name for d in dirents if d.ftyp == "l" and is_entry_name(d.name)]
        stats, targets = await gather(
            lambda: self._guest_call(source, lambda: client.lstatnslist(path, names)),
            lambda: self._guest_call(source, lambda: client.readlinklist(path, links)) if links else _no_targets(),
        )
        if any(d.ftyp == "u" for d in dirents):  # types unknown (see GuestfsClient.readdir): the links from lstat
            links = [name for name, st in zip(names, stats) if st is not None and stat.S_ISLNK(st.st_mode)]
            targets = await self._guest_call(source, lambda: client.readlinklist(path, links)) if links else []
        target_of = dict(zip(links, targets))
        return self._siblings_of(source, view, layout, path,
                                 [(name, st, target_of.get(name, b"")) for name, st in zip(names, stats)])

    def _siblings_of(self, source: ServedSource, view: str, layout: GuestLayout, path: bytes,
                     entries: list[tuple[bytes, Statns | None, bytes]]) -> Siblings:
        """The listing of ``path`` from its entries' names, attributes and link targets."""
        siblings = Siblings(path)
        by_inode: dict[int, GuestNode] = {}  # hard links within the directory share one node
        # by name: most walkers (ls, rsync, file browsers) go in that order, and readdir-order
        # walkers (find, tar) then do too, so the directories listed ahead are the next ones wanted
        for name, st, target in sorted(entries, key=lambda entry: entry[0]):
            if st is None:
                log.warning("%s: cannot stat %r in %r", source.name, name, path)
                continue
            child = self._guest_node(source, view, layout, _join(path, name), st)
            child = by_inode.setdefault(child.inode, child)
            if stat.S_ISLNK(st.st_mode) and target:
                child.link_target = target
            child.siblings = siblings
            siblings.members.append((name, child))
        return siblings

    async def _lookup_guest(self, parent: GuestNode, name: bytes) -> GuestNode:
        """The child ``name``: from the parent's cached listing if there is one, else one lstat."""
        assert parent.source is not None
        layout = await self._guest_layout_for(parent)
        siblings = self._listings.get((parent.inode, layout.generation))
        if siblings is not None:
            child = siblings.find(name)
            if child is None:
                raise FsError(errno.ENOENT)
            registered = self._table.get(child.inode)  # a hard link the kernel holds already
            if isinstance(registered, GuestNode) and registered.generation == child.generation:
                return registered
            return child
        path = _join(parent.path, name)
        st = await self._guest_call(parent.source, lambda: layout.client.lstatns(path))
        return self._guest_node(parent.source, parent.view, layout, path, st)

    # --- what the tree asks of guest nodes ------------------------------------------

    async def lookup(self, parent: GuestNode, name: bytes) -> GuestNode:
        await self.boot_if_needed(parent)
        assert parent.stat is not None
        if not stat.S_ISDIR(parent.stat.st_mode):
            raise FsError(errno.ENOTDIR)
        if b"/" in name or name == b"..":
            raise FsError(errno.ENOENT)
        return await self._lookup_guest(parent, name)

    def is_resting_view_root(self, node: GuestNode) -> bool:
        """A view root (fs/, devices/<fs>) whose appliance is off: what is asked of the root itself
        (attributes, xattrs, statfs) is answered without a boot; a look inside boots."""
        source = node.source
        return source is not None and source.view_roots.get(node.view) is node \
            and source.appliance.running_layout is None

    async def attributes_if_running(self, node: GuestNode) -> None:
        """A view root's attributes if its appliance runs; a view root of an appliance that is off
        keeps showing as an empty directory, so that stat(2) never boots one."""
        if node.stat is None and node.source is not None and node.source.appliance.running_layout is not None:
            await self._view_root(node.source, node.view)

    async def boot_if_needed(self, node: GuestNode) -> None:
        """A view root's attributes, booting its appliance if none runs."""
        if node.stat is None:
            assert node.source is not None
            await self._view_root(node.source, node.view)

    async def list_directory(self, node: GuestNode) -> list[tuple[bytes, Node]]:
        await self.boot_if_needed(node)
        assert node.stat is not None
        if not stat.S_ISDIR(node.stat.st_mode):
            raise FsError(errno.ENOTDIR)
        return await self._list_guest_dir(node)

    async def readlink(self, node: GuestNode) -> bytes:
        if node.stat is None or not stat.S_ISLNK(node.stat.st_mode):
            raise FsError(errno.EINVAL)
        if node.link_target is None:
            layout = await self._guest_layout_for(node)
            assert node.source is not None
            node.link_target = await self._guest_call(node.source, lambda: layout.client.readlink(node.path))
        assert node.link_target is not None
        return node.link_target

    async def open(self, node: GuestNode) -> FileHandle:
        assert node.stat is not None and node.source is not None
        if stat.S_ISDIR(node.stat.st_mode):
            raise FsError(errno.EISDIR)
        handle = FileHandle(node)
        if stat.S_ISREG(node.stat.st_mode) and node.stat.st_size == 0:
            handle.data = b""  # nothing to read in an empty file of a guest filesystem
        elif self._contents_ahead is not None:
            handle.data = await self._contents_ahead.claim((node.inode, node.generation, node.source.writes))
        if handle.data is None:
            handle.reader = self._guest_reader(node)
        node.source.appliance.handle_opened()
        self._read_siblings_ahead(node)
        return handle

    def release(self, node: GuestNode) -> None:
        if node.source is not None:
            node.source.appliance.handle_closed()

    def _guest_reader(self, node: GuestNode) -> ReadAhead:
        assert node.source is not None
        source = node.source

        async def fetch(offset: int, size: int) -> bytes:
            layout = await self._guest_layout_for(node)
            return await self._guest_call(source, lambda: layout.client.pread(node.path, size, offset))

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
        assert node.source is not None
        source = node.source
        wishes = []
        for _, member in siblings.members:  # by name already
            st = member.stat
            if (member.inode not in siblings.opened and st is not None and stat.S_ISREG(st.st_mode)
                    and 0 < st.st_size <= SMALL_FILE_MAX):
                fetch = functools.partial(self._content_ahead, source, member.path, st.st_size, member.generation)
                wishes.append(((member.inode, member.generation, source.writes), fetch, st.st_size))
        self._contents_ahead.want(wishes)

    async def _content_ahead(self, source: ServedSource, path: bytes, size: int, generation: int) -> bytes:
        """The whole content of a small file, if the appliance that listed it still runs."""
        layout = source.appliance.running_layout
        if layout is None or layout.generation != generation:
            raise FsError(errno.EIO, "appliance gone")
        data = await self._guest_call(source, lambda: layout.client.pread(path, size + 1, 0))
        if len(data) != size:
            raise FsError(errno.EIO, f"{path!r} has {len(data)} bytes, not {size}")
        return data

    async def xattrs(self, node: GuestNode) -> dict[bytes, bytes]:
        """A node's xattrs; the first asked for in a directory brings those of all its entries."""
        self._xattrs_wanted_at = time.monotonic()
        if node.xattrs is None:
            assert node.source is not None
            layout = await self._guest_layout_for(node)
            siblings = node.siblings
            if siblings is None:
                found = await self._guest_call(node.source, lambda: layout.client.lgetxattrs(node.path))
                node.xattrs = _shown_xattrs(found)
            else:
                walk = self._walks.covering((node.source.identity, layout.generation), siblings.directory)
                if walk is not None:  # its dump of xattrs may bring this listing's
                    await walk.xattrs_done.wait()
                if self._listings_ahead is not None and node.xattrs is None:  # fetched ahead, or on its way
                    await self._listings_ahead.claim(_xattrs_key(siblings))
                if node.xattrs is None:
                    await self._fetch_sibling_xattrs(node.source, layout, siblings)
                    self._list_ahead(node.source, node.view, layout, siblings)  # xattrs are in demand now
                if node.xattrs is None:  # not in that listing any more (e.g. a hard link seen elsewhere)
                    node.siblings = None
                    return await self.xattrs(node)
        return node.xattrs

    async def _fetch_sibling_xattrs(self, source: ServedSource, layout: GuestLayout, siblings: Siblings) -> None:
        """The xattrs of every entry of a listing that has none yet, in one lxattrlist per thousand."""
        wanted = [(name, member) for name, member in siblings.members if member.xattrs is None]
        if not wanted:
            return
        names = [name for name, _ in wanted]
        writes = source.writes
        lists = await self._guest_call(source, lambda: layout.client.lxattrlist(siblings.directory, names))
        if source.writes != writes:  # perhaps an xattr was set meanwhile: each node asks on its own
            return
        for (_, member), xattrs in zip(wanted, lists):
            if xattrs is not None:  # None: listing failed; the node asks again on its own
                member.xattrs = _shown_xattrs(xattrs)

    async def statvfs(self, node: GuestNode) -> Statvfs:
        layout = await self._guest_layout_for(node)
        assert node.source is not None
        return await self._guest_call(node.source, lambda: layout.client.statvfs(node.path))

    # --- what the writes (guestwrites.py) use ------------------------------------------

    async def layout_for(self, node: GuestNode) -> GuestLayout:
        return await self._guest_layout_for(node)

    async def guest_call(self, source: ServedSource, call: Callable[[], Awaitable[T]]) -> T:
        return await self._guest_call(source, call)

    def guest_node(self, source: ServedSource, view: str, layout: GuestLayout, path: bytes, st: Statns) -> GuestNode:
        return self._guest_node(source, view, layout, path, st)

    def reader_for(self, node: GuestNode) -> ReadAhead:
        return self._guest_reader(node)

    def forget_listing(self, directory: GuestNode, layout: GuestLayout) -> None:
        """The kept listing of ``directory`` is no longer true (written to)."""
        self._listings.drop((directory.inode, layout.generation))

    def kept_listings(self) -> list[Siblings]:
        return self._listings.listings()

    def forget_kernel_entry(self, parent_inode: int, name: bytes) -> None:
        """The kernel is to forget the entry ``name`` (gone behind its back)."""
        if self._forget_kernel_entry is not None:
            self._forget_kernel_entry(parent_inode, name)

    @property
    def cached_entries(self) -> int:
        """Directory entries kept in the listing cache, all sources together."""
        return self._listings.entries

    def cached_entries_of(self) -> dict[str, int]:
        """Directory entries kept in the listing cache, by source identity."""
        counts: dict[str, int] = {}
        for siblings in self._listings.listings():
            if siblings.members and (source := siblings.members[0][1].source) is not None:
                counts[source.identity] = counts.get(source.identity, 0) + len(siblings)
        return counts

    def prefetch_summary(self) -> str:
        """How much of the speculative work was used, for the log."""
        parts = []
        for name, prefetcher in (("listings", self._listings_ahead), ("file contents", self._contents_ahead)):
            if prefetcher is not None:
                parts.append(f"{name} fetched ahead: {prefetcher.fetched}, used: {prefetcher.hits}")
        return "; ".join(parts) or "nothing fetched ahead"


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
