"""Exceptions that carry a one-line message meant for the user."""


class VirtmountError(Exception):
    """A failure the user can act on; the CLI prints str(exc) on one line and exits non-zero."""

    exit_code = 1


class UsageError(VirtmountError):
    """Bad command line: unknown option, malformed URI, unusable mount point."""

    exit_code = 2
