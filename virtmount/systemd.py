"""systemd's readiness protocol: a `virtmount -f` service of ``Type=notify`` is told when the mount is up.

systemd passes the path of a datagram socket in ``$NOTIFY_SOCKET`` (``@`` for the abstract
namespace); ``READY=1`` sent there marks the service started. Outside systemd this does nothing.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def notify(state: str) -> None:
    """Send ``state`` (e.g. ``READY=1``) to the service manager, if there is one; never raises."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("cannot notify the service manager at %s: %s", os.environ["NOTIFY_SOCKET"], exc.strerror)
