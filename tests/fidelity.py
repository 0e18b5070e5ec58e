"""The fidelity guest: a source tree full of awkward files, the same tree as a
guest image, and a strict tree comparison.

``make_source_tree(root)`` builds, deterministically, a Debian-looking OS tree
holding everything that is hard to copy faithfully: hard-link groups, symlinks
(relative, absolute, dangling, a loop, long and non-UTF-8 targets), fifos,
character and block device nodes, setuid/setgid/sticky bits, POSIX access and
default ACLs, user xattrs with binary values, odd names (non-UTF-8 bytes,
newline, tab, leading dash, spaces, 255 bytes, unicode), a 40-deep directory,
a 5000-file directory, sparse files (one of 1 GiB), nanosecond mtimes (before
1970 and after 2038 too) and several owners (uids/gids above 2**31 too).

``build()`` makes that tree into a qcow2 image (GPT: sda1 ext4 /boot, sda2
LVM PV of VG ``vgf`` with LV ``root`` ext4 / and LV ``home`` XFS /home), one
pax tarball per filesystem unpacked by libguestfs, and caches both the image
and the source tree next to the other test images::

    images.IMAGE_DIR/fidelity-<hash>.qcow2
    images.IMAGE_DIR/fidelity-<hash>.src/tree/

where <hash> covers this file's and tests/images.py's source.

``compare_trees(expected, actual)`` walks two trees (never following
symlinks) and returns every difference as a readable line.

Run ``python -m tests.fidelity`` to build (or find) the image by hand and
``python -m tests.fidelity compare A B`` to compare two trees.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Collection, Iterator

from tests import images

MiB = images.MiB
GiB = images.GiB

DOMAIN_NAME = "virtmount-test-fidelity"
RECIPE = "fidelity"
VG = "vgf"
HOSTNAME = "virtmount-fidelity"

BOOT = images.Filesystem("/dev/sda1", "ext4", "boot", images._fs_uuid(RECIPE, "boot"), 200, "/boot")
ROOT = images.Filesystem(f"/dev/{VG}/root", "ext4", "root", images._fs_uuid(RECIPE, "root"), 1024, "/")
# XFS refuses filesystems smaller than 300 MiB.
HOME = images.Filesystem(f"/dev/{VG}/home", "xfs", "home", images._fs_uuid(RECIPE, "home"), 512, "/home")
FILESYSTEMS = (BOOT, ROOT, HOME)

# The Debian look-alike files that libguestfs inspection reads, taken from the
# standard image's recipe (only /etc/fstab differs: other devices).
_DEBIAN = images._debian_like(RECIPE, HOSTNAME, b"virtmount fidelity guest", 0, 0)
_INSPECTED_FILES = ("/etc/os-release", "/etc/debian_version", "/etc/hostname", "/etc/hosts",
                    "/var/lib/dpkg/status")
assert _DEBIAN.inspection is not None
SPEC = images.ImageSpec(
    name=RECIPE,
    layout="gpt-lvm",
    size=2 * GiB,
    filesystems=FILESYSTEMS,
    files={},  # the content is the source tree, see make_source_tree()
    inspection=dataclasses.replace(
        _DEBIAN.inspection,
        root=ROOT.device,
        mountpoints={"/": ROOT.device, "/boot": BOOT.device, "/home": HOME.device},
    ),
)

# mkfs.ext4 creates lost+found in the root directory of every ext4
# filesystem; the source tree has none.  compare_trees() ignores exactly these
# entries (relative paths, only as extra directories on the actual side), and
# nothing else.  XFS (/home) has no lost+found.
LOST_FOUND = frozenset({b"lost+found", b"boot/lost+found"})

SPARSE_1G = b"var/lib/sparse-1g.img"
SPARSE_XFS = b"home/alice/sparse-xfs.img"


# ================================================================ source tree


def _mtime_ns(rel: bytes) -> int:
    """Deterministic mtime with a nanosecond part, 2000-01-01 .. 2025-01-01."""
    h = int.from_bytes(hashlib.sha256(b"mtime:" + rel).digest()[:8], "big")
    return (946684800 + h % (25 * 365 * 86400)) * 1_000_000_000 + (h >> 32) % 1_000_000_000


class TreeBuilder:
    """Creates entries under ``root``; mtimes are applied by ``finish()``."""

    def __init__(self, root: Path) -> None:
        os.makedirs(root, exist_ok=True)
        self.root = os.fsencode(root)
        self.mtimes: dict[bytes, int] = {}  # rel path -> mtime (one entry per inode)
        self.dirs: set[bytes] = {b""}

    def path(self, rel: bytes) -> bytes:
        return self.root + b"/" + rel if rel else self.root

    def _parents(self, rel: bytes) -> None:
        parent = rel.rpartition(b"/")[0]
        if parent and parent not in self.dirs:
            self.dir(parent)

    def _meta(self, rel: bytes, mode: int | None, owner: tuple[int, int], acl: str | None,
              default_acl: str | None, xattrs: dict[bytes, bytes] | None, mtime: int | None) -> None:
        p = self.path(rel)
        # chown before chmod: chown clears setuid/setgid bits of files.
        os.chown(p, *owner, follow_symlinks=False)
        if mode is not None:
            os.chmod(p, mode)
        # setfacl after chmod: a later chmod would rewrite the ACL mask.
        self.set_acl(rel, acl=acl, default_acl=default_acl)
        for name, value in (xattrs or {}).items():
            os.setxattr(p, name, value, follow_symlinks=False)
        self.mtimes[rel] = _mtime_ns(rel) if mtime is None else mtime

    def dir(self, rel: bytes, mode: int = 0o755, owner: tuple[int, int] = (0, 0), *,
            acl: str | None = None, default_acl: str | None = None,
            xattrs: dict[bytes, bytes] | None = None, mtime: int | None = None) -> None:
        if rel:
            self._parents(rel)
            if rel not in self.dirs:
                os.mkdir(self.path(rel))
        self.dirs.add(rel)
        self._meta(rel, mode, owner, acl, default_acl, xattrs, mtime)

    def file(self, rel: bytes, content: bytes = b"", mode: int = 0o644, owner: tuple[int, int] = (0, 0), *,
             acl: str | None = None, xattrs: dict[bytes, bytes] | None = None, mtime: int | None = None) -> None:
        self._parents(rel)
        with open(self.path(rel), "xb") as f:
            f.write(content)
        self._meta(rel, mode, owner, acl, None, xattrs, mtime)

    def sparse(self, rel: bytes, size: int, islands: dict[int, bytes], mode: int = 0o644,
               owner: tuple[int, int] = (0, 0)) -> None:
        self._parents(rel)
        with open(self.path(rel), "xb") as f:
            f.truncate(size)
            for offset, data in islands.items():
                os.pwrite(f.fileno(), data, offset)
        self._meta(rel, mode, owner, None, None, None, None)

    def symlink(self, rel: bytes, target: bytes, owner: tuple[int, int] = (0, 0), *,
                mtime: int | None = None) -> None:
        self._parents(rel)
        os.symlink(target, self.path(rel))
        self._meta(rel, None, owner, None, None, None, mtime)

    def hardlink(self, rel: bytes, existing: bytes) -> None:
        self._parents(rel)
        os.link(self.path(existing), self.path(rel), follow_symlinks=False)

    def node(self, rel: bytes, kind: int, mode: int, device: tuple[int, int] = (0, 0),
             owner: tuple[int, int] = (0, 0)) -> None:
        """A fifo or device node (user xattrs are not allowed on those)."""
        self._parents(rel)
        os.mknod(self.path(rel), kind | 0o600, os.makedev(*device))
        self._meta(rel, mode, owner, None, None, None, None)

    def set_acl(self, rel: bytes, *, acl: str | None = None, default_acl: str | None = None) -> None:
        """Add ACL entries to an existing entry (its mtime is not affected)."""
        if acl:
            subprocess.run(["setfacl", "-m", acl, "--", self.path(rel)], check=True)
        if default_acl:
            subprocess.run(["setfacl", "-d", "-m", default_acl, "--", self.path(rel)], check=True)

    def finish(self) -> None:
        """Set mtimes: everything but directories, then directories deepest first."""
        for rel, ns in self.mtimes.items():
            if rel not in self.dirs:
                os.utime(self.path(rel), ns=(ns, ns), follow_symlinks=False)
        for rel in sorted(self.dirs, key=lambda r: (-r.count(b"/") - (1 if r else 0), r)):
            ns = self.mtimes[rel]
            os.utime(self.path(rel), ns=(ns, ns), follow_symlinks=False)


# Odd file names: any bytes but "/" and NUL.
ODD_NAMES: tuple[bytes, ...] = (
    b"\xff\xfe latin1 \xe9",
    b"new\nline",
    b"tab\there",
    b"-leading-dash",
    b"--",
    b" leading and trailing spaces ",
    b"x" * 255,
    ("\u00fcn\u00efc\u00f8d\u00e9 \u2603 \u65e5\u672c\u8a9e " + "\u00e9" * 114 + "x").encode(),  # 255 bytes of UTF-8
    "\U0001f600 emoji".encode(),
    b"*?[glob]{a,b}",
    b"back\\slash",
    b"quotes ' \"",
    b"\x01\x02\x1b[31mcontrol\x7f",
    b"...",
    b".hidden",
    b"~tilde$HOME%s",
    b"colon:semi;amp&pipe|",
    b"\r\n",
)
assert all(len(n) <= 255 and b"/" not in n and b"\0" not in n for n in ODD_NAMES)
assert len(ODD_NAMES[7]) == 255, len(ODD_NAMES[7])

ALICE = (1000, 1000)
BOB = (1001, 2002)        # neither in /etc/passwd nor /etc/group
NOBODY = (65534, 65534)
BIG = (4000000000, 4000000001)  # above 2**31
S = images.pseudo_random


def make_source_tree(root: Path) -> None:
    """Build the fidelity guest's whole OS tree under ``root`` (an empty or absent directory)."""
    root.mkdir(parents=True, exist_ok=True)
    if any(root.iterdir()):
        raise ValueError(f"{root} is not empty")
    old_umask = os.umask(0o022)
    try:
        b = TreeBuilder(root)
        _make_root_fs(b)
        _make_boot_fs(b)
        _make_home_fs(b)
        b.finish()
    finally:
        os.umask(old_umask)


def _make_root_fs(b: TreeBuilder) -> None:
    b.dir(b"", 0o755, xattrs={b"user.fidelity.root": b"/ on ext4 (LVM)"})
    # --- what libguestfs inspection needs (shared with tests/images.py)
    for name in _INSPECTED_FILES:
        b.file(name.lstrip("/").encode(), _DEBIAN.files[name])
    fstab = (
        "# /etc/fstab: static file system information (virtmount fidelity test image)\n"
        f"{ROOT.device}  /      ext4  errors=remount-ro  0  1\n"
        f"UUID={BOOT.uuid}  /boot  ext4  defaults  0  2\n"
        f"{HOME.device}  /home  xfs   defaults  0  2\n"
    ).encode()
    b.file(b"etc/fstab", fstab)
    b.file(b"etc/passwd", b"root:x:0:0:root:/root:/bin/bash\nalice:x:1000:1000::/home/alice:/bin/sh\n")
    b.file(b"etc/group", b"root:x:0:\ntty:x:5:\nalice:x:1000:\n")
    b.file(b"etc/shadow", b"root:*:19000:0:99999:7:::\n", 0o640, (0, 42))
    for d in (b"bin", b"usr/bin", b"usr/sbin", b"usr/lib", b"run", b"srv", b"dev"):
        b.dir(d)
    b.dir(b"root", 0o700)
    b.dir(b"tmp", 0o1777, mtime=0)                          # sticky; mtime at the epoch exactly
    b.dir(b"var/tmp", 0o1777, mtime=999_999_999)           # sticky; 0.999999999 s
    b.file(b"root/.profile", b"# nothing\n", 0o600)

    # --- setuid / setgid / sticky files (not real programs)
    b.file(b"usr/bin/su", b"not a program: setuid root\n", 0o4755)
    b.file(b"usr/bin/wall", b"not a program: setgid tty\n", 0o2755, (0, 5))
    b.file(b"usr/bin/all-bits", b"every mode bit\n", 0o7777, BOB)
    b.file(b"usr/bin/suid-not-exec", b"setuid without x: S\n", 0o4644, ALICE)
    b.file(b"usr/bin/sticky-file", b"sticky regular file\n", 0o1755)
    b.file(b"usr/bin/no-perms", b"mode 0000\n", 0o000)
    b.dir(b"srv/setgid-dir", 0o2775, BOB)
    b.file(b"srv/setgid-dir/inherits", b"in a setgid directory\n", 0o664, BOB)
    b.dir(b"srv/locked", 0o000)
    b.file(b"srv/locked/inside", b"in a mode-0000 directory\n", 0o600)
    # hard-link group of 2 across directories, setuid
    b.hardlink(b"usr/sbin/su-hardlink", b"usr/bin/su")

    # --- device nodes and fifos (numbers chosen not to be the host's disks)
    b.node(b"dev/null", stat.S_IFCHR, 0o666, (1, 3))
    b.node(b"dev/console", stat.S_IFCHR, 0o600, (5, 1))
    b.node(b"dev/tty0", stat.S_IFCHR, 0o620, (4, 0), (0, 5))
    b.node(b"dev/char-max", stat.S_IFCHR, 0o600, (4095, 1048575))  # largest numbers the kernel has
    b.node(b"dev/block-nvme-like", stat.S_IFBLK, 0o660, (259, 123456), (0, 6))
    b.node(b"dev/block-experimental", stat.S_IFBLK, 0o640, (240, 0x12345), ALICE)
    b.node(b"run/initctl", stat.S_IFIFO, 0o600)
    b.node(b"run/fifo-suid-odd", stat.S_IFIFO, 0o4751, owner=BIG)

    # --- symlinks
    b.symlink(b"etc/os-release-link", b"os-release")                      # relative
    b.symlink(b"usr/lib/rel-up", b"../../etc/os-release")                  # relative, upwards
    b.symlink(b"usr/lib/abs", b"/etc/os-release")                          # absolute
    b.symlink(b"usr/lib/abs-dir", b"/usr/bin", ALICE)                       # to a directory, owned by 1000
    b.symlink(b"dangling", b"does/not/exist")                              # dangling, relative
    b.symlink(b"dangling-abs", b"/nonexistent/at/all", BIG)                # dangling, absolute
    b.symlink(b"loop/a", b"b")                                             # a loop
    b.symlink(b"loop/b", b"a")
    b.symlink(b"loop/self", b"self")
    b.symlink(b"loop/dir-loop", b".")
    b.symlink(b"usr/lib/into-home", b"../../home/alice/hello.txt")         # across mountpoints
    b.symlink(b"usr/lib/odd-target", b"\xff\xfe\n\ttarget with spaces and \xe9")
    b.symlink(b"usr/lib/long-target", b"/".join([b"y" * 200] * 20) + b"/" + b"z" * 75)  # 4095 bytes
    b.symlink(b"usr/lib/pre-1970-link", b"old", mtime=-123_456_789_012_345_678)

    # --- odd names on ext4
    for i, odd in enumerate(ODD_NAMES):
        b.file(b"odd/" + odd, f"odd name #{i} on the root filesystem\n".encode())
    b.dir(b"odd/dir \n\xff with odd name", 0o751)
    b.file(b"odd/dir \n\xff with odd name/\t", b"tab-named file\n")
    b.symlink(b"odd/link-\xff\n", ODD_NAMES[0])

    # --- a 40-deep directory
    deep = b"var/deep"
    for level in range(1, 41):
        deep += b"/level-%02d" % level
        b.dir(deep, 0o755 if level % 7 else 0o700, ALICE if level % 5 == 0 else (0, 0))
    b.file(deep + b"/bottom.txt", b"40 directories down\n")
    b.symlink(deep + b"/to-top", b"../" * 40)

    # --- times beyond the 32-bit range, and exact ns edges
    b.file(b"var/times/pre-1970", b"1901-12-13\n", mtime=-(2**31 - 1) * 1_000_000_000 + 123)
    b.file(b"var/times/y2038-plus-1", b"after 2038-01-19\n", mtime=2**31 * 1_000_000_000)
    b.file(b"var/times/y2100", b"2100\n", mtime=4102444800_999_999_999)
    b.file(b"var/times/zero-ns", b"no fraction\n", mtime=1704164645_000_000_000)
    b.file(b"var/times/one-ns", b"1 ns\n", mtime=1704164645_000_000_001)
    b.dir(b"var/times", mtime=-1)  # 1969-12-31T23:59:59.999999999

    # --- contents: empty, block-sized, above the appliance's pread size, all zeros
    b.file(b"var/data/empty", b"")
    b.file(b"var/data/one-byte", b"\0")
    b.file(b"var/data/block-4096", S("block", 4096))
    b.file(b"var/data/random-5M", S("root/random", 5 * MiB + 12345))
    b.file(b"var/data/zeros-64k", bytes(65536))  # written, not a hole
    # sparse, 1 GiB, ending in a hole
    b.sparse(SPARSE_1G, GiB, {
        0: S("sparse/0", 4096),
        123456789: S("sparse/1", 10000),
        600 * MiB: S("sparse/2", 65536),
        GiB - 3 * 4096 + 17: S("sparse/3", 100),
    })

    # --- ACLs and xattrs on ext4
    b.dir(b"srv/acl", 0o750, BOB, acl="u:1000:rwx,g:65534:r-x",
          default_acl="u::rwx,g::r-x,o::-,u:1000:rw-,g:2002:r--,m::rwx")
    b.file(b"srv/acl/file", b"inherits the default ACL of srv/acl\n", 0o640)
    b.file(b"srv/acl-file", b"access ACL\n", 0o640, ALICE, acl="u:1001:rw-,u:4000000000:r--,g:2002:r--")
    b.file(b"srv/xattrs", b"xattrs with binary values\n", xattrs={
        b"user.binary": bytes(range(256)),
        b"user.empty": b"",
        b"user.nul-only": b"\0",
        b"user.text": b"hello",
        "user.\u00fcn\u00efc\u00f8d\u00e9 name".encode(): "\u2603".encode(),
        b"user.large": S("xattr/large", 3000),
    })
    b.dir(b"srv/xattr-dir", xattrs={b"user.dir": b"\xff\x00\xfe"})


def _make_boot_fs(b: TreeBuilder) -> None:
    b.dir(b"boot", 0o755, xattrs={b"user.fidelity.root": b"/boot on ext4"})
    b.file(b"boot/vmlinuz-6.1.0-fidelity", S("boot/vmlinuz", 2 * MiB + 1))
    b.hardlink(b"boot/vmlinuz", b"boot/vmlinuz-6.1.0-fidelity")
    b.file(b"boot/initrd.img-6.1.0-fidelity", S("boot/initrd", 700_001), 0o600)
    b.symlink(b"boot/initrd.img", b"initrd.img-6.1.0-fidelity")
    b.file(b"boot/grub/grub.cfg", b"set timeout=5\n", 0o444)
    b.dir(b"boot/grub", 0o700)
    b.file(b"boot/odd/" + ODD_NAMES[0], b"odd name on /boot\n")
    b.file(b"boot/acl", b"ACL on /boot\n", acl="g:5:rw-")
    b.node(b"boot/fifo", stat.S_IFIFO, 0o644, owner=NOBODY)


def _make_home_fs(b: TreeBuilder) -> None:
    # The XFS root directory: unusual mode, both ACLs (the default one set
    # last, so that not everything below inherits it), an xattr.
    b.dir(b"home", 0o751, (0, 0), acl="u:1000:r-x", xattrs={b"user.fidelity.root": b"/home on XFS \x00\xff"})
    b.dir(b"home/alice", 0o700, ALICE)
    b.dir(b"home/bob", 0o750, BOB)
    b.dir(b"home/nobody", 0o755, NOBODY)
    b.dir(b"home/big", 0o755, BIG)
    b.dir(b"home/shared", 0o3777, BOB)   # setgid + sticky directory
    b.file(b"home/alice/hello.txt", b"Hello from alice\n", 0o644, ALICE)
    b.file(b"home/alice/random.bin", S("home/random", 3 * MiB + 4097), 0o600, ALICE)
    b.file(b"home/bob/notes", b"bob's notes\n", 0o640, BOB)
    b.file(b"home/nobody/nothing", b"", 0o444, NOBODY)
    b.file(b"home/big/ids", b"uid 4000000000 gid 4000000001\n", 0o644, BIG)
    b.file(b"home/big/setuid-big", b"setuid to a big uid\n", 0o4711, BIG)
    b.sparse(SPARSE_XFS, 64 * MiB + 3, {
        1 * MiB: S("xfs-sparse/0", 5000),
        40 * MiB + 1: S("xfs-sparse/1", 70000),
        64 * MiB + 3 - 2: b"\xff\xfe",  # ends in data
    }, 0o640, ALICE)

    # hard-link groups: 2 and 3, across directories; odd names; with ACL + xattrs
    b.file(b"home/alice/pair", b"hard-link pair\n", 0o644, ALICE, xattrs={b"user.pair": b"\x01"})
    b.hardlink(b"home/bob/pair-link", b"home/alice/pair")
    b.file(b"home/shared/triple", b"hard-link triple\n", 0o664, BOB,
           acl="u:1000:rw-", xattrs={b"user.triple": b"\x00\x00\x03"})
    b.hardlink(b"home/alice/triple-a", b"home/shared/triple")
    b.hardlink(b"home/bob/" + ODD_NAMES[1], b"home/shared/triple")
    b.file(b"home/shared/empty-pair", b"")
    b.hardlink(b"home/nobody/empty-pair", b"home/shared/empty-pair")
    # two groups of 2 whose members look alike: only the grouping tells them apart
    b.file(b"home/shared/twin-1a", b"twin\n")
    b.hardlink(b"home/shared/twin-1b", b"home/shared/twin-1a")
    b.file(b"home/shared/twin-2a", b"twin\n", mtime=_mtime_ns(b"home/shared/twin-1a"))
    b.hardlink(b"home/shared/twin-2b", b"home/shared/twin-2a")

    # ACLs and xattrs on XFS
    b.dir(b"home/acl", 0o770, BOB, default_acl="u::rwx,g::rwx,o::-,u:1000:r-x,g:65534:rwx,m::rwx")
    b.file(b"home/acl/inherited", b"inherits home/acl's default ACL\n", 0o660, BOB)
    b.dir(b"home/acl/subdir", 0o770, BOB)  # inherits access + default ACL
    b.file(b"home/acl/explicit", b"explicit ACL\n", 0o600, ALICE,
           acl="u:1001:r--,g:4000000001:rw-,m::rw-", xattrs={b"user.binary": b"\x00\xff" * 100})
    b.file(b"home/xattrs", b"many xattrs\n", xattrs={
        b"user.%02d" % i: S(f"xattr/{i}", i * 7) for i in range(30)
    })
    b.dir(b"home/xattr-dir", 0o700, NOBODY, xattrs={b"user.empty": b""})

    # devices, fifo, symlinks on XFS
    b.node(b"home/alice/dev-char", stat.S_IFCHR, 0o600, (240, 1), ALICE)
    b.node(b"home/bob/fifo", stat.S_IFIFO, 0o620, owner=BOB)
    b.symlink(b"home/alice/link-rel", b"hello.txt", ALICE)
    b.symlink(b"home/alice/link-abs", b"/home/alice/hello.txt", ALICE)
    b.symlink(b"home/alice/link-dangling", b"../../nowhere", ALICE)
    b.symlink(b"home/alice/loop-a", b"loop-b")
    b.symlink(b"home/alice/loop-b", b"loop-a")
    b.symlink(b"home/alice/to-boot", b"/boot/vmlinuz")
    b.symlink(b"home/long-target", b"w" * 1023)  # XFS's longest

    # times beyond the 32-bit range on XFS (bigtime) too
    b.file(b"home/times/pre-1970", b"1901\n", mtime=-(2**31 - 1) * 1_000_000_000 + 999_999_999)
    b.file(b"home/times/y2100", b"2100\n", mtime=4102444800_000_000_001)
    b.symlink(b"home/times/link-y2040", b"y2100", mtime=2208988800_123_456_789)
    b.dir(b"home/times", mtime=-1)

    # odd names on XFS, a directory of odd names, an odd-named hard link
    for i, odd in enumerate(ODD_NAMES):
        b.file(b"home/odd/" + odd, f"odd name #{i} on XFS\n".encode(), 0o644, BOB if i % 2 else ALICE)
    b.dir(b"home/odd/" + ODD_NAMES[2] + b" dir", 0o755)
    b.hardlink(b"home/odd/" + ODD_NAMES[2] + b" dir/" + ODD_NAMES[0], b"home/odd/" + ODD_NAMES[3])

    # a directory of 5000 files (various modes, owners; a few hard links out)
    owners = ((0, 0), ALICE, BOB, NOBODY, BIG)
    b.dir(b"home/many", 0o755)
    for i in range(5000):
        b.file(b"home/many/f%04d" % i, b"%d\n" % i * (i % 5), (0o644, 0o600, 0o755, 0o444)[i % 4],
               owners[i % len(owners)])
    b.hardlink(b"home/shared/from-many-7", b"home/many/f0007")
    b.hardlink(b"home/many/zz-link-to-f4999", b"home/many/f4999")

    b.set_acl(b"home", default_acl="u::rwx,g::r-x,o::r-x,g:2002:rwx,m::rwx")


# ================================================================ comparison


def _show(rel: bytes) -> str:
    """A readable path: control characters and undecodable bytes shown as escapes."""
    text = ("/" + rel.decode("utf-8", "backslashreplace")) if rel else "/"
    return "".join(c if c.isprintable() or c == " " else c.encode("unicode_escape").decode() for c in text)


def _xattrs(path: bytes) -> dict[bytes, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):  # e.g. some filesystems on symlinks
            return {}
        raise
    values = {}
    for name in names:
        key = os.fsencode(name)
        values[key] = os.getxattr(path, key, follow_symlinks=False)
    return values


def _describe_xattr(value: bytes) -> str:
    return repr(value) if len(value) <= 64 else f"{len(value)} bytes, sha256 {hashlib.sha256(value).hexdigest()[:16]}"


def _first_difference(a: bytes, b: bytes, chunk: int = 1 << 20) -> int | None:
    """Offset of the first differing byte of two files' contents, None if equal; streams."""
    with open(a, "rb", buffering=0) as fa, open(b, "rb", buffering=0) as fb:
        offset = 0
        while True:
            da = fa.read(chunk)
            db = fb.read(chunk)
            # FUSE may return short reads: refill to equal lengths before comparing
            while len(db) < len(da):
                more = fb.read(len(da) - len(db))
                if not more:
                    break
                db += more
            while len(da) < len(db):
                more = fa.read(len(db) - len(da))
                if not more:
                    break
                da += more
            if da != db:
                n = min(len(da), len(db))
                return next((i for i in range(n) if da[i] != db[i]), n) + offset
            if not da:
                return None
            offset += len(da)


def compare_trees(expected: Path, actual: Path, *, ignore_extra: Collection[bytes] = LOST_FOUND,
                  compare_content: bool = True) -> list[str]:
    """Every difference between two trees, as readable lines; [] if they are identical.

    Compared for every entry (lstat, bytes paths, symlinks never followed):
    presence, file type, permission bits including setuid/setgid/sticky, uid,
    gid, nlink, size (not of directories: that is filesystem-specific), rdev
    of device nodes, mtime in nanoseconds, all xattrs (POSIX ACLs included, as
    system.posix_acl_access/default), symlink targets, regular files' bytes,
    and hard links: the partition of non-directories into groups sharing an
    inode must be the same on both sides.  Not compared: atime, ctime, block
    counts, inode numbers themselves, directory sizes.

    ``ignore_extra``: paths (relative, bytes) of directories that may exist in
    ``actual`` only -- by default exactly the lost+found directories mkfs.ext4
    makes in the fidelity guest's ext4 roots (see LOST_FOUND).  Their parent's
    nlink is compared without them.  ``compare_content=False`` skips reading
    regular files (for quick looks; the tests always compare content).
    """
    diffs: list[str] = []
    exp_root, act_root = os.fsencode(expected), os.fsencode(actual)
    # (st_dev, st_ino) -> relative paths of all non-directories (so that two
    # distinct files shown with one inode number are caught too)
    groups: tuple[dict[tuple[int, int], list[bytes]], dict[tuple[int, int], list[bytes]]] = ({}, {})
    inode_of: tuple[dict[bytes, tuple[int, int]], dict[bytes, tuple[int, int]]] = ({}, {})

    def join(root: bytes, rel: bytes) -> bytes:
        return root + b"/" + rel if rel else root

    def child_of(rel: bytes, name: bytes) -> bytes:
        return rel + b"/" + name if rel else name

    def listing(path: bytes, rel: bytes, side: str) -> list[bytes] | None:
        try:
            with os.scandir(path) as it:
                return sorted(e.name for e in it)
        except OSError as exc:
            diffs.append(f"{_show(rel)}: cannot list {side} directory: {exc.strerror} (errno {exc.errno})")
            return None

    def compare(rel: bytes, ignored_children: int = 0) -> None:
        where = _show(rel)
        e_path, a_path = join(exp_root, rel), join(act_root, rel)
        try:
            e = os.lstat(e_path)
        except OSError as exc:
            diffs.append(f"{where}: cannot lstat expected: {exc.strerror}")
            return
        try:
            a = os.lstat(a_path)
        except OSError as exc:
            diffs.append(f"{where}: cannot lstat actual: {exc.strerror} (errno {exc.errno})")
            return

        def differ(what: str, e_val: object, a_val: object) -> None:
            if e_val != a_val:
                diffs.append(f"{where}: {what}: expected {e_val}, got {a_val}")

        e_type, a_type = stat.S_IFMT(e.st_mode), stat.S_IFMT(a.st_mode)
        if e_type != a_type:
            diffs.append(f"{where}: file type: expected {stat.filemode(e.st_mode)[0]!r} ({e_type:#o}), "
                         f"got {stat.filemode(a.st_mode)[0]!r} ({a_type:#o})")
            return
        is_dir = stat.S_ISDIR(e.st_mode)
        differ("mode", f"{stat.S_IMODE(e.st_mode):04o}", f"{stat.S_IMODE(a.st_mode):04o}")
        differ("uid", e.st_uid, a.st_uid)
        differ("gid", e.st_gid, a.st_gid)
        differ("nlink", e.st_nlink, a.st_nlink - ignored_children)
        if not is_dir:
            differ("size", e.st_size, a.st_size)
        if e_type in (stat.S_IFCHR, stat.S_IFBLK):
            differ("rdev", f"{os.major(e.st_rdev)},{os.minor(e.st_rdev)}", f"{os.major(a.st_rdev)},{os.minor(a.st_rdev)}")
        differ("mtime_ns", e.st_mtime_ns, a.st_mtime_ns)

        try:
            e_x = _xattrs(e_path)
        except OSError as exc:
            diffs.append(f"{where}: cannot read expected xattrs: {exc.strerror}")
            e_x = None
        try:
            a_x = _xattrs(a_path)
        except OSError as exc:
            diffs.append(f"{where}: cannot read actual xattrs: {exc.strerror} (errno {exc.errno})")
            a_x = None
        if e_x is not None and a_x is not None:
            for name in sorted(e_x.keys() | a_x.keys()):
                shown = name.decode("utf-8", "backslashreplace")
                if name not in a_x:
                    diffs.append(f"{where}: xattr {shown}: missing (expected {_describe_xattr(e_x[name])})")
                elif name not in e_x:
                    diffs.append(f"{where}: xattr {shown}: unexpected (value {_describe_xattr(a_x[name])})")
                elif e_x[name] != a_x[name]:
                    diffs.append(f"{where}: xattr {shown}: expected {_describe_xattr(e_x[name])}, "
                                 f"got {_describe_xattr(a_x[name])}")

        if not is_dir:
            for side, st in enumerate((e, a)):
                groups[side].setdefault((st.st_dev, st.st_ino), []).append(rel)
                inode_of[side][rel] = (st.st_dev, st.st_ino)

        if stat.S_ISLNK(e.st_mode):
            try:
                differ("symlink target", os.readlink(e_path), os.readlink(a_path))
            except OSError as exc:
                diffs.append(f"{where}: cannot read symlink: {exc.strerror} (errno {exc.errno})")
        elif stat.S_ISREG(e.st_mode) and compare_content and e.st_size == a.st_size:
            try:
                offset = _first_difference(e_path, a_path)
            except OSError as exc:
                diffs.append(f"{where}: cannot read content: {exc.strerror} (errno {exc.errno})")
            else:
                if offset is not None:
                    diffs.append(f"{where}: content differs from byte {offset}")
        elif is_dir:
            e_names, a_names = listing(e_path, rel, "expected"), listing(a_path, rel, "actual")
            if e_names is None or a_names is None:
                return
            a_set, e_set = set(a_names), set(e_names)
            for name in e_names:
                if name not in a_set:
                    diffs.append(f"{_show(child_of(rel, name))}: missing")
            for name in a_names:
                child = child_of(rel, name)
                if name in e_set:
                    continue
                a_child = join(act_root, child)
                if child in ignore_extra and os.path.isdir(a_child) and not os.path.islink(a_child):
                    continue
                diffs.append(f"{_show(child)}: unexpected entry")
            for name in e_names:
                if name in a_set:
                    child = child_of(rel, name)
                    compare(child, _ignored_dirs_in(act_root, child, ignore_extra, join(exp_root, child)))

    compare(b"", _ignored_dirs_in(act_root, b"", ignore_extra, exp_root))

    # Hard links: each path's group (the paths sharing its inode) must be the same on both sides.
    seen: set[tuple[frozenset[bytes], frozenset[bytes]]] = set()
    for rel in sorted(inode_of[0].keys() & inode_of[1].keys()):
        e_group = frozenset(groups[0][inode_of[0][rel]])
        a_group = frozenset(groups[1][inode_of[1][rel]])
        if e_group != a_group and (e_group, a_group) not in seen:
            seen.add((e_group, a_group))
            diffs.append(f"{_show(rel)}: hard links: expected one inode for "
                         f"[{', '.join(map(_show, sorted(e_group)))}], got one inode for "
                         f"[{', '.join(map(_show, sorted(a_group)))}]")
    return diffs


def _ignored_dirs_in(act_root: bytes, rel: bytes, ignore_extra: Collection[bytes], e_path: bytes) -> int:
    """How many ignorable extra directories ``rel`` has in the actual tree (they count in its nlink)."""
    count = 0
    for extra in ignore_extra:
        parent, _, name = extra.rpartition(b"/")
        if parent != rel:
            continue
        a_child = (act_root + b"/" + extra)
        if os.path.isdir(a_child) and not os.path.islink(a_child) and not os.path.lexists(e_path + b"/" + name):
            count += 1
    return count


# ================================================================ building


def recipe_hash() -> str:
    """Hash of this file and tests/images.py (whose helpers build the image)."""
    return images.recipe_hash(Path(__file__))


def image_path() -> Path:
    return images.IMAGE_DIR / f"{RECIPE}-{recipe_hash()}.qcow2"


def source_path() -> Path:
    """The cached source tree (the guest's whole OS tree, all filesystems)."""
    return images.IMAGE_DIR / f"{RECIPE}-{recipe_hash()}.src" / "tree"


def _fs_of(rel: bytes) -> images.Filesystem:
    for fs in (BOOT, HOME):
        mp = fs.mountpoint.lstrip("/").encode()  # type: ignore[union-attr]
        if rel == mp or rel.startswith(mp + b"/"):
            return fs
    return ROOT


def _walk(root: bytes, rel: bytes = b"") -> Iterator[bytes]:
    """Relative paths of everything below root, parents first, never following symlinks."""
    with os.scandir(root + b"/" + rel if rel else root) as it:
        entries = sorted((e.name, e.is_dir(follow_symlinks=False)) for e in it)
    for name, is_dir in entries:
        child = rel + b"/" + name if rel else name
        yield child
        if is_dir:
            yield from _walk(root, child)


def filesystem_members(source: Path) -> dict[images.Filesystem, list[tuple[bytes, bytes]]]:
    """Each guest filesystem's entries: (path relative to the source tree, name in that filesystem).

    Names are relative to the filesystem's root ("." is the root itself, parents
    come first).  A mountpoint directory is in both its parent filesystem (the
    directory the filesystem is mounted on) and, as ".", in its own.
    """
    src = os.fsencode(source)
    members: dict[images.Filesystem, list[tuple[bytes, bytes]]] = {
        fs: [(fs.mountpoint.lstrip("/").encode(), b".")] for fs in FILESYSTEMS  # type: ignore[union-attr]
    }
    for rel in _walk(src):
        fs = _fs_of(rel)
        mp = fs.mountpoint.lstrip("/").encode()  # type: ignore[union-attr]
        if rel == mp:
            members[ROOT].append((rel, b"./" + rel))
        else:
            members[fs].append((rel, b"./" + (rel[len(mp) + 1:] if mp else rel)))
    return members


def make_tarballs(source: Path, workdir: Path) -> dict[images.Filesystem, Path]:
    """One pax tarball per guest filesystem (see filesystem_members), made by GNU tar.

    ACLs are in the tarballs too, but GNU tar writes them as text with user
    and group *names* of the host (acl_to_text), which the appliance cannot
    resolve: _set_acls() copies them as raw xattrs instead.
    """
    tarballs = {}
    for fs, members in filesystem_members(source).items():
        mp = fs.mountpoint.lstrip("/")  # type: ignore[union-attr]
        listfile = workdir / f"{fs.label}.list"
        listfile.write_bytes(b"".join(name + b"\0" for _, name in members))
        tarball = workdir / f"{fs.label}.tar"
        subprocess.run(
            ["tar", "--create", "--file", str(tarball), "--format=posix", "--xattrs", "--xattrs-include=*",
             "--acls", "--sparse", "--numeric-owner", "--no-recursion", "--directory", str(source / mp),
             "--null", "--verbatim-files-from", "--files-from", str(listfile)],
            check=True, stdin=subprocess.DEVNULL, capture_output=True,
        )
        tarballs[fs] = tarball
    return tarballs


ACL_XATTRS = {"access": b"system.posix_acl_access", "default": b"system.posix_acl_default"}
_ACL_TAGS = {0x01: "u:", 0x02: "u:{id}", 0x04: "g:", 0x08: "g:{id}", 0x10: "m:", 0x20: "o:"}


def acl_text(xattr_value: bytes) -> str:
    """A POSIX ACL xattr value (the kernel's binary format) as ACL text with numeric ids."""
    version = int.from_bytes(xattr_value[:4], "little")
    if version != 2 or (len(xattr_value) - 4) % 8:
        raise ValueError(f"not a POSIX ACL xattr value: {xattr_value!r}")
    entries = []
    for offset in range(4, len(xattr_value), 8):
        tag = int.from_bytes(xattr_value[offset:offset + 2], "little")
        perm = int.from_bytes(xattr_value[offset + 2:offset + 4], "little")
        ident = int.from_bytes(xattr_value[offset + 4:offset + 8], "little")
        bits = "".join(c if perm & bit else "-" for c, bit in (("r", 4), ("w", 2), ("x", 1)))
        entries.append(_ACL_TAGS[tag].format(id=ident) + ":" + bits)
    return ",".join(entries)


def _set_acls(g, source: Path, fs: images.Filesystem, members: list[tuple[bytes, bytes]]) -> int:
    """Copy the POSIX ACLs of fs's entries from the source, with numeric ids; returns how many.

    (The Python binding of lsetxattr takes str values, so raw ACL xattrs,
    which hold NUL bytes, cannot be copied as they are.)
    """
    src = os.fsencode(source)
    done: set[tuple[int, int]] = set()
    count = 0
    for rel, name in members:
        path = src + b"/" + rel if rel else src
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode) or (st.st_dev, st.st_ino) in done:
            continue
        done.add((st.st_dev, st.st_ino))
        names = set(os.listxattr(path, follow_symlinks=False))
        for acltype, xattr in ACL_XATTRS.items():
            if os.fsdecode(xattr) not in names:
                continue
            text = acl_text(os.getxattr(path, xattr, follow_symlinks=False))
            guest = os.path.normpath(os.path.join(fs.mountpoint or "/", name.decode("utf-8")))
            g.acl_set_file(guest, acltype, text)
            count += 1
    return count


def _build_image(source: Path, target: Path, log: Callable[[str], None]) -> None:
    with tempfile.TemporaryDirectory(prefix="virtmount-fidelity-") as work:
        start = time.monotonic()
        tarballs = make_tarballs(source, Path(work))
        members = filesystem_members(source)
        log(f"tarballs in {time.monotonic() - start:.1f}s: "
            + ", ".join(f"{fs.mountpoint} {p.stat().st_size // 1024} KiB" for fs, p in tarballs.items()))
        g = images.new_handle()
        try:
            g.disk_create(str(target), "qcow2", SPEC.size)
            g.add_drive_opts(str(target), format="qcow2", readonly=False)
            g.launch()
            sector = 512
            first = MiB // sector
            boot_end = first + BOOT.size_mib * MiB // sector - 1
            g.part_init("/dev/sda", "gpt")
            g.part_add("/dev/sda", "p", first, boot_end)
            g.part_add("/dev/sda", "p", boot_end + 1, -(MiB // sector))
            g.part_set_name("/dev/sda", 1, "boot")
            g.part_set_name("/dev/sda", 2, "lvm")
            g.pvcreate("/dev/sda2")
            g.vgcreate(VG, ["/dev/sda2"])
            g.lvcreate("root", VG, ROOT.size_mib)
            g.lvcreate("home", VG, HOME.size_mib)
            for fs in FILESYSTEMS:
                images._mkfs(g, fs)
            # Root first: its tarball makes the mountpoint directories; then
            # each filesystem mounted there gets its own tree ("." included).
            # Setting an ACL changes no mtime, so doing it after tar is fine.
            for fs in (ROOT, BOOT, HOME):
                assert fs.mountpoint
                g.mount(fs.device, fs.mountpoint)
                g.tar_in(str(tarballs[fs]), fs.mountpoint, xattrs=True)
                acls = _set_acls(g, source, fs, members[fs])
                log(f"{fs.mountpoint}: {len(members[fs])} entries, {acls} ACLs")
            g.umount_all()
            g.sync()
            images._check_inspection(g, SPEC)
            _check_clean(g)
            g.shutdown()
        finally:
            g.close()


def _check_clean(g) -> None:
    """Every filesystem must have been unmounted cleanly (no journal to replay)."""
    for fs in FILESYSTEMS:
        if fs.fstype == "ext4":
            info = g.tune2fs_l(fs.device)
            state = info.get("Filesystem state")
            features = info.get("Filesystem features", "")
            if state != "clean" or "needs_recovery" in features:
                raise images.ImageBuildError(f"{fs.device}: not unmounted cleanly: state {state!r}, "
                                             f"features {features!r}")
        elif fs.fstype == "xfs":
            status = g.xfs_repair(fs.device, nomodify=True)
            if status != 0:
                raise images.ImageBuildError(f"{fs.device}: xfs_repair -n exited with {status}")


def _build_source(final: Path, log: Callable[[str], None]) -> None:
    """Make the source tree at final (= <dir>/tree), atomically (rename of <dir>)."""
    start = time.monotonic()
    holder = Path(tempfile.mkdtemp(dir=images.IMAGE_DIR, prefix=f".{RECIPE}-", suffix=".src.tmp"))
    try:
        make_source_tree(holder / "tree")
        holder.chmod(0o700)
        holder.rename(final.parent)  # the tree's own times are untouched
    except BaseException:
        shutil.rmtree(holder, ignore_errors=True)
        raise
    log(f"source tree {final} in {time.monotonic() - start:.1f}s")


def _remove_stale(keep: set[Path]) -> None:
    """Images and source trees of older recipes, leftovers of interrupted builds (call with the lock held)."""
    for old in [*images.IMAGE_DIR.glob(f"{RECIPE}-*.qcow2"), *images.IMAGE_DIR.glob(f"{RECIPE}-*.src"),
                *images.IMAGE_DIR.glob(f".{RECIPE}-*.tmp")]:
        if old in keep:
            continue
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def ensure_source(*, log: Callable[[str], None] | None = None) -> Path:
    """The cached source tree, made if missing (no image needed)."""
    source = source_path()
    if source.exists():
        return source
    with images.locked(RECIPE):
        if not source.exists():
            _build_source(source, log or (lambda _msg: None))
    return source


def build(*, log: Callable[[str], None] | None = None) -> tuple[Path, Path]:
    """The cached (image, source tree), building what is missing."""
    say = log or (lambda _msg: None)
    image, source = image_path(), source_path()
    if image.exists() and source.exists():
        return image, source
    with images.locked(RECIPE):
        if not source.exists():
            _build_source(source, say)
        if not image.exists():
            start = time.monotonic()
            images.write_atomically(RECIPE, image, lambda tmp: _build_image(source, tmp, say))
            say(f"image {image} in {time.monotonic() - start:.1f}s")
        _remove_stale({image, source.parent})
    return image, source


def ensure_guest(uri: str) -> tuple[str, Path]:
    """Build (or find) the image and source tree; define the shut-off domain; (domain name, source tree)."""
    image, source = build()
    images.ensure_domain(uri, DOMAIN_NAME, image)
    return DOMAIN_NAME, source


def main(argv: list[str]) -> int:
    if argv[:1] == ["compare"] and len(argv) == 3:
        diffs = compare_trees(Path(argv[1]), Path(argv[2]))
        print("\n".join(diffs) or "no differences")
        return 1 if diffs else 0
    if argv:
        print("usage: python -m tests.fidelity [compare EXPECTED ACTUAL]", file=sys.stderr)
        return 2
    image, source = build(log=print)
    print(image)
    print(source)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
