"""Minimal XDR (RFC 4506) encoder and decoder.

Only what the guestfs protocol (generator/XDR.ml, guestfs_protocol.x)
needs: 32/64-bit integers, bool, variable and fixed opaque data, strings,
counted arrays and optional ("*") values.  All quantities are big-endian
and every item is padded to a multiple of four bytes.

The unpacker never lets IndexError, struct.error or similar escape:
truncated or invalid input raises :class:`XdrError`.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from typing import TypeVar

from .errors import XdrError

__all__ = ["XdrError", "XdrPacker", "XdrUnpacker", "UNLIMITED"]

T = TypeVar("T")

#: Maximum length used for ``string<>`` / ``opaque<>`` (no explicit bound).
UNLIMITED = 0xFFFFFFFF

_U32 = struct.Struct(">I")
_I32 = struct.Struct(">i")
_U64 = struct.Struct(">Q")
_I64 = struct.Struct(">q")


def _padding(length: int) -> int:
    return (4 - (length & 3)) & 3


class XdrPacker:
    """Appends XDR-encoded items to an internal buffer."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def get_buffer(self) -> bytes:
        """Return everything packed so far."""
        return bytes(self._buf)

    def __len__(self) -> int:
        return len(self._buf)

    def _int(self, fmt: struct.Struct, value: int, lo: int, hi: int, kind: str) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise XdrError(f"{kind}: expected int, got {type(value).__name__}")
        if not lo <= value <= hi:
            raise XdrError(f"{kind}: {value} out of range")
        self._buf += fmt.pack(value)

    def pack_uint32(self, value: int) -> None:
        self._int(_U32, value, 0, 0xFFFFFFFF, "uint32")

    def pack_int32(self, value: int) -> None:
        self._int(_I32, value, -(2**31), 2**31 - 1, "int32")

    def pack_uint64(self, value: int) -> None:
        self._int(_U64, value, 0, 2**64 - 1, "uint64")

    def pack_int64(self, value: int) -> None:
        self._int(_I64, value, -(2**63), 2**63 - 1, "int64")

    def pack_enum(self, value: int) -> None:
        """Enums are signed 32-bit integers on the wire."""
        self.pack_int32(value)

    def pack_bool(self, value: bool) -> None:
        self._buf += _U32.pack(1 if value else 0)

    def pack_fopaque(self, size: int, data: bytes) -> None:
        """Fixed-length opaque: exactly ``size`` bytes, then padding."""
        if len(data) != size:
            raise XdrError(f"fixed opaque: expected {size} bytes, got {len(data)}")
        self._buf += data
        self._buf += b"\0" * _padding(size)

    def pack_opaque(self, data: bytes, max_length: int = UNLIMITED) -> None:
        """Variable-length opaque: length word, bytes, padding."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise XdrError(f"opaque: expected bytes, got {type(data).__name__}")
        length = len(data)
        if length > max_length or length > 0xFFFFFFFF:
            raise XdrError(f"opaque: length {length} exceeds maximum {max_length}")
        self._buf += _U32.pack(length)
        self._buf += data
        self._buf += b"\0" * _padding(length)

    def pack_string(self, data: bytes | str, max_length: int = UNLIMITED) -> None:
        """XDR string: same layout as opaque; str is encoded as UTF-8."""
        if isinstance(data, str):
            data = data.encode("utf-8", "surrogateescape")
        self.pack_opaque(data, max_length)

    def pack_array(
        self,
        items: Iterable[T],
        pack_item: Callable[[T], None],
        max_length: int = UNLIMITED,
    ) -> None:
        """Counted (variable-length) array."""
        seq = list(items)
        if len(seq) > max_length:
            raise XdrError(f"array: length {len(seq)} exceeds maximum {max_length}")
        self.pack_uint32(len(seq))
        for item in seq:
            pack_item(item)

    def pack_farray(self, size: int, items: Iterable[T], pack_item: Callable[[T], None]) -> None:
        """Fixed-length array (no count word)."""
        seq = list(items)
        if len(seq) != size:
            raise XdrError(f"fixed array: expected {size} items, got {len(seq)}")
        for item in seq:
            pack_item(item)

    def pack_optional(self, value: T | None, pack_item: Callable[[T], None]) -> None:
        """Optional data (``type *name``): a bool, then the value if present."""
        if value is None:
            self.pack_bool(False)
        else:
            self.pack_bool(True)
            pack_item(value)


class XdrUnpacker:
    """Decodes XDR items from a bytes-like buffer, front to back."""

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self._data = bytes(data)
        self._pos = 0

    @property
    def position(self) -> int:
        return self._pos

    def remaining(self) -> int:
        return len(self._data) - self._pos

    def rest(self) -> bytes:
        """Return (and consume) every byte not decoded yet."""
        out = self._data[self._pos :]
        self._pos = len(self._data)
        return out

    def done(self) -> None:
        """Raise XdrError unless the whole buffer has been consumed."""
        if self._pos != len(self._data):
            raise XdrError(f"{len(self._data) - self._pos} unexpected trailing bytes")

    def _take(self, n: int, what: str) -> bytes:
        if n < 0 or self._pos + n > len(self._data):
            raise XdrError(
                f"{what}: need {n} bytes at offset {self._pos}, "
                f"only {len(self._data) - self._pos} left"
            )
        chunk = self._data[self._pos : self._pos + n]
        self._pos += n
        return chunk

    def unpack_uint32(self) -> int:
        value: int = _U32.unpack(self._take(4, "uint32"))[0]
        return value

    def unpack_int32(self) -> int:
        value: int = _I32.unpack(self._take(4, "int32"))[0]
        return value

    def unpack_uint64(self) -> int:
        value: int = _U64.unpack(self._take(8, "uint64"))[0]
        return value

    def unpack_int64(self) -> int:
        value: int = _I64.unpack(self._take(8, "int64"))[0]
        return value

    def unpack_enum(self) -> int:
        return self.unpack_int32()

    def unpack_bool(self) -> bool:
        value = self.unpack_uint32()
        if value not in (0, 1):
            raise XdrError(f"bool: invalid value {value:#x}")
        return value == 1

    def unpack_fopaque(self, size: int) -> bytes:
        data = self._take(size, "fixed opaque")
        # Padding content is not checked, like glibc's xdr_opaque.
        self._take(_padding(size), "opaque padding")
        return data

    def unpack_opaque(self, max_length: int = UNLIMITED) -> bytes:
        length = self.unpack_uint32()
        if length > max_length:
            raise XdrError(f"opaque: length {length} exceeds maximum {max_length}")
        return self.unpack_fopaque(length)

    def unpack_string(self, max_length: int = UNLIMITED) -> bytes:
        """XDR string as raw bytes (guest file names are not text)."""
        return self.unpack_opaque(max_length)

    def unpack_text(self, max_length: int = UNLIMITED, errors: str = "surrogateescape") -> str:
        """XDR string decoded as UTF-8, for intrinsically textual values."""
        return self.unpack_string(max_length).decode("utf-8", errors)

    def unpack_array(self, unpack_item: Callable[[], T], max_length: int = UNLIMITED) -> list[T]:
        count = self.unpack_uint32()
        if count > max_length:
            raise XdrError(f"array: length {count} exceeds maximum {max_length}")
        # Every XDR item takes at least 4 bytes; reject absurd counts early
        # instead of looping over data that cannot be there.
        if count > self.remaining() // 4:
            raise XdrError(f"array: count {count} larger than the remaining data")
        return [unpack_item() for _ in range(count)]

    def unpack_farray(self, size: int, unpack_item: Callable[[], T]) -> list[T]:
        return [unpack_item() for _ in range(size)]

    def unpack_optional(self, unpack_item: Callable[[], T]) -> T | None:
        return unpack_item() if self.unpack_bool() else None
