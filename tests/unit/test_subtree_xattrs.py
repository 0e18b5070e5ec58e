"""Parsing the xattr dump of a subtree (virtmount.guestfs.subtree_xattrs): getfattr's quoting, and dumps
that must not be trusted (cut, failed, malformed)."""

from __future__ import annotations

import base64
import os
import subprocess
from pathlib import Path

import pytest

from virtmount.guestfs.procs import Xattr
from virtmount.guestfs.subtree_xattrs import dump_command, parse_dump


def b64(value: bytes) -> bytes:
    return b"0s" + base64.b64encode(value)


def test_entries_with_xattrs_by_path_below_the_start() -> None:
    dump = (b"# file: usr/share/a\nuser.comment=" + b64(b"hello\0world") + b"\nuser.empty=\n\n"
            b"# file: .\nsecurity.selinux=" + b64(b"system_u:object_r:root_t:s0\0") + b"\n\n"
            b"# virtmount-status 0\n")
    assert parse_dump(dump) == {
        b"usr/share/a": [Xattr(b"user.comment", b"hello\0world"), Xattr(b"user.empty", b"")],
        b".": [Xattr(b"security.selinux", b"system_u:object_r:root_t:s0\0")],
    }


def test_quoted_bytes_in_paths_and_names_are_restored() -> None:
    """getfattr writes a backslash, newline and carriage return (in names also '=') as \\ooo; other bytes raw."""
    path = b"odd\\name\nwith\rbytes \xff=\x01"
    quoted_path = b"odd\\134name\\012with\\015bytes \xff=\x01"
    dump = b"# file: " + quoted_path + b"\nuser.a\\075b=" + b64(b"v") + b"\n\n# virtmount-status 0\n"
    assert parse_dump(dump) == {path: [Xattr(b"user.a=b", b"v")]}


def test_an_empty_dump_means_no_entry_has_xattrs() -> None:
    assert parse_dump(b"# virtmount-status 0\n") == {}


def test_a_dump_that_is_not_whole_or_not_clean_is_not_trusted() -> None:
    whole = b"# file: a\nuser.x=" + b64(b"1") + b"\n\n# virtmount-status 0\n"
    assert parse_dump(whole) is not None
    assert parse_dump(whole[:-25]) is None  # cut at the limit: its status is missing
    assert parse_dump(b"") is None  # the start could not be entered
    assert parse_dump(whole.replace(b"status 0", b"status 1")) is None  # an entry getfattr could not read
    assert parse_dump(whole.replace(b"status 0", b"status 127")) is None  # no getfattr in the appliance
    assert parse_dump(whole.replace(b"=0s", b"=0x")) is None  # not the encoding asked for
    assert parse_dump(whole.replace(b"=" + b64(b"1"), b"=0s!!")) is None  # not base64
    assert parse_dump(b"user.x=" + b64(b"1") + b"\n# virtmount-status 0\n") is None  # no file header


def test_the_command_quotes_the_start_for_the_shell() -> None:
    command = dump_command(b"/fs/it's here", 1000, b"'/out'")
    assert b"cd \"$root\"'/fs/it'\\''s here'" in command and b"(ulimit -f 2; " in command and b" > '/out')" in command


@pytest.mark.parametrize("limit", [1 << 20, 1024])
def test_the_dump_command_run_by_dash_is_whole_or_refused(tmp_path: Path, limit: int) -> None:
    """The real command in the appliance's shell (dash, as here) with the real getfattr: exit status 0 both
    ways; a whole dump parses, one cut at the file size limit does not."""
    (tmp_path / "tree").mkdir()
    for n in range(40):
        file = tmp_path / "tree" / f"f{n}"
        file.write_bytes(b"")
        os.setxattr(file, "user.virtmount", b"v" * 40)
    ran = subprocess.run(["dash", "-c", dump_command(b"/tree", limit, b"\"$root\"'/out'")],
                         env={"root": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert ran.returncode == 0
    dump = parse_dump((tmp_path / "out").read_bytes())
    if limit > 100_000:
        assert dump is not None and len(dump) == 40 and dump[b"f7"] == [Xattr(b"user.virtmount", b"v" * 40)]
    else:
        assert dump is None and (tmp_path / "out").stat().st_size == 1024
