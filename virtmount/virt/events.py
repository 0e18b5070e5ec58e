"""The libvirt event loop, run in one background thread, and the bridge to trio.

libvirt delivers stream and keep-alive events only while an event loop runs.
We run libvirt's default implementation in a daemon thread and hand every
event over to the trio thread with ``TrioToken.run_sync_soon``; no trio code
runs in the libvirt thread and no libvirt callback blocks.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable

import libvirt
import trio

log = logging.getLogger(__name__)

_start_lock = threading.Lock()
_started = False


def _silence_default_error_printer(_ctx: Any, _err: Any) -> None:
    """libvirt prints every error to stderr by default; we report errors ourselves."""


def ensure_event_loop() -> None:
    """Register libvirt's default event implementation and run it in a thread, once per process.

    Must run before the first connection is opened: a connection only gets
    keep-alives and stream events from an event loop registered before it.
    """
    global _started
    with _start_lock:
        if _started:
            return
        libvirt.registerErrorHandler(_silence_default_error_printer, None)
        libvirt.virEventRegisterDefaultImpl()
        thread = threading.Thread(target=_run_forever, name="libvirt-events", daemon=True)
        thread.start()
        _started = True


def _run_forever() -> None:
    while True:
        try:
            libvirt.virEventRunDefaultImpl()
        except Exception:  # the loop must survive anything a callback did
            log.exception("libvirt event loop iteration failed")


def call_in_trio(token: trio.lowlevel.TrioToken, fn: Callable[..., None], *args: Any) -> None:
    """Schedule ``fn(*args)`` in the trio thread; drop it quietly if trio has already finished."""
    try:
        token.run_sync_soon(fn, *args)
    except trio.RunFinishedError:
        pass
