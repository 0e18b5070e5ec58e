"""The nodes of the mount and the table the kernel's inode numbers are looked up in.

Virtual nodes (directories and files virtmount makes up) live as long as the
mount. Guest nodes (files seen through one view of a source's appliance) are
kept while the kernel holds a reference (lookup count) to them, and view
roots as long as their source is known.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from ..guestfs.procs import Statns
from ..lifecycle import SourceAppliance
from .inodes import InodeNumbers
from .readahead import ReadAhead


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
class VirtualFile(Node):
    """A file virtmount makes up (domain.xml, volume.xml); ``content`` asks libvirt for it."""

    content: Callable[[], Awaitable[bytes]] | None = None


def is_entry_name(name: bytes) -> bool:
    """Whether ``name`` can be a directory entry: the kernel fails a whole readdir that holds a name
    with ``/`` (and a NUL would end it early); ``""``, ``.`` and ``..`` name no child."""
    return name not in (b"", b".", b"..") and b"/" not in name and b"\0" not in name


@dataclass(eq=False, slots=True)
class VirtualLink(Node):
    """A symbolic link virtmount makes up (devices/<fs> of a writable source's OS filesystem -> ../fs/…)."""

    target: bytes = b""


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
    """A file or directory of a source, seen through one view of its appliance."""

    source: ServedSource | None = None
    view: str = ""
    path: bytes = b""  # inside the appliance, e.g. b"/fs/etc/passwd"
    stat: Statns | None = None  # None for a view root before its appliance booted
    generation: int = 0  # the appliance boot that produced ``stat``
    stale: bool = False  # ``stat`` estimated after a write: stat'ed again before it is shown (guestwrites.py)
    link_target: bytes | None = None
    xattrs: dict[bytes, bytes] | None = None
    # made by this mount's mknod or create, with no xattr set here since: it has no security.capability
    # (the kernel asks for it before every write, see guestwrites.py)
    without_capability: bool = False
    siblings: Siblings | None = None  # the listing this node was last seen in

    def forget_what_was_read_of_the_file(self) -> None:
        """Drop the xattrs and link target kept for this inode (after a new boot, or a reused inode number)."""
        self.xattrs = self.link_target = None
        self.without_capability = False


@dataclass(eq=False)
class ServedSource:
    """A source in the tree: its directory (description file, fs/, devices/) and its appliance."""

    name: str  # for logs
    identity: str  # for inode numbers (see inodes.py)
    appliance: SourceAppliance
    directory: VirtualDir
    devices_dir: VirtualDir
    view_roots: dict[str, GuestNode] = field(default_factory=dict)
    device_links: dict[str, VirtualLink] = field(default_factory=dict)  # devices/ entries that link to fs/
    writes: int = 0  # writes so far: what was fetched ahead before one is not kept (see guestwrites.py)


@dataclass
class FileHandle:
    node: Node
    data: bytes | None = None  # whole content, for virtual files and small guest files read ahead
    reader: ReadAhead | None = None  # for guest files
    writable_in: int | None = None  # opened for writing: the appliance generation it writes through


class NodeTable:
    """Inode number -> node, for every node the kernel may ask about."""

    def __init__(self) -> None:
        self.numbers = InodeNumbers()
        self._nodes: dict[int, Node] = {}

    def add(self, node: Node) -> None:
        self._nodes[node.inode] = node

    def get(self, inode: int) -> Node | None:
        return self._nodes.get(inode)

    def node(self, inode: int) -> Node:
        try:
            return self._nodes[inode]
        except KeyError:
            raise FsError(errno.ESTALE) from None

    def virtual_dir(self, *, children: Callable[[], Awaitable[list[tuple[bytes, Node]]]],
                    child: Callable[[bytes], Awaitable[Node]], inode: int | None = None) -> VirtualDir:
        node = VirtualDir(inode or self.numbers.new_virtual(), children=children, child=child)
        node.lookups = 1  # virtual nodes live as long as the mount
        self.add(node)
        return node

    def virtual_file(self, content: Callable[[], Awaitable[bytes]]) -> VirtualFile:
        node = VirtualFile(self.numbers.new_virtual(), lookups=1, content=content)
        self.add(node)
        return node

    def virtual_link(self, target: bytes) -> VirtualLink:
        node = VirtualLink(self.numbers.new_virtual(), lookups=1, target=target)
        self.add(node)
        return node

    def guest_nodes(self) -> list[GuestNode]:
        """Every guest node the kernel may ask about (to follow a renamed directory)."""
        return [node for node in self._nodes.values() if isinstance(node, GuestNode)]

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
        if node.lookups <= 0 and node not in (node.source.view_roots.values() if node.source else ()):
            del self._nodes[inode]
