"""Hostile daemon replies over a real socket, through the real client: every violation fails the
call in flight promptly, drops the connection (the daemon end sees it closed) and fails later calls;
nothing waits for ``call_timeout`` unless the daemon stays silent.

test_guestfs_fuzz.py feeds random bytes to the sans-IO core and a memory stream; here each
case is a deliberate attack on a limit the protocol sets, with the kernel's socket in between.
"""

from __future__ import annotations

import struct
import time

import pytest
import trio

from tests.hostile_daemon import HostileDaemon
from tests.unit.test_guestfs_client import statns_payload
from virtmount.guestfs import procs
from virtmount.guestfs.errors import ConnectionLost, GuestfsTimeout, ProtocolError
from virtmount.guestfs.protocol import (
    ERRNO_STRING_MAX,
    ERROR_LEN,
    LAUNCH_FLAG_BYTES,
    MAX_CHUNK_SIZE,
    MAX_PROGRESS_RUN,
    MESSAGE_MAX,
    PROGRAM,
    PROTOCOL_VERSION,
    STATUS_ERROR,
    CallHeader,
    MessageHeader,
    encode_chunk,
    encode_progress,
    encode_reply,
)
from virtmount.guestfs.xdr import XdrPacker

CALL_TIMEOUT = 60.0  # no case may come near it, except the silent daemon's (which sets its own)
PROMPT = 15.0  # generous bound for "at once" on a loaded 2-core machine


def length_word(n: int) -> bytes:
    return struct.pack(">I", n)


def error_reply_raw(call: CallHeader, errno_name: bytes, message: bytes) -> bytes:
    """An error reply whose strings may break their XDR limits (encode_error_reply keeps to them)."""
    p = XdrPacker()
    MessageHeader(PROGRAM, PROTOCOL_VERSION, call.proc, 1, call.serial, 0, 0, STATUS_ERROR).pack(p)
    p.pack_opaque(errno_name)
    p.pack_opaque(message)
    body = p.get_buffer()
    return length_word(len(body)) + body


def oversized_chunk() -> bytes:
    p = XdrPacker()
    p.pack_int32(0)
    p.pack_opaque(b"x" * (MAX_CHUNK_SIZE + 1))
    body = p.get_buffer()
    return length_word(len(body)) + body


# Each answer to the first call (an lstatns, or a FileOut readdir where it says so) breaks the protocol.
DROPPING_ANSWERS = {
    "length one past GUESTFS_MESSAGE_MAX": lambda c: length_word(MESSAGE_MAX + 1) + b"\0" * 64,
    "length 2**31 - 1, few bytes behind it": lambda c: length_word(0x7FFFFFFF) + b"\0" * 64,
    "reply to a serial never sent": lambda c: encode_reply(c.proc, c.serial + 1000, statns_payload(2)),
    "reply naming another procedure": lambda c: encode_reply(procs.READLINK.number, c.serial, b""),
    "errno string past its 32 bytes": lambda c: error_reply_raw(c, b"E" * (ERRNO_STRING_MAX + 1), b"no"),
    "error message past its 64 KiB": lambda c: error_reply_raw(c, b"EIO", b"m" * (ERROR_LEN + 1)),
    "header of another program": lambda c: encode_reply(c.proc, c.serial)[:4] + b"\x20\x00\xf5\xf6"
    + encode_reply(c.proc, c.serial)[8:],
    "a second launch flag": lambda c: LAUNCH_FLAG_BYTES,
    "a flood of progress messages": lambda c: encode_progress(c.proc, c.serial, 1, 2) * (MAX_PROGRESS_RUN * 3),
}


@pytest.mark.parametrize("case", sorted(DROPPING_ANSWERS))
async def test_a_protocol_violation_drops_the_connection(case: str) -> None:
    daemon = HostileDaemon(DROPPING_ANSWERS[case])
    started = time.monotonic()
    async with daemon.client(CALL_TIMEOUT) as client:
        with trio.fail_after(PROMPT):
            with pytest.raises(ConnectionLost) as lost:
                await client.lstatns(b"/")
        assert client.closed
        assert isinstance(client.failure, ProtocolError), client.failure
        assert "protocol error" in str(lost.value)
        with pytest.raises(ConnectionLost):  # later calls fail at once, nothing is sent
            await client.lstatns(b"/etc")
    assert daemon.wait_dropped(PROMPT), "the client kept the connection open"
    assert time.monotonic() - started < PROMPT
    assert len(daemon.calls) == 1


async def test_an_oversized_file_chunk_drops_the_connection() -> None:
    def answer(call: CallHeader) -> bytes:
        assert call.proc == procs.INTERNAL_READDIR.number
        return encode_reply(call.proc, call.serial) + encode_chunk(b"ok") + oversized_chunk()

    daemon = HostileDaemon(answer)
    async with daemon.client(CALL_TIMEOUT) as client:
        with trio.fail_after(PROMPT), pytest.raises(ConnectionLost):
            await client.internal_readdir(b"/")
        assert isinstance(client.failure, ProtocolError)
    assert daemon.wait_dropped(PROMPT)


async def test_a_message_cut_short_then_eof() -> None:
    daemon = HostileDaemon(lambda c: encode_reply(c.proc, c.serial, statns_payload(2))[:30], hang_up=True)
    async with daemon.client(CALL_TIMEOUT) as client:
        with trio.fail_after(PROMPT), pytest.raises(ConnectionLost, match="closed the connection"):
            await client.lstatns(b"/")


async def test_a_message_cut_short_then_silence_ends_at_the_call_timeout() -> None:
    """The only case that waits: the client cannot tell a slow daemon from a stuck one before the call
    timeout; then the call fails and the connection is dropped (no hang past call_timeout)."""
    daemon = HostileDaemon(lambda c: encode_reply(c.proc, c.serial, statns_payload(2))[:30])
    started = time.monotonic()
    async with daemon.client(call_timeout=1.0) as client:
        with trio.fail_after(PROMPT), pytest.raises(GuestfsTimeout):
            await client.lstatns(b"/")
        assert client.closed
    assert daemon.wait_dropped(PROMPT)
    assert 1.0 <= time.monotonic() - started < PROMPT


async def test_progress_at_the_daemons_pace_is_no_flood() -> None:
    """Progress messages below the limit (a long call, as guestfsd sends them) end in the reply."""
    daemon = HostileDaemon(lambda c: encode_progress(c.proc, c.serial, 1, 2) * (MAX_PROGRESS_RUN // 2)
                           + encode_reply(c.proc, c.serial, statns_payload(7, 42)))
    async with daemon.client(CALL_TIMEOUT) as client:
        with trio.fail_after(PROMPT):
            for _ in range(3):  # the count starts afresh after every reply
                st = await client.lstatns(b"/")
                assert (st.st_ino, st.st_size) == (7, 42)
        assert not client.closed


async def test_an_array_count_past_the_data_fails_only_that_call() -> None:
    """A length inside an intact frame (here a dirent count of 2**32 - 1) is the call's error; the framing
    is still in step, so the connection stays and serves the next call."""

    def answer(call: CallHeader) -> bytes:
        if call.proc == procs.READDIR.number:
            return encode_reply(call.proc, call.serial, length_word(0xFFFFFFFF) + b"\0" * 32)
        return encode_reply(call.proc, call.serial, statns_payload(3))

    daemon = HostileDaemon(answer)
    async with daemon.client(CALL_TIMEOUT) as client:
        with trio.fail_after(PROMPT):
            with pytest.raises(ProtocolError, match="readdir: undecodable reply"):
                await client.legacy_readdir(b"/")
            assert (await client.lstatns(b"/")).st_ino == 3
        assert not client.closed
