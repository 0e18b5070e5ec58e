"""Fuzzing: arbitrary or mutated daemon bytes yield events or ProtocolError.

Never another exception type, never a hang, and feeding whole or one byte
at a time gives the same result.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from virtmount.guestfs import procs
from virtmount.guestfs.client import GuestfsClient
from virtmount.guestfs.errors import (
    ConnectionLost,
    GuestfsError,
    GuestfsTimeout,
    ProtocolError,
    XdrError,
)
from virtmount.guestfs.procs import Dirent
from virtmount.guestfs.protocol import (
    LAUNCH_FLAG_BYTES,
    DaemonProtocol,
    Event,
    FileChunk,
    FileEnd,
    LaunchFlag,
    NeedData,
    Progress,
    Reply,
    encode_chunk,
    encode_error_reply,
    encode_progress,
    encode_reply,
)
from virtmount.guestfs.xdr import XdrPacker, XdrUnpacker

FUZZ = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def run(data: bytes, step: int | None) -> tuple[list[Event], bool]:
    """Feed ``data`` (in pieces of ``step`` bytes, or whole) and collect events.

    Returns (events, raised ProtocolError).  Bounded: every event consumes
    at least 4 bytes, so more events than len(data) // 4 + 1 means a loop.
    """
    proto = DaemonProtocol()
    events: list[Event] = []
    limit = len(data) // 4 + 1
    pieces = [data] if step is None else [data[i : i + step] for i in range(0, len(data), step)]
    try:
        for piece in pieces:
            proto.receive_data(piece)
            while True:
                ev = proto.next_event()
                if isinstance(ev, NeedData):
                    break
                assert isinstance(ev, (LaunchFlag, Progress, Reply, FileChunk, FileEnd))
                events.append(ev)
                assert len(events) <= limit, "protocol produced events without consuming data"
    except ProtocolError:
        return events, True
    return events, False


def valid_stream() -> bytes:
    p = XdrPacker()
    procs.encode_dirent(p, Dirent(3, "r", b"name"))
    return (
        LAUNCH_FLAG_BYTES
        + encode_reply(422, 1, b"\0" * 176)
        + encode_progress(511, 2, 0, 1)
        + encode_reply(511, 2)
        + encode_chunk(p.get_buffer())
        + encode_chunk(b"")
        + encode_error_reply(138, 3, "ENOENT", "opendir: /x")
        + encode_reply(511, 4)
        + encode_chunk(b"", cancel=True)
    )


def test_valid_stream_parses() -> None:
    events, failed = run(valid_stream(), None)
    assert not failed
    assert len(events) == 9
    assert run(valid_stream(), 1) == (events, False)


@FUZZ
@given(st.binary(max_size=600))
def test_random_bytes(data: bytes) -> None:
    whole = run(data, None)
    assert run(data, 1) == whole
    assert run(data, 7) == whole


@FUZZ
@given(st.binary(max_size=200))
def test_random_bytes_after_a_fileout_reply(data: bytes) -> None:
    stream = encode_reply(511, 1) + data
    whole = run(stream, None)
    assert run(stream, 1) == whole


_mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10_000), st.integers(1, 255)),
    st.tuples(st.just("insert"), st.integers(0, 10_000), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("delete"), st.integers(0, 10_000), st.integers(1, 8)),
    st.tuples(st.just("truncate"), st.integers(0, 10_000), st.just(0)),
)


def mutate(data: bytes, mutations: list[tuple[str, int, object]]) -> bytes:
    buf = bytearray(data)
    for kind, pos, arg in mutations:
        if not buf:
            break
        pos %= len(buf)
        if kind == "flip":
            assert isinstance(arg, int)
            buf[pos] ^= arg
        elif kind == "insert":
            assert isinstance(arg, bytes)
            buf[pos:pos] = arg
        elif kind == "delete":
            assert isinstance(arg, int)
            del buf[pos : pos + arg]
        else:
            del buf[pos:]
    return bytes(buf)


@FUZZ
@given(st.lists(_mutation, min_size=1, max_size=4))
def test_mutated_valid_messages(mutations: list[tuple[str, int, object]]) -> None:
    data = mutate(valid_stream(), mutations)
    whole = run(data, None)
    assert run(data, 1) == whole


@FUZZ
@given(st.binary(max_size=300), st.lists(st.sampled_from(sorted(procs.BY_NAME)), max_size=6))
def test_result_decoders_only_raise_xdr_error(data: bytes, names: list[str]) -> None:
    for name in names:
        try:
            procs.BY_NAME[name].decode_result(data)
        except XdrError:
            pass


@FUZZ
@given(st.binary(max_size=100), st.lists(st.integers(0, 7), max_size=20))
def test_unpacker_only_raises_xdr_error(data: bytes, ops: list[int]) -> None:
    u = XdrUnpacker(data)
    calls: list[Callable[[], object]] = [
        u.unpack_uint32, u.unpack_int32, u.unpack_uint64, u.unpack_int64,
        u.unpack_bool, u.unpack_string, u.unpack_text,
        lambda: u.unpack_array(u.unpack_string),
    ]
    try:
        for op in ops:
            calls[op]()
    except XdrError:
        pass


@settings(max_examples=40, deadline=None, database=None)
@given(st.binary(max_size=300))
def test_client_never_hangs_on_bad_daemon_bytes(garbage: bytes) -> None:
    """A call pending while the daemon sends junk ends, promptly, with a
    defined exception or a result."""

    async def main() -> None:
        client_stream, daemon_stream = trio.testing.memory_stream_pair()
        async with GuestfsClient(client_stream, call_timeout=30) as client:
            await daemon_stream.send_all(LAUNCH_FLAG_BYTES)
            outcome: list[object] = []

            async def caller() -> None:
                try:
                    outcome.append(await client.lstatns(b"/"))
                except (ConnectionLost, GuestfsTimeout, GuestfsError, ProtocolError) as exc:
                    outcome.append(exc)

            with trio.fail_after(60):
                async with trio.open_nursery() as n:
                    n.start_soon(caller)
                    await daemon_stream.receive_some(65536)
                    # A reply header for serial 1 followed by random junk.
                    await daemon_stream.send_all(
                        encode_reply(422, 1, garbage[:176]) + garbage[176:]
                    )
                    await daemon_stream.send_all(struct.pack(">I", 0xFFFFFFF0))
            assert len(outcome) == 1

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
