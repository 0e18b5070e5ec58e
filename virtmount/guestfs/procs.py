"""Table of the guestfsd procedures virtmount uses.

For each procedure: its number, how to encode its arguments, how to decode
its result, and whether it is a FileOut call (reply followed by chunks).

Sources (libguestfs v1.48.6 unless noted):

* numbers: ``generator/proc_nr.ml``
* argument / return types: ``generator/actions_core.ml`` and
  ``generator/actions_inspection.ml`` (all entries below are in their
  ``daemon_functions`` lists)
* args/ret XDR layout: ``generator/XDR.ml`` -- ordinary arguments followed
  by *all* optional arguments in declaration order (absent ones encoded as
  zero values, the header's optargs_bitmask says which are meaningful);
  FileOut arguments are not encoded at all
* structs: ``generator/structs.ml`` (statns, statvfs, dirent, xattr); an
  FChar column is an XDR ``char``, which rpcgen encodes as a 4-byte int

Guest file names and paths are ``bytes``.  Device names, mountables,
filesystem types, inspection results are text and decoded as UTF-8 with
``surrogateescape``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any, Generic, TypeVar

from .xdr import XdrError, XdrPacker, XdrUnpacker

R = TypeVar("R")

#: Largest ``count`` the daemon's pread/pread_device accept
#: (daemon/file.c rejects count >= GUESTFS_MESSAGE_MAX; the reply also has
#: to fit in one message together with its header).
PREAD_MAX = 4 * 1024 * 1024 - 4096

#: Batch size the library uses for the *list calls (lib/file.c:
#: LSTATNSLIST_MAX, LXATTRLIST_MAX, READLINK_MAX).
LIST_BATCH = 1000


# ----------------------------------------------------------------------
# Result structures


@dataclass(frozen=True, slots=True)
class Statns:
    """guestfs_int_statns (generator/structs.ml): 22 int64 columns."""

    st_dev: int
    st_ino: int
    st_mode: int
    st_nlink: int
    st_uid: int
    st_gid: int
    st_rdev: int
    st_size: int
    st_blksize: int
    st_blocks: int
    st_atime_sec: int
    st_atime_nsec: int
    st_mtime_sec: int
    st_mtime_nsec: int
    st_ctime_sec: int
    st_ctime_nsec: int
    st_spare1: int
    st_spare2: int
    st_spare3: int
    st_spare4: int
    st_spare5: int
    st_spare6: int


@dataclass(frozen=True)
class Statvfs:
    """guestfs_int_statvfs (generator/structs.ml): 11 int64 columns."""

    bsize: int
    frsize: int
    blocks: int
    bfree: int
    bavail: int
    files: int
    ffree: int
    favail: int
    fsid: int
    flag: int
    namemax: int


@dataclass(frozen=True)
class Dirent:
    """guestfs_int_dirent: int64 ino, char ftyp, string name.

    ``ftyp`` is one of ``b c d f l r s u ?`` (see readdir in
    generator/actions_core.ml); ``name`` is the raw guest file name.
    """

    ino: int
    ftyp: str
    name: bytes


@dataclass(frozen=True)
class Xattr:
    """guestfs_int_xattr: string attrname, opaque attrval (both raw bytes)."""

    name: bytes
    value: bytes


_STATNS_FIELDS = tuple(f.name for f in fields(Statns))
_STATVFS_FIELDS = tuple(f.name for f in fields(Statvfs))


def decode_statns(u: XdrUnpacker) -> Statns:
    return Statns(*(u.unpack_int64() for _ in _STATNS_FIELDS))


def encode_statns(p: XdrPacker, s: Statns) -> None:
    for name in _STATNS_FIELDS:
        p.pack_int64(getattr(s, name))


def decode_statvfs(u: XdrUnpacker) -> Statvfs:
    return Statvfs(*(u.unpack_int64() for _ in _STATVFS_FIELDS))


def encode_statvfs(p: XdrPacker, s: Statvfs) -> None:
    for name in _STATVFS_FIELDS:
        p.pack_int64(getattr(s, name))


def decode_dirent(u: XdrUnpacker) -> Dirent:
    ino = u.unpack_int64()
    ftyp = u.unpack_int32()  # XDR char: a full 32-bit int on the wire
    if not -128 <= ftyp <= 255:
        raise XdrError(f"dirent: ftyp {ftyp} is not a char")
    return Dirent(ino, chr(ftyp & 0xFF), u.unpack_string())


def encode_dirent(p: XdrPacker, d: Dirent) -> None:
    p.pack_int64(d.ino)
    p.pack_int32(ord(d.ftyp))
    p.pack_string(d.name)


def decode_xattr(u: XdrUnpacker) -> Xattr:
    name = u.unpack_string()
    return Xattr(name, u.unpack_opaque())


def encode_xattr(p: XdrPacker, x: Xattr) -> None:
    p.pack_string(x.name)
    p.pack_opaque(x.value)


def decode_dirent_stream(data: bytes) -> list[Dirent]:
    """Decode internal_readdir's file content: dirents back to back.

    daemon/readdir.c (libguestfs >= 1.49.1) writes one XDR-encoded
    guestfs_int_dirent per chunk; lib/readdir.c decodes until EOF.
    """
    u = XdrUnpacker(data)
    out: list[Dirent] = []
    while u.remaining():
        out.append(decode_dirent(u))
    return out


# ----------------------------------------------------------------------
# Argument kinds


class Arg(enum.Enum):
    """How one argument is put on the wire (all strings are XDR string<>)."""

    PATH = "path"  # guest path, bytes (Pathname / PlainString path)
    TEXT = "text"  # device, mountable, options, vfstype, xattr name...
    NAMES = "names"  # StringList of guest file names (bytes)
    TEXTS = "texts"  # StringList of text
    INT = "int"  # int32
    INT64 = "int64"
    BOOL = "bool"
    BUFFER = "buffer"  # binary data, NUL bytes allowed (BufferIn, xattr values)


def _as_bytes(value: Any, what: str) -> bytes:
    if isinstance(value, str):
        value = value.encode("utf-8", "surrogateescape")
    if not isinstance(value, (bytes, bytearray)):
        raise TypeError(f"{what}: expected bytes or str, got {type(value).__name__}")
    if b"\0" in value:
        # The daemon sees C strings: an embedded NUL would silently cut the
        # name short and act on a different file.
        raise ValueError(f"{what}: embedded NUL byte in {bytes(value)!r}")
    return bytes(value)


def _pack_arg(p: XdrPacker, kind: Arg, value: Any, what: str) -> None:
    if kind in (Arg.PATH, Arg.TEXT):
        p.pack_string(_as_bytes(value, what))
    elif kind in (Arg.NAMES, Arg.TEXTS):
        if isinstance(value, (str, bytes, bytearray)):
            raise TypeError(f"{what}: expected a sequence of names, got a single string")
        p.pack_array([_as_bytes(v, what) for v in value], p.pack_string)
    elif kind is Arg.INT:
        p.pack_int32(value)
    elif kind is Arg.INT64:
        p.pack_int64(value)
    elif kind is Arg.BOOL:
        p.pack_bool(bool(value))
    elif kind is Arg.BUFFER:
        p.pack_opaque(value)
    else:  # pragma: no cover - exhaustive
        raise AssertionError(kind)


def _zero_value(kind: Arg) -> Any:
    if kind in (Arg.PATH, Arg.TEXT, Arg.BUFFER):
        return b""
    if kind in (Arg.NAMES, Arg.TEXTS):
        return []
    if kind is Arg.BOOL:
        return False
    return 0


# ----------------------------------------------------------------------
# Procedure descriptors


@dataclass(frozen=True)
class Proc(Generic[R]):
    """One daemon procedure.

    ``decode`` turns the reply body (or, for FileOut calls, the
    concatenated file content) into the Python result.
    """

    name: str
    number: int
    args: tuple[tuple[str, Arg], ...]
    decode: Callable[[XdrUnpacker], R]
    optargs: tuple[tuple[str, Arg], ...] = ()
    fileout: bool = False

    def encode_args(self, *values: Any, **optvalues: Any) -> tuple[bytes, int]:
        """Return (XDR args struct, optargs_bitmask) for this call."""
        if len(values) != len(self.args):
            raise TypeError(f"{self.name}: expected {len(self.args)} arguments, got {len(values)}")
        known = {name for name, _ in self.optargs}
        unknown = set(optvalues) - known
        if unknown:
            raise TypeError(f"{self.name}: unknown optional argument(s) {sorted(unknown)}")
        p = XdrPacker()
        for (name, kind), value in zip(self.args, values):
            _pack_arg(p, kind, value, f"{self.name}({name})")
        bitmask = 0
        for bit, (name, kind) in enumerate(self.optargs):
            value = optvalues.get(name)
            if value is None:
                _pack_arg(p, kind, _zero_value(kind), name)
            else:
                bitmask |= 1 << bit
                _pack_arg(p, kind, value, f"{self.name}({name})")
        return p.get_buffer(), bitmask

    def decode_result(self, data: bytes) -> R:
        """Decode a reply body / FileOut content; XdrError if malformed."""
        u = XdrUnpacker(data)
        result = self.decode(u)
        u.done()
        return result


# Return decoders (shapes from generator/XDR.ml).


def _ret_none(u: XdrUnpacker) -> None:
    return None


def _ret_int(u: XdrUnpacker) -> int:
    return u.unpack_int32()


def _ret_int64(u: XdrUnpacker) -> int:
    return u.unpack_int64()


def _ret_bool(u: XdrUnpacker) -> bool:
    return u.unpack_bool()


def _ret_text(u: XdrUnpacker) -> str:
    return u.unpack_text()


def _ret_bytes_string(u: XdrUnpacker) -> bytes:
    return u.unpack_string()


def _ret_buffer(u: XdrUnpacker) -> bytes:
    return u.unpack_opaque()


def _ret_text_list(u: XdrUnpacker) -> list[str]:
    return u.unpack_array(u.unpack_text)


def _ret_bytes_list(u: XdrUnpacker) -> list[bytes]:
    return u.unpack_array(u.unpack_string)


def _ret_hashtable(u: XdrUnpacker) -> dict[str, str]:
    flat = u.unpack_array(u.unpack_text)
    if len(flat) % 2:
        raise XdrError("hashtable reply has an odd number of strings")
    return dict(zip(flat[0::2], flat[1::2]))


def _ret_statns(u: XdrUnpacker) -> Statns:
    return decode_statns(u)


def _ret_statns_list(u: XdrUnpacker) -> list[Statns]:
    return u.unpack_array(lambda: decode_statns(u))


def _ret_statvfs(u: XdrUnpacker) -> Statvfs:
    return decode_statvfs(u)


def _ret_dirent_list(u: XdrUnpacker) -> list[Dirent]:
    return u.unpack_array(lambda: decode_dirent(u))


def _ret_dirent_stream(u: XdrUnpacker) -> list[Dirent]:
    return decode_dirent_stream(u.rest())


def _ret_file_content(u: XdrUnpacker) -> bytes:
    return u.rest()


def _ret_name_stream(u: XdrUnpacker) -> list[bytes]:
    """ls0's file content: every name followed by a NUL."""
    data = u.rest()
    if data and not data.endswith(b"\0"):
        raise XdrError("ls0: the last name is not NUL-terminated")
    return data.split(b"\0")[:-1]


def _ret_xattr_list(u: XdrUnpacker) -> list[Xattr]:
    return u.unpack_array(lambda: decode_xattr(u))


_P = Arg.PATH
_T = Arg.TEXT

# --- devices, filesystems, inspection ---------------------------------
LIST_DEVICES = Proc("list_devices", 7, (), _ret_text_list)
LIST_PARTITIONS = Proc("list_partitions", 8, (), _ret_text_list)
LVS = Proc("lvs", 11, (), _ret_text_list)  # optional group "lvm2"
LVM_SCAN = Proc("lvm_scan", 506, (("activate", Arg.BOOL),), _ret_none)  # since 1.39.8
LIST_FILESYSTEMS = Proc("list_filesystems", 476, (), _ret_hashtable)
VFS_TYPE = Proc("vfs_type", 198, (("mountable", _T),), _ret_text)
VFS_LABEL = Proc("vfs_label", 253, (("mountable", _T),), _ret_text)
VFS_UUID = Proc("vfs_uuid", 254, (("mountable", _T),), _ret_text)
BLOCKDEV_GETSIZE64 = Proc("blockdev_getsize64", 63, (("device", _T),), _ret_int64)
INSPECT_OS = Proc("inspect_os", 480, (), _ret_text_list)
INSPECT_GET_ROOTS = Proc("inspect_get_roots", 481, (), _ret_text_list)
INSPECT_GET_TYPE = Proc("inspect_get_type", 483, (("root", _T),), _ret_text)
INSPECT_GET_DISTRO = Proc("inspect_get_distro", 484, (("root", _T),), _ret_text)
INSPECT_GET_PRODUCT_NAME = Proc("inspect_get_product_name", 487, (("root", _T),), _ret_text)
INSPECT_GET_MAJOR_VERSION = Proc("inspect_get_major_version", 489, (("root", _T),), _ret_int)
INSPECT_GET_MINOR_VERSION = Proc("inspect_get_minor_version", 490, (("root", _T),), _ret_int)
INSPECT_GET_ARCH = Proc("inspect_get_arch", 491, (("root", _T),), _ret_text)
INSPECT_GET_HOSTNAME = Proc("inspect_get_hostname", 492, (("root", _T),), _ret_text)
INSPECT_GET_MOUNTPOINTS = Proc("inspect_get_mountpoints", 500, (("root", _T),), _ret_hashtable)
INSPECT_GET_FILESYSTEMS = Proc("inspect_get_filesystems", 501, (("root", _T),), _ret_text_list)

# --- mounting ---------------------------------------------------------
MOUNT = Proc("mount", 1, (("mountable", _T), ("mountpoint", _P)), _ret_none)
MOUNT_RO = Proc("mount_ro", 73, (("mountable", _T), ("mountpoint", _P)), _ret_none)
MOUNT_OPTIONS = Proc(
    "mount_options", 74, (("options", _T), ("mountable", _T), ("mountpoint", _P)), _ret_none
)
MOUNT_VFS = Proc(
    "mount_vfs",
    75,
    (("options", _T), ("vfstype", _T), ("mountable", _T), ("mountpoint", _P)),
    _ret_none,
)
MKMOUNTPOINT = Proc("mkmountpoint", 148, (("exemptpath", _P),), _ret_none)
RMMOUNTPOINT = Proc("rmmountpoint", 149, (("exemptpath", _P),), _ret_none)
UMOUNT = Proc(
    "umount",
    45,
    (("pathordevice", _P),),
    _ret_none,
    optargs=(("force", Arg.BOOL), ("lazyunmount", Arg.BOOL)),
)
UMOUNT_ALL = Proc("umount_all", 47, (), _ret_none)
SYNC = Proc("sync", 2, (), _ret_none)
INTERNAL_AUTOSYNC = Proc("internal_autosync", 282, (), _ret_none)  # umount_all + sync
INTERNAL_EXIT = Proc("internal_exit", 414, (), _ret_none)  # reply, then exit(0)
PING_DAEMON = Proc("ping_daemon", 92, (), _ret_none)

# --- metadata ---------------------------------------------------------
LSTATNS = Proc("lstatns", 422, (("path", _P),), _ret_statns)
STATNS = Proc("statns", 421, (("path", _P),), _ret_statns)
INTERNAL_LSTATNSLIST = Proc(
    "internal_lstatnslist", 423, (("path", _P), ("names", Arg.NAMES)), _ret_statns_list
)
INTERNAL_LXATTRLIST = Proc(
    "internal_lxattrlist", 205, (("path", _P), ("names", Arg.NAMES)), _ret_xattr_list
)
INTERNAL_READLINKLIST = Proc(
    "internal_readlinklist", 206, (("path", _P), ("names", Arg.NAMES)), _ret_bytes_list
)
READLINK = Proc("readlink", 168, (("path", _P),), _ret_bytes_string)
STATVFS = Proc("statvfs", 54, (("path", _P),), _ret_statvfs)
LGETXATTR = Proc("lgetxattr", 280, (("path", _P), ("name", _P)), _ret_buffer)
LGETXATTRS = Proc("lgetxattrs", 142, (("path", _P),), _ret_xattr_list)
GETXATTR = Proc("getxattr", 279, (("path", _P), ("name", _P)), _ret_buffer)
GETXATTRS = Proc("getxattrs", 141, (("path", _P),), _ret_xattr_list)
IS_DIR = Proc(
    "is_dir", 38, (("path", _P),), _ret_bool, optargs=(("followsymlinks", Arg.BOOL),)
)
IS_FILE = Proc(
    "is_file", 37, (("path", _P),), _ret_bool, optargs=(("followsymlinks", Arg.BOOL),)
)
IS_SYMLINK = Proc("is_symlink", 270, (("path", _P),), _ret_bool)
EXISTS = Proc("exists", 36, (("path", _P),), _ret_bool)

# --- directory listing and data ---------------------------------------
#: libguestfs <= 1.48.x: the whole listing in one reply (4 MiB limit).
READDIR = Proc("readdir", 138, (("dir", _P),), _ret_dirent_list)
#: libguestfs >= 1.49.1 (and RHEL 9.1+ backports): FileOut variant, the
#: file content is a stream of XDR dirents.  Absent from 1.48.6.
INTERNAL_READDIR = Proc(
    "internal_readdir", 511, (("dir", _P),), _ret_dirent_stream, fileout=True
)
#: Names only (no "." or ".."), NUL-terminated, as FileOut: no size limit. For directories whose
#: readdir reply would pass GUESTFS_MESSAGE_MAX on daemons without internal_readdir.
LS0 = Proc("ls0", 347, (("dir", _P),), _ret_name_stream, fileout=True)
PREAD = Proc("pread", 207, (("path", _P), ("count", Arg.INT), ("offset", Arg.INT64)), _ret_buffer)
PREAD_DEVICE = Proc(
    "pread_device", 276, (("device", _T), ("count", Arg.INT), ("offset", Arg.INT64)), _ret_buffer
)

# --- whole subtrees (guestfs/subtree.py) -------------------------------
#: generator/actions_debug.ml: "sh" runs its extra argument with /bin/sh -c, $root set to the
#: sysroot; the reply is its output.
DEBUG = Proc("debug", 76, (("subcmd", _T), ("extraargs", Arg.NAMES)), _ret_bytes_string)
#: The file's content, streamed as FileOut chunks.
DOWNLOAD = Proc("download", 67, (("remotefilename", _P),), _ret_file_content, fileout=True)

# --- writing (-o rw; see fs/guestwrites.py) ---------------------------
#: pwrite(2) of the whole buffer at ``offset``; returns the bytes written (may be short).
PWRITE = Proc("pwrite", 247, (("path", _P), ("content", Arg.BUFFER), ("offset", Arg.INT64)), _ret_int)
TRUNCATE_SIZE = Proc("truncate_size", 200, (("path", _P), ("size", Arg.INT64)), _ret_none)
#: mknod(2) with the type bits in ``mode`` (S_IFREG makes an empty file, EEXIST if the name exists).
MKNOD = Proc("mknod", 133, (("mode", Arg.INT), ("devmajor", Arg.INT), ("devminor", Arg.INT), ("path", _P)),
             _ret_none)
MKDIR_MODE = Proc("mkdir_mode", 202, (("path", _P), ("mode", Arg.INT)), _ret_none)
RM = Proc("rm", 29, (("path", _P),), _ret_none)
RMDIR = Proc("rmdir", 30, (("path", _P),), _ret_none)
RENAME = Proc("rename", 394, (("oldpath", _P), ("newpath", _P)), _ret_none)
LN = Proc("ln", 164, (("target", _P), ("linkname", _P)), _ret_none)
LN_S = Proc("ln_s", 166, (("target", _P), ("linkname", _P)), _ret_none)
CHMOD = Proc("chmod", 34, (("mode", Arg.INT), ("path", _P)), _ret_none)
LCHOWN = Proc("lchown", 203, (("owner", Arg.INT), ("group", Arg.INT), ("path", _P)), _ret_none)
#: No symlink following; an nsecs of -1 means now, -2 leaves that time alone (UTIME_NOW/UTIME_OMIT).
UTIMENS = Proc("utimens", 201, (("path", _P), ("atsecs", Arg.INT64), ("atnsecs", Arg.INT64),
                                ("mtsecs", Arg.INT64), ("mtnsecs", Arg.INT64)), _ret_none)
LSETXATTR = Proc("lsetxattr", 144, (("xattr", _P), ("val", Arg.BUFFER), ("vallen", Arg.INT), ("path", _P)),
                 _ret_none)
LREMOVEXATTR = Proc("lremovexattr", 146, (("xattr", _P), ("path", _P)), _ret_none)
UMASK = Proc("umask", 137, (("mask", Arg.INT),), _ret_int)

ALL_PROCS: tuple[Proc[Any], ...] = tuple(
    v for v in list(globals().values()) if isinstance(v, Proc)
)
BY_NUMBER: dict[int, Proc[Any]] = {p.number: p for p in ALL_PROCS}
BY_NAME: dict[str, Proc[Any]] = {p.name: p for p in ALL_PROCS}
FILEOUT_NUMBERS: frozenset[int] = frozenset(p.number for p in ALL_PROCS if p.fileout)

assert len(BY_NUMBER) == len(ALL_PROCS), "duplicate procedure number"


def is_fileout(proc_number: int) -> bool:
    """True if a successful reply to this procedure is followed by chunks."""
    return proc_number in FILEOUT_NUMBERS


def proc_name(proc_number: int) -> str:
    proc = BY_NUMBER.get(proc_number)
    return proc.name if proc is not None else f"proc#{proc_number}"


def split_lxattrlist(xattrs: Sequence[Xattr], count: int) -> list[list[Xattr] | None]:
    """Group internal_lxattrlist's flat reply per requested name.

    daemon/xattr.c (do_internal_lxattrlist) emits, for every name, a marker
    entry with an empty attrname whose value is the decimal number of
    attributes plus a NUL ("2\\0"), followed by that many entries.  When
    llistxattr failed for a name the marker has an empty value and nothing
    follows; that name maps to None here.
    """
    out: list[list[Xattr] | None] = []
    i = 0
    while i < len(xattrs):
        marker = xattrs[i]
        if marker.name != b"":
            raise XdrError(f"lxattrlist: expected a marker entry at index {i}")
        i += 1
        if marker.value == b"":
            out.append(None)
            continue
        digits = marker.value.rstrip(b"\0")
        if not digits.isdigit():
            raise XdrError(f"lxattrlist: bad marker value {marker.value!r}")
        n = int(digits)
        if i + n > len(xattrs):
            raise XdrError("lxattrlist: marker count exceeds the reply")
        out.append(list(xattrs[i : i + n]))
        i += n
    if len(out) != count:
        raise XdrError(f"lxattrlist: {len(out)} groups for {count} names")
    return out
