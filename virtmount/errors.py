"""Exceptions that carry a one-line message meant for the user."""

import trio


class VirtmountError(Exception):
    """A failure the user can act on; the CLI prints str(exc) on one line and exits non-zero."""

    exit_code = 1


class UsageError(VirtmountError):
    """Bad command line: unknown option, malformed URI, unusable mount point."""

    exit_code = 2


def sole_error(group: BaseExceptionGroup) -> BaseException:
    """trio wraps errors that leave a nursery in groups; a lone error is reported as itself."""
    leaves: list[BaseException] = []

    def collect(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                collect(inner)
        elif not isinstance(exc, trio.Cancelled):
            leaves.append(exc)

    collect(group)
    return leaves[0] if len(leaves) == 1 else group
