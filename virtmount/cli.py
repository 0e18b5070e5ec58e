"""Command line: argv -> configuration -> run; user errors become one line on stderr and an exit code."""

from __future__ import annotations

import argparse
import logging
import logging.handlers
import os
import sys
from typing import Callable, NoReturn, Sequence

import trio

from . import __version__
from .config import Config, options_help, parse_options
from .errors import UsageError, VirtmountError, sole_error
from .guestfs.errors import GuestfsClientError
from .daemonize import run_in_background
from .fs.tree import RELEASE_XATTR
from .appliance import ApplianceSettings
from .inspection import format_report, inspect_domain
from .leftovers import collect
from .mount import check_mountpoint, serve
from .status import format_table, read_status
from .systemd import notify
from .virt.connection import check_uri, close_connection, open_connection

log = logging.getLogger(__name__)

_DESCRIPTION = """\
Browse the filesystems of the guests on a libvirt connection.

  virtmount [-f] [-o OPTS] URI MOUNTPOINT
      mount the connection: MOUNTPOINT/domains/<name>/{domain.xml,fs/,devices/}.
      Unmount with: fusermount3 -u MOUNTPOINT (or umount MOUNTPOINT).
      Also: mount -t fuse.virtmount -o ro URI MOUNTPOINT, and fstab (see virtmount(1)).
  virtmount inspect [-o OPTS] URI DOMAIN
      boot an appliance for the shut-off DOMAIN, print its operating system
      and filesystems, and shut the appliance down.
  virtmount release MOUNTPOINT DOMAIN|volumes/POOL/VOLUME
      shut that appliance down now, so that the domain can be started.
  virtmount status [--json] MOUNTPOINT
      what the mount and each appliance is doing (booting, ready, idle, failed
      and why), as a table or as JSON.
  virtmount gc [-o OPTS] URI
      delete from the host what virtmount left there and nothing uses: older
      appliance builds, saved appliances of other builds or settings (-o),
      forgotten overlays, and what dead virtmounts left running.
"""


class _Parser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of printing usage and exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _add_common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", dest="options", action="append", default=[], metavar="OPT[,OPT...]",
                        help="options, see below")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")


def _new_parser(prog: str) -> argparse.ArgumentParser:
    parser = _Parser(
        prog=prog,
        description=_DESCRIPTION,
        epilog="options (-o):\n" + options_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"virtmount {__version__}")
    return parser


def _mount_parser() -> argparse.ArgumentParser:
    parser = _new_parser("virtmount")
    parser.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    _add_common_options(parser)
    parser.add_argument("uri", help="libvirt URI, e.g. qemu:///system or qemu+ssh://host/system")
    parser.add_argument("mountpoint", help="an empty directory")
    return parser


def _inspect_parser() -> argparse.ArgumentParser:
    parser = _new_parser("virtmount inspect")
    _add_common_options(parser)
    parser.add_argument("uri", help="libvirt URI, e.g. qemu:///system or qemu+ssh://host/system")
    parser.add_argument("domain", help="name of a shut-off domain")
    return parser


def _status_parser() -> argparse.ArgumentParser:
    parser = _new_parser("virtmount status")
    parser.add_argument("--json", action="store_true", help="print JSON, for programs")
    parser.add_argument("mountpoint", help="where virtmount is mounted")
    return parser


def _release_parser() -> argparse.ArgumentParser:
    parser = _new_parser("virtmount release")
    parser.add_argument("mountpoint", help="where virtmount is mounted")
    parser.add_argument("domain", help="the domain whose appliance to shut down, or volumes/POOL/VOLUME")
    return parser


def _gc_parser() -> argparse.ArgumentParser:
    parser = _new_parser("virtmount gc")
    _add_common_options(parser)
    parser.add_argument("uri", help="libvirt URI of the host to clean up")
    return parser


def _configure_logging(verbose: bool, debug: bool, *, to_syslog: bool = False) -> None:
    """stderr in the foreground; syslog (if there is one) once detached."""
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    handler: logging.Handler = logging.StreamHandler()
    if to_syslog and os.path.exists("/dev/log"):
        handler = logging.handlers.SysLogHandler(address="/dev/log")
    handler.setFormatter(logging.Formatter(
        "virtmount: %(message)s" if not debug else "%(asctime)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)


def _serve_logged(args: argparse.Namespace, mountpoint: str, config: Config, on_ready: Callable[[], None]) -> None:
    _configure_logging(args.verbose, config.debug, to_syslog=True)
    trio.run(serve, args.uri, mountpoint, config, on_ready)


async def _inspect(uri: str, domain: str, config: Config) -> None:
    report = await inspect_domain(uri, domain, config.appliance)
    print(format_report(report))


async def _gc(uri: str, settings: ApplianceSettings) -> None:
    conn = await open_connection(uri)
    try:
        deleted = await collect(conn, settings)
    finally:
        await close_connection(conn)
    for volume in deleted:
        print(f"deleted {volume.place} ({volume.allocation / 1e6:.1f} MB)")
    print(f"{len(deleted)} volume(s) deleted, {sum(volume.allocation for volume in deleted) / 1e6:.1f} MB freed")


def _release(mountpoint: str, domain: str) -> None:
    """``domain`` names a domain, or a source's path below the mount point (volumes/POOL/VOLUME)."""
    below = domain if domain.startswith(("domains/", "volumes/")) else os.path.join("domains", domain)
    path = os.path.join(mountpoint, below)
    try:
        os.getxattr(path, RELEASE_XATTR, follow_symlinks=False)  # a read: works on ro mounts too
    except OSError as exc:
        raise VirtmountError(f"cannot release {domain}: {path}: {exc.strerror}") from None


def run(argv: Sequence[str]) -> int:
    """Run the command line ``argv`` (without the program name); return the exit code."""
    try:
        try:
            return _run(argv)
        except BaseExceptionGroup as group:
            raise sole_error(group) from None
    except VirtmountError as exc:
        print(f"virtmount: {exc}", file=sys.stderr)
        return exc.exit_code
    except GuestfsClientError as exc:
        print(f"virtmount: appliance: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("virtmount: interrupted", file=sys.stderr)
        return 130


def _run(argv: Sequence[str]) -> int:
    """Parse ``argv`` and do what it says; errors propagate to ``run``."""
    if argv[:1] == ["inspect"]:
        args = _inspect_parser().parse_args(argv[1:])
        config = parse_options(args.options)
        _configure_logging(args.verbose, config.debug)
        trio.run(_inspect, args.uri, args.domain, config)
    elif argv[:1] == ["status"]:
        args = _status_parser().parse_args(argv[1:])
        status = read_status(args.mountpoint)
        print(status.to_json() if args.json else format_table(status))
    elif argv[:1] == ["gc"]:
        args = _gc_parser().parse_args(argv[1:])
        config = parse_options(args.options)
        _configure_logging(args.verbose, config.debug)
        check_uri(args.uri)
        trio.run(_gc, args.uri, config.appliance)
    elif argv[:1] == ["release"]:
        args = _release_parser().parse_args(argv[1:])
        _release(args.mountpoint, args.domain)
    else:
        args = _mount_parser().parse_args(argv)
        config = parse_options(args.options)
        check_uri(args.uri)
        mountpoint = check_mountpoint(args.mountpoint)
        if args.foreground:
            _configure_logging(args.verbose, config.debug)
            # under systemd (Type=notify) the service counts as started once the mount is up
            trio.run(serve, args.uri, mountpoint, config,
                     lambda: notify(f"READY=1\nSTATUS=mounted {args.uri} on {mountpoint}"))
        else:
            return run_in_background(lambda on_ready: _serve_logged(args, mountpoint, config, on_ready))
    return 0


def main() -> NoReturn:
    sys.exit(run(sys.argv[1:]))
