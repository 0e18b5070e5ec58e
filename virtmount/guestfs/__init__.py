"""Talk to the libguestfs appliance daemon (guestfsd) over a byte stream.

Layers, bottom up: :mod:`.xdr` (codec), :mod:`.protocol` (sans-IO framing
and events), :mod:`.procs` (procedure table and result types),
:mod:`.client` (trio client with pipelined calls).
"""

from .client import ByteStream, GuestfsClient
from .errors import (
    ConnectionLost,
    GuestfsClientError,
    GuestfsError,
    GuestfsTimeout,
    ProtocolError,
    XdrError,
)
from .procs import Dirent, Statns, Statvfs, Xattr

__all__ = [
    "ByteStream",
    "ConnectionLost",
    "Dirent",
    "GuestfsClient",
    "GuestfsClientError",
    "GuestfsError",
    "GuestfsTimeout",
    "ProtocolError",
    "Statns",
    "Statvfs",
    "XdrError",
    "Xattr",
]
