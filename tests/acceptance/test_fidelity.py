"""Fidelity: fs/ of a guest shows exactly the tree the guest image was made from.

The guest (tests/fidelity.py) holds hard-link groups, all kinds of symlinks,
fifos, device nodes, setuid/setgid/sticky bits, ACLs, binary user xattrs, odd
names, a 40-deep and a 5000-file directory, sparse files, nanosecond mtimes
and many owners, on ext4 (/, /boot) and XFS (/home) over LVM.  Both a strict
walk of fs/ and an ``rsync -aHAXS`` copy of it must equal the source tree.

The tests of compare_trees() itself (no libvirt needed, root needed) show
that the comparison sees each kind of difference, and that it finds none
between the source tree and a local rsync copy of it.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Callable

import pytest

from tests import fidelity
from tests.acceptance.conftest import unmount
from tests.acceptance.helpers import mount_foreground

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown, mknod, trusted namespace)")
RSYNC = ["rsync", "-aHAXS", "--numeric-ids"]


def _report(diffs: list[str], limit: int = 100) -> str:
    shown = "\n".join(diffs[:limit])
    more = f"\n... and {len(diffs) - limit} more" if len(diffs) > limit else ""
    return f"{len(diffs)} differences:\n{shown}{more}"


# ---------------------------------------------------------------- the guest


@pytest.fixture(scope="session")
def fidelity_guest(libvirtd: str) -> tuple[str, Path]:
    """Shut-off domain virtmount-test-fidelity: (domain name, source tree it was made from).

    The image and the source tree are built on first use (about 1.5 min
    under TCG) and cached in tests.images.IMAGE_DIR.
    """
    return fidelity.ensure_guest(libvirtd)


@pytest.fixture
def fs_dir(fidelity_guest: tuple[str, Path], mounted: Path) -> Path:
    name, _source = fidelity_guest
    return mounted / "domains" / name / "fs"


@pytest.mark.acceptance
def test_strict_walk_matches_source(fidelity_guest: tuple[str, Path], fs_dir: Path) -> None:
    _name, source = fidelity_guest
    diffs = fidelity.compare_trees(source, fs_dir)
    assert diffs == [], _report(diffs)


@pytest.mark.acceptance
def test_whole_subtree_listings_match_source(fidelity_guest: tuple[str, Path], libvirtd: str,
                                             tmp_path_factory: pytest.TempPathFactory) -> None:
    """On a mount of its own (nothing listed yet), find(1) walks first, as backup tools scan: its walk is
    served by whole-subtree listings (find in the appliance, guestfs/subtree.py) rather than directory
    by directory, and the strict walk after it must see the same tree, every time stamp included (find
    prints those before 1970 its own way)."""
    name, source = fidelity_guest
    mountpoint = tmp_path_factory.mktemp("virtmount-fidelity-walker")
    mount_foreground(libvirtd, mountpoint, "idle=600")
    try:
        fs = mountpoint / "domains" / name / "fs"
        subprocess.run(["find", str(fs)], check=True, stdout=subprocess.DEVNULL, timeout=600)
        diffs = fidelity.compare_trees(source, fs)
    finally:
        unmount(mountpoint)
    log = mountpoint.with_suffix(".log").read_text()
    assert "as a whole" in log, log[-3000:]
    assert diffs == [], _report(diffs)


@pytest.mark.acceptance
def test_rsync_copy_matches_source(fidelity_guest: tuple[str, Path], fs_dir: Path, tmp_path: Path) -> None:
    _name, source = fidelity_guest
    copy = tmp_path / "copy"
    result = subprocess.run([*RSYNC, f"{fs_dir}/", f"{copy}/"], capture_output=True, text=True,
                            errors="backslashreplace", timeout=1200, stdin=subprocess.DEVNULL)
    try:
        assert result.returncode == 0, f"rsync exited with {result.returncode}:\n{result.stderr[-5000:]}"
        diffs = fidelity.compare_trees(source, copy)
        assert diffs == [], _report(diffs)
    finally:
        shutil.rmtree(copy, ignore_errors=True)  # setuid files, device nodes, 1 GiB (sparse)


@pytest.mark.acceptance
def test_rsync_of_a_fresh_mount_gets_the_xattrs_of_whole_subtrees(
        fidelity_guest: tuple[str, Path], libvirtd: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    """On a mount of its own, rsync -X reads every entry's xattrs as it walks: the walked subtrees' xattrs
    come in one dump each (getfattr in the appliance, guestfs/subtree_xattrs.py), and the copy is exact.
    fs/ is listed first: until its appliance has booted once, stat(2) of fs/ itself shows a stand-in
    (README, "Not done yet"), and rsync would give the copy's top directory that mode and time."""
    name, source = fidelity_guest
    mountpoint = tmp_path_factory.mktemp("virtmount-fidelity-xattrs")
    copy = tmp_path_factory.mktemp("virtmount-fidelity-xattrs-copy")
    mount_foreground(libvirtd, mountpoint, "idle=600")
    try:
        os.listdir(mountpoint / "domains" / name / "fs")
        result = subprocess.run([*RSYNC, f"{mountpoint}/domains/{name}/fs/", f"{copy}/"], capture_output=True,
                                text=True, errors="backslashreplace", timeout=1200, stdin=subprocess.DEVNULL)
    finally:
        unmount(mountpoint)
    try:
        assert result.returncode == 0, f"rsync exited with {result.returncode}:\n{result.stderr[-5000:]}"
        log = mountpoint.with_suffix(".log").read_text()
        assert "entries have some" in log and "directory by directory" not in log, log[-3000:]
        diffs = fidelity.compare_trees(source, copy)
        assert diffs == [], _report(diffs)
    finally:
        shutil.rmtree(copy, ignore_errors=True)


@pytest.mark.acceptance
@pytest.mark.parametrize("path, size", [(fidelity.SPARSE_1G, fidelity.GiB),
                                        (fidelity.SPARSE_XFS, 64 * fidelity.MiB + 3)])
def test_sparse_files_are_sparse_in_guest(fs_dir: Path, path: bytes, size: int) -> None:
    """The sparse files were stored with holes (well under 1 MiB allocated), not written out."""
    st = os.lstat(fs_dir / os.fsdecode(path))
    assert st.st_size == size
    assert 0 < st.st_blocks * 512 < fidelity.MiB, st


# ---------------------------------------------------------------- the comparison itself


@needs_root
def test_source_tree_equals_local_rsync_copy(tmp_path: Path) -> None:
    """The comparison is not stricter than a faithful copy: rsync of the source is equal to it."""
    source = fidelity.ensure_source()
    copy = tmp_path / "copy"
    subprocess.run([*RSYNC, f"{source}/", f"{copy}/"], check=True, capture_output=True, timeout=600)
    try:
        diffs = fidelity.compare_trees(source, copy)
        assert diffs == [], _report(diffs)
        assert fidelity.compare_trees(source, source) == []
    finally:
        shutil.rmtree(copy, ignore_errors=True)


BIG = 3 * fidelity.MiB + 5  # streamed in chunks by compare_trees
TWIN_MTIME = 1_234_567_890_123_456_789


def _small_tree(root: Path) -> None:
    b = fidelity.TreeBuilder(root)
    b.dir(b"", 0o755)
    b.file(b"file", b"content\n", 0o644, (1000, 1000), xattrs={b"user.bin": b"\x00\xff"})
    b.file(b"big", fidelity.images.pseudo_random("big", BIG))
    b.file(b"acl-file", b"acl\n", 0o640, acl="u:1001:r--")
    b.dir(b"dir", 0o750, (1001, 2002), default_acl="u::rwx,g::r-x,o::-,g:2002:rwx")
    b.file(b"dir/inner", b"inner\n")
    b.file(b"h1", b"linked\n")
    b.hardlink(b"dir/h2", b"h1")
    for twin in (b"a", b"b"):  # two look-alike hard-link pairs
        b.file(twin + b"1", b"twin\n", mtime=TWIN_MTIME)
        b.hardlink(twin + b"2", twin + b"1")
    b.symlink(b"link", b"target-1")
    b.node(b"fifo", stat.S_IFIFO, 0o644)
    b.node(b"chr", stat.S_IFCHR, 0o600, (240, 7))
    b.dir(b"sub")
    b.file(b"\xff odd\nname", b"odd\n")
    b.finish()


def _replace_with_copy(root: Path, name: str) -> None:
    """Turn one link of a hard-link group into an identical separate file."""
    path = root / name
    tmp = root / ".copy"  # not made in path's directory: it may have a default ACL
    shutil.copy2(path, tmp)
    st = os.lstat(path)
    os.chown(tmp, st.st_uid, st.st_gid)
    os.chmod(tmp, stat.S_IMODE(st.st_mode))
    os.replace(tmp, path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _append(path: Path) -> None:
    st = os.lstat(path)
    with open(path, "ab") as f:
        f.write(b"x")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _relink(root: Path, pairs: list[tuple[str, str]]) -> None:
    for new, existing in pairs:
        os.unlink(root / new)
        os.link(root / existing, root / new)


def _flip_byte(path: Path, offset: int) -> None:
    st = os.lstat(path)
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 1]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _retarget(root: Path) -> None:
    os.unlink(root / "link")
    os.symlink("target-2", root / "link")
    os.utime(root / "link", ns=(0, os.lstat(root.parent / "expected" / "link").st_mtime_ns), follow_symlinks=False)


def _fifo_to_file(root: Path) -> None:
    os.unlink(root / "fifo")
    (root / "fifo").write_bytes(b"")


def _other_device(root: Path) -> None:
    os.unlink(root / "chr")
    os.mknod(root / "chr", stat.S_IFCHR | 0o600, os.makedev(240, 8))
    os.utime(root / "chr", ns=(0, os.lstat(root.parent / "expected" / "chr").st_mtime_ns))


# mutation of the actual tree -> fragments, each in exactly one of the differences reported
MUTATIONS: dict[str, tuple[Callable[[Path], object], list[str]]] = {
    "nothing": (lambda a: None, []),
    "mode": (lambda a: os.chmod(a / "file", 0o4644), ["/file: mode: expected 0644, got 4644"]),
    "sticky dir": (lambda a: os.chmod(a / "sub", 0o1755), ["/sub: mode: expected 0755, got 1755"]),
    "uid": (lambda a: os.chown(a / "file", 1001, -1), ["/file: uid: expected 1000, got 1001"]),
    "gid": (lambda a: os.chown(a / "file", -1, 4000000000), ["/file: gid: expected 1000, got 4000000000"]),
    "mtime 1 ns": (lambda a: os.utime(a / "file", ns=(0, os.lstat(a / "file").st_mtime_ns + 1)),
                   ["/file: mtime_ns"]),
    "directory mtime": (lambda a: os.utime(a / "dir", ns=(0, 5)), ["/dir: mtime_ns: expected"]),
    "symlink mtime": (lambda a: os.utime(a / "link", ns=(0, 5), follow_symlinks=False), ["/link: mtime_ns"]),
    "content": (lambda a: _flip_byte(a / "big", BIG - 2), [f"/big: content differs from byte {BIG - 2}"]),
    "size": (lambda a: _append(a / "file"), ["/file: size: expected 8, got 9"]),
    "xattr value": (lambda a: os.setxattr(a / "file", "user.bin", b"\x00\xfe"), ["/file: xattr user.bin: expected"]),
    "xattr missing": (lambda a: os.removexattr(a / "file", "user.bin"), ["/file: xattr user.bin: missing"]),
    "xattr extra": (lambda a: os.setxattr(a / "dir/inner", "user.new", b""), ["/dir/inner: xattr user.new: unexpected"]),
    "trusted xattr extra": (lambda a: os.setxattr(a / "sub", "trusted.SGI_ACL_FILE", b"\0"),
                            ["/sub: xattr trusted.SGI_ACL_FILE: unexpected"]),
    "access ACL": (lambda a: subprocess.run(["setfacl", "-m", "u:1001:rw-", a / "acl-file"], check=True),
                   ["/acl-file: xattr system.posix_acl_access: expected", "/acl-file: mode: expected 0640, got 0660"]),
    "ACL removed": (lambda a: subprocess.run(["setfacl", "-b", a / "acl-file"], check=True),
                    ["/acl-file: xattr system.posix_acl_access: missing"]),
    "default ACL": (lambda a: subprocess.run(["setfacl", "-d", "-m", "u:1000:r--", a / "dir"], check=True),
                    ["/dir: xattr system.posix_acl_default: expected"]),
    "hard link broken": (lambda a: _replace_with_copy(a, "dir/h2"),
                         ["/h1: nlink: expected 2, got 1", "/dir/h2: nlink: expected 2, got 1",
                          "/dir/h2: hard links: expected one inode for [/dir/h2, /h1], got one inode for [/dir/h2]",
                          "/h1: hard links: expected one inode for [/dir/h2, /h1], got one inode for [/h1]"]),
    "hard links regrouped": (lambda a: _relink(a, [("b1", "a1"), ("a2", "b2")]),
                             ["/a1: hard links: expected one inode for [/a1, /a2], got one inode for [/a1, /b1]",
                              "/a2: hard links", "/b1: hard links", "/b2: hard links"]),
    "symlink target": (_retarget, ["/link: symlink target: expected b'target-1', got b'target-2'"]),
    "file type": (_fifo_to_file, ["/fifo: file type: expected 'p'"]),
    "rdev": (lambda a: _other_device(a), ["/chr: rdev: expected 240,7, got 240,8"]),
    "missing entry": (lambda a: os.unlink(a / "dir/inner"), ["/dir/inner: missing"]),
    "missing odd name": (lambda a: os.unlink(os.fsencode(a) + b"/\xff odd\nname"), ["/\\xff odd\\nname: missing"]),
    "extra entry": (lambda a: (a / "sub/new").write_bytes(b""), ["/sub/new: unexpected entry"]),
    "extra directory": (lambda a: (a / "sub/d").mkdir(), ["/sub/d: unexpected entry", "/sub: nlink: expected 2, got 3"]),
    # lost+found is ignored at the guest's ext4 roots only
    "lost+found at the root": (lambda a: (a / "lost+found").mkdir(), []),
    "lost+found elsewhere": (lambda a: (a / "sub/lost+found").mkdir(),
                             ["/sub/lost+found: unexpected entry", "/sub: nlink: expected 2, got 3"]),
    "lost+found as a file": (lambda a: (a / "lost+found").write_bytes(b""), ["/lost+found: unexpected entry"]),
}


@needs_root
@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_compare_trees_sees_each_difference(tmp_path: Path, mutation: str) -> None:
    mutate, fragments = MUTATIONS[mutation]
    expected, actual = tmp_path / "expected", tmp_path / "actual"
    _small_tree(expected)
    _small_tree(actual)
    # Mutate, then put the directories' mtimes back so only the intended difference remains.
    dirs = [p for p in [actual, *actual.rglob("*")] if p.is_dir() and not p.is_symlink()]
    mtimes = {p: os.lstat(p).st_mtime_ns for p in dirs}
    mutate(actual)
    for p, ns in mtimes.items():
        if mutation != "directory mtime" and p.exists():
            os.utime(p, ns=(ns, ns))
    diffs = fidelity.compare_trees(expected, actual)
    for fragment in fragments:
        matching = [d for d in diffs if fragment in d]
        assert len(matching) == 1, (fragment, diffs)
    assert len(diffs) == len(fragments), diffs


@needs_root
def test_compare_trees_sees_merged_hard_link_groups(tmp_path: Path) -> None:
    """Two groups shown as one inode: grouping and nlink differences; subtrees compare too."""
    expected, actual = tmp_path / "expected", tmp_path / "actual"
    _small_tree(expected)
    _small_tree(actual)
    assert fidelity.compare_trees(expected / "dir", actual / "dir") == []
    _relink(actual, [("b1", "a1")])
    os.unlink(actual / "b2")
    os.link(actual / "a2", actual / "b2")  # a1, a2, b1, b2: one inode, nlink 4
    diffs = fidelity.compare_trees(expected, actual)
    assert any("hard links" in d for d in diffs), diffs
    assert any("/a1: nlink: expected 2, got 4" in d for d in diffs), diffs
