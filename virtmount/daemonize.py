"""Running the mount in the background, with an exit status that says whether it mounted.

The parent forks before any thread or event loop exists, then waits on a
pipe: the child writes "ready" once the FUSE mount is up, or its one-line
error, and the parent exits 0 or 1 accordingly. The child detaches (new
session, standard streams to /dev/null) only after it is ready, so start-up
errors still reach the user.
"""

from __future__ import annotations

import os
import sys
from typing import Callable

from .errors import VirtmountError, sole_error
from .guestfs.errors import GuestfsClientError

_READY = b"ready\n"


def run_in_background(serve: Callable[[Callable[[], None]], None]) -> int:
    """Fork; the child runs ``serve(on_ready)``; return the parent's exit code."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        os.setsid()
        _child(serve, write_end)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        message = pipe.read()
    if message == _READY:
        return 0
    text = message.decode("utf-8", "replace").strip() or "the mount process ended before the mount was ready"
    print(f"virtmount: {text}", file=sys.stderr)
    os.waitpid(pid, 0)
    return 1


def _child(serve: Callable[[Callable[[], None]], None], pipe_fd: int) -> None:
    status = 0

    def on_ready() -> None:
        os.write(pipe_fd, _READY)
        os.close(pipe_fd)
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.close(devnull)

    try:
        try:
            serve(on_ready)
        except BaseExceptionGroup as group:
            raise sole_error(group) from None
    except (VirtmountError, GuestfsClientError) as exc:
        _report(pipe_fd, str(exc))
        status = 1
    except BaseException as exc:  # noqa: BLE001 - the parent must always hear back
        _report(pipe_fd, f"internal error: {exc!r}")
        status = 1
    os._exit(status)


def _report(pipe_fd: int, message: str) -> None:
    try:
        os.write(pipe_fd, message.encode() + b"\n")
    except OSError:
        pass  # already reported ready; the error goes to the log only
