"""The model's speculative and cached paths: walk-ahead, listing cache, file contents and xattrs ahead.

Same fake guest as test_model (sda1 at /fs with /fs/etc and /fs/boot, sda2 on
/fs/boot), with a tree that has a nursery for its background fetches.
"""

from __future__ import annotations

import errno
import os
from typing import AsyncIterator

import pytest
import trio
import trio.testing

from virtmount.fs.nodes import GuestNode
from virtmount.fs.tree import ConnectionTree

from .test_tree import World, file_inode, fs_error, guest, make_world, read_dir


@pytest.fixture
async def world() -> AsyncIterator[World]:
    async with trio.open_nursery() as nursery:
        made = make_world(nursery=nursery)
        sda1 = made.client.mounts[b"/fs"][0]
        for number, name in ((15, "group"), (16, "motd"), (17, "empty")):
            sda1.inodes[11].entries[name.encode()] = number
            sda1.inodes[number] = file_inode(number, b"" if name == "empty" else f"{name} content\n".encode())
        yield made
        nursery.cancel_scope.cancel()


def readdirs(world: World) -> list[bytes]:
    return [args[0] for args in world.client.args_of("readdir")]


async def test_subdirectories_are_listed_ahead_and_then_not_again(world: World) -> None:
    fs_root = await guest(world, b"fs")
    listed = await read_dir(world.tree, fs_root)
    await trio.testing.wait_all_tasks_blocked()
    assert sorted(readdirs(world)) == [b"/fs", b"/fs/boot", b"/fs/boot/grub", b"/fs/etc"]  # depth first, all of it
    await read_dir(world.tree, listed[b"etc"])
    await read_dir(world.tree, listed[b"boot"])
    assert len(readdirs(world)) == 4


async def test_a_listing_is_kept_after_the_kernel_forgot_it(world: World) -> None:
    tree = world.tree
    etc = await guest(world, b"fs", b"etc")
    first = await read_dir(tree, etc)
    for node in first.values():
        tree.forget(node.inode, node.lookups)
    again = await read_dir(tree, etc)
    assert readdirs(world).count(b"/fs/etc") == 1
    assert again[b"hostname"] is first[b"hostname"]
    assert again[b"hostname"].lookups == 1  # counted afresh, not on top of the forgotten ones
    tree.forget(again[b"hostname"].inode, 1)
    assert await fs_error(tree.getattr(again[b"hostname"].inode)) == errno.ESTALE


async def test_lookups_in_a_listed_directory_make_no_calls(world: World) -> None:
    tree = world.tree
    etc = await guest(world, b"fs", b"etc")
    await tree.list_directory(etc.inode)
    calls = len(world.client.calls)
    hostname = await tree.lookup(etc.inode, b"hostname")
    assert isinstance(hostname, GuestNode) and hostname.path == b"/fs/etc/hostname"
    assert await fs_error(tree.lookup(etc.inode, b"no-such-file")) == errno.ENOENT
    assert len(world.client.calls) == calls


async def read_all(tree: ConnectionTree, node: GuestNode) -> bytes:
    handle = await tree.open(node.inode, os.O_RDONLY)
    try:
        return await tree.read(handle, 0, 1 << 20)
    finally:
        tree.release(handle)


def preads(world: World) -> list[bytes]:
    return [args[0] for args in world.client.args_of("pread")]


async def test_second_file_opened_brings_its_small_siblings(world: World) -> None:
    tree = world.tree
    etc = await guest(world, b"fs", b"etc")
    files = await read_dir(tree, etc)
    assert await read_all(tree, files[b"hostname"]) == b"guest1\n"  # type: ignore[arg-type]
    await trio.testing.wait_all_tasks_blocked()
    assert preads(world) == [b"/fs/etc/hostname"]  # one file read: no guessing yet
    assert await read_all(tree, files[b"passwd"]) == b"root:x:0:0:root:/root:/bin/sh\n"  # type: ignore[arg-type]
    await trio.testing.wait_all_tasks_blocked()
    # the others, without the empty one (empty files need no call); then served without a call
    assert sorted(preads(world)) == [b"/fs/etc/group", b"/fs/etc/hostname", b"/fs/etc/motd", b"/fs/etc/passwd"]
    assert await read_all(tree, files[b"motd"]) == b"motd content\n"  # type: ignore[arg-type]
    assert await read_all(tree, files[b"group"]) == b"group content\n"  # type: ignore[arg-type]
    assert await read_all(tree, files[b"empty"]) == b""  # type: ignore[arg-type]
    assert len(preads(world)) == 4
    assert "file contents fetched ahead: 2, used: 2" in tree.prefetch_summary()


async def test_xattrs_come_ahead_while_a_walker_reads_them(world: World) -> None:
    tree = world.tree
    fs_root = await guest(world, b"fs")
    listed = await read_dir(tree, fs_root)
    await trio.testing.wait_all_tasks_blocked()
    assert world.client.count("lxattrlist") == 0  # nobody asked for xattrs: none fetched
    assert await tree.listxattr(listed[b"big"].inode) == []
    assert world.client.args_of("lxattrlist")[0][0] == b"/fs"
    await read_dir(tree, fs_root)  # the walker goes on: the cached etc/ and boot/ get theirs ahead
    await trio.testing.wait_all_tasks_blocked()
    assert sorted(args[0] for args in world.client.args_of("lxattrlist")) == [b"/fs", b"/fs/boot", b"/fs/etc"]
    etc = await read_dir(tree, listed[b"etc"])
    assert await tree.getxattr(etc[b"hostname"].inode, b"user.comment") == b"hello"
    assert world.client.count("lxattrlist") == 3
