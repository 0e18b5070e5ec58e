"""GuestfsClient against a fake guestfsd speaking the protocol in-process."""

from __future__ import annotations

import errno
import struct
from collections.abc import AsyncIterator, Callable

import pytest
import trio
import trio.testing

from virtmount.guestfs import procs
from virtmount.guestfs.client import GuestfsClient
from virtmount.guestfs.errors import ConnectionLost, GuestfsError, GuestfsTimeout, ProtocolError
from virtmount.guestfs.procs import Dirent, Statns, Xattr
from virtmount.guestfs.protocol import (
    LAUNCH_FLAG_BYTES,
    CallHeader,
    CallSplitter,
    encode_chunk,
    encode_error_reply,
    encode_progress,
    encode_reply,
)
from virtmount.guestfs.xdr import XdrPacker, XdrUnpacker

UNKNOWN_PROC = (
    "dispatch_incoming_message: unknown procedure number {}, set LIBGUESTFS_PATH "
    "to point to the matching libguestfs appliance directory"
)


class FakeDaemon:
    """The daemon end of a memory stream: records calls, sends what tests say."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.splitter = CallSplitter()
        self.calls: list[CallHeader] = []
        self.eof = trio.Event()
        self._send, self._recv = trio.open_memory_channel[CallHeader](100)

    async def reader(self) -> None:
        while True:
            try:
                data = await self.stream.receive_some(65536)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                data = b""
            if not data:
                self.eof.set()
                return
            self.splitter.receive_data(data)
            while (call := self.splitter.next_call()) is not None:
                self.calls.append(call)
                await self._send.send(call)

    async def next_call(self) -> CallHeader:
        with trio.fail_after(5):
            return await self._recv.receive()

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def reply(self, call: CallHeader, payload: bytes = b"") -> None:
        await self.send(encode_reply(call.proc, call.serial, payload))

    async def error(self, call: CallHeader, errno_name: str, message: str) -> None:
        await self.send(encode_error_reply(call.proc, call.serial, errno_name, message))

    async def serve(self, handler: Callable[[CallHeader], bytes]) -> None:
        """Answer every call with handler(call) (full wire bytes)."""
        while True:
            call = await self._recv.receive()
            await self.send(handler(call))


def statns_payload(ino: int, size: int = 0) -> bytes:
    values = [0] * 22
    values[1] = ino
    values[7] = size
    return b"".join(struct.pack(">q", v) for v in values)


def path_arg(call: CallHeader) -> bytes:
    return XdrUnpacker(call.args).unpack_string()


def dirent_bytes(dirents: list[Dirent]) -> bytes:
    p = XdrPacker()
    for d in dirents:
        procs.encode_dirent(p, d)
    return p.get_buffer()


@pytest.fixture
async def pair(nursery: trio.Nursery) -> AsyncIterator[tuple[GuestfsClient, FakeDaemon]]:
    client_stream, daemon_stream = trio.testing.memory_stream_pair()
    daemon = FakeDaemon(daemon_stream)
    nursery.start_soon(daemon.reader)
    client = GuestfsClient(client_stream, call_timeout=10.0)
    client.start(nursery)
    await daemon.send(LAUNCH_FLAG_BYTES)
    await client.wait_for_launch(5)
    yield client, daemon
    await client.aclose()


async def test_simple_call_and_exact_request(pair: tuple[GuestfsClient, FakeDaemon]) -> None:
    client, daemon = pair
    result: list[Statns] = []

    async def caller() -> None:
        result.append(await client.lstatns(b"/etc"))

    async with trio.open_nursery() as n:
        n.start_soon(caller)
        call = await daemon.next_call()
        assert call.proc == 422
        assert call.optargs_bitmask == 0
        assert path_arg(call) == b"/etc"
        await daemon.send(encode_progress(422, call.serial, 1, 2))  # skipped
        await daemon.reply(call, statns_payload(1234, size=99))
    assert result[0].st_ino == 1234 and result[0].st_size == 99


async def test_calls_are_pipelined_and_matched_by_serial(
    pair: tuple[GuestfsClient, FakeDaemon],
) -> None:
    client, daemon = pair
    paths = [f"/p{i}".encode() for i in range(5)]
    results: dict[bytes, int] = {}

    async def caller(path: bytes) -> None:
        st = await client.lstatns(path)
        results[path] = st.st_ino

    async with trio.open_nursery() as n:
        for path in paths:
            n.start_soon(caller, path)
        # All five requests reach the daemon before any reply is sent.
        calls = [await daemon.next_call() for _ in paths]
        assert len({c.serial for c in calls}) == 5
        assert sorted(path_arg(c) for c in calls) == sorted(paths)
        assert not results
        # Serial numbers increase in wire order.
        assert [c.serial for c in calls] == sorted(c.serial for c in calls)
        # Answer in reverse order: matching must go by serial, not order.
        for c in reversed(calls):
            ino = int(path_arg(c)[2:]) + 1000
            await daemon.reply(c, statns_payload(ino))
    assert results == {p: int(p[2:]) + 1000 for p in paths}


async def test_error_reply_maps_errno(pair: tuple[GuestfsClient, FakeDaemon]) -> None:
    client, daemon = pair

    async def answer() -> None:
        call = await daemon.next_call()
        await daemon.error(call, "ENOENT", "lstat: /nope: No such file or directory")
        call = await daemon.next_call()
        await daemon.reply(call, struct.pack(">I", 1))

    async with trio.open_nursery() as n:
        n.start_soon(answer)
        with pytest.raises(GuestfsError) as info:
            await client.lstatns(b"/nope")
        # the connection stays usable after an error reply
        assert await client.exists(b"/") is True
    err = info.value
    assert err.errno == errno.ENOENT
    assert err.errno_name == "ENOENT"
    assert err.proc_name == "lstatns"
    assert "No such file" in err.message
    assert not client.closed


async def test_timeout_closes_connection_and_fails_all_pending(
    pair: tuple[GuestfsClient, FakeDaemon], autojump_clock: trio.testing.MockClock
) -> None:
    client, daemon = pair
    outcomes: dict[str, BaseException] = {}

    async def caller(name: str, timeout: float | None) -> None:
        try:
            await client.lstatns(b"/" + name.encode(), timeout=timeout)
        except BaseException as exc:  # noqa: BLE001 - recorded for asserts
            outcomes[name] = exc

    async with trio.open_nursery() as n:
        n.start_soon(caller, "slow", 1.0)
        await daemon.next_call()
        n.start_soon(caller, "b", None)
        n.start_soon(caller, "c", None)
        await daemon.next_call()
        await daemon.next_call()
        # the daemon never answers
    assert isinstance(outcomes["slow"], GuestfsTimeout)
    assert isinstance(outcomes["b"], ConnectionLost)
    assert isinstance(outcomes["c"], ConnectionLost)
    assert client.closed
    with trio.fail_after(1):
        await daemon.eof.wait()  # the stream really was closed
    with pytest.raises(ConnectionLost):
        await client.lstatns(b"/after")


async def test_readdir_falls_back_when_internal_readdir_is_unknown(
    pair: tuple[GuestfsClient, FakeDaemon],
) -> None:
    client, daemon = pair
    entries = [Dirent(2, "d", b"."), Dirent(1, "d", b".."), Dirent(7, "r", b"a\xffb")]
    old_payload = XdrPacker()
    old_payload.pack_array(entries, lambda d: procs.encode_dirent(old_payload, d))

    def handler(call: CallHeader) -> bytes:
        if call.proc == 511:
            return encode_error_reply(511, call.serial, "", UNKNOWN_PROC.format(511))
        assert call.proc == 138
        return encode_reply(138, call.serial, old_payload.get_buffer())

    async with trio.open_nursery() as n:
        n.start_soon(daemon.serve, handler)
        assert client.supports("internal_readdir") is None
        assert await client.readdir(b"/") == entries
        assert client.supports("internal_readdir") is False
        assert await client.readdir(b"/etc") == entries
        n.cancel_scope.cancel()
    assert [c.proc for c in daemon.calls] == [511, 138, 138]
    assert path_arg(daemon.calls[2]) == b"/etc"


TOO_LARGE = ("guestfsd: failed to encode reply body\n"
             "(maybe the reply exceeds the maximum message size in the protocol?)")


async def test_a_listing_too_large_for_one_readdir_reply_comes_from_ls0(
    pair: tuple[GuestfsClient, FakeDaemon],
) -> None:
    """guestfsd 1.48 answers readdir of a huge directory (over 4 MiB of dirents) with an error; ls0 streams."""
    client, daemon = pair
    names = [b"%060d" % i for i in range(3000)] + [b"\xff odd"]
    stream = b"".join(name + b"\0" for name in names)

    def handler(call: CallHeader) -> bytes:
        if call.proc == 511:
            return encode_error_reply(511, call.serial, "", UNKNOWN_PROC.format(511))
        if call.proc == 138:
            return encode_error_reply(138, call.serial, "", TOO_LARGE)
        assert call.proc == procs.LS0.number and path_arg(call) == b"/huge"
        chunks = [encode_chunk(stream[i:i + 8192]) for i in range(0, len(stream), 8192)]
        return encode_reply(call.proc, call.serial) + b"".join(chunks) + encode_chunk(b"")

    async with trio.open_nursery() as n:
        n.start_soon(daemon.serve, handler)
        listed = await client.readdir(b"/huge")
        n.cancel_scope.cancel()
    assert [d.name for d in listed] == names
    assert {(d.ino, d.ftyp) for d in listed} == {(-1, "u")}


async def test_other_readdir_errors_are_not_retried_with_ls0(pair: tuple[GuestfsClient, FakeDaemon]) -> None:
    client, daemon = pair

    def handler(call: CallHeader) -> bytes:
        if call.proc == 511:
            return encode_error_reply(511, call.serial, "", UNKNOWN_PROC.format(511))
        return encode_error_reply(call.proc, call.serial, "ENOTDIR", "opendir: /f: Not a directory")

    async with trio.open_nursery() as n:
        n.start_soon(daemon.serve, handler)
        with pytest.raises(GuestfsError) as info:
            await client.readdir(b"/f")
        n.cancel_scope.cancel()
    assert info.value.errno == errno.ENOTDIR
    assert procs.LS0.number not in [c.proc for c in daemon.calls]


async def test_readdir_uses_fileout_when_available(
    pair: tuple[GuestfsClient, FakeDaemon],
) -> None:
    client, daemon = pair
    entries = [Dirent(i, "r", b"file%d" % i) for i in range(300)]
    content = dirent_bytes(entries)

    def handler(call: CallHeader) -> bytes:
        assert call.proc == 511
        out = encode_reply(511, call.serial)
        for i in range(0, len(content), 8192):
            out += encode_chunk(content[i : i + 8192])
            out += encode_progress(511, call.serial, i, len(content))
        return out + encode_chunk(b"")

    async with trio.open_nursery() as n:
        n.start_soon(daemon.serve, handler)
        assert await client.readdir(b"/big") == entries
        assert client.supports("internal_readdir") is True
        assert await client.readdir(b"/big") == entries
        n.cancel_scope.cancel()
    assert [c.proc for c in daemon.calls] == [511, 511]


async def test_nothing_is_written_during_a_fileout_transfer(
    pair: tuple[GuestfsClient, FakeDaemon],
) -> None:
    client, daemon = pair
    results: list[object] = []

    async def readdir() -> None:
        results.append(await client.internal_readdir(b"/d"))

    async def stat() -> None:
        results.append((await client.lstatns(b"/x")).st_ino)

    async with trio.open_nursery() as n:
        n.start_soon(readdir)
        rd = await daemon.next_call()
        assert rd.proc == 511
        n.start_soon(stat)
        await trio.testing.wait_all_tasks_blocked()
        assert len(daemon.calls) == 1  # lstatns held back
        await daemon.reply(rd)
        await daemon.send(encode_chunk(dirent_bytes([Dirent(5, "d", b"sub")])))
        await trio.testing.wait_all_tasks_blocked()
        assert len(daemon.calls) == 1  # still mid-transfer
        await daemon.send(encode_chunk(b""))
        st = await daemon.next_call()
        assert st.proc == 422
        await daemon.reply(st, statns_payload(55))
    assert results == [[Dirent(5, "d", b"sub")], 55]


async def test_fileout_error_and_cancel_release_the_gate(
    pair: tuple[GuestfsClient, FakeDaemon],
) -> None:
    client, daemon = pair

    def handler(call: CallHeader) -> bytes:
        path = path_arg(call)
        if call.proc == 511 and path == b"/enoent":
            return encode_error_reply(511, call.serial, "ENOENT", "opendir: /enoent")
        if call.proc == 511:
            return encode_reply(511, call.serial) + encode_chunk(b"xx") + encode_chunk(b"", cancel=True)
        return encode_reply(call.proc, call.serial, struct.pack(">I", 0))

    async with trio.open_nursery() as n:
        n.start_soon(daemon.serve, handler)
        with pytest.raises(GuestfsError) as info:
            await client.internal_readdir(b"/enoent")
        assert info.value.errno == errno.ENOENT
        assert await client.exists(b"/") is False
        with pytest.raises(GuestfsError) as info:
            await client.internal_readdir(b"/cancelled")
        assert "cancelled" in info.value.message
        assert await client.exists(b"/") is False
        n.cancel_scope.cancel()
    assert not client.closed


async def test_garbage_from_daemon_fails_pending_calls(
    pair: tuple[GuestfsClient, FakeDaemon],
) -> None:
    client, daemon = pair
    errors: list[BaseException] = []

    async def caller() -> None:
        try:
            await client.lstatns(b"/")
        except ConnectionLost as exc:
            errors.append(exc)

    async with trio.open_nursery() as n:
        n.start_soon(caller)
        n.start_soon(caller)
        await daemon.next_call()
        await daemon.next_call()
        await daemon.send(b"\x00\x00\x00\x08garbage!")
    assert len(errors) == 2
    assert isinstance(client.failure, ProtocolError)
    assert client.closed
    with trio.fail_after(1):
        await daemon.eof.wait()


async def test_reply_with_unknown_serial_is_a_protocol_error(
    pair: tuple[GuestfsClient, FakeDaemon],
) -> None:
    client, daemon = pair
    async with trio.open_nursery() as n:

        async def caller() -> None:
            with pytest.raises(ConnectionLost):
                await client.lstatns(b"/")

        n.start_soon(caller)
        call = await daemon.next_call()
        await daemon.send(encode_reply(422, call.serial + 100, statns_payload(1)))
    assert isinstance(client.failure, ProtocolError)


async def test_daemon_eof_fails_pending(pair: tuple[GuestfsClient, FakeDaemon]) -> None:
    client, daemon = pair
    async with trio.open_nursery() as n:

        async def caller() -> None:
            with pytest.raises(ConnectionLost):
                await client.sync()

        n.start_soon(caller)
        await daemon.next_call()
        await daemon.stream.aclose()
    assert client.closed


async def test_cancelled_caller_does_not_break_the_connection(
    pair: tuple[GuestfsClient, FakeDaemon],
) -> None:
    client, daemon = pair
    async with trio.open_nursery() as n:
        n.start_soon(client.lstatns, b"/abandoned")
        first = await daemon.next_call()
        n.cancel_scope.cancel()
    # The abandoned call's reply arrives later and is discarded quietly.
    await daemon.reply(first, statns_payload(1))
    async with trio.open_nursery() as n:
        n.start_soon(daemon.serve, lambda c: encode_reply(c.proc, c.serial, statns_payload(2)))
        assert (await client.lstatns(b"/next")).st_ino == 2
        n.cancel_scope.cancel()
    assert not client.closed


async def test_calls_wait_for_the_launch_flag(nursery: trio.Nursery) -> None:
    client_stream, daemon_stream = trio.testing.memory_stream_pair()
    daemon = FakeDaemon(daemon_stream)
    nursery.start_soon(daemon.reader)
    async with GuestfsClient(client_stream) as client:
        results: list[bool] = []

        async def pinger() -> None:
            await client.ping_daemon()
            results.append(True)

        async with trio.open_nursery() as n:
            n.start_soon(pinger)
            await trio.testing.wait_all_tasks_blocked()
            assert daemon.calls == []
            await daemon.send(LAUNCH_FLAG_BYTES)
            call = await daemon.next_call()
            assert call.proc == 92 and call.args == b""
            await daemon.reply(call)
        assert results == [True]
        assert client.launched
    assert client.closed


async def test_wait_for_launch_timeout_and_close(autojump_clock: trio.testing.MockClock) -> None:
    client_stream, daemon_stream = trio.testing.memory_stream_pair()
    async with GuestfsClient(client_stream) as client:
        with pytest.raises(GuestfsTimeout):
            await client.wait_for_launch(3)
        await daemon_stream.aclose()
        with pytest.raises(ConnectionLost):
            await client.wait_for_launch(3)


async def test_context_manager_does_not_wrap_body_exceptions() -> None:
    client_stream, _daemon_stream = trio.testing.memory_stream_pair()
    with pytest.raises(KeyError):
        async with GuestfsClient(client_stream):
            raise KeyError("body")


async def test_list_helpers_batch_and_group(pair: tuple[GuestfsClient, FakeDaemon]) -> None:
    client, daemon = pair

    def handler(call: CallHeader) -> bytes:
        u = XdrUnpacker(call.args)
        u.unpack_string()
        names = u.unpack_array(u.unpack_string)
        p = XdrPacker()
        if call.proc == 423:  # internal_lstatnslist: st_ino -1 marks failures
            p.pack_uint32(len(names))
            for name in names:
                ino = -1 if name.startswith(b"missing") else int(name[1:])
                p.pack_fopaque(176, statns_payload(ino))
        elif call.proc == 205:  # internal_lxattrlist
            flat: list[Xattr] = []
            for name in names:
                if name == b"broken":
                    flat.append(Xattr(b"", b""))
                else:
                    flat += [Xattr(b"", b"1\0"), Xattr(b"user.n", name)]
            p.pack_array(flat, lambda x: procs.encode_xattr(p, x))
        elif call.proc == 206:  # internal_readlinklist
            p.pack_array([b"->" + n if n.startswith(b"l") else b"" for n in names], p.pack_string)
        else:
            raise AssertionError(call.proc)
        return encode_reply(call.proc, call.serial, p.get_buffer())

    names = [b"f%d" % i for i in range(2500)] + [b"missing"]
    async with trio.open_nursery() as n:
        n.start_soon(daemon.serve, handler)
        stats = await client.lstatnslist(b"/d", names)
        assert len(daemon.calls) == 3  # batches of 1000
        assert [s.st_ino if s else None for s in stats] == list(range(2500)) + [None]
        xattrs = await client.lxattrlist(b"/d", [b"a", b"broken", b"c"])
        assert xattrs == [[Xattr(b"user.n", b"a")], None, [Xattr(b"user.n", b"c")]]
        links = await client.readlinklist(b"/d", [b"l1", b"x"])
        assert links == [b"->l1", b""]
        n.cancel_scope.cancel()


async def test_optargs_and_typed_results(pair: tuple[GuestfsClient, FakeDaemon]) -> None:
    client, daemon = pair
    seen: list[CallHeader] = []

    def handler(call: CallHeader) -> bytes:
        seen.append(call)
        p = XdrPacker()
        if call.proc == 38:
            p.pack_bool(True)
        elif call.proc == 476:
            p.pack_array(["/dev/sda1", "ext4", "/dev/vg/lv", "xfs"], p.pack_string)
        elif call.proc == 500:
            p.pack_array(["/", "/dev/sda1", "/boot", "/dev/sda2"], p.pack_string)
        elif call.proc == 489:
            p.pack_int32(9)
        elif call.proc == 207:
            u = XdrUnpacker(call.args)
            u.unpack_string()
            count, offset = u.unpack_int32(), u.unpack_int64()
            p.pack_opaque(bytes([offset % 256]) * count)
        return encode_reply(call.proc, call.serial, p.get_buffer())

    async with trio.open_nursery() as n:
        n.start_soon(daemon.serve, handler)
        assert await client.is_dir(b"/l", followsymlinks=True) is True
        assert await client.is_dir(b"/l") is True
        assert await client.list_filesystems() == {"/dev/sda1": "ext4", "/dev/vg/lv": "xfs"}
        assert await client.inspect_get_mountpoints("/dev/sda1") == {
            "/": "/dev/sda1", "/boot": "/dev/sda2"}
        assert await client.inspect_get_major_version("/dev/sda1") == 9
        assert await client.pread(b"/f", 3, 7) == b"\x07\x07\x07"
        n.cancel_scope.cancel()
    assert seen[0].optargs_bitmask == 1 and seen[0].args.endswith(b"\0\0\0\1")
    assert seen[1].optargs_bitmask == 0 and seen[1].args.endswith(b"\0\0\0\0")


async def test_exit_daemon_sends_autosync_then_exit(
    pair: tuple[GuestfsClient, FakeDaemon],
) -> None:
    client, daemon = pair

    async def fake() -> None:
        call = await daemon.next_call()
        assert call.proc == 282
        await daemon.error(call, "EBUSY", "umount: busy")  # logged, not raised
        call = await daemon.next_call()
        assert call.proc == 414
        await daemon.reply(call)
        await daemon.stream.aclose()

    async with trio.open_nursery() as n:
        n.start_soon(fake)
        await client.exit_daemon()
    assert client.closed


async def test_undecodable_reply_fails_only_that_call(
    pair: tuple[GuestfsClient, FakeDaemon],
) -> None:
    client, daemon = pair

    def handler(call: CallHeader) -> bytes:
        if call.proc == 422:
            return encode_reply(422, call.serial, b"\0\0\0\1")  # far too short
        return encode_reply(call.proc, call.serial, struct.pack(">I", 1))

    async with trio.open_nursery() as n:
        n.start_soon(daemon.serve, handler)
        with pytest.raises(ProtocolError):
            await client.lstatns(b"/")
        assert await client.exists(b"/") is True
        n.cancel_scope.cancel()


async def test_custom_fileout_proc_through_call(pair: tuple[GuestfsClient, FakeDaemon]) -> None:
    client, daemon = pair
    download = procs.Proc(
        "fake_download", 999, (("path", procs.Arg.PATH),), lambda u: u.rest(), fileout=True
    )

    def handler(call: CallHeader) -> bytes:
        assert call.proc == 999
        return (encode_reply(999, call.serial) + encode_chunk(b"hello ")
                + encode_chunk(b"world") + encode_chunk(b""))

    async with trio.open_nursery() as n:
        n.start_soon(daemon.serve, handler)
        assert await client.call(download, b"/f") == b"hello world"
        n.cancel_scope.cancel()


async def test_attach_without_launch_flag(nursery: trio.Nursery) -> None:
    client_stream, daemon_stream = trio.testing.memory_stream_pair()
    daemon = FakeDaemon(daemon_stream)
    nursery.start_soon(daemon.reader)
    nursery.start_soon(daemon.serve, lambda c: encode_reply(c.proc, c.serial))
    async with GuestfsClient(client_stream, require_launch_flag=False) as client:
        rtt = await client.measure_round_trip()
        assert rtt >= 0
        assert not client.launched
    assert [c.proc for c in daemon.calls] == [92]
