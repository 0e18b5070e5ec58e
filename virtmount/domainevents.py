"""Domain life-cycle events from libvirt, handed to trio (no polling).

A domain's view is decided when its appliance boots: a running domain's is a
backup job's export, which ends when the guest stops; a shut-off domain's is
its disks as they are, which a guest that starts would change under the
appliance (QEMU's image locking keeps most guests from starting meanwhile,
but not those whose disks it does not lock, such as network disks). Either
change ends the view at once, and the next access is served the other way.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Iterator

import libvirt
import trio

from .virt.events import call_in_trio


@dataclass(frozen=True)
class StateChange:
    uuid: str
    started: bool  # False: stopped


@contextlib.contextmanager
def domain_state_changes(conn: libvirt.virConnect) -> Iterator[trio.MemoryReceiveChannel[StateChange]]:
    """The connection's domains as they start and stop, while the context lasts."""
    token = trio.lowlevel.current_trio_token()
    send, receive = trio.open_memory_channel[StateChange](math.inf)

    def deliver(change: StateChange) -> None:
        with contextlib.suppress(trio.ClosedResourceError):
            send.send_nowait(change)

    def on_lifecycle(_conn: libvirt.virConnect, domain: libvirt.virDomain, event: int, _detail: int,
                     _opaque: Any) -> None:
        if event in (libvirt.VIR_DOMAIN_EVENT_STARTED, libvirt.VIR_DOMAIN_EVENT_STOPPED):
            call_in_trio(token, deliver, StateChange(domain.UUIDString(), event == libvirt.VIR_DOMAIN_EVENT_STARTED))

    callback = conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, on_lifecycle, None)
    try:
        yield receive
    finally:
        send.close()
        with contextlib.suppress(libvirt.libvirtError):
            conn.domainEventDeregisterAny(callback)
