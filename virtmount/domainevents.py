"""Domain life-cycle events from libvirt, handed to trio (no polling).

A running domain's view is a backup job's export, which ends when the guest
stops: the mount then ends the view at once (its in-flight reads answer EIO)
so that the next access is served from the domain's disks.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator

import libvirt
import trio

from .virt.events import call_in_trio


@contextlib.contextmanager
def stopped_domains(conn: libvirt.virConnect) -> Iterator[trio.MemoryReceiveChannel[str]]:
    """The UUIDs of the connection's domains as they stop, while the context lasts."""
    token = trio.lowlevel.current_trio_token()
    send, receive = trio.open_memory_channel[str](math.inf)

    def deliver(uuid: str) -> None:
        with contextlib.suppress(trio.ClosedResourceError):
            send.send_nowait(uuid)

    def on_lifecycle(_conn: libvirt.virConnect, domain: libvirt.virDomain, event: int, _detail: int,
                     _opaque: Any) -> None:
        if event == libvirt.VIR_DOMAIN_EVENT_STOPPED:
            call_in_trio(token, deliver, domain.UUIDString())

    callback = conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, on_lifecycle, None)
    try:
        yield receive
    finally:
        send.close()
        with contextlib.suppress(libvirt.libvirtError):
            conn.domainEventDeregisterAny(callback)
