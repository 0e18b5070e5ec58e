"""Sans-IO protocol core and procedure table, against hand-built wire bytes."""

from __future__ import annotations

import errno
import struct

import pytest

from virtmount.guestfs import procs
from virtmount.guestfs.errors import GuestfsError, ProtocolError
from virtmount.guestfs.procs import Dirent, Statns, Xattr
from virtmount.guestfs.protocol import (
    CANCEL_FLAG_BYTES,
    LAUNCH_FLAG_BYTES,
    MAX_PROGRESS_RUN,
    MESSAGE_MAX,
    CallSplitter,
    DaemonProtocol,
    ErrorBody,
    Event,
    FileChunk,
    FileEnd,
    LaunchFlag,
    NeedData,
    Progress,
    Reply,
    encode_call,
    encode_chunk,
    encode_error_reply,
    encode_progress,
    encode_reply,
)
from virtmount.guestfs.xdr import XdrPacker, XdrUnpacker

U32 = struct.Struct(">I").pack
U64 = struct.Struct(">Q").pack


def header(proc: int, serial: int, *, direction: int = 1, status: int = 0,
           prog: int = 0x2000F5F5, vers: int = 4) -> bytes:
    """guestfs_message_header written out by hand (generator/XDR.ml)."""
    return (U32(prog) + U32(vers) + U32(proc) + U32(direction) + U32(serial)
            + U64(0) + U64(0) + U32(status))


def frame(body: bytes) -> bytes:
    return U32(len(body)) + body


def xdr_string(b: bytes) -> bytes:
    return U32(len(b)) + b + b"\0" * (-len(b) % 4)


def drain(proto: DaemonProtocol) -> list[Event]:
    out: list[Event] = []
    while True:
        ev = proto.next_event()
        if isinstance(ev, NeedData):
            return out
        out.append(ev)


def feed_whole(data: bytes) -> list[Event]:
    proto = DaemonProtocol()
    proto.receive_data(data)
    return drain(proto)


def feed_bytewise(data: bytes) -> list[Event]:
    proto = DaemonProtocol()
    out: list[Event] = []
    for i in range(len(data)):
        proto.receive_data(data[i : i + 1])
        out.extend(drain(proto))
    return out


# ---------------------------------------------------------------------------
# encoding


def test_encode_call_exact_bytes() -> None:
    args, bitmask = procs.LSTATNS.encode_args(b"/etc")
    assert bitmask == 0
    msg = encode_call(422, 7, args)
    expected_body = (
        b"\x20\x00\xf5\xf5" b"\0\0\0\4" b"\0\0\x01\xa6" b"\0\0\0\0" b"\0\0\0\7"
        + b"\0" * 16 + b"\0\0\0\0" + b"\0\0\0\4/etc"
    )
    assert msg == U32(len(expected_body)) + expected_body
    assert len(expected_body) == 48


def test_encode_call_optargs_bitmask_and_layout() -> None:
    # is_dir: Pathname path + OBool followsymlinks (always encoded).
    args, bitmask = procs.IS_DIR.encode_args(b"/x", followsymlinks=True)
    assert bitmask == 1
    assert args == xdr_string(b"/x") + U32(1)
    args, bitmask = procs.IS_DIR.encode_args(b"/x")
    assert bitmask == 0
    assert args == xdr_string(b"/x") + U32(0)
    # umount: force is bit 0, lazyunmount bit 1.
    args, bitmask = procs.UMOUNT.encode_args(b"/", lazyunmount=True)
    assert bitmask == 2
    assert args == xdr_string(b"/") + U32(0) + U32(1)
    msg = encode_call(procs.UMOUNT.number, 1, args, bitmask)
    assert msg[4 + 28 : 4 + 36] == U64(2)  # optargs_bitmask field


def test_encode_args_pread_and_lists() -> None:
    args, _ = procs.PREAD.encode_args(b"/f", 4096, 2**40)
    assert args == xdr_string(b"/f") + U32(4096) + U64(2**40)
    args, _ = procs.INTERNAL_LSTATNSLIST.encode_args(b"/d", [b"a", b"\xffb"])
    assert args == xdr_string(b"/d") + U32(2) + xdr_string(b"a") + xdr_string(b"\xffb")


def test_encode_args_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        procs.LSTATNS.encode_args(b"/etc\0/passwd")
    with pytest.raises(TypeError):
        procs.LSTATNS.encode_args()
    with pytest.raises(TypeError):
        procs.LSTATNS.encode_args(b"/", bogus=True)
    with pytest.raises(TypeError):
        procs.INTERNAL_LSTATNSLIST.encode_args(b"/", b"name")


def test_oversized_call_is_refused() -> None:
    # guestfsd exits on an oversized message: never produce one.
    with pytest.raises(ProtocolError):
        encode_call(1, 1, b"\0" * MESSAGE_MAX)


def test_procedure_numbers_match_libguestfs_1_48_6() -> None:
    expected = {
        "mount": 1, "sync": 2, "list_devices": 7, "list_partitions": 8, "lvs": 11,
        "exists": 36, "is_file": 37, "is_dir": 38, "umount": 45, "umount_all": 47,
        "statvfs": 54, "blockdev_getsize64": 63, "mount_ro": 73, "mount_options": 74,
        "mount_vfs": 75, "ping_daemon": 92, "readdir": 138, "lgetxattrs": 142,
        "mkmountpoint": 148, "rmmountpoint": 149, "readlink": 168, "vfs_type": 198,
        "internal_lxattrlist": 205, "internal_readlinklist": 206, "pread": 207,
        "vfs_label": 253, "vfs_uuid": 254, "pread_device": 276, "lgetxattr": 280,
        "internal_autosync": 282, "internal_exit": 414, "statns": 421, "lstatns": 422,
        "internal_lstatnslist": 423, "list_filesystems": 476, "inspect_os": 480,
        "inspect_get_type": 483, "inspect_get_distro": 484,
        "inspect_get_product_name": 487, "inspect_get_major_version": 489,
        "inspect_get_minor_version": 490, "inspect_get_hostname": 492,
        "inspect_get_mountpoints": 500, "inspect_get_filesystems": 501,
        "internal_readdir": 511, "download": 67, "debug": 76, "ls0": 347,
    }
    for name, number in expected.items():
        assert procs.BY_NAME[name].number == number, name
    assert procs.FILEOUT_NUMBERS == frozenset({511, 67, 347})


# ---------------------------------------------------------------------------
# decoding


def test_flags_reply_and_progress_from_hand_built_bytes() -> None:
    stream = (
        b"\xf5\xf5\x5f\xf5"  # launch flag
        + b"\xff\xff\x55\x55" + U32(422) + U32(9) + U64(5) + U64(10)  # progress
        + b"\xff\xff\xee\xee"  # stray cancel flag: ignored
        + frame(header(422, 9) + b"PAYL")
    )
    events = feed_whole(stream)
    assert events == [
        LaunchFlag(),
        Progress(proc=422, serial=9, position=5, total=10),
        Reply(serial=9, proc=422, payload=b"PAYL", error=None),
    ]
    assert feed_bytewise(stream) == events


def test_error_reply_decoding_and_errno_mapping() -> None:
    body = header(422, 3, status=1) + xdr_string(b"ENOENT") + xdr_string(b"lstat: /nope: No such file")
    [reply] = feed_whole(frame(body))
    assert isinstance(reply, Reply)
    assert reply.error == ErrorBody("ENOENT", "lstat: /nope: No such file")
    assert reply.payload == b""
    err = GuestfsError.from_reply(reply.error.errno_name, reply.error.message, "lstatns")
    assert err.errno == errno.ENOENT
    assert err.errno_name == "ENOENT"
    assert err.proc_name == "lstatns"
    assert not err.is_unknown_procedure
    assert "No such file" in str(err)

    other = GuestfsError.from_reply("EXYZZY", "odd", "x")
    assert other.errno is None and other.errno_name == "EXYZZY"
    none = GuestfsError.from_reply("", "plain", "x")
    assert none.errno is None


def test_unknown_procedure_reply_is_recognised() -> None:
    # Text from the generated daemon/dispatch.c (generator/daemon.ml).
    msg = ("dispatch_incoming_message: unknown procedure number 511, set "
           "LIBGUESTFS_PATH to point to the matching libguestfs appliance directory")
    [reply] = feed_whole(encode_error_reply(511, 4, "", msg))
    assert isinstance(reply, Reply) and reply.error is not None
    err = GuestfsError.from_reply(reply.error.errno_name, reply.error.message, "internal_readdir")
    assert err.is_unknown_procedure


def test_fileout_reply_chunks_and_end() -> None:
    dirents = [Dirent(2, "d", b"."), Dirent(1, "d", b".."), Dirent(12, "r", b"f\xffile")]
    p = XdrPacker()
    for d in dirents:
        procs.encode_dirent(p, d)
    content = p.get_buffer()
    stream = (
        frame(header(511, 5))
        + frame(U32(0) + xdr_string(content[:10]))  # chunk, hand-built
        + encode_progress(511, 5, 1, 2)
        + encode_chunk(content[10:])
        + encode_chunk(b"")
        + encode_reply(422, 6, b"next")
    )
    events = feed_whole(stream)
    assert events == [
        Reply(5, 511, b"", None),
        FileChunk(content[:10]),
        Progress(511, 5, 1, 2),
        FileChunk(content[10:]),
        FileEnd(cancelled=False),
        Reply(6, 422, b"next", None),
    ]
    assert feed_bytewise(stream) == events
    data = b"".join(e.data for e in events if isinstance(e, FileChunk))
    assert procs.INTERNAL_READDIR.decode_result(data) == dirents


def test_fileout_cancel_and_error_reply_without_chunks() -> None:
    stream = (
        encode_reply(511, 1)
        + encode_chunk(b"abc")
        + encode_chunk(b"", cancel=True)
        + encode_error_reply(511, 2, "ENOTDIR", "opendir: /f")
        + encode_reply(422, 3)  # parsed as a reply, not as a chunk
    )
    events = feed_whole(stream)
    assert events == [
        Reply(1, 511, b"", None),
        FileChunk(b"abc"),
        FileEnd(cancelled=True),
        Reply(2, 511, b"", ErrorBody("ENOTDIR", "opendir: /f")),
        Reply(3, 422, b"", None),
    ]


def test_is_fileout_callback_is_used() -> None:
    proto = DaemonProtocol(is_fileout=lambda proc: proc == 99)
    proto.receive_data(encode_reply(99, 1) + encode_chunk(b"x") + encode_chunk(b""))
    assert drain(proto) == [Reply(1, 99, b"", None), FileChunk(b"x"), FileEnd(False)]
    assert not proto.in_file_transfer


@pytest.mark.parametrize(
    "data",
    [
        U32(MESSAGE_MAX + 1),
        frame(header(1, 1, prog=0x20000000)),
        frame(header(1, 1, vers=3)),
        frame(header(1, 1, direction=0)),
        frame(header(1, 1, status=2)),
        frame(b"\0\0\0"),
        frame(header(1, 1, status=1) + U32(64) + b"x" * 64 + xdr_string(b"m")),  # errno > 32
        frame(header(1, 1, status=1) + xdr_string(b"EIO")),  # message missing
        encode_reply(511, 1) + frame(U32(0) + U32(8193) + b"\0" * 8196),  # chunk > 8192
        encode_reply(511, 1) + frame(U32(0) + xdr_string(b"ab") + b"junk"),
        encode_reply(511, 1) + LAUNCH_FLAG_BYTES,
        encode_reply(511, 1) + CANCEL_FLAG_BYTES,
    ],
)
def test_invalid_input_raises_protocol_error(data: bytes) -> None:
    for feeder in (feed_whole, feed_bytewise):
        with pytest.raises(ProtocolError):
            feeder(data)


def test_protocol_error_is_sticky() -> None:
    proto = DaemonProtocol()
    proto.receive_data(frame(header(1, 1, vers=9)))
    with pytest.raises(ProtocolError):
        proto.next_event()
    proto.receive_data(encode_reply(1, 2))
    with pytest.raises(ProtocolError):
        proto.next_event()


def test_partial_data_needs_more() -> None:
    proto = DaemonProtocol()
    msg = encode_reply(2, 1)
    proto.receive_data(msg[:-1])
    assert proto.next_event() == NeedData()
    assert proto.buffered == len(msg) - 1
    proto.receive_data(msg[-1:])
    assert proto.next_event() == Reply(1, 2, b"", None)
    assert proto.next_event() == NeedData()


def test_call_splitter_reads_what_encode_call_writes() -> None:
    splitter = CallSplitter()
    args, bitmask = procs.IS_FILE.encode_args(b"/a", followsymlinks=False)
    data = CANCEL_FLAG_BYTES + encode_call(37, 77, args, bitmask)
    for i in range(len(data)):
        assert splitter.next_call() is None
        splitter.receive_data(data[i : i + 1])
    call = splitter.next_call()
    assert call is not None
    assert (call.proc, call.serial, call.optargs_bitmask, call.args) == (37, 77, 1, args)


# ---------------------------------------------------------------------------
# result decoders


def statns_bytes(values: list[int]) -> bytes:
    return b"".join(struct.pack(">q", v) for v in values)


def test_statns_field_order() -> None:
    values = list(range(100, 122))
    values[1] = -1
    st = procs.LSTATNS.decode_result(statns_bytes(values))
    assert isinstance(st, Statns)
    assert st.st_dev == 100 and st.st_ino == -1 and st.st_mode == 102
    assert st.st_size == 107 and st.st_mtime_sec == 112 and st.st_ctime_nsec == 115
    assert st.st_spare6 == 121
    with pytest.raises(ProtocolError):
        procs.LSTATNS.decode_result(statns_bytes(values)[:-1])
    with pytest.raises(ProtocolError):
        procs.LSTATNS.decode_result(statns_bytes(values) + b"\0\0\0\0")


def test_statvfs_and_list_results() -> None:
    sv = procs.STATVFS.decode_result(b"".join(struct.pack(">q", v) for v in range(11)))
    assert sv.bsize == 0 and sv.namemax == 10 and sv.fsid == 8
    lst = procs.INTERNAL_LSTATNSLIST.decode_result(U32(2) + statns_bytes([1] * 22) + statns_bytes([2] * 22))
    assert [s.st_ino for s in lst] == [1, 2]
    fs = procs.LIST_FILESYSTEMS.decode_result(
        U32(4) + xdr_string(b"/dev/sda1") + xdr_string(b"ext4")
        + xdr_string(b"/dev/sda2") + xdr_string(b"swap"))
    assert fs == {"/dev/sda1": "ext4", "/dev/sda2": "swap"}
    with pytest.raises(ProtocolError):
        procs.LIST_FILESYSTEMS.decode_result(U32(1) + xdr_string(b"/dev/sda1"))
    assert procs.IS_DIR.decode_result(U32(1)) is True
    assert procs.INSPECT_GET_MAJOR_VERSION.decode_result(U32(12)) == 12
    assert procs.BLOCKDEV_GETSIZE64.decode_result(U64(2**33)) == 2**33
    assert procs.READLINK.decode_result(xdr_string(b"t\xffarget")) == b"t\xffarget"
    assert procs.PREAD.decode_result(xdr_string(b"\0\1\2")) == b"\0\1\2"
    assert procs.SYNC.decode_result(b"") is None


def test_old_readdir_and_dirent_char_encoding() -> None:
    # dirent: int64 ino, XDR char (4-byte int), string name.
    body = U32(1) + U64(42) + U32(ord("l")) + xdr_string(b"link")
    assert procs.READDIR.decode_result(body) == [Dirent(42, "l", b"link")]
    # signed char '?' = 63, and a negative char value is accepted too
    body = U32(1) + U64(1) + struct.pack(">i", -1) + xdr_string(b"x")
    assert procs.READDIR.decode_result(body) == [Dirent(1, "\xff", b"x")]


def test_xattr_results_and_lxattrlist_grouping() -> None:
    body = U32(2) + xdr_string(b"user.a") + xdr_string(b"1") + xdr_string(b"security.selinux") + xdr_string(b"ctx\0")
    assert procs.LGETXATTRS.decode_result(body) == [
        Xattr(b"user.a", b"1"), Xattr(b"security.selinux", b"ctx\0")]
    flat = [
        Xattr(b"", b"2\0"), Xattr(b"user.a", b"1"), Xattr(b"user.b", b""),
        Xattr(b"", b""),  # llistxattr failed for the second name
        Xattr(b"", b"0\0"),
    ]
    assert procs.split_lxattrlist(flat, 3) == [
        [Xattr(b"user.a", b"1"), Xattr(b"user.b", b"")], None, []]
    with pytest.raises(ProtocolError):
        procs.split_lxattrlist(flat, 2)
    with pytest.raises(ProtocolError):
        procs.split_lxattrlist([Xattr(b"user.a", b"")], 1)
    with pytest.raises(ProtocolError):
        procs.split_lxattrlist([Xattr(b"", b"5\0")], 1)


def test_dirent_stream_rejects_truncation() -> None:
    p = XdrPacker()
    procs.encode_dirent(p, Dirent(1, "r", b"name"))
    data = p.get_buffer()
    assert procs.decode_dirent_stream(data + data) == [Dirent(1, "r", b"name")] * 2
    with pytest.raises(ProtocolError):
        procs.decode_dirent_stream(data[:-2])
    u = XdrUnpacker(b"")
    assert u.remaining() == 0


def test_progress_messages_in_a_row_are_bounded() -> None:
    """guestfsd sends at most three a second; MAX_PROGRESS_RUN in a row pass, one more is a flood.
    A reply or a chunk starts the count afresh."""
    progress = encode_progress(422, 1, 1, 2)
    burst = progress * MAX_PROGRESS_RUN
    events = feed_whole(burst + encode_reply(422, 1, b"\0" * 176) + burst)
    assert len(events) == 2 * MAX_PROGRESS_RUN + 1
    proto = DaemonProtocol()
    proto.receive_data(burst + progress)
    for _ in range(MAX_PROGRESS_RUN):
        assert isinstance(proto.next_event(), Progress)
    with pytest.raises(ProtocolError, match="flood"):
        proto.next_event()
