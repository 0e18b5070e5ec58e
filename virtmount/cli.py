"""Command line: argv -> configuration -> run; user errors become one line on stderr and an exit code."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import NoReturn, Sequence

import trio

from . import __version__
from .config import Config, options_help, parse_options
from .errors import UsageError, VirtmountError
from .guestfs.errors import GuestfsClientError
from .inspection import format_report, inspect_domain

log = logging.getLogger(__name__)

_DESCRIPTION = """\
Browse the filesystems of the guests on a libvirt connection.

  virtmount inspect [-o OPTS] URI DOMAIN
      boot an appliance for the shut-off DOMAIN, print its operating system
      and filesystems, and shut the appliance down.
"""


class _Parser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of printing usage and exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _add_common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", dest="options", action="append", default=[], metavar="OPT[,OPT...]",
                        help="options, see below")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="virtmount",
        description=_DESCRIPTION,
        epilog="options (-o):\n" + options_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"virtmount {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    inspect = commands.add_parser("inspect", help="print a domain's operating system and filesystems",
                                  epilog="options (-o):\n" + options_help(),
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_common_options(inspect)
    inspect.add_argument("uri", help="libvirt URI, e.g. qemu:///system or qemu+ssh://host/system")
    inspect.add_argument("domain", help="name of a shut-off domain")
    return parser


def _configure_logging(verbose: bool, debug: bool) -> None:
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="virtmount: %(message)s" if not debug else "%(asctime)s %(name)s: %(message)s")


async def _inspect(uri: str, domain: str, config: Config) -> None:
    report = await inspect_domain(uri, domain, config.appliance)
    print(format_report(report))


def run(argv: Sequence[str]) -> int:
    """Run the command line ``argv`` (without the program name); return the exit code."""
    try:
        args = _build_parser().parse_args(argv)
        config = parse_options(args.options)
        _configure_logging(args.verbose, config.debug)
        if args.command == "inspect":
            trio.run(_inspect, args.uri, args.domain, config)
        return 0
    except VirtmountError as exc:
        print(f"virtmount: {exc}", file=sys.stderr)
        return exc.exit_code
    except GuestfsClientError as exc:
        print(f"virtmount: appliance: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("virtmount: interrupted", file=sys.stderr)
        return 130


def main() -> NoReturn:
    sys.exit(run(sys.argv[1:]))
