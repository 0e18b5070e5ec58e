"""XDR codec: exact byte layouts, round trips, and errors on bad input."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virtmount.guestfs.errors import ProtocolError, XdrError
from virtmount.guestfs.xdr import XdrPacker, XdrUnpacker


def packed(fn_name: str, *args: object) -> bytes:
    p = XdrPacker()
    getattr(p, fn_name)(*args)
    return p.get_buffer()


def test_integer_layouts_are_big_endian() -> None:
    assert packed("pack_uint32", 0x01020304) == b"\x01\x02\x03\x04"
    assert packed("pack_int32", -2) == b"\xff\xff\xff\xfe"
    assert packed("pack_uint64", 0x0102030405060708) == bytes(range(1, 9))
    assert packed("pack_int64", -1) == b"\xff" * 8
    assert packed("pack_bool", True) == b"\0\0\0\1"
    assert packed("pack_bool", False) == b"\0\0\0\0"


def test_string_and_opaque_padding() -> None:
    assert packed("pack_string", b"") == b"\0\0\0\0"
    assert packed("pack_string", b"a") == b"\0\0\0\1a\0\0\0"
    assert packed("pack_string", b"abcd") == b"\0\0\0\4abcd"
    assert packed("pack_string", b"abcde") == b"\0\0\0\5abcde\0\0\0"
    assert packed("pack_opaque", b"\xff\x00") == b"\0\0\0\2\xff\x00\0\0"
    assert packed("pack_fopaque", 3, b"xyz") == b"xyz\0"
    # str is UTF-8, undecodable bytes survive via surrogateescape
    assert packed("pack_string", "é") == b"\0\0\0\2\xc3\xa9\0\0"


def test_arrays_and_optional() -> None:
    p = XdrPacker()
    p.pack_array([1, 2], p.pack_uint32)
    p.pack_optional(None, p.pack_uint32)
    p.pack_optional(7, p.pack_uint32)
    p.pack_farray(2, [b"a", b"b"], p.pack_string)
    data = p.get_buffer()
    assert data[:12] == b"\0\0\0\2\0\0\0\1\0\0\0\2"
    u = XdrUnpacker(data)
    assert u.unpack_array(u.unpack_uint32) == [1, 2]
    assert u.unpack_optional(u.unpack_uint32) is None
    assert u.unpack_optional(u.unpack_uint32) == 7
    assert u.unpack_farray(2, u.unpack_string) == [b"a", b"b"]
    u.done()


def test_pack_range_and_type_checks() -> None:
    p = XdrPacker()
    with pytest.raises(XdrError):
        p.pack_uint32(-1)
    with pytest.raises(XdrError):
        p.pack_uint32(2**32)
    with pytest.raises(XdrError):
        p.pack_int32(2**31)
    with pytest.raises(XdrError):
        p.pack_int64(2**63)
    with pytest.raises(XdrError):
        p.pack_uint32(True)  # bools are not ints on the wire
    with pytest.raises(XdrError):
        p.pack_string(b"abc", max_length=2)
    with pytest.raises(XdrError):
        p.pack_fopaque(4, b"abc")
    with pytest.raises(XdrError):
        p.pack_array([1, 2, 3], p.pack_uint32, max_length=2)
    assert p.get_buffer() == b""


@pytest.mark.parametrize(
    "data, op",
    [
        (b"", "unpack_uint32"),
        (b"\0\0\0", "unpack_int32"),
        (b"\0" * 7, "unpack_uint64"),
        (b"\0\0\0\2", "unpack_bool"),
        (b"\0\0\0\5abc", "unpack_string"),
        (b"\0\0\0\5abcde", "unpack_string"),  # padding missing
        (b"\xff\xff\xff\xff", "unpack_opaque"),
        (b"\0\0\0\xff\xfe", "unpack_text"),
    ],
)
def test_unpack_errors_raise_xdr_error(data: bytes, op: str) -> None:
    u = XdrUnpacker(data)
    with pytest.raises(XdrError) as info:
        getattr(u, op)()
    assert isinstance(info.value, ProtocolError)


def test_max_length_and_huge_array_count() -> None:
    u = XdrUnpacker(b"\0\0\0\3abc\0")
    with pytest.raises(XdrError):
        u.unpack_string(max_length=2)
    # A count far larger than the data must fail fast, not allocate/loop.
    u = XdrUnpacker(b"\x7f\xff\xff\xff" + b"\0" * 8)
    with pytest.raises(XdrError):
        u.unpack_array(u.unpack_uint32)


def test_done_detects_trailing_bytes() -> None:
    u = XdrUnpacker(b"\0\0\0\1\0")
    assert u.unpack_uint32() == 1
    assert u.remaining() == 1
    with pytest.raises(XdrError):
        u.done()
    assert u.rest() == b"\0"
    u.done()


def test_text_decoding_keeps_bad_bytes() -> None:
    u = XdrUnpacker(packed("pack_string", b"a\xffb"))
    text = u.unpack_text()
    assert text.encode("utf-8", "surrogateescape") == b"a\xffb"


_values = st.one_of(
    st.tuples(st.just("uint32"), st.integers(0, 2**32 - 1)),
    st.tuples(st.just("int32"), st.integers(-(2**31), 2**31 - 1)),
    st.tuples(st.just("uint64"), st.integers(0, 2**64 - 1)),
    st.tuples(st.just("int64"), st.integers(-(2**63), 2**63 - 1)),
    st.tuples(st.just("bool"), st.booleans()),
    st.tuples(st.just("string"), st.binary(max_size=40)),
    st.tuples(st.just("opaque"), st.binary(max_size=40)),
    st.tuples(st.just("strings"), st.lists(st.binary(max_size=9), max_size=5)),
)


@settings(max_examples=200, deadline=None, database=None)
@given(st.lists(_values, max_size=12))
def test_round_trip(items: list[tuple[str, object]]) -> None:
    p = XdrPacker()
    for kind, value in items:
        if kind == "strings":
            p.pack_array(value, p.pack_string)  # type: ignore[arg-type]
        else:
            getattr(p, f"pack_{kind}")(value)
    data = p.get_buffer()
    assert len(data) % 4 == 0
    u = XdrUnpacker(data)
    for kind, value in items:
        if kind == "strings":
            assert u.unpack_array(u.unpack_string) == value
        else:
            assert getattr(u, f"unpack_{kind}")() == value
    u.done()
