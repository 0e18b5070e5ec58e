"""The model over a real client and a hostile daemon on a real socket: what the daemon gets wrong stays
below that one source (EIO there, a log line), and the rest of the mount keeps working.

Guest alpha's appliance is a HostileDaemon (tests/hostile_daemon.py) behind a real GuestfsClient;
guest beta keeps the in-memory fake of test_tree. The tree runs with a nursery, so walk-ahead tasks
meet the hostile replies too: a crash of one of them would end the test's nursery.
"""

from __future__ import annotations

import errno
import os
import struct

import pytest
import trio

from tests.hostile_daemon import HostileDaemon
from tests.unit.test_tree import fs_error, make_world, names_in, walk
from virtmount.fs.nodes import GuestNode
from virtmount.guestfs import procs
from virtmount.guestfs.procs import Dirent
from virtmount.guestfs.protocol import CallHeader, encode_error_reply, encode_reply
from virtmount.guestfs.xdr import XdrPacker, XdrUnpacker
from virtmount.guestlayout import GuestLayout

UNKNOWN = "dispatch_incoming_message: unknown procedure number {}, set LIBGUESTFS_PATH"
LISTED = [b".", b"..", b"ok", b"a/b", b"", b"x\0y", b"sub"]


def statns(ino: int, mode: int) -> bytes:
    values = [0] * 22
    values[0], values[1], values[2], values[3], values[7] = 2049, ino, mode, 1, 100
    return b"".join(struct.pack(">q", v) for v in values)


def answer(call: CallHeader) -> bytes:
    """A daemon that lists impossible names in every directory, and answers a read of /fs/ok with a wrong serial."""
    if call.proc == procs.INTERNAL_READDIR.number:
        return encode_error_reply(call.proc, call.serial, "", UNKNOWN.format(call.proc))
    if call.proc == procs.READDIR.number:
        p = XdrPacker()
        p.pack_uint32(len(LISTED))
        for ino, name in enumerate(LISTED, start=10):
            procs.encode_dirent(p, Dirent(ino, "d" if name == b"sub" else "r", name))
        return encode_reply(call.proc, call.serial, p.get_buffer())
    if call.proc == procs.INTERNAL_LSTATNSLIST.number:
        u = XdrUnpacker(call.args)
        u.unpack_string()
        names = u.unpack_array(u.unpack_string)
        p = XdrPacker()
        p.pack_uint32(len(names))
        payload = b"".join(statns(20 + i, 0o40755 if name == b"sub" else 0o100644) for i, name in enumerate(names))
        return encode_reply(call.proc, call.serial, p.get_buffer() + payload)
    path = XdrUnpacker(call.args).unpack_string()
    if call.proc == procs.PREAD.number:
        return encode_reply(call.proc, call.serial + 7, b"")
    return encode_reply(call.proc, call.serial, statns(2, 0o40755))


async def test_a_hostile_daemon_harms_only_its_own_source(caplog: pytest.LogCaptureFixture) -> None:
    daemon = HostileDaemon(answer)
    async with trio.open_nursery() as nursery, daemon.client(call_timeout=30) as client:
        world = make_world(nursery=nursery)
        world.results["alpha"] = GuestLayout(client=client, has_os=True, generation=1)
        with trio.fail_after(15):
            fs_root = await walk(world.tree, b"domains", b"alpha", b"fs")
            assert isinstance(fs_root, GuestNode)
            await world.tree.guests.boot_if_needed(fs_root)
            assert await names_in(world.tree, fs_root) == [b"ok", b"sub"]  # the impossible names left out
            assert "the appliance listed impossible names" in caplog.text
            ok = await world.tree.lookup(fs_root.inode, b"ok")
            for _ in range(2):  # a reply to a serial never sent: the connection is dropped; EIO, then EIO again
                handle = await world.tree.open(ok.inode, os.O_RDONLY)
                try:
                    assert await fs_error(world.tree.read(handle, 0, 4096)) == errno.EIO
                finally:
                    world.tree.release(handle)
            assert client.closed
            beta_devices = await walk(world.tree, b"domains", b"beta", b"devices")
            assert await names_in(world.tree, beta_devices) == [b"sda1", b"sda2"]  # the other guest still served
        nursery.cancel_scope.cancel()
    assert daemon.wait_dropped(5)
