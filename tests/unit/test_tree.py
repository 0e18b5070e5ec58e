"""The virtual tree (virtmount.fs.tree) and the guest view behind it over a fake libvirt connection and fake appliances.

The fake guest has two filesystems: sda1 (the root, st_dev 2049) and sda2
(/boot, st_dev 2050). Inside the appliance they appear as the OS view
``/fs`` (sda1 with sda2 mounted on /fs/boot) and as ``/d/sda1`` and ``/d/sda2``.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import libvirt
import pytest
import trio

from virtmount.fs.guestview import READ_CALL_MAX
from virtmount.fs.nodes import Attributes, FsError, GuestNode, Node, VirtualDir, VirtualFile
from virtmount.fs.tree import RELEASE_XATTR, ConnectionTree
from virtmount.guestfs.client import GuestfsClient
from virtmount.guestfs.errors import ConnectionLost, GuestfsError, GuestfsTimeout
from virtmount.guestfs.procs import PREAD_MAX, Dirent, Statns, Statvfs, Xattr
from virtmount.guestlayout import GuestLayout
from virtmount.lifecycle import GuestUnavailableError, SourceAppliance
from virtmount.virt.link import LibvirtLink
from virtmount.sources import SourceRef

SDA1_DEV = 2049
SDA2_DEV = 2050
ALPHA_UUID = "2d0c3e6a-1b7f-4c55-8e0e-5f4c3b2a1908"
BETA_UUID = "9b6f1d2e-7c3a-4e8b-a5d0-0f1e2d3c4b5a"
GAMMA_UUID = "5e4d3c2b-1a09-4f8e-9d7c-6b5a49382716"
APPLIANCE_NAME = "virtmount-appliance-alpha-1a2b3c"
BIG_SIZE = 2 * PREAD_MAX + 1000


# --- a guest in memory ------------------------------------------------------------------


@dataclass
class FakeInode:
    ino: int
    mode: int
    nlink: int = 1
    uid: int = 0
    gid: int = 0
    rdev: int = 0
    blksize: int = 4096
    content: bytes = b""
    target: bytes = b""
    entries: dict[bytes, int] = field(default_factory=dict)
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    times: tuple[int, int, int, int, int, int] = (1_700_000_000, 1, 1_700_000_000, 2, 1_700_000_000, 3)

    @property
    def size(self) -> int:
        if stat.S_ISDIR(self.mode):
            return 4096
        return len(self.target) if stat.S_ISLNK(self.mode) else len(self.content)


class FakeFs:
    def __init__(self, dev: int, *inodes: FakeInode) -> None:
        self.dev = dev
        self.inodes = {inode.ino: inode for inode in inodes}


def dir_inode(ino: int, **entries: int) -> FakeInode:
    return FakeInode(ino, stat.S_IFDIR | 0o755, nlink=2, entries={k.encode(): v for k, v in entries.items()})


def file_inode(ino: int, content: bytes, **kwargs: Any) -> FakeInode:
    return FakeInode(ino, stat.S_IFREG | 0o644, content=content, **kwargs)


def big_content() -> bytes:
    return (bytes(range(256)) * (BIG_SIZE // 256 + 1))[:BIG_SIZE]


def guest_filesystems() -> tuple[FakeFs, FakeFs]:
    """sda1: the root filesystem; sda2: /boot. Inode 12 exists on both (/boot dir on sda1, vmlinuz on sda2)."""
    sda1 = FakeFs(
        SDA1_DEV,
        dir_inode(2, etc=11, boot=12, link=20, hard1=30, hard2=30, big=40, vanished=99),
        dir_inode(11, hostname=13, passwd=14),
        dir_inode(12),
        FakeInode(13, stat.S_IFREG | 0o640, nlink=1, uid=1000, gid=1001, rdev=0, blksize=512,
                  content=b"guest1\n", times=(1_700_000_001, 111_111_111, 1_700_000_002, 222_222_222,
                                              1_700_000_003, 333_333_333),
                  xattrs={b"user.comment": b"hello", b"security.selinux": b"system_u:object_r:etc_t:s0\0"}),
        file_inode(14, b"root:x:0:0:root:/root:/bin/sh\n"),
        FakeInode(20, stat.S_IFLNK | 0o777, target=b"etc/hostname"),
        file_inode(30, b"shared\n", nlink=2),
        file_inode(40, big_content()),
    )
    sda2 = FakeFs(
        SDA2_DEV,
        dir_inode(2, vmlinuz=12, grub=13),
        file_inode(12, b"kernel image"),
        dir_inode(13, **{"grub.cfg": 14}),
        file_inode(14, b"set timeout=5\n", blksize=0),
    )
    return sda1, sda2


def _ftyp(inode: FakeInode | None) -> str:
    """readdir's file type letter (generator/actions_core.ml); ``?`` when unknown."""
    if inode is None:
        return "?"
    kinds = {stat.S_IFDIR: "d", stat.S_IFREG: "r", stat.S_IFLNK: "l", stat.S_IFCHR: "c", stat.S_IFBLK: "b",
             stat.S_IFIFO: "f", stat.S_IFSOCK: "s"}
    return kinds.get(stat.S_IFMT(inode.mode), "?")


def guestfs_error(code: int | None, name: str, proc: str) -> GuestfsError:
    return GuestfsError(code, name, os.strerror(code) if code else "failed", proc)


class FakeGuestClient:
    """The few GuestfsClient calls the model makes, over FakeFs filesystems mounted at appliance paths."""

    closed = False

    def __init__(self, sda1: FakeFs, sda2: FakeFs) -> None:
        self.mounts: dict[bytes, tuple[FakeFs, int]] = {
            b"/fs": (sda1, 2), b"/fs/boot": (sda2, 2), b"/d/sda1": (sda1, 2), b"/d/sda2": (sda2, 2),
        }
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.failures: dict[tuple[str, bytes], Exception] = {}
        self.walk_file = b""
        self.delay = 0.0  # seconds each listing call takes, as a daemon's round trip does

    def count(self, method: str) -> int:
        return sum(1 for name, _ in self.calls if name == method)

    def args_of(self, method: str) -> list[tuple[Any, ...]]:
        return [args for name, args in self.calls if name == method]

    def _record(self, method: str, path: bytes, *args: Any) -> None:
        self.calls.append((method, (path, *args)))
        failure = self.failures.get((method, path))
        if failure is not None:
            raise failure

    def _resolve(self, path: bytes, proc: str) -> tuple[FakeFs, FakeInode]:
        current: tuple[FakeFs, int] | None = None
        prefix = b""
        for part in [p for p in path.split(b"/") if p]:
            prefix += b"/" + part
            if prefix in self.mounts:
                current = self.mounts[prefix]
                continue
            if current is None:
                if any(mount.startswith(prefix + b"/") for mount in self.mounts):
                    continue  # a directory of the appliance holding mount points, e.g. /d
                raise guestfs_error(errno.ENOENT, "ENOENT", proc)
            fs, ino = current
            directory = fs.inodes[ino]
            if not stat.S_ISDIR(directory.mode):
                raise guestfs_error(errno.ENOTDIR, "ENOTDIR", proc)
            if part not in directory.entries or directory.entries[part] not in fs.inodes:
                raise guestfs_error(errno.ENOENT, "ENOENT", proc)
            current = (fs, directory.entries[part])
        if current is None:
            raise guestfs_error(errno.ENOENT, "ENOENT", proc)
        return current[0], current[0].inodes[current[1]]

    def _stat(self, path: bytes, proc: str) -> Statns:
        fs, inode = self._resolve(path, proc)
        times = inode.times
        return Statns(
            st_dev=fs.dev, st_ino=inode.ino, st_mode=inode.mode, st_nlink=inode.nlink, st_uid=inode.uid,
            st_gid=inode.gid, st_rdev=inode.rdev, st_size=inode.size, st_blksize=inode.blksize,
            st_blocks=(inode.size + 511) // 512,
            st_atime_sec=times[0], st_atime_nsec=times[1], st_mtime_sec=times[2], st_mtime_nsec=times[3],
            st_ctime_sec=times[4], st_ctime_nsec=times[5],
            st_spare1=0, st_spare2=0, st_spare3=0, st_spare4=0, st_spare5=0, st_spare6=0,
        )

    async def lstatns(self, path: bytes) -> Statns:
        self._record("lstatns", path)
        return self._stat(path, "lstatns")

    async def readdir(self, path: bytes) -> list[Dirent]:
        await trio.sleep(self.delay)
        self._record("readdir", path)
        _, directory = self._resolve(path, "readdir")
        if not stat.S_ISDIR(directory.mode):
            raise guestfs_error(errno.ENOTDIR, "ENOTDIR", "readdir")
        fs, _ = self._resolve(path, "readdir")
        return [Dirent(directory.ino, "d", b"."), Dirent(2, "d", b".."),
                *(Dirent(ino, _ftyp(fs.inodes.get(ino)), name) for name, ino in directory.entries.items())]

    async def lstatnslist(self, path: bytes, names: list[bytes]) -> list[Statns | None]:
        await trio.sleep(self.delay)
        self._record("lstatnslist", path, tuple(names))
        out: list[Statns | None] = []
        for name in names:
            try:
                out.append(self._stat(path + b"/" + name, "lstatnslist"))
            except GuestfsError:
                out.append(None)
        return out

    async def readlinklist(self, path: bytes, names: list[bytes]) -> list[bytes]:
        await trio.sleep(self.delay)
        self._record("readlinklist", path, tuple(names))
        return [self._resolve(path + b"/" + name, "readlinklist")[1].target for name in names]

    async def readlink(self, path: bytes) -> bytes:
        self._record("readlink", path)
        _, inode = self._resolve(path, "readlink")
        if not stat.S_ISLNK(inode.mode):
            raise guestfs_error(errno.EINVAL, "EINVAL", "readlink")
        return inode.target

    async def pread(self, path: bytes, count: int, offset: int) -> bytes:
        self._record("pread", path, count, offset)
        assert 0 < count <= PREAD_MAX, count
        return self._resolve(path, "pread")[1].content[offset:offset + count]

    async def lxattrlist(self, path: bytes, names: list[bytes]) -> list[list[Xattr] | None]:
        self._record("lxattrlist", path, tuple(names))
        out: list[list[Xattr] | None] = []
        for name in names:
            try:
                inode = self._resolve(path + b"/" + name, "lxattrlist")[1]
            except GuestfsError:
                out.append(None)
            else:
                out.append([Xattr(key, value) for key, value in inode.xattrs.items()])
        return out

    async def lgetxattrs(self, path: bytes) -> list[Xattr]:
        self._record("lgetxattrs", path)
        return [Xattr(name, value) for name, value in self._resolve(path, "lgetxattrs")[1].xattrs.items()]

    async def debug_sh(self, command: bytes) -> bytes:
        """Only the subtree walk's command (guestfs/subtree.py): find's output goes to ``walk_file``, and
        the deletion of that file afterwards."""
        if command.startswith(b"rm -f "):
            self._record("rm", command)
            return b""
        await trio.sleep(self.delay)
        self._record("debug_sh", command)
        if self.failures.get(("debug_sh", b"")) is not None:
            raise self.failures[("debug_sh", b"")]
        match = re.fullmatch(rb"\{ \(ulimit -f (?P<blocks>\d+); find \"\$root\"'(?P<start>[^']*)' -mindepth 1 "
                             rb"-printf '.*' > (?P<output>[^)]*)\); \[ \$\? -lt 128 \] && printf %s '(?P<end>[^']*)' "
                             rb">> (?P=output); \} 2>/dev/null; true", command, re.S)
        assert match is not None, command
        walk, cap = b"".join(self._find(match["start"], b"")), int(match["blocks"]) * 512
        self.walk_file = walk[:cap] if len(walk) > cap else walk + match["end"]  # find killed at the cap: no mark
        return b""

    def _find(self, directory: bytes, relative: bytes) -> Iterator[bytes]:
        """find -printf subtree.FIND_FORMAT below ``directory``: each entry, then its own subtree."""
        for name in self._resolve(directory, "find")[1].entries:
            path, below = directory + b"/" + name, relative + b"/" + name if relative else name
            try:
                st, inode = self._stat(path, "find"), self._resolve(path, "find")[1]
            except GuestfsError:
                continue  # find says so on stderr and goes on
            kind = {stat.S_IFDIR: b"d", stat.S_IFREG: b"f", stat.S_IFLNK: b"l"}[stat.S_IFMT(st.st_mode)]
            times = b" ".join(b"%d.%09d0" % pair for pair in ((st.st_atime_sec, st.st_atime_nsec),
                                                               (st.st_mtime_sec, st.st_mtime_nsec),
                                                               (st.st_ctime_sec, st.st_ctime_nsec)))
            yield (b"%s %d %d %o %d %d %d %d %d " % (kind, st.st_ino, st.st_dev, st.st_mode & 0o7777, st.st_nlink,
                                                     st.st_uid, st.st_gid, st.st_size, st.st_blocks)
                   + times + b"\0" + below + b"\0" + inode.target + b"\0")
            if stat.S_ISDIR(st.st_mode):
                yield from self._find(path, below)

    async def download(self, path: bytes) -> bytes:
        await trio.sleep(self.delay)
        self._record("download", path)
        return self.walk_file

    async def statvfs(self, path: bytes) -> Statvfs:
        self._record("statvfs", path)
        fs, _ = self._resolve(path, "statvfs")
        return Statvfs(bsize=4096, frsize=1024, blocks=fs.dev * 10, bfree=500, bavail=400, files=1000,
                       ffree=900, favail=900, fsid=fs.dev, flag=1, namemax=255)


def make_layout(client: FakeGuestClient, *, has_os: bool = True, generation: int = 1) -> GuestLayout:
    return GuestLayout(
        client=cast(GuestfsClient, client),
        has_os=has_os,
        devices={"sda1": "/dev/sda1", "sda2": "/dev/sda2"},
        fs_by_dev={SDA1_DEV: "sda1", SDA2_DEV: "sda2"},
        generation=generation,
    )


class FakeAppliance:
    """What ConnectionTree uses of a SourceAppliance; ``result`` is what the next layout() gives."""

    def __init__(self, guest_name: str, result: GuestLayout | GuestUnavailableError) -> None:
        self.guest_name = guest_name
        self.result = result
        self.current: GuestLayout | None = None
        self.layout_calls = 0
        self.release_calls = 0
        self.touches = 0
        self.open_handles = 0
        self.snapshot_taken_at: float | None = None  # a running domain's view: when it was taken

    @property
    def known_has_os(self) -> bool | None:
        return None if self.current is None else self.current.has_os

    @property
    def running_layout(self) -> GuestLayout | None:
        return self.current

    async def layout(self, *, with_devices: bool = False) -> GuestLayout:
        self.layout_calls += 1
        if isinstance(self.result, GuestUnavailableError):
            raise self.result
        self.current = self.result
        return self.current

    def touch(self) -> None:
        self.touches += 1

    def handle_opened(self) -> None:
        self.open_handles += 1

    def handle_closed(self) -> None:
        self.open_handles -= 1

    async def release(self, why: str = "released") -> None:
        self.release_calls += 1
        self.current = None


# --- a libvirt connection in memory ---------------------------------------------------


def libvirt_error(code: int, message: str) -> libvirt.libvirtError:
    exc = libvirt.libvirtError(message)
    exc.err = (code, libvirt.VIR_FROM_QEMU, message, libvirt.VIR_ERR_ERROR, message, None, None, -1, -1)
    return exc


class FakeDomain:
    def __init__(self, name: str, uuid: str) -> None:
        self._name = name
        self._uuid = uuid

    def name(self) -> str:
        return self._name

    def UUIDString(self) -> str:
        return self._uuid

    def XMLDesc(self, flags: int = 0) -> str:
        return f"<domain type='kvm'>\n  <name>{self._name}</name>\n  <uuid>{self._uuid}</uuid>\n</domain>\n"


class FakeConnection:
    def __init__(self, *domains: FakeDomain) -> None:
        self.domains = {domain.name(): domain for domain in domains}
        self.list_calls = 0
        self.looked_up: list[str] = []
        self.broken = False

    def _check(self) -> None:
        if self.broken:
            raise libvirt_error(libvirt.VIR_ERR_INTERNAL_ERROR, "internal error: connection broken")

    def listAllDomains(self, flags: int = 0) -> list[FakeDomain]:
        self._check()
        self.list_calls += 1
        return list(self.domains.values())

    def lookupByName(self, name: str) -> FakeDomain:
        self._check()
        self.looked_up.append(name)
        if name not in self.domains:
            raise libvirt_error(libvirt.VIR_ERR_NO_DOMAIN, f"Domain not found: no domain with matching name '{name}'")
        return self.domains[name]

    def lookupByUUIDString(self, uuid: str) -> FakeDomain:
        self._check()
        for domain in self.domains.values():
            if domain.UUIDString() == uuid:
                return domain
        raise libvirt_error(libvirt.VIR_ERR_NO_DOMAIN, f"Domain not found: no domain with matching uuid '{uuid}'")


@dataclass
class World:
    conn: FakeConnection
    tree: ConnectionTree
    client: FakeGuestClient
    results: dict[str, GuestLayout | GuestUnavailableError]
    made: list[FakeAppliance]

    def appliance(self, name: str) -> FakeAppliance:
        return [a for a in self.made if a.guest_name == name][-1]


def make_world(conn: FakeConnection | None = None, nursery: trio.Nursery | None = None,
               forget_kernel_entry: Callable[[int, bytes], None] | None = None) -> World:
    client = FakeGuestClient(*guest_filesystems())
    conn = conn or FakeConnection(
        FakeDomain("beta", BETA_UUID), FakeDomain(APPLIANCE_NAME, "11111111-2222-3333-4444-555555555555"),
        FakeDomain("alpha", ALPHA_UUID), FakeDomain("gamma", GAMMA_UUID),
    )
    results: dict[str, GuestLayout | GuestUnavailableError] = {
        "alpha": make_layout(client),
        "beta": make_layout(client, has_os=False),
        "gamma": GuestUnavailableError("gamma: appliance failed to boot"),
    }
    made: list[FakeAppliance] = []

    def make_appliance(source: SourceRef) -> SourceAppliance:
        appliance = FakeAppliance(source.name, results[source.name])
        made.append(appliance)
        return cast(SourceAppliance, appliance)

    tree = ConnectionTree(LibvirtLink("test:///default", cast(libvirt.virConnect, conn)), make_appliance, nursery,
                          forget_kernel_entry=forget_kernel_entry)
    return World(conn, tree, client, results, made)


@pytest.fixture
def world() -> World:
    return make_world()


async def walk(tree: ConnectionTree, *names: bytes) -> Node:
    node: Node = tree.root
    for name in names:
        node = await tree.lookup(node.inode, name)
    return node


async def guest(world: World, *names: bytes) -> GuestNode:
    """The node at domains/alpha/NAMES, the appliance booted (as the first look inside a view does)."""
    node: Node = await walk(world.tree, b"domains", b"alpha")
    for name in names:
        node = await world.tree.lookup(node.inode, name)
        if isinstance(node, GuestNode):
            await world.tree.guests.boot_if_needed(node)
    assert isinstance(node, GuestNode)
    return node


async def read_dir(tree: ConnectionTree, node: Node) -> dict[bytes, Node]:
    """A directory's entries, each counted as the kernel's readdirplus does (operations.readdir)."""
    listing = await tree.list_directory(node.inode)
    for _, child in listing:
        tree.count_lookup(child)
    return dict(listing)


async def names_in(tree: ConnectionTree, node: Node) -> list[bytes]:
    return [name for name, _ in await tree.list_directory(node.inode)]


async def fs_error(awaitable: Any) -> int:
    with pytest.raises(FsError) as info:
        await awaitable
    return info.value.errno


# --- the virtual part ---------------------------------------------------------------


async def test_root_holds_domains_and_volumes(world: World) -> None:
    tree = world.tree
    assert tree.root.inode == 1
    assert await tree.list_directory(1) == [(b"domains", tree.domains_dir), (b"volumes", tree.volumes_dir)]
    assert await tree.lookup(1, b"volumes") is tree.volumes_dir
    assert await tree.lookup(1, b"domains") is tree.domains_dir
    assert await tree.lookup(1, b".") is tree.root
    assert await fs_error(tree.lookup(1, b"nothing")) == errno.ENOENT
    attributes = await tree.getattr(1)
    assert (attributes.inode, attributes.mode, attributes.nlink) == (1, stat.S_IFDIR | 0o555, 2)
    assert (attributes.uid, attributes.gid) == (os.getuid(), os.getgid())


async def test_domains_listed_sorted_without_appliances_and_without_booting(world: World) -> None:
    tree = world.tree
    assert await names_in(tree, tree.domains_dir) == [b"alpha", b"beta", b"gamma"]
    assert await names_in(tree, tree.domains_dir) == [b"alpha", b"beta", b"gamma"]
    assert world.conn.list_calls == 1  # cached for a second
    assert APPLIANCE_NAME not in world.conn.looked_up
    assert [a.guest_name for a in world.made] == ["alpha", "beta", "gamma"]
    assert all(a.layout_calls == 0 for a in world.made)


async def test_domain_directories_are_stable_nodes(world: World) -> None:
    tree = world.tree
    listed = dict(await tree.list_directory(tree.domains_dir.inode))
    alpha = await walk(tree, b"domains", b"alpha")
    assert alpha is listed[b"alpha"]
    assert isinstance(alpha, VirtualDir)
    assert len({node.inode for node in listed.values()} | {1, tree.domains_dir.inode}) == 5


async def test_appliance_domain_cannot_be_looked_up(world: World) -> None:
    tree = world.tree
    assert await fs_error(tree.lookup(tree.domains_dir.inode, APPLIANCE_NAME.encode())) == errno.ENOENT
    assert world.conn.looked_up == []


async def test_unknown_domain_is_enoent(world: World) -> None:
    tree = world.tree
    assert await fs_error(tree.lookup(tree.domains_dir.inode, b"nosuch")) == errno.ENOENT
    assert world.conn.looked_up == ["nosuch"]


async def test_libvirt_failure_is_eio(world: World) -> None:
    tree = world.tree
    world.conn.broken = True
    assert await fs_error(tree.lookup(tree.domains_dir.inode, b"alpha")) == errno.EIO
    assert await fs_error(tree.list_directory(tree.domains_dir.inode)) == errno.EIO


async def test_domain_dir_shows_fs_before_boot_without_booting(world: World) -> None:
    tree = world.tree
    alpha = await walk(tree, b"domains", b"alpha")
    listing = await tree.list_directory(alpha.inode)
    assert [name for name, _ in listing] == [b"domain.xml", b"fs", b"devices"]
    fs_root = dict(listing)[b"fs"]
    assert isinstance(fs_root, GuestNode) and fs_root.stat is None
    # attributes as listed: an empty directory, still without booting
    attributes = await tree.attributes(fs_root)
    assert (attributes.mode, attributes.inode) == (stat.S_IFDIR | 0o555, fs_root.inode)
    assert world.appliance("alpha").layout_calls == 0


async def test_domain_dir_hides_fs_once_the_layout_has_no_os(world: World) -> None:
    tree = world.tree
    beta = await walk(tree, b"domains", b"beta")
    assert await names_in(tree, beta) == [b"domain.xml", b"fs", b"devices"]
    devices = await tree.lookup(beta.inode, b"devices")
    assert await names_in(tree, devices) == [b"sda1", b"sda2"]
    assert world.appliance("beta").layout_calls >= 1
    assert await names_in(tree, beta) == [b"domain.xml", b"devices"]
    assert await fs_error(tree.lookup(beta.inode, b"fs")) == errno.ENOENT


async def test_domain_dir_unknown_child(world: World) -> None:
    alpha = await walk(world.tree, b"domains", b"alpha")
    assert await fs_error(world.tree.lookup(alpha.inode, b"disks")) == errno.ENOENT
    assert world.appliance("alpha").layout_calls == 0


async def test_fs_lookup_and_getattr_never_boot(world: World) -> None:
    """ls -l of a domain's directory, file browsers' probes: no appliance for a look at fs/ itself."""
    fs_root = await walk(world.tree, b"domains", b"alpha", b"fs")
    attributes = await world.tree.getattr(fs_root.inode)
    assert attributes.mode == stat.S_IFDIR | 0o555  # an empty directory until a look inside
    assert world.appliance("alpha").layout_calls == 0
    assert world.client.calls == []
    assert await world.tree.list_directory(fs_root.inode)  # the first look inside boots
    assert world.appliance("alpha").running_layout is not None
    assert (await world.tree.getattr(fs_root.inode)).mode == stat.S_IFDIR | 0o755


async def test_fs_shows_the_guest_root_once_booted(world: World) -> None:
    fs_root = await guest(world, b"fs")
    assert world.appliance("alpha").layout_calls == 1
    assert fs_root.path == b"/fs"
    assert fs_root.inode < 1 << 40  # a view root keeps its virtual number
    attributes = await world.tree.getattr(fs_root.inode)
    assert (attributes.inode, attributes.mode, attributes.nlink) == (fs_root.inode, stat.S_IFDIR | 0o755, 2)


async def test_view_root_getattr_shows_the_guest_s_attributes_while_its_appliance_runs(world: World) -> None:
    tree = world.tree
    alpha = await walk(tree, b"domains", b"alpha")
    fs_root = dict(await tree.list_directory(alpha.inode))[b"fs"]
    assert (await tree.getattr(fs_root.inode)).mode == stat.S_IFDIR | 0o555
    assert world.appliance("alpha").layout_calls == 0
    await walk(tree, b"domains", b"alpha", b"devices", b"sda1")  # boots
    assert (await tree.getattr(fs_root.inode)).mode == stat.S_IFDIR | 0o755
    assert world.client.args_of("lstatns")[-1] == (b"/fs",)


async def test_devices_listing_and_lookup(world: World) -> None:
    tree = world.tree
    devices = await walk(tree, b"domains", b"alpha", b"devices")
    listing = await tree.list_directory(devices.inode)
    assert [name for name, _ in listing] == [b"sda1", b"sda2"]
    assert [cast(GuestNode, node).path for _, node in listing] == [b"/d/sda1", b"/d/sda2"]
    assert await tree.lookup(devices.inode, b"sda2") is dict(listing)[b"sda2"]
    assert await fs_error(tree.lookup(devices.inode, b"sdz9")) == errno.ENOENT


async def test_domain_xml_file(world: World) -> None:
    tree = world.tree
    xml = FakeDomain("alpha", ALPHA_UUID).XMLDesc().encode()
    node = await walk(tree, b"domains", b"alpha", b"domain.xml")
    assert isinstance(node, VirtualFile)
    attributes = await tree.getattr(node.inode)
    assert (attributes.mode, attributes.size, attributes.nlink) == (stat.S_IFREG | 0o444, len(xml), 1)
    handle = await tree.open(node.inode, os.O_RDONLY)
    assert await tree.read(handle, 0, 1 << 20) == xml
    assert await tree.read(handle, 8, 10) == xml[8:18]
    tree.release(handle)
    assert await fs_error(tree.read(handle, 0, 10)) == errno.EBADF
    assert world.appliance("alpha").layout_calls == 0


async def test_domain_xml_of_vanished_domain_is_enoent(world: World) -> None:
    node = await walk(world.tree, b"domains", b"alpha", b"domain.xml")
    del world.conn.domains["alpha"]
    assert await fs_error(world.tree.getattr(node.inode)) == errno.ENOENT


async def test_same_name_new_domain_releases_the_old_appliance(world: World) -> None:
    tree = world.tree
    first = await walk(tree, b"domains", b"alpha")
    old_appliance = world.appliance("alpha")
    world.conn.domains["alpha"] = FakeDomain("alpha", "0f0f0f0f-0000-4000-8000-000000000001")
    second = await walk(tree, b"domains", b"alpha")
    assert second is not first
    assert old_appliance.release_calls == 1
    assert world.appliance("alpha") is not old_appliance


# --- lookup counts ----------------------------------------------------------------------


async def test_lookup_counts_and_forget(world: World) -> None:
    tree = world.tree
    etc = await guest(world, b"fs", b"etc")
    hostname = await tree.lookup(etc.inode, b"hostname")
    again = await tree.lookup(etc.inode, b"hostname")
    assert again is hostname
    assert hostname.lookups == 2
    tree.forget(hostname.inode, 1)
    assert tree.node(hostname.inode) is hostname
    tree.forget(hostname.inode, 1)
    assert await fs_error(tree.getattr(hostname.inode)) == errno.ESTALE
    with pytest.raises(FsError) as info:
        tree.node(hostname.inode)
    assert info.value.errno == errno.ESTALE


async def test_forget_keeps_view_roots_and_virtual_nodes(world: World) -> None:
    tree = world.tree
    fs_root = await guest(world, b"fs")
    alpha = await walk(tree, b"domains", b"alpha")
    tree.forget(fs_root.inode, 100)
    tree.forget(alpha.inode, 100)
    tree.forget(tree.root.inode, 100)
    tree.forget(123456789, 1)  # unknown: ignored
    assert tree.node(fs_root.inode) is fs_root
    assert tree.node(alpha.inode) is alpha
    assert tree.node(1) is tree.root


async def test_looked_up_node_is_reused_by_listing(world: World) -> None:
    tree = world.tree
    etc = await guest(world, b"fs", b"etc")
    hostname = await tree.lookup(etc.inode, b"hostname")
    listed = await read_dir(tree, etc)
    assert listed[b"hostname"] is hostname


# --- inode numbers ------------------------------------------------------------------------


async def test_hard_links_share_one_inode(world: World) -> None:
    tree = world.tree
    fs_root = await guest(world, b"fs")
    listed = await read_dir(tree, fs_root)
    assert listed[b"hard1"].inode == listed[b"hard2"].inode
    first = await tree.lookup(fs_root.inode, b"hard1")
    second = await tree.lookup(fs_root.inode, b"hard2")
    assert first is second
    assert first.inode == listed[b"hard1"].inode
    assert (await tree.getattr(first.inode)).nlink == 2


async def test_two_filesystems_give_distinct_prefixes(world: World) -> None:
    tree = world.tree
    fs_root = await guest(world, b"fs")
    listed = await read_dir(tree, fs_root)
    boot = listed[b"boot"]  # sda2's root, mounted on /boot
    etc = listed[b"etc"]
    vmlinuz = await tree.lookup(boot.inode, b"vmlinuz")  # inode 12 on sda2
    assert boot.inode & ((1 << 40) - 1) == 2
    assert etc.inode & ((1 << 40) - 1) == 11
    assert vmlinuz.inode & ((1 << 40) - 1) == 12
    assert boot.inode >> 40 == vmlinuz.inode >> 40
    assert etc.inode >> 40 != boot.inode >> 40
    assert 0 < etc.inode >> 40 < (1 << 24) - 1
    assert 0 < boot.inode >> 40 < (1 << 24) - 1
    # the same guest inode number on the two filesystems: /boot on sda1 (devices view) and vmlinuz
    sda1_boot = await guest(world, b"devices", b"sda1", b"boot")
    sda2_vmlinuz = await guest(world, b"devices", b"sda2", b"vmlinuz")
    assert sda1_boot.inode & ((1 << 40) - 1) == sda2_vmlinuz.inode & ((1 << 40) - 1) == 12
    assert sda1_boot.inode != sda2_vmlinuz.inode


async def test_same_file_in_fs_and_devices_has_different_numbers(world: World) -> None:
    in_fs = await guest(world, b"fs", b"etc", b"hostname")
    in_device = await guest(world, b"devices", b"sda1", b"etc", b"hostname")
    assert in_fs is not in_device
    assert in_fs.inode != in_device.inode
    assert in_fs.inode & ((1 << 40) - 1) == in_device.inode & ((1 << 40) - 1) == 13
    assert (in_fs.path, in_device.path) == (b"/fs/etc/hostname", b"/d/sda1/etc/hostname")
    assert in_fs.stat == in_device.stat


async def test_guest_inode_numbers_stable_across_mounts() -> None:
    numbers = []
    for _ in range(2):
        world = make_world()
        numbers.append([
            (await guest(world, *path)).inode
            for path in [(b"fs", b"etc", b"hostname"), (b"fs", b"boot", b"grub"),
                         (b"devices", b"sda2", b"grub", b"grub.cfg")]
        ])
    assert numbers[0] == numbers[1]
    assert len(set(numbers[0])) == 3


# --- attributes and listings ------------------------------------------------------------


async def test_getattr_maps_every_statns_field(world: World) -> None:
    hostname = await guest(world, b"fs", b"etc", b"hostname")
    attributes = await world.tree.getattr(hostname.inode)
    assert attributes == Attributes(
        inode=hostname.inode,
        mode=stat.S_IFREG | 0o640,
        nlink=1,
        uid=1000,
        gid=1001,
        rdev=0,
        size=7,
        blksize=512,
        blocks=1,
        atime_ns=1_700_000_001_111_111_111,
        mtime_ns=1_700_000_002_222_222_222,
        ctime_ns=1_700_000_003_333_333_333,
    )


async def test_getattr_device_node_rdev_and_zero_blksize(world: World) -> None:
    sda1, _ = guest_filesystems()
    sda1.inodes[2].entries[b"null"] = 50
    sda1.inodes[50] = FakeInode(50, stat.S_IFCHR | 0o666, rdev=0x0103, blksize=0)
    world.client.mounts[b"/fs"] = (sda1, 2)
    null = await guest(world, b"fs", b"null")
    attributes = await world.tree.getattr(null.inode)
    assert (attributes.mode, attributes.rdev, attributes.blksize) == (stat.S_IFCHR | 0o666, 0x0103, 4096)


async def test_listing_skips_dot_entries_and_unstattable_names(world: World) -> None:
    tree = world.tree
    fs_root = await guest(world, b"fs")
    listing = await tree.list_directory(fs_root.inode)
    assert [name for name, _ in listing] == [b"big", b"boot", b"etc", b"hard1", b"hard2", b"link"]  # by name
    # one batched stat for all names (including the one that failed), without . and ..
    assert world.client.args_of("lstatnslist") == [
        (b"/fs", (b"etc", b"boot", b"link", b"hard1", b"hard2", b"big", b"vanished")),
    ]
    paths = [cast(GuestNode, node).path for _, node in listing]
    # hard1 and hard2 are one node, reached by the first name listed
    assert paths == [b"/fs/big", b"/fs/boot", b"/fs/etc", b"/fs/hard1", b"/fs/hard1", b"/fs/link"]
    modes = [stat.S_IFMT(cast(GuestNode, node).stat.st_mode) for _, node in listing]  # type: ignore[union-attr]
    assert modes == [stat.S_IFREG, stat.S_IFDIR, stat.S_IFDIR, stat.S_IFREG, stat.S_IFREG, stat.S_IFLNK]


async def test_listing_a_file_is_enotdir(world: World) -> None:
    hostname = await guest(world, b"fs", b"etc", b"hostname")
    assert await fs_error(world.tree.list_directory(hostname.inode)) == errno.ENOTDIR
    assert await fs_error(world.tree.lookup(hostname.inode, b"x")) == errno.ENOTDIR
    xml = await walk(world.tree, b"domains", b"alpha", b"domain.xml")
    assert await fs_error(world.tree.list_directory(xml.inode)) == errno.ENOTDIR


@pytest.mark.parametrize("name", [b"..", b"etc/hostname", b"a/b"])
async def test_lookup_of_dotdot_or_slash_is_enoent(world: World, name: bytes) -> None:
    fs_root = await guest(world, b"fs")
    before = len(world.client.calls)
    assert await fs_error(world.tree.lookup(fs_root.inode, name)) == errno.ENOENT
    assert world.client.calls[before:] == []


async def test_symlink_targets_come_from_the_batched_listing(world: World) -> None:
    tree = world.tree
    fs_root = await guest(world, b"fs")
    link = (await read_dir(tree, fs_root))[b"link"]
    assert await tree.readlink(link.inode) == b"etc/hostname"
    assert world.client.args_of("readlinklist") == [(b"/fs", (b"link",))]
    assert world.client.count("readlink") == 0


async def test_symlink_targets_come_with_a_listing_of_unknown_types(world: World) -> None:
    """A listing from ls0 (too large for one readdir reply) has no types: the links are found by lstat."""
    readdir = world.client.readdir

    async def untyped(path: bytes) -> list[Dirent]:
        return [Dirent(-1, "u", d.name) for d in await readdir(path) if d.name not in (b".", b"..")]

    world.client.readdir = untyped  # type: ignore[method-assign]
    fs_root = await guest(world, b"fs")
    link = (await read_dir(world.tree, fs_root))[b"link"]
    assert await world.tree.readlink(link.inode) == b"etc/hostname"
    assert world.client.args_of("readlinklist") == [(b"/fs", (b"link",))]
    assert world.client.count("readlink") == 0


async def test_listing_without_symlinks_does_not_ask_for_targets(world: World) -> None:
    etc = await guest(world, b"fs", b"etc")
    await world.tree.list_directory(etc.inode)
    assert world.client.count("readlinklist") == 0


async def test_readlink_of_a_looked_up_link_asks_once(world: World) -> None:
    link = await guest(world, b"fs", b"link")
    assert await world.tree.readlink(link.inode) == b"etc/hostname"
    assert await world.tree.readlink(link.inode) == b"etc/hostname"
    assert world.client.args_of("readlink") == [(b"/fs/link",)]


async def test_readlink_of_non_links_is_einval(world: World) -> None:
    hostname = await guest(world, b"fs", b"etc", b"hostname")
    assert await fs_error(world.tree.readlink(hostname.inode)) == errno.EINVAL
    assert await fs_error(world.tree.readlink(world.tree.root.inode)) == errno.EINVAL


# --- reading ------------------------------------------------------------------------------


async def test_read_longer_than_the_largest_read_call_is_split(world: World) -> None:
    tree = world.tree
    big = await guest(world, b"fs", b"big")
    assert (await tree.getattr(big.inode)).size == BIG_SIZE
    handle = await tree.open(big.inode, os.O_RDONLY)
    data = await tree.read(handle, 100, 2 * READ_CALL_MAX + 500)
    assert data == big_content()[100:100 + 2 * READ_CALL_MAX + 500]
    assert world.client.args_of("pread") == [
        (b"/fs/big", READ_CALL_MAX, 100),
        (b"/fs/big", READ_CALL_MAX, 100 + READ_CALL_MAX),
        (b"/fs/big", 500, 100 + 2 * READ_CALL_MAX),
    ]


async def test_read_stops_at_end_of_file(world: World) -> None:
    tree = world.tree
    big = await guest(world, b"fs", b"big")
    handle = await tree.open(big.inode, os.O_RDONLY)
    assert await tree.read(handle, BIG_SIZE - 10, 2 * READ_CALL_MAX) == big_content()[-10:]
    assert world.client.args_of("pread") == [(b"/fs/big", READ_CALL_MAX, BIG_SIZE - 10)]
    assert await tree.read(handle, BIG_SIZE + 5, 100) == b""


async def test_small_read(world: World) -> None:
    tree = world.tree
    hostname = await guest(world, b"fs", b"etc", b"hostname")
    handle = await tree.open(hostname.inode, os.O_RDONLY)
    assert await tree.read(handle, 0, 4096) == b"guest1\n"
    assert await tree.read(handle, 2, 3) == b"est"


async def test_open_and_release_count_handles(world: World) -> None:
    tree = world.tree
    hostname = await guest(world, b"fs", b"etc", b"hostname")
    appliance = world.appliance("alpha")
    first = await tree.open(hostname.inode, os.O_RDONLY)
    second = await tree.open(hostname.inode, os.O_RDONLY | os.O_NONBLOCK)
    assert first != second
    assert appliance.open_handles == 2
    tree.release(first)
    tree.release(first)  # twice: ignored
    assert appliance.open_handles == 1
    tree.release(second)
    assert appliance.open_handles == 0


@pytest.mark.parametrize("flags", [os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC, os.O_WRONLY | os.O_APPEND])
async def test_open_for_writing_a_read_only_source_is_erofs(world: World, flags: int) -> None:
    tree = world.tree
    hostname = await guest(world, b"fs", b"etc", b"hostname")
    xml = await walk(tree, b"domains", b"alpha", b"domain.xml")
    assert await fs_error(tree.open(hostname.inode, flags)) == errno.EROFS
    assert await fs_error(tree.open(xml.inode, flags)) == errno.EROFS
    assert world.appliance("alpha").open_handles == 0


async def test_open_directory_is_eisdir(world: World) -> None:
    etc = await guest(world, b"fs", b"etc")
    assert await fs_error(world.tree.open(etc.inode, os.O_RDONLY)) == errno.EISDIR
    assert await fs_error(world.tree.open(world.tree.domains_dir.inode, os.O_RDONLY)) == errno.EISDIR


# --- extended attributes, statfs ---------------------------------------------------------


async def test_xattrs_fetched_once(world: World) -> None:
    tree = world.tree
    hostname = await guest(world, b"fs", b"etc", b"hostname")
    assert await tree.listxattr(hostname.inode) == [b"user.comment", b"security.selinux"]
    assert await tree.getxattr(hostname.inode, b"user.comment") == b"hello"
    assert await tree.getxattr(hostname.inode, b"security.selinux") == b"system_u:object_r:etc_t:s0\0"
    assert world.client.args_of("lgetxattrs") == [(b"/fs/etc/hostname",)]


async def test_xattrs_of_listed_entries(world: World) -> None:
    tree = world.tree
    etc = await guest(world, b"fs", b"etc")
    entries = await read_dir(tree, etc)
    assert await tree.getxattr(entries[b"hostname"].inode, b"user.comment") == b"hello"
    assert await tree.listxattr(entries[b"passwd"].inode) == []
    assert await fs_error(tree.getxattr(entries[b"passwd"].inode, b"user.comment")) == errno.ENODATA


async def test_xfs_internal_acl_names_are_not_shown_twice(world: World) -> None:
    tree = world.tree
    etc = await guest(world, b"fs", b"etc")
    sda1, _ = world.client.mounts[b"/fs"]
    hostname_inode = sda1.inodes[13]
    hostname_inode.xattrs.update({b"system.posix_acl_access": b"acl", b"trusted.SGI_ACL_FILE": b"xfs-form",
                                  b"trusted.SGI_ACL_DEFAULT": b"xfs-form"})
    entries = await read_dir(tree, etc)
    names = await tree.listxattr(entries[b"hostname"].inode)
    assert b"system.posix_acl_access" in names
    assert not {b"trusted.SGI_ACL_FILE", b"trusted.SGI_ACL_DEFAULT"} & set(names)
    assert await fs_error(tree.getxattr(entries[b"hostname"].inode, b"trusted.SGI_ACL_FILE")) == errno.ENODATA


async def test_missing_xattr_is_enodata(world: World) -> None:
    tree = world.tree
    hostname = await guest(world, b"fs", b"etc", b"hostname")
    assert await fs_error(tree.getxattr(hostname.inode, b"user.missing")) == errno.ENODATA
    assert await fs_error(tree.getxattr(tree.root.inode, b"user.comment")) == errno.ENODATA
    assert await tree.listxattr(tree.root.inode) == []


async def test_release_xattr_on_a_domain_dir_releases_its_appliance(world: World) -> None:
    tree = world.tree
    alpha = await walk(tree, b"domains", b"alpha")
    await walk(tree, b"domains", b"beta")
    assert RELEASE_XATTR == b"user.virtmount.release"
    await tree.setxattr(alpha.inode, RELEASE_XATTR, b"")
    assert world.appliance("alpha").release_calls == 1
    assert world.appliance("beta").release_calls == 0
    # reading it releases too (ro mounts refuse setxattr), and it is never listed
    assert await tree.getxattr(alpha.inode, RELEASE_XATTR) == b"released"
    assert world.appliance("alpha").release_calls == 2
    assert RELEASE_XATTR not in await tree.listxattr(alpha.inode)
    assert await fs_error(tree.getxattr(tree.domains_dir.inode, RELEASE_XATTR)) == errno.ENODATA


async def test_a_resting_view_root_answers_xattrs_and_statfs_without_a_boot(world: World) -> None:
    fs_root = await walk(world.tree, b"domains", b"alpha", b"fs")
    assert await world.tree.listxattr(fs_root.inode) == []
    assert await fs_error(world.tree.getxattr(fs_root.inode, b"security.selinux")) == errno.ENODATA
    assert (await world.tree.statfs(fs_root.inode))[2] == 0
    assert world.appliance("alpha").layout_calls == 0


async def test_other_setxattr_is_erofs(world: World) -> None:
    tree = world.tree
    alpha = await walk(tree, b"domains", b"alpha")
    hostname = await guest(world, b"fs", b"etc", b"hostname")
    assert await fs_error(tree.setxattr(alpha.inode, b"user.other", b"")) == errno.EROFS
    assert await fs_error(tree.setxattr(hostname.inode, RELEASE_XATTR, b"")) == errno.EROFS
    assert await fs_error(tree.setxattr(tree.root.inode, RELEASE_XATTR, b"")) == errno.EROFS
    assert await fs_error(tree.setxattr(tree.domains_dir.inode, RELEASE_XATTR, b"")) == errno.EROFS
    assert world.appliance("alpha").release_calls == 0


async def test_statfs(world: World) -> None:
    tree = world.tree
    vmlinuz = await guest(world, b"fs", b"boot", b"vmlinuz")
    assert await tree.statfs(vmlinuz.inode) == (4096, 1024, SDA2_DEV * 10, 500, 400, 1000, 900, 255)
    assert world.client.args_of("statvfs") == [(b"/fs/boot/vmlinuz",)]
    assert await tree.statfs(tree.root.inode) == (4096, 4096, 0, 0, 0, 0, 0, 255)


# --- errors ------------------------------------------------------------------------------


async def test_guest_enoent_propagates(world: World) -> None:
    fs_root = await guest(world, b"fs")
    assert await fs_error(world.tree.lookup(fs_root.inode, b"nonexistent")) == errno.ENOENT


@pytest.mark.parametrize(("code", "expected"), [
    (errno.EACCES, errno.EACCES), (errno.ELOOP, errno.ELOOP), (errno.ENAMETOOLONG, errno.ENAMETOOLONG),
    (None, errno.EIO), (0, errno.EIO),
])
async def test_guestfs_error_errno_becomes_fs_error_errno(world: World, code: int | None, expected: int) -> None:
    fs_root = await guest(world, b"fs")
    world.client.failures[("lstatns", b"/fs/etc")] = GuestfsError(code, "", "lstat failed", "lstatns")
    assert await fs_error(world.tree.lookup(fs_root.inode, b"etc")) == expected


async def test_guestfs_error_on_read_and_xattrs(world: World) -> None:
    tree = world.tree
    hostname = await guest(world, b"fs", b"etc", b"hostname")
    handle = await tree.open(hostname.inode, os.O_RDONLY)
    world.client.failures[("pread", b"/fs/etc/hostname")] = guestfs_error(errno.EIO, "EIO", "pread")
    world.client.failures[("lgetxattrs", b"/fs/etc/hostname")] = guestfs_error(errno.ENOTSUP, "ENOTSUP",
                                                                                "lgetxattrs")
    assert await fs_error(tree.read(handle, 0, 10)) == errno.EIO
    assert await fs_error(tree.getxattr(hostname.inode, b"user.comment")) == errno.ENOTSUP


@pytest.mark.parametrize("failure, number", [(ConnectionLost("daemon went away"), errno.EIO),
                                             (GuestfsTimeout("call took too long"), errno.ETIMEDOUT)])
async def test_lost_or_stuck_appliance(world: World, failure: Exception, number: int) -> None:
    fs_root = await guest(world, b"fs")
    world.client.failures[("readdir", b"/fs")] = failure
    assert await fs_error(world.tree.list_directory(fs_root.inode)) == number


async def test_layout_failure_gives_its_errno(world: World) -> None:
    tree = world.tree
    gamma = await walk(tree, b"domains", b"gamma")
    assert await names_in(tree, gamma) == [b"domain.xml", b"fs", b"devices"]  # no boot attempted
    assert world.appliance("gamma").layout_calls == 0
    fs_root = await tree.lookup(gamma.inode, b"fs")  # no boot for a look at fs/ itself
    assert world.appliance("gamma").layout_calls == 0
    assert await fs_error(tree.list_directory(fs_root.inode)) == errno.EIO
    devices = await tree.lookup(gamma.inode, b"devices")
    assert await fs_error(tree.list_directory(devices.inode)) == errno.EIO
    world.appliance("gamma").result = GuestUnavailableError("busy", errno.EBUSY)
    assert await fs_error(tree.lookup(fs_root.inode, b"etc")) == errno.EBUSY
    assert (await tree.getattr(fs_root.inode)).mode == stat.S_IFDIR | 0o555


async def test_unknown_inode_is_estale(world: World) -> None:
    assert await fs_error(world.tree.getattr(987654321)) == errno.ESTALE
    assert await fs_error(world.tree.list_directory(987654321)) == errno.ESTALE


# --- a new appliance boot ----------------------------------------------------------------


def rebooted_with_changes(world: World) -> FakeGuestClient:
    """The alpha appliance boots again (generation 2) and finds the guest changed in between."""
    sda1, sda2 = guest_filesystems()
    sda1.inodes[13].content = b"renamed-guest\n"
    sda1.inodes[13].xattrs = {b"user.comment": b"changed"}
    sda1.inodes[20].target = b"etc/passwd"
    client = FakeGuestClient(sda1, sda2)
    world.appliance("alpha").result = make_layout(client, generation=2)
    return client


async def test_attributes_refreshed_after_a_new_boot(world: World) -> None:
    hostname = await guest(world, b"fs", b"etc", b"hostname")
    assert (await world.tree.getattr(hostname.inode)).size == 7
    rebooted_with_changes(world)
    again = await guest(world, b"fs", b"etc", b"hostname")
    assert again is hostname
    assert (await world.tree.getattr(hostname.inode)).size == len(b"renamed-guest\n")


async def test_xattrs_refreshed_after_a_new_boot(world: World) -> None:
    hostname = await guest(world, b"fs", b"etc", b"hostname")
    assert await world.tree.getxattr(hostname.inode, b"user.comment") == b"hello"
    rebooted_with_changes(world)
    assert await guest(world, b"fs", b"etc", b"hostname") is hostname
    assert await world.tree.getxattr(hostname.inode, b"user.comment") == b"changed"


async def test_link_target_refreshed_after_a_new_boot(world: World) -> None:
    link = await guest(world, b"fs", b"link")
    assert await world.tree.readlink(link.inode) == b"etc/hostname"
    rebooted_with_changes(world)
    assert await guest(world, b"fs", b"link") is link
    assert await world.tree.readlink(link.inode) == b"etc/passwd"


async def test_listing_after_a_new_boot_refreshes_link_targets(world: World) -> None:
    tree = world.tree
    fs_root = await guest(world, b"fs")
    link = await tree.lookup(fs_root.inode, b"link")
    assert await tree.readlink(link.inode) == b"etc/hostname"
    rebooted_with_changes(world)
    listed = await read_dir(tree, fs_root)
    assert listed[b"link"] is link
    assert await tree.readlink(link.inode) == b"etc/passwd"


async def test_a_discarded_appliance_makes_the_kernel_forget_the_domain_views() -> None:
    forgotten: list[tuple[int, bytes]] = []
    world = make_world(forget_kernel_entry=lambda parent, name: forgotten.append((parent, name)))
    alpha = await walk(world.tree, b"domains", b"alpha")
    await walk(world.tree, b"domains", b"alpha", b"fs", b"etc")
    assert forgotten == []
    on_discard = world.appliance("alpha").on_discard  # type: ignore[attr-defined]
    on_discard()
    assert forgotten == [(alpha.inode, b"fs"), (alpha.inode, b"devices")]
