"""Ending restored appliances and backup jobs when the virtmount that runs them dies.

Appliances booted cold are created with auto-destroy: libvirt ends them with
their client's connection. A restored appliance cannot be (libvirt has no such
flag for a restore), and when its client dies without closing the daemon
channel, libvirtd keeps the channel open, so the appliance runs on and keeps
the guest's disks locked (measured: still running minutes after SIGKILL).

So a mount that restores appliances runs this watchdog: a child process with
its own libvirt connection, told over a pipe which restored appliances are
running. When the pipe ends without a goodbye (the mount process died, even
by SIGKILL), it destroys those still owned by that process, then exits.
Backup jobs of running domains (sources/running.py) are not ended when their
client goes either: the watchdog ends those it was told about too, and deletes
their scratch volumes.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from typing import IO

import libvirt
import trio

from .virt import backup
from .virt.connection import without_prompts
from .virt.domainxml import appliance_owner

log = logging.getLogger(__name__)

_READY = "ready"
_GOODBYE = "bye"
BACKUP_ITEM = "backup:"  # a watched backup job: "backup:DOMAIN-UUID:OWNER" (see backup_item)
_START_TIMEOUT_S = 60.0


class Watchdog:
    """The parent's end: say which restored appliances and backup jobs run; ``close`` when none can be left behind."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self._process = process

    @staticmethod
    async def start(uri: str) -> Watchdog | None:
        """Start the watchdog for ``uri``; None (logged) if it cannot connect to libvirt."""
        process = subprocess.Popen(
            [sys.executable, "-m", "virtmount.watchdog", uri, str(os.getpid())],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True,
        )
        assert process.stdout is not None
        with trio.move_on_after(_START_TIMEOUT_S):
            line = await trio.to_thread.run_sync(process.stdout.readline, abandon_on_cancel=True)
            if line.strip() == _READY:
                return Watchdog(process)
        process.kill()
        process.wait()
        log.warning("the appliance watchdog did not start; appliances will boot cold")
        return None

    def _say(self, line: str) -> None:
        assert self._process.stdin is not None
        try:
            self._process.stdin.write(line + "\n")
            self._process.stdin.flush()
        except (BrokenPipeError, ValueError):
            log.warning("the appliance watchdog is gone")

    def watch(self, domain_name: str) -> None:
        self._say(f"+{domain_name}")

    def unwatch(self, domain_name: str) -> None:
        self._say(f"-{domain_name}")

    def close(self) -> None:
        """Every appliance has been shut down: let the watchdog go without destroying anything."""
        self._say(_GOODBYE)
        if self._process.stdin is not None:
            self._process.stdin.close()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()


class WatchdogSource:
    """The mount's one watchdog, started on the first restore (None if it cannot start)."""

    def __init__(self, uri: str) -> None:
        self._uri = uri
        self._lock = trio.Lock()
        self._started = False
        self._watchdog: Watchdog | None = None

    async def get(self) -> Watchdog | None:
        async with self._lock:
            if not self._started:
                self._started = True
                self._watchdog = await Watchdog.start(self._uri)
            return self._watchdog

    def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.close()


def _alive(conn: libvirt.virConnect, uri: str) -> libvirt.virConnect:
    """``conn`` if it still answers, else a new connection (libvirtd may have restarted since)."""
    try:
        conn.getLibVersion()
        return conn
    except libvirt.libvirtError:
        return libvirt.open(without_prompts(uri))


def _watch(commands: IO[str], uri: str, conn: libvirt.virConnect, owner: str) -> None:
    watched: set[str] = set()
    for line in commands:
        line = line.rstrip("\n")
        if line == _GOODBYE:
            return
        if line.startswith("+"):
            watched.add(line[1:])
        elif line.startswith("-"):
            watched.discard(line[1:])
    # the pipe ended without a goodbye: the owner died. Appliances go first: they read the backup jobs' exports.
    try:
        conn = _alive(conn, uri)
    except libvirt.libvirtError as exc:
        print(f"virtmount watchdog: cannot reconnect to {uri}: {exc}", file=sys.stderr)
        return
    for name in sorted(watched, key=lambda item: item.startswith(BACKUP_ITEM)):
        if name.startswith(BACKUP_ITEM):
            _end_backup(conn, name)
            continue
        try:
            domain = conn.lookupByName(name)
            if appliance_owner(domain.XMLDesc(0)) == owner:  # not restored since by another virtmount
                domain.destroy()
                print(f"virtmount watchdog: destroyed {name}, left behind by process {owner}", file=sys.stderr)
        except libvirt.libvirtError:
            pass  # already gone


def backup_item(uuid: str, owner: str) -> str:
    """How a backup job of ``owner``'s on the domain ``uuid`` is named to the watchdog (see sources/running.py)."""
    return f"{BACKUP_ITEM}{uuid}:{owner}"


def _end_backup(conn: libvirt.virConnect, item: str) -> None:
    """End a backup job named ``backup:UUID:OWNER`` (if it is still that owner's) and delete its scratch."""
    _, uuid, owner = item.split(":", 2)
    try:
        domain = conn.lookupByUUIDString(uuid)
        if backup.end_job(conn, domain, owner):
            print(f"virtmount watchdog: ended the backup job on {domain.name()}, left behind by {owner}",
                  file=sys.stderr)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
            print(f"virtmount watchdog: cannot end the backup job on {uuid}: {exc}", file=sys.stderr)


def main(argv: list[str]) -> int:
    uri, owner = argv
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # errors are reported here, not by libvirt
    try:
        conn = libvirt.open(without_prompts(uri))
    except libvirt.libvirtError as exc:
        print(f"virtmount watchdog: cannot connect to {uri}: {exc}", file=sys.stderr)
        return 1
    print(_READY, flush=True)
    _watch(sys.stdin, uri, conn, owner)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
