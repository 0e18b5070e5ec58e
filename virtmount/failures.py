"""Which errno a failure answers, decided in this one module.

Every exception that libvirt, the guestfs daemon protocol or an appliance
raises reaches a FUSE reply as exactly one errno chosen here (README, "When
things go wrong", has the table); the callers name the source and log the
reason. Specific errnos are kept for what a user can act on; a failure of the
machinery (connection, appliance, daemon, protocol) is EIO.
"""

from __future__ import annotations

import errno

import libvirt

from .errors import VirtmountError
from .guestfs.errors import GuestfsError, GuestfsTimeout
from .virt.connection import libvirt_message
from .virt.stream import StreamClosed

_LIBVIRT_GONE = frozenset({
    libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_NO_STORAGE_POOL, libvirt.VIR_ERR_NO_STORAGE_VOL,
})
_LIBVIRT_DENIED = frozenset({
    libvirt.VIR_ERR_AUTH_FAILED, libvirt.VIR_ERR_AUTH_CANCELLED, libvirt.VIR_ERR_OPERATION_DENIED,
    libvirt.VIR_ERR_ACCESS_DENIED,
})
_NO_SPACE = "No space left on device"
# QEMU's message when another QEMU (the running guest, another tool) holds an image's lock.
_LOCKED = ("Failed to get shared", "Failed to get \"write\" lock", "Failed to get \"consistent read\" lock")


class ErrnoError(VirtmountError):
    """A failure that already knows its errno (e.g. ENOENT: the source is gone)."""

    def __init__(self, message: str, errno_value: int = errno.EIO) -> None:
        super().__init__(message)
        self.errno = errno_value


def errno_of(exc: BaseException) -> int:
    """The errno that ``exc`` answers to the process whose system call met it."""
    if isinstance(exc, ErrnoError):
        return exc.errno
    if isinstance(exc, GuestfsError):
        return exc.errno or errno.EIO  # the guest's own answer (ENOENT, EACCES, ...), as its kernel gave it
    if isinstance(exc, GuestfsTimeout):
        return errno.ETIMEDOUT
    if isinstance(exc, libvirt.libvirtError):
        return _libvirt_errno(exc)
    if isinstance(exc, StreamClosed) and _NO_SPACE in str(exc):  # an upload into a full pool
        return errno.ENOSPC
    return errno.EIO


def _libvirt_errno(exc: libvirt.libvirtError) -> int:
    code, message = exc.get_error_code(), libvirt_message(exc)
    if code in _LIBVIRT_GONE:
        return errno.ENOENT
    if code in _LIBVIRT_DENIED:
        return errno.EACCES
    if code == libvirt.VIR_ERR_OPERATION_TIMEOUT:
        return errno.ETIMEDOUT
    if _NO_SPACE in message or (code == libvirt.VIR_ERR_SYSTEM_ERROR and exc.get_int1() == errno.ENOSPC):
        return errno.ENOSPC
    if any(words in message for words in _LOCKED):
        return errno.EBUSY
    return errno.EIO


def reason_of(exc: BaseException) -> str:
    """What went wrong, on one line, for the log line that names the source."""
    if isinstance(exc, libvirt.libvirtError):
        return libvirt_message(exc)
    return " ".join(str(exc).split()) or type(exc).__name__
