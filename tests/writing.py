"""Helpers for the -o rw tests: a scratch guest of one's own, the system calls Python lacks, an
independent reader of a guest image (libguestfs, its own appliance), fio runs, and a tree to untar with
the manifest that says whether two trees are identical."""

from __future__ import annotations

import ctypes
import hashlib
import json
import random
import os
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests import images

AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
UTIME_OMIT = (1 << 30) - 2

_libc = ctypes.CDLL(None, use_errno=True)


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def renameat2(old: Path, new: Path, flags: int) -> None:
    """renameat2(2); OSError with its errno."""
    if _libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags) != 0:
        number = ctypes.get_errno()
        raise OSError(number, os.strerror(number), str(old))


def utimensat(path: Path, atime: tuple[int, int], mtime: tuple[int, int]) -> None:
    """utimensat(2) without following a symlink; a nanoseconds field of UTIME_OMIT leaves that time alone."""
    times = (_Timespec * 2)(_Timespec(*atime), _Timespec(*mtime))
    if _libc.utimensat(AT_FDCWD, os.fsencode(path), times, 0x100) != 0:  # AT_SYMLINK_NOFOLLOW
        number = ctypes.get_errno()
        raise OSError(number, os.strerror(number), str(path))


@dataclass(frozen=True)
class ScratchGuest:
    """A shut-off domain whose only disk is a qcow2 overlay of a cached test image: writes to it never
    reach the shared cached image."""

    name: str
    uri: str
    disk: Path
    spec: images.ImageSpec


def make_scratch_guest(uri: str, name: str, spec: images.ImageSpec) -> ScratchGuest:
    base = images.build(spec)
    disk = base.parent / f"{name}-{os.getpid()}.qcow2"
    disk.unlink(missing_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base), str(disk)],
                   check=True)
    images.ensure_domain(uri, name, disk)
    return ScratchGuest(name, uri, disk, spec)


def remove_scratch_guest(guest: ScratchGuest) -> None:
    subprocess.run(["virsh", "-q", "-c", guest.uri, "destroy", guest.name], capture_output=True)
    subprocess.run(["virsh", "-q", "-c", guest.uri, "undefine", guest.name], capture_output=True)
    guest.disk.unlink(missing_ok=True)


def guestfs_handle(disk: Path, *, readonly: bool) -> Any:
    """A libguestfs handle (direct backend, TCG) with ``disk`` added; not launched yet."""
    handle = images.new_handle()
    handle.add_drive_opts(str(disk), format="qcow2", readonly=readonly)
    return handle


class FileModel:
    """What a few files in one directory must hold after random operations through open descriptors and
    names: the reference a randomized test compares every read and stat with (hard links share an inode,
    a removed file stays open)."""

    def __init__(self, directory: Path, seed: int) -> None:
        self.directory = directory
        self.random = random.Random(seed)
        self.names: dict[str, bytearray] = {}  # name -> inode content (shared by hard links)
        self.fds: dict[int, bytearray] = {}  # open descriptor -> inode content
        self.log: list[str] = []

    def step(self) -> None:
        """One random operation, checked against the model."""
        r = self.random
        choice = r.random()
        if not self.names or choice < 0.08:
            name = f"f{r.randrange(6)}"
            if name not in self.names:
                self._do(f"create {name}")
                fd = os.open(self.directory / name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
                self.names[name] = self.fds[fd] = bytearray()
            return
        fd = r.choice(list(self.fds))
        content = self.fds[fd]
        name = r.choice(list(self.names))
        if choice < 0.40:
            offset, data = r.randrange(len(content) + 70_000), r.randbytes(r.choice((1, 100, 4096, 70_000, 300_000)))
            self._do(f"pwrite fd{fd} {len(data)}@{offset}")
            assert os.pwrite(fd, data, offset) == len(data)
            content.extend(bytes(max(0, offset + len(data) - len(content))))
            content[offset:offset + len(data)] = data
        elif choice < 0.65:
            offset, size = r.randrange(len(content) + 10), r.choice((1, 4096, 131072, 1 << 20))
            self._do(f"pread fd{fd} {size}@{offset}")
            assert os.pread(fd, size, offset) == bytes(content[offset:offset + size]), self.log[-8:]
        elif choice < 0.72:
            size = r.randrange(len(content) + 10_000)
            self._do(f"ftruncate fd{fd} {size}")
            os.ftruncate(fd, size)
            del content[size:]
            content.extend(bytes(size - len(content)))
        elif choice < 0.82:
            self._do(f"check {name}")
            expected = self.names[name]
            assert os.stat(self.directory / name).st_size == len(expected), self.log[-8:]
            assert (self.directory / name).read_bytes() == bytes(expected), self.log[-8:]
            links = sum(1 for other in self.names.values() if other is expected)
            assert os.stat(self.directory / name).st_nlink == links, self.log[-8:]
            listed = {n for n in os.listdir(self.directory) if not n.startswith(".virtmount-hidden-")}
            assert listed == set(self.names), self.log[-8:]
        elif choice < 0.87:
            new = f"f{r.randrange(6)}"
            self._do(f"rename {name} {new}")
            os.rename(self.directory / name, self.directory / new)
            if new != name and self.names.get(new) is not self.names[name]:
                self.names[new] = self.names.pop(name)
        elif choice < 0.92:
            new = f"f{r.randrange(6)}"
            if new not in self.names:
                self._do(f"link {name} {new}")
                os.link(self.directory / name, self.directory / new)
                self.names[new] = self.names[name]
        elif choice < 0.97:
            self._do(f"unlink {name}")
            os.unlink(self.directory / name)
            del self.names[name]
        else:
            self._do(f"close fd{fd}")
            os.close(fd)
            del self.fds[fd]

    def _do(self, what: str) -> None:
        self.log.append(what)

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()


# fio: two jobs at once, each writing a 16 MiB file in random blocks of 4-256 KiB with a crc32c in every
# block, fsyncing at the end; then (or alone, with --verify_only) reading every block back and checking it.
FIO_JOB = ("--name=crc32c", "--numjobs=2", "--size=16M", "--rw=randwrite", "--bsrange=4k-256k",
           "--verify=crc32c", "--verify_fatal=1", "--end_fsync=1", "--group_reporting",
           "--fallocate=none",  # the mount answers EOPNOTSUPP
           "--verify_state_save=0")  # no state files in the current directory


@dataclass(frozen=True)
class FioResult:
    """One fio run's outcome: its exit status, fio's errno for the jobs (EILSEQ: a block did not verify),
    and the bytes and bandwidths (bytes/s) of its write and read (verify) phases."""

    returncode: int
    error: int
    written: int
    write_bandwidth: float
    read: int
    read_bandwidth: float
    stderr: str


def run_fio(directory: Path, *, verify_only: bool = False) -> FioResult:
    """The FIO_JOB in ``directory``: write and verify, or (``verify_only``) verify what an earlier run
    wrote (the same seed gives the same blocks)."""
    command = ["fio", "--output-format=json", f"--directory={directory}", *FIO_JOB]
    if verify_only:
        command.append("--verify_only")
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    # A failed job prints its error line before the JSON.
    report = json.loads(result.stdout[result.stdout.index("{"):])
    [job] = report["jobs"]  # --group_reporting: both jobs in one
    return FioResult(result.returncode, job["error"], job["write"]["io_bytes"], job["write"]["bw_bytes"],
                     job["read"]["io_bytes"], job["read"]["bw_bytes"], result.stderr)


def make_tree(top: Path, files: int) -> None:
    """``files`` regular files under ``top``, ten to a directory and ten directories to a parent, of
    varied sizes (a few of 256 KiB and more), modes, owners and nanosecond mtimes; every 100th file also
    has a hard link and a symbolic link beside it."""
    r = random.Random(files)
    for index in range(files):
        directory = top / f"d{index // 1000}" / f"d{index // 100 % 10}" / f"d{index // 10 % 10}"
        if index % 10 == 0:
            directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"f{index:05d}"
        path.write_bytes(r.randbytes(256 * 1024 + index if index % 250 == 0 else index % 7 * 1000 + 1))
        path.chmod((0o644, 0o600, 0o755, 0o640)[index % 4])
        if index % 3 == 0:
            os.chown(path, 1000, 1000)
        if index % 100 == 0:
            os.link(path, directory / f"hardlink{index:05d}")
            os.symlink(path.name, directory / f"symlink{index:05d}")
        os.utime(path, ns=(1_700_000_000_000_000_000, 1_600_000_000_000_000_000 + index * 1_000_000_007))
    for parent, subdirectories, _ in os.walk(top):  # last: making entries changes a directory's mtime
        for subdirectory in subdirectories:
            os.utime(os.path.join(parent, subdirectory), ns=(1_700_000_000_000_000_000, 1_650_000_000_123_456_789))


def tree_manifest(top: Path) -> dict[str, tuple[object, ...]]:
    """Every path below ``top`` with what makes two trees identical: type, mode, owner, mtime to the
    nanosecond, and a file's link count, size and SHA-256 or a symbolic link's target."""
    manifest: dict[str, tuple[object, ...]] = {}
    for parent, directories, names in os.walk(top):
        for name in directories + names:
            path = os.path.join(parent, name)
            st = os.lstat(path)
            common = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as file:
                    digest = hashlib.sha256(file.read()).hexdigest()
                manifest[os.path.relpath(path, top)] = (*common, st.st_mtime_ns, st.st_nlink, st.st_size, digest)
            elif stat.S_ISLNK(st.st_mode):
                manifest[os.path.relpath(path, top)] = (*common, os.readlink(path))
            else:
                manifest[os.path.relpath(path, top)] = (*common, st.st_mtime_ns)
    return manifest
