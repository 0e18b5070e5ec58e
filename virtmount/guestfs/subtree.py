"""A whole subtree's listings in two daemon calls: every entry's name, attributes and link target.

Listing directory by directory costs a walker two or three daemon calls per
directory (readdir, lstatnslist, readlinklist); a cold walk of a guest with
~2,000 directories then pays ~6,000 round trips, each with milliseconds of
emulated CPU in the appliance. Instead, one ``find -printf`` run in the
appliance (guestfsd's ``debug sh``) writes every entry below a directory to a
file in the appliance's own root (not a guest filesystem), and ``download``
streams that file back: the cost is find's own, ~2 s for 24,000 entries under
TCG here. The output is cut at ``limit`` bytes, which bounds the memory used;
a cut walk gives the listings of the directories it finished (find lists a
directory's entries, each followed by its own subtree, before the next
sibling), and the others are listed one by one as before.

find writes the file itself, cut by the kernel's file size limit (``ulimit
-f``), not through a pipe to ``head -c``: under TCG here that pipe made a cold
walk of the bench guest's 24,200 entries take 4.4-6.4 s instead of 3.2-3.8 s.
Whether the walk ended by itself is told by an end mark appended after find
exits, one the guest cannot foresee (random per walk): the size of a cut file
depends on how the shell counts ``ulimit`` blocks, the mark does not.

What find cannot print comes from lstat: a device node's rdev (one lstatns
each; guests rarely have any outside /dev) and each filesystem's st_blksize
(one lstatns per filesystem met, kept by the caller in ``blksizes``).
"""

from __future__ import annotations

import itertools
import logging
import secrets
import stat
from dataclasses import dataclass, field
from typing import Callable

from .client import GuestfsClient
from .errors import GuestfsClientError, ProtocolError
from .procs import Statns

# find -printf fields: type, inode, device, permission bits (octal), links, uid, gid, size, 512-byte
# blocks, atime, mtime, ctime; then NUL-terminated the path below the start and the link target.
FIND_FORMAT = rb"%y %i %D %m %n %U %G %s %b %A@ %T@ %C@\0%P\0%l\0"
DEFAULT_LIMIT = 16 * 1024 * 1024  # bytes of find output, ~120,000 entries

log = logging.getLogger(__name__)

_TYPES = {b"f": stat.S_IFREG, b"d": stat.S_IFDIR, b"l": stat.S_IFLNK, b"b": stat.S_IFBLK, b"c": stat.S_IFCHR,
          b"p": stat.S_IFIFO, b"s": stat.S_IFSOCK}


@dataclass(frozen=True)
class Entry:
    name: bytes
    st: Statns
    link_target: bytes  # b"" unless a symlink


@dataclass
class Subtree:
    """The listings of a walk: directory path (as the daemon names it) -> its entries, for the
    directories the walk finished; ``complete``: every directory below the start is there."""

    start: bytes
    listings: dict[bytes, list[Entry]] = field(default_factory=dict)
    complete: bool = True

    @property
    def entries(self) -> int:
        return sum(len(entries) for entries in self.listings.values())


def shell_word(path: bytes) -> bytes:
    """``path`` as one shell word (single quotes; any byte but NUL)."""
    return b"'" + path.replace(b"'", b"'\\''") + b"'"


def capped_output(command: bytes, limit: int, output: bytes) -> bytes:
    """A subshell running ``command`` with its standard output in the file ``output`` (a shell word),
    killed by SIGXFSZ once that file would pass ``limit`` bytes (rounded up to dash's 512-byte blocks):
    its exit status is then 128 or more."""
    return b"(ulimit -f %d; %s > %s)" % (-(-limit // 512), command, output)


def walk_command(start: bytes, limit: int, output: bytes, end: bytes) -> bytes:
    """The shell command that writes the walk of ``start`` (a daemon path) to ``output`` (a shell word),
    followed by ``end`` unless the walk was cut at ``limit`` bytes; its exit status is 0 either way."""
    find = b'find "$root"' + shell_word(start) + b" -mindepth 1 -printf " + shell_word(FIND_FORMAT)
    return (b"{ " + capped_output(find, limit, output) + b"; [ $? -lt 128 ] && printf %s " + shell_word(end)
            + b" >> " + output + b"; } 2>/dev/null; true")


def end_mark() -> bytes:
    """A walk's end mark, printed after find's last record: random, so that no name in the guest can
    imitate it at the end of a cut output."""
    return b"virtmount-walk-end-" + secrets.token_hex(16).encode()


_output_numbers = itertools.count()


async def output_of(client: GuestfsClient, command: Callable[[bytes], bytes], kind: bytes) -> bytes:
    """Run ``command(output)`` in the appliance, where ``output`` names a file of this run's own below
    the sysroot (outside every guest filesystem: runs at once must not share one), and bring the file
    back; it is deleted afterwards."""
    path = b"/.virtmount-%s-%d" % (kind, next(_output_numbers))
    output = b'"$root"' + shell_word(path)
    try:
        await client.debug_sh(command(output))
        return await client.download(path)
    finally:
        try:
            await client.debug_sh(b"rm -f " + output)
        except GuestfsClientError as exc:
            log.debug("cannot delete %r in the appliance: %s", path, exc)


async def list_subtree(client: GuestfsClient, start: bytes, blksizes: dict[int, int],
                       limit: int = DEFAULT_LIMIT) -> Subtree:
    """The listings of every directory below ``start`` (a directory of the daemon's sysroot);
    ``blksizes`` (device -> st_blksize) is filled in as filesystems are met.
    GuestfsError if the daemon cannot run it (e.g. a guest's own daemon without ``debug``)."""
    end = end_mark()
    output = await output_of(client, lambda file: walk_command(start, limit, file, end), b"walk")
    records, complete = parse_walk(output, end)
    for dev, path in _first_path_per_device(records).items():
        if dev not in blksizes:
            blksizes[dev] = (await client.lstatns(_join(start, path))).st_blksize
    rdevs = {path: (await client.lstatns(_join(start, path))).st_rdev
             for path, fields, _ in records if fields[0] in (b"b", b"c")}
    subtree = Subtree(start, complete=complete)
    subtree.listings[start] = []
    for path, fields, target in records:
        parent, _, name = path.rpartition(b"/")
        listing = subtree.listings.get(_join(start, parent) if parent else start)
        if listing is None:
            continue  # below an entry that was not a directory, or one left out: cannot happen with find
        st = _statns(fields, blksizes, rdevs.get(path, 0))
        listing.append(Entry(name, st, target if stat.S_ISLNK(st.st_mode) else b""))
        if stat.S_ISDIR(st.st_mode):
            subtree.listings[_join(start, path)] = []
    if not complete:
        for unfinished in _unfinished(start, records):
            subtree.listings.pop(unfinished, None)
    return subtree


Record = tuple[bytes, list[bytes], bytes]  # path below the start, the header's fields, link target


def parse_walk(output: bytes, end: bytes) -> tuple[list[Record], bool]:
    """The whole records of find's output, and whether the output is all of the walk (it ends with the
    walk's ``end`` mark, right after a record); ProtocolError if a record is malformed."""
    complete = output.endswith(end) and (len(output) == len(end) or output[-len(end) - 1] == 0)
    if complete:
        output = output[:-len(end)]
    parts = output.split(b"\0")
    whole = (len(parts) - 1) // 3  # each record ends in its third NUL
    if complete and (len(parts) - 1) % 3 or complete and parts[-1]:
        raise ProtocolError("the subtree walk's output does not end with a whole record")
    records: list[Record] = []
    for index in range(whole):
        header, path, target = parts[3 * index:3 * index + 3]
        fields = header.split(b" ")
        if len(fields) != 12 or fields[0] not in _TYPES or not path:
            raise ProtocolError(f"malformed subtree record {header[:80]!r}")
        records.append((path, fields, target))
    return records, complete


def _statns(fields: list[bytes], blksizes: dict[int, int], rdev: int) -> Statns:
    try:
        ino, dev, mode, nlink, uid, gid, size, blocks = (int(f, 8) if i == 2 else int(f)
                                                          for i, f in enumerate(fields[1:9]))
        times = [_seconds(f) for f in fields[9:12]]
    except ValueError:
        raise ProtocolError(f"malformed subtree record {b' '.join(fields)[:80]!r}") from None
    return Statns(dev, ino, _TYPES[fields[0]] | mode, nlink, uid, gid, rdev, size, blksizes.get(dev, 4096), blocks,
                  *times[0], *times[1], *times[2], 0, 0, 0, 0, 0, 0)


def _seconds(text: bytes) -> tuple[int, int]:
    """find's ``%T@`` as (seconds, nanoseconds). findutils 4.9 prints the two fields of the timestamp
    side by side, ``tv_sec.tv_nsec`` and a 0: 0.5 s before the epoch is ``-1.5000000000``, not -0.5."""
    whole, dot, fraction = text.partition(b".")
    if not dot or len(fraction) != 10 or not fraction.isdigit():
        raise ValueError(f"not a find timestamp: {text!r}")
    return int(whole), int(fraction[:9])


def _first_path_per_device(records: list[Record]) -> dict[int, bytes]:
    first: dict[int, bytes] = {}
    for path, fields, _ in records:
        first.setdefault(int(fields[2]), path)
    return first


def _unfinished(start: bytes, records: list[Record]) -> list[bytes]:
    """The directories a cut walk may not have finished: those on the way to its last record, and
    the last record itself if it is a directory."""
    if not records:
        return [start]
    path, fields, _ = records[-1]
    unfinished = [start]
    parts = path.split(b"/")
    for depth in range(1, len(parts)):
        unfinished.append(_join(start, b"/".join(parts[:depth])))
    if fields[0] == b"d":
        unfinished.append(_join(start, path))
    return unfinished


def _join(directory: bytes, name: bytes) -> bytes:
    return directory.rstrip(b"/") + b"/" + name
