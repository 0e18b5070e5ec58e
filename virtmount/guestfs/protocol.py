"""Sans-IO core of the library <-> guestfsd wire protocol.

No I/O and no trio here: feed received bytes with
:meth:`DaemonProtocol.receive_data`, pull :class:`Event` objects with
:meth:`DaemonProtocol.next_event` until it returns :class:`NeedData`, and
build outgoing calls with :func:`encode_call`.

Wire format (libguestfs 1.48.6, ``generator/XDR.ml``, ``lib/proto.c``,
``daemon/proto.c``, ``daemon/guestfsd.c``):

* Every message is a 4-byte big-endian length followed by that many bytes
  of XDR.  Lengths are at most ``GUESTFS_MESSAGE_MAX`` (4 MiB).
* Three length values are flags, never followed by a length-counted body:

  - ``LAUNCH_FLAG`` 0xf5f55ff5: sent once, alone, by guestfsd when ready.
  - ``PROGRESS_FLAG`` 0xffff5555: followed by exactly 24 bytes
    (guestfs_progress: proc, serial, uint64 position, uint64 total).  Can
    appear at any message boundary, also between FileOut chunks.  guestfsd
    sends them for the call in progress 2 s into it, then at most every
    1/3 s, and one at 100% (daemon/proto.c notify_progress): more than
    ``MAX_PROGRESS_RUN`` in a row is a flood, not a daemon at work.
  - ``CANCEL_FLAG`` 0xffffeeee: the daemon only sends it alone during
    FileIn uploads (which we never do); stray ones are ignored, as
    lib/proto.c does.

* A reply is guestfs_message_header (prog, vers, proc, direction, serial,
  progress_hint, optargs_bitmask, status) followed either by the ret struct
  (status OK) or by guestfs_message_error (string errno_string<32>, string
  error_message<65536>).
* A successful reply to a FileOut procedure is followed by length-framed
  guestfs_chunk messages (int cancel; opaque data<8192>) ending with an
  empty chunk (done) or a chunk with cancel != 0 (daemon gave up).  An error
  reply to a FileOut procedure has no chunks.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from . import procs
from .errors import ProtocolError, XdrError
from .xdr import XdrPacker, XdrUnpacker

__all__ = [
    "CANCEL_FLAG",
    "DIRECTION_CALL",
    "DIRECTION_REPLY",
    "ERROR_LEN",
    "ERRNO_STRING_MAX",
    "LAUNCH_FLAG",
    "MAX_CHUNK_SIZE",
    "MAX_PROGRESS_RUN",
    "MESSAGE_MAX",
    "PROGRAM",
    "PROGRESS_FLAG",
    "PROGRESS_SIZE",
    "PROTOCOL_VERSION",
    "STATUS_ERROR",
    "STATUS_OK",
    "CallHeader",
    "CallSplitter",
    "DaemonProtocol",
    "ErrorBody",
    "Event",
    "FileChunk",
    "FileEnd",
    "LaunchFlag",
    "MessageHeader",
    "NeedData",
    "Progress",
    "Reply",
    "encode_call",
    "encode_chunk",
    "encode_error_reply",
    "encode_progress",
    "encode_reply",
    "LAUNCH_FLAG_BYTES",
    "CANCEL_FLAG_BYTES",
]

# Constants from generator/XDR.ml (guestfs_protocol.x).
PROGRAM = 0x2000F5F5
PROTOCOL_VERSION = 4
MESSAGE_MAX = 4 * 1024 * 1024
LAUNCH_FLAG = 0xF5F55FF5
CANCEL_FLAG = 0xFFFFEEEE
PROGRESS_FLAG = 0xFFFF5555
DIRECTION_CALL = 0
DIRECTION_REPLY = 1
STATUS_OK = 0
STATUS_ERROR = 1
ERROR_LEN = 64 * 1024
ERRNO_STRING_MAX = 32
MAX_CHUNK_SIZE = 8192
#: Size of the raw guestfs_progress body after PROGRESS_FLAG (lib/proto.c).
PROGRESS_SIZE = 24
#: Progress messages in a row (no reply or chunk between them) that end the connection: guestfsd's own
#: rate (at most three a second) takes almost an hour to send this many for one call.
MAX_PROGRESS_RUN = 10_000
#: Encoded size of guestfs_message_header.
HEADER_SIZE = 4 * 5 + 8 * 2 + 4

_U32 = struct.Struct(">I")
LAUNCH_FLAG_BYTES = _U32.pack(LAUNCH_FLAG)
CANCEL_FLAG_BYTES = _U32.pack(CANCEL_FLAG)


# ----------------------------------------------------------------------
# Events


class Event:
    """Base class of everything :meth:`DaemonProtocol.next_event` returns."""

    __slots__ = ()


@dataclass(frozen=True)
class NeedData(Event):
    """No complete event is buffered; feed more bytes."""


@dataclass(frozen=True)
class LaunchFlag(Event):
    """guestfsd is up and reading requests."""


@dataclass(frozen=True)
class Progress(Event):
    """A progress notification for the call in progress (safe to ignore)."""

    proc: int
    serial: int
    position: int
    total: int


@dataclass(frozen=True)
class ErrorBody:
    """guestfs_message_error: errno name ("" if none) and message text."""

    errno_name: str
    message: str


@dataclass(frozen=True)
class Reply(Event):
    """A reply header plus either the raw ret struct or an error."""

    serial: int
    proc: int
    payload: bytes = b""
    error: ErrorBody | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class FileChunk(Event):
    """One non-empty chunk of FileOut data for the preceding reply."""

    data: bytes


@dataclass(frozen=True)
class FileEnd(Event):
    """End of the FileOut data; ``cancelled`` if the daemon aborted it."""

    cancelled: bool


_NEED_DATA = NeedData()
_LAUNCH = LaunchFlag()


# ----------------------------------------------------------------------
# Header codec


@dataclass(frozen=True)
class MessageHeader:
    """guestfs_message_header (generator/XDR.ml)."""

    prog: int
    vers: int
    proc: int
    direction: int
    serial: int
    progress_hint: int
    optargs_bitmask: int
    status: int

    def pack(self, p: XdrPacker) -> None:
        p.pack_uint32(self.prog)
        p.pack_uint32(self.vers)
        p.pack_enum(self.proc)
        p.pack_enum(self.direction)
        p.pack_uint32(self.serial)
        p.pack_uint64(self.progress_hint)
        p.pack_uint64(self.optargs_bitmask)
        p.pack_enum(self.status)

    @classmethod
    def unpack(cls, u: XdrUnpacker) -> MessageHeader:
        return cls(
            prog=u.unpack_uint32(),
            vers=u.unpack_uint32(),
            proc=u.unpack_enum(),
            direction=u.unpack_enum(),
            serial=u.unpack_uint32(),
            progress_hint=u.unpack_uint64(),
            optargs_bitmask=u.unpack_uint64(),
            status=u.unpack_enum(),
        )

    def check(self, direction: int) -> None:
        """Raise ProtocolError unless prog/vers/direction/status are sane."""
        if self.prog != PROGRAM:
            raise ProtocolError(f"wrong program {self.prog:#x} (expected {PROGRAM:#x})")
        if self.vers != PROTOCOL_VERSION:
            raise ProtocolError(f"wrong protocol version {self.vers}")
        if self.direction != direction:
            raise ProtocolError(f"unexpected message direction {self.direction}")
        if self.status not in (STATUS_OK, STATUS_ERROR):
            raise ProtocolError(f"invalid message status {self.status}")


def _frame(body: bytes) -> bytes:
    if len(body) > MESSAGE_MAX:
        # guestfsd exits (daemon/proto.c main_loop) on an oversized message,
        # so this must never reach the wire.
        raise ProtocolError(f"message of {len(body)} bytes exceeds GUESTFS_MESSAGE_MAX")
    return _U32.pack(len(body)) + body


def encode_call(
    proc: int,
    serial: int,
    args: bytes = b"",
    optargs_bitmask: int = 0,
    progress_hint: int = 0,
) -> bytes:
    """Frame one request: length word, call header, XDR args struct."""
    p = XdrPacker()
    MessageHeader(
        PROGRAM,
        PROTOCOL_VERSION,
        proc,
        DIRECTION_CALL,
        serial,
        progress_hint,
        optargs_bitmask,
        STATUS_OK,
    ).pack(p)
    return _frame(p.get_buffer() + args)


# Daemon-side encoders.  virtmount never sends these; they exist so that
# tests and fake daemons produce exactly what daemon/proto.c writes.


def encode_reply(proc: int, serial: int, payload: bytes = b"") -> bytes:
    """A successful reply (daemon/proto.c reply())."""
    p = XdrPacker()
    MessageHeader(
        PROGRAM, PROTOCOL_VERSION, proc, DIRECTION_REPLY, serial, 0, 0, STATUS_OK
    ).pack(p)
    return _frame(p.get_buffer() + payload)


def encode_error_reply(proc: int, serial: int, errno_name: str, message: str) -> bytes:
    """An error reply (daemon/proto.c send_error())."""
    p = XdrPacker()
    MessageHeader(
        PROGRAM, PROTOCOL_VERSION, proc, DIRECTION_REPLY, serial, 0, 0, STATUS_ERROR
    ).pack(p)
    p.pack_string(errno_name, ERRNO_STRING_MAX)
    p.pack_string(message.encode("utf-8", "surrogateescape")[:ERROR_LEN], ERROR_LEN)
    return _frame(p.get_buffer())


def encode_chunk(data: bytes, cancel: bool = False) -> bytes:
    """One guestfs_chunk message (daemon/proto.c send_chunk())."""
    p = XdrPacker()
    p.pack_int32(1 if cancel else 0)
    p.pack_opaque(data, MAX_CHUNK_SIZE)
    return _frame(p.get_buffer())


def encode_progress(proc: int, serial: int, position: int, total: int) -> bytes:
    """PROGRESS_FLAG plus the unframed 24-byte guestfs_progress."""
    p = XdrPacker()
    p.pack_uint32(PROGRESS_FLAG)
    p.pack_enum(proc)
    p.pack_uint32(serial)
    p.pack_uint64(position)
    p.pack_uint64(total)
    return p.get_buffer()


# ----------------------------------------------------------------------
# Receiving side


class _Buffer:
    """Byte buffer consumed from the front without quadratic copying."""

    def __init__(self) -> None:
        self._data = bytearray()
        self._pos = 0

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._pos and self._pos >= len(self._data) // 2:
            del self._data[: self._pos]
            self._pos = 0
        self._data += data

    def __len__(self) -> int:
        return len(self._data) - self._pos

    def peek_u32(self) -> int | None:
        if len(self) < 4:
            return None
        value: int = _U32.unpack_from(self._data, self._pos)[0]
        return value

    def take(self, n: int) -> bytes:
        out = bytes(self._data[self._pos : self._pos + n])
        self._pos += n
        return out


class DaemonProtocol:
    """Parses the daemon -> library byte stream into events.

    ``is_fileout(proc)`` tells whether a successful reply to ``proc`` is
    followed by file chunks; it defaults to the procedure table in
    :mod:`virtmount.guestfs.procs`.

    Any violation raises :class:`ProtocolError`; after that the object is
    broken and every further :meth:`next_event` raises the same error.
    """

    def __init__(
        self,
        is_fileout: Callable[[int], bool] | None = None,
        *,
        max_message: int = MESSAGE_MAX,
    ) -> None:
        self._is_fileout = is_fileout if is_fileout is not None else procs.is_fileout
        self._max_message = max_message
        self._buf = _Buffer()
        self._transfer: Reply | None = None
        self._error: ProtocolError | None = None
        self._progress_run = 0

    @property
    def in_file_transfer(self) -> bool:
        """True between a FileOut reply and its FileEnd."""
        return self._transfer is not None

    @property
    def buffered(self) -> int:
        """Number of received bytes not yet turned into events."""
        return len(self._buf)

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Append bytes received from the daemon."""
        self._buf.feed(data)

    def next_event(self) -> Event:
        """Return the next complete event, or NeedData."""
        if self._error is not None:
            raise self._error
        try:
            return self._next_event()
        except ProtocolError as exc:
            self._error = exc
            raise

    def _next_event(self) -> Event:
        while True:
            word = self._buf.peek_u32()
            if word is None:
                return _NEED_DATA
            if word == LAUNCH_FLAG:
                if self._transfer is not None:
                    raise ProtocolError("launch flag received during a file transfer")
                self._buf.take(4)
                return _LAUNCH
            if word == CANCEL_FLAG:
                if self._transfer is not None:
                    raise ProtocolError("cancel flag received during a file transfer")
                self._buf.take(4)
                continue
            if word == PROGRESS_FLAG:
                if len(self._buf) < 4 + PROGRESS_SIZE:
                    return _NEED_DATA
                self._progress_run += 1
                if self._progress_run > MAX_PROGRESS_RUN:
                    raise ProtocolError(f"a flood of more than {MAX_PROGRESS_RUN} progress messages in a row")
                self._buf.take(4)
                u = XdrUnpacker(self._buf.take(PROGRESS_SIZE))
                return Progress(
                    proc=u.unpack_enum(),
                    serial=u.unpack_uint32(),
                    position=u.unpack_uint64(),
                    total=u.unpack_uint64(),
                )
            if word > self._max_message:
                raise ProtocolError(
                    f"message length {word} exceeds maximum {self._max_message}"
                )
            if len(self._buf) < 4 + word:
                return _NEED_DATA
            self._buf.take(4)
            body = self._buf.take(word)
            self._progress_run = 0
            if self._transfer is not None:
                return self._parse_chunk(body)
            return self._parse_reply(body)

    def _parse_chunk(self, body: bytes) -> Event:
        u = XdrUnpacker(body)
        try:
            cancel = u.unpack_int32()
            data = u.unpack_opaque(MAX_CHUNK_SIZE)
            u.done()
        except XdrError as exc:
            raise ProtocolError(f"bad file chunk: {exc}") from exc
        if cancel != 0:
            # lib/proto.c: any non-zero cancel ends the transfer in error.
            self._transfer = None
            return FileEnd(cancelled=True)
        if not data:
            self._transfer = None
            return FileEnd(cancelled=False)
        return FileChunk(data)

    def _parse_reply(self, body: bytes) -> Reply:
        u = XdrUnpacker(body)
        try:
            hdr = MessageHeader.unpack(u)
        except XdrError as exc:
            raise ProtocolError(f"bad reply header: {exc}") from exc
        hdr.check(DIRECTION_REPLY)
        if hdr.status == STATUS_ERROR:
            try:
                errno_name = u.unpack_text(ERRNO_STRING_MAX, "replace")
                message = u.unpack_text(ERROR_LEN, "replace")
                u.done()
            except XdrError as exc:
                raise ProtocolError(f"bad error reply body: {exc}") from exc
            return Reply(hdr.serial, hdr.proc, b"", ErrorBody(errno_name, message))
        reply = Reply(hdr.serial, hdr.proc, u.rest(), None)
        if self._is_fileout(hdr.proc):
            self._transfer = reply
        return reply


# ----------------------------------------------------------------------
# Daemon side (for fake daemons in tests)


@dataclass(frozen=True)
class CallHeader:
    """A decoded request: header fields plus the raw args bytes."""

    proc: int
    serial: int
    optargs_bitmask: int
    progress_hint: int
    args: bytes


class CallSplitter:
    """Splits the library -> daemon stream into calls, like daemon/proto.c.

    Cancel flags between messages are skipped.  Meant for fake daemons.
    """

    def __init__(self) -> None:
        self._buf = _Buffer()

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        self._buf.feed(data)

    def next_call(self) -> CallHeader | None:
        """Return the next complete call or None if more bytes are needed."""
        while True:
            word = self._buf.peek_u32()
            if word is None:
                return None
            if word == CANCEL_FLAG:
                self._buf.take(4)
                continue
            if word > MESSAGE_MAX:
                raise ProtocolError(f"incoming message is too long ({word} bytes)")
            if len(self._buf) < 4 + word:
                return None
            self._buf.take(4)
            u = XdrUnpacker(self._buf.take(word))
            hdr = MessageHeader.unpack(u)
            hdr.check(DIRECTION_CALL)
            return CallHeader(
                hdr.proc, hdr.serial, hdr.optargs_bitmask, hdr.progress_hint, u.rest()
            )
