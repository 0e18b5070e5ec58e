"""Domain life-cycle events from libvirt, handed to trio (no polling).

A domain's view is decided when its appliance boots: a running domain's is a
backup job's export, which ends when the guest stops; a shut-off domain's is
its disks as they are, which a guest that starts would change under the
appliance (QEMU's image locking keeps most guests from starting meanwhile,
but not those whose disks it does not lock, such as network disks). Either
change ends the view at once (its in-flight reads answer EIO), and the next
access is served the other way. A domain that is undefined or defined anew
(other disks, perhaps) must not keep being served by an appliance that holds
the disks of its old definition.
"""

from __future__ import annotations

import contextlib
import enum
import math
from typing import Any, AsyncIterator, Callable

import libvirt
import trio

from .virt.connection import run_blocking
from .virt.events import call_in_trio

# Bound on deregistering from a connection that is still open (at unmount): the mount must end.
DEREGISTER_TIMEOUT_S = 5.0


class Change(enum.Enum):
    """What happened to a domain, as far as its appliance is concerned."""

    STARTED = "started"  # values complete "the domain …" in log lines
    STOPPED = "stopped"
    REDEFINED = "was defined anew"
    UNDEFINED = "was undefined"


_CHANGES = {
    libvirt.VIR_DOMAIN_EVENT_STARTED: Change.STARTED,
    libvirt.VIR_DOMAIN_EVENT_STOPPED: Change.STOPPED,
    libvirt.VIR_DOMAIN_EVENT_DEFINED: Change.REDEFINED,
    libvirt.VIR_DOMAIN_EVENT_UNDEFINED: Change.UNDEFINED,
}


@contextlib.asynccontextmanager
async def domain_changes(conn: libvirt.virConnect, lost: Callable[[], bool]
                         ) -> AsyncIterator[trio.MemoryReceiveChannel[tuple[str, Change]]]:
    """(UUID, change) of the connection's domains as they start, stop or are (un)defined, while the context
    lasts. ``lost()`` tells whether the connection was lost: its callbacks went with it, and a call on it
    may never return (a deregistration on the trio thread after a libvirtd restart hung a whole mount
    here), so nothing is deregistered then. libvirt is called in worker threads only."""
    token = trio.lowlevel.current_trio_token()
    send, receive = trio.open_memory_channel[tuple[str, Change]](math.inf)

    def deliver(uuid: str, change: Change) -> None:
        with contextlib.suppress(trio.ClosedResourceError):
            send.send_nowait((uuid, change))

    def on_lifecycle(_conn: libvirt.virConnect, domain: libvirt.virDomain, event: int, _detail: int,
                     _opaque: Any) -> None:
        change = _CHANGES.get(event)
        if change is not None:
            call_in_trio(token, deliver, domain.UUIDString(), change)

    callback = await run_blocking(conn.domainEventRegisterAny, None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                                  on_lifecycle, None)
    try:
        yield receive
    finally:
        send.close()
        if not lost():
            with trio.move_on_after(DEREGISTER_TIMEOUT_S) as bounded, contextlib.suppress(libvirt.libvirtError):
                bounded.shield = True
                await run_blocking(conn.domainEventDeregisterAny, callback)
