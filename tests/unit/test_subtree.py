"""Whole-subtree listings: find's output parsed (guestfs/subtree.py), and walks started for walkers
(fs/subtreewalks.py) in the guest view, over the fake guest of test_tree."""

from __future__ import annotations

import errno
import re
import stat
import subprocess
from pathlib import Path
from typing import Any, AsyncIterator, cast

import pytest
import trio
import trio.testing

from virtmount.fs.nodes import GuestNode
from virtmount.fs.subtreewalks import WALKER_CLAIMS
from virtmount.guestfs.client import GuestfsClient
from virtmount.guestfs.errors import GuestfsError, ProtocolError
from virtmount.guestfs.subtree import end_mark, list_subtree, output_of, parse_walk, shell_word, walk_command

from .test_tree import (SDA1_DEV, SDA2_DEV, FakeGuestClient, FakeInode, World, dir_inode, file_inode,
                        guest_filesystems, guestfs_error, make_world, read_dir)

PACKAGES = 30  # /fs/usr/pkgN, each with two files and a subdirectory holding one file


def grown_client() -> FakeGuestClient:
    """The fake guest with /fs/usr/pkg0..4 (a walker's playground), a symlink and a name with odd bytes."""
    sda1, sda2 = guest_filesystems()
    usr = dir_inode(50)
    sda1.inodes[2].entries[b"usr"] = 50
    sda1.inodes[50] = usr
    for n in range(PACKAGES):
        base = 1000 + 10 * n
        usr.entries[f"pkg{n}".encode()] = base
        sda1.inodes[base] = dir_inode(base, a=base + 1, b=base + 2, sub=base + 3)
        sda1.inodes[base + 1] = file_inode(base + 1, f"a{n}\n".encode())
        sda1.inodes[base + 2] = FakeInode(base + 2, stat.S_IFLNK | 0o777, target=b"../it's \xff here")
        sda1.inodes[base + 3] = dir_inode(base + 3, **{"deep file": base + 4})
        sda1.inodes[base + 4] = file_inode(base + 4, b"deep\n", nlink=1, uid=7, gid=8,  # times before 1970 too
                                           times=(-1, 500_000_000, -(2**31 - 1), 123, 1_700_000_000, 999_999_999))
    return FakeGuestClient(sda1, sda2)


@pytest.fixture
async def world() -> AsyncIterator[World]:
    async with trio.open_nursery() as nursery:
        made = make_world(nursery=nursery)
        grown = grown_client()
        made.client.mounts, made.client.calls = grown.mounts, grown.calls
        yield made
        nursery.cancel_scope.cancel()


async def walk_like_find(world: World, start: GuestNode) -> dict[bytes, GuestNode]:
    """List ``start`` and every directory below it, depth first, as find does; every node seen by path."""
    seen: dict[bytes, GuestNode] = {}

    async def visit(directory: GuestNode) -> None:
        for name, node in sorted((await read_dir(world.tree, directory)).items()):
            assert isinstance(node, GuestNode)
            seen[node.path] = node
            if node.stat is not None and stat.S_ISDIR(node.stat.st_mode):
                await visit(node)
    await visit(start)
    return seen


async def usr_of(world: World) -> GuestNode:
    from .test_tree import guest
    return await guest(world, b"fs", b"usr")


async def test_a_walker_gets_the_rest_of_a_subtree_from_one_walk(world: World, autojump_clock: Any) -> None:
    world.client.delay = 0.01
    usr = await usr_of(world)
    seen = await walk_like_find(world, usr)
    client = world.client
    assert client.count("debug_sh") == 1 and client.count("download") == 1
    listed_one_by_one = {args[0] for args in client.args_of("readdir")}
    # the walker's first directories were listed one by one; the rest of /fs/usr came from the walk
    assert len(listed_one_by_one) < 1 + 2 * PACKAGES and len(listed_one_by_one) == client.count("readdir")
    assert f"/fs/usr/pkg{PACKAGES - 1}/sub".encode() not in listed_one_by_one
    for path, node in seen.items():  # the walk's attributes are the lstat ones (st_blksize: per filesystem)
        expected = client._stat(path, "lstatns")
        assert _same_but_blksize(node.stat, expected), path
        if stat.S_ISLNK(expected.st_mode):
            assert node.link_target == b"../it's \xff here"


def _same_but_blksize(got: Any, expected: Any) -> bool:
    from dataclasses import fields
    return all(getattr(got, f.name) == getattr(expected, f.name) for f in fields(expected) if f.name != "st_blksize")


async def test_a_failed_walk_lists_directory_by_directory_and_is_not_tried_again(world: World) -> None:
    world.client.failures[("debug_sh", b"")] = guestfs_error(None, "", "debug")
    usr = await usr_of(world)
    seen = await walk_like_find(world, usr)
    assert world.client.count("debug_sh") == 1
    assert {args[0] for args in world.client.args_of("readdir")} >= {p for p, n in seen.items()
                                                                      if n.stat and stat.S_ISDIR(n.stat.st_mode)}


async def test_one_folder_opened_starts_no_walk(world: World) -> None:
    usr = await usr_of(world)
    listed = await read_dir(world.tree, usr)
    await trio.testing.wait_all_tasks_blocked()
    for name in [f"pkg{n}".encode() for n in range(WALKER_CLAIMS - 1)]:
        await read_dir(world.tree, listed[name])
    await trio.testing.wait_all_tasks_blocked()
    assert world.client.count("debug_sh") == 0


# --- find's output -----------------------------------------------------------------------------------


async def fake_walk(start: bytes, limit: int) -> tuple[FakeGuestClient, Any]:
    client = grown_client()
    subtree = await list_subtree(cast(GuestfsClient, client), start, {}, limit)
    return client, subtree


async def test_a_whole_walk_lists_every_directory_with_lstat_attributes() -> None:
    client, subtree = await fake_walk(b"/fs/usr", 1 << 20)
    assert subtree.complete
    assert sorted(subtree.listings) == [b"/fs/usr", *sorted(
        p for n in range(PACKAGES) for p in (f"/fs/usr/pkg{n}".encode(), f"/fs/usr/pkg{n}/sub".encode()))]
    [deep] = subtree.listings[b"/fs/usr/pkg3/sub"]
    assert deep.name == b"deep file"
    assert _same_but_blksize(deep.st, client._stat(b"/fs/usr/pkg3/sub/deep file", "lstatns"))
    assert deep.st.st_blksize == 4096  # learnt with one lstat for the filesystem
    assert client.count("lstatns") == 1


async def test_a_walk_across_filesystems_learns_each_blksize() -> None:
    client, subtree = await fake_walk(b"/fs", 1 << 20)
    devices = {entry.st.st_dev for entries in subtree.listings.values() for entry in entries}
    assert devices == {SDA1_DEV, SDA2_DEV} and client.count("lstatns") == 2


async def test_a_cut_walk_keeps_only_whole_listings_of_the_directories_it_finished() -> None:
    """Cut wherever the file size limit falls (whole 512-byte blocks): each listing kept is the whole walk's
    listing of its directory; the start, cut inside, is not kept."""
    whole_client, whole = await fake_walk(b"/fs/usr", 1 << 20)
    assert whole.complete
    cuts = range(512, len(whole_client.walk_file) - 64, 512)
    assert len(cuts) >= 3
    kept_at = []
    for cut in cuts:
        client, subtree = await fake_walk(b"/fs/usr", cut)
        assert len(client.walk_file) == cut and not subtree.complete
        assert b"/fs/usr" not in subtree.listings
        for path, entries in subtree.listings.items():
            assert entries == whole.listings[path], (cut, path)
        kept_at.append(len(subtree.listings))
    assert kept_at == sorted(kept_at) and kept_at[-1] > kept_at[0]  # more is kept as the cut moves on


def test_output_without_its_end_mark_is_a_cut_walk() -> None:
    record = b"f 1 2 644 1 0 0 5 8 1.0000000000 1.0000000000 1.0000000000\0name\0\0"
    assert parse_walk(record + b"mark", b"mark") == ([(b"name", record.split(b"\0")[0].split(b" "), b"")], True)
    assert parse_walk(record, b"mark")[1] is False
    assert parse_walk(record + b"mar", b"mark")[1] is False
    assert parse_walk(record + b"xmark", b"mark")[1] is False  # not right after a record: a name's bytes


@pytest.mark.parametrize("limit", [1 << 20, 1500])
def test_the_walk_command_run_by_dash_marks_only_a_whole_walk(tmp_path: Path, limit: int) -> None:
    """The real command in the appliance's shell (dash, as here) over a real tree: exit status 0 both ways;
    a whole walk ends with its mark; one cut by the file size limit stops at whole 512-byte blocks."""
    for n in range(60):
        (tmp_path / "tree" / f"d{n % 3}").mkdir(parents=True, exist_ok=True)
        (tmp_path / "tree" / f"d{n % 3}" / f"file-with-a-long-name-{n:03d}").write_bytes(b"x" * n)
    end = end_mark()
    command = walk_command(b"/tree", limit, b'"$root"' + shell_word(b"/out"), end)
    ran = subprocess.run(["dash", "-c", command], env={"root": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert ran.returncode == 0
    output = (tmp_path / "out").read_bytes()
    records, complete = parse_walk(output, end)
    if limit > 100_000:
        assert complete and len(records) == 63 and output.endswith(end)
    else:
        assert not complete and len(output) == 1536 and end not in output and 0 < len(records) < 63


def test_malformed_output_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        parse_walk(b"f 1 2 644 1 0 0 5 8 1.0000000000 1.0000000000 1.0000000000\0name\0end", b"end")  # not whole
    with pytest.raises(ProtocolError):
        parse_walk(b"x 1 2 644 1 0 0 5 8 1.0000000000 1.0000000000 1.0000000000\0name\0\0", b"end")  # unknown type
    with pytest.raises(ProtocolError):
        parse_walk(b"f 1 2\0name\0\0", b"end")


async def test_times_before_1970_and_odd_names_survive() -> None:
    class Client:
        end = b""

        async def debug_sh(self, command: bytes) -> bytes:
            if mark := re.search(rb"printf %s '([^']*)'", command):
                self.end = mark[1]
            return b""

        async def download(self, path: bytes) -> bytes:
            # As findutils 4.9 prints them (measured): tv_sec, a dot, tv_nsec and a 0, even below zero;
            # -1.5000000000 is half a second before the epoch, -2147483647.0000001230 is 123 ns after 1901-12-13.
            return (b"f 12 2049 4755 1 0 0 3 8 -1.5000000000 -2147483647.0000001230 1700000000.9999999990\0a\nb\xff\0\0"
                    + self.end)

        async def lstatns(self, path: bytes) -> Any:
            raise GuestfsError(errno.EIO, "EIO", "no", "lstatns")

    subtree = await list_subtree(cast(GuestfsClient, Client()), b"/fs", {2049: 4096})
    [entry] = subtree.listings[b"/fs"]
    st = entry.st
    assert entry.name == b"a\nb\xff" and stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o4755
    assert (st.st_atime_sec, st.st_atime_nsec) == (-1, 500_000_000)
    assert (st.st_mtime_sec, st.st_mtime_nsec) == (-(2**31 - 1), 123)
    assert (st.st_ctime_sec, st.st_ctime_nsec) == (1_700_000_000, 999_999_999)


async def test_runs_at_once_write_files_of_their_own_and_delete_them() -> None:
    """Two walks at once once shared one output file: the second read the first's walk as its own."""
    files: dict[bytes, bytes] = {}
    deleted: list[bytes] = []

    class Client:
        async def debug_sh(self, command: bytes) -> bytes:
            word = command.rsplit(b" ", 1)[1]
            path = word.removeprefix(b'"$root"').strip(b"'")
            if command.startswith(b"rm -f "):
                deleted.append(path)
            else:
                files[path] = command.split(b" ", 1)[0]
                await trio.sleep(0.01)
            return b""

        async def download(self, path: bytes) -> bytes:
            return files[path]

    outputs: list[bytes] = []

    async def run(program: bytes) -> None:
        outputs.append(await output_of(cast(GuestfsClient, Client()), lambda file: program + b" > " + file, b"test"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run, b"first")
        nursery.start_soon(run, b"second")
    assert sorted(outputs) == [b"first", b"second"]
    assert len(set(files)) == 2 and sorted(deleted) == sorted(files)
