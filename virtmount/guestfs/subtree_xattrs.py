"""A whole subtree's extended attributes in two daemon calls, for walkers that read every file's xattrs.

``rsync -X`` or a backup tool asks for the xattrs of every entry; fetched a
directory at a time (``lxattrlist``, whose names the daemon's stub refuses to
hold a slash) that is one call per directory, ~10 ms each under TCG. Instead,
one ``getfattr -R`` run in the appliance (guestfsd's ``debug sh``) dumps the
xattrs of every entry below a directory into a file in the appliance's own
root, and ``download`` brings it back: ~1 s for 24,000 entries here, of which
getfattr prints only the few that have any. Entries it does not print have
none, which holds only when getfattr read every entry: its exit status is
appended and checked, and a dump that failed or was cut at ``limit`` bytes
gives nothing (the walker's directories are then asked one by one as before).

getfattr quotes a backslash and, in paths, newline and carriage return (in
names also ``=``) as ``\\ooo``; every other byte is printed as it is.
"""

from __future__ import annotations

import base64
import binascii
import re

from .client import GuestfsClient
from .procs import Xattr
from .subtree import capped_output, output_of, shell_word

_STATUS = b"# virtmount-status "
_ESCAPE = re.compile(rb"\\([0-3][0-7][0-7])")


def dump_command(start: bytes, limit: int, output: bytes) -> bytes:
    """The shell command that writes the xattrs of every entry below ``start`` (a daemon path) to
    ``output`` (a shell word), then getfattr's exit status, all cut at ``limit`` bytes (no pipe: see
    subtree.py); its exit status is 0 even when the dump is cut."""
    dump = b"{ getfattr -R -P -h -d -m - -e base64 . 2>/dev/null; echo " + shell_word(_STATUS) + b"$?; }"
    return b'{ cd "$root"' + shell_word(start) + b" && " + capped_output(dump, limit, output) + b"; } 2>/dev/null; true"


def parse_dump(output: bytes) -> dict[bytes, list[Xattr]] | None:
    """Path below the start -> its xattrs, for the entries that have any; None unless the dump is whole
    and getfattr read every entry (then an entry not in it has none)."""
    lines = output.split(b"\n")
    if len(lines) < 2 or lines[-1] != b"" or lines[-2] != _STATUS + b"0":
        return None  # cut, getfattr failed somewhere (or is missing), or the start could not be entered
    dump: dict[bytes, list[Xattr]] = {}
    current: list[Xattr] | None = None
    for line in lines[:-2]:
        if line.startswith(b"# file: "):
            current = dump.setdefault(_unquoted(line[len(b"# file: "):]), [])
        elif not line:
            current = None
        elif current is None or b"=" not in line:
            return None
        else:
            name, _, encoded = line.partition(b"=")
            value = _decoded(encoded)
            if value is None:
                return None
            current.append(Xattr(_unquoted(name), value))
    return dump


def _unquoted(text: bytes) -> bytes:
    return _ESCAPE.sub(lambda match: bytes([int(match.group(1), 8)]), text)


def _decoded(encoded: bytes) -> bytes | None:
    """A value as getfattr -e base64 prints it (``0s`` and base64; nothing for an empty one)."""
    if not encoded:
        return b""
    if not encoded.startswith(b"0s"):
        return None
    try:
        return base64.b64decode(encoded[2:], validate=True)
    except binascii.Error:
        return None


async def subtree_xattrs(client: GuestfsClient, start: bytes, limit: int) -> dict[bytes, list[Xattr]] | None:
    """The xattrs of the entries below ``start`` (a directory of the daemon's sysroot) that have any, by
    path below it; None if the appliance could not dump them all. GuestfsClientError from the daemon."""
    return parse_dump(await output_of(client, lambda file: dump_command(start, limit, file), b"xattrs"))
