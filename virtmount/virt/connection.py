"""Opening a libvirt connection from trio, and turning libvirt errors into one-line messages."""

from __future__ import annotations

import logging
import re
import urllib.parse
import xml.etree.ElementTree as ET
from typing import Any, Callable, TypeVar

import libvirt
import trio

from ..errors import UsageError, VirtmountError
from .events import ensure_event_loop

log = logging.getLogger(__name__)

T = TypeVar("T")

# scheme "driver[+transport]", then "://" or ":///"; libvirt accepts more, but
# anything else is almost certainly a typo or a mount point given first.
_URI_SHAPE = re.compile(r"^[a-z][a-z0-9]*(\+[a-z0-9]+)?://[^\s]*$")

KEEPALIVE_INTERVAL_S = 5
KEEPALIVE_COUNT = 3


class ConnectionFailed(VirtmountError):
    """The libvirt URI could not be opened (unreachable, refused, bad driver)."""


def libvirt_message(exc: libvirt.libvirtError) -> str:
    """libvirt's own message for an error, on one line."""
    message = exc.get_error_message() or str(exc)
    return " ".join(message.split())


def domain_exists(conn: libvirt.virConnect, name: str) -> bool:
    """Whether a domain called ``name`` is defined or running (blocking); other libvirt errors are raised."""
    try:
        conn.lookupByName(name)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
            raise
        return False
    return True


def pool_directory(pool: libvirt.virStoragePool) -> str:
    """The directory a dir or fs pool keeps its volumes in, without a trailing slash ("" for other pools)."""
    return (ET.fromstring(pool.XMLDesc(0)).findtext("./target/path") or "").rstrip("/")


def check_uri(uri: str) -> None:
    """Reject strings that cannot be libvirt URIs before handing them to libvirt."""
    if not _URI_SHAPE.match(uri):
        raise UsageError(f"{uri!r} is not a libvirt URI (expected e.g. qemu:///system or qemu+ssh://host/system)")


class CallAbandoned(libvirt.libvirtError):
    """A libvirt call given up because its connection died under it (see ``abandon_calls``). A libvirtError,
    so that every caller handles it as the failed call it is; it carries no libvirt error code."""

    def __init__(self, message: str) -> None:
        Exception.__init__(self, message)
        self.err = None


# One libvirt call at a time. With two calls waiting on a connection whose network path went dead (no FIN,
# no RST), libvirt 9.0 failed the first when the keep-alives timed out but left the second waiting, for
# minutes, until the socket itself closed, and reported the connection closed only then; when that waiting
# call finally woke up after virtmount had let go of the connection, the process segfaulted in libvirt. With
# one call at a time the keep-alives fail it and libvirt reports the close at once. The cost: a call waits
# for the one before it (most take milliseconds; starting an appliance's QEMU takes a second or two), so
# only a process that opened a connection over a network does this: a local socket has no silent path
# (a libvirtd that ends closes it), and its calls stay concurrent.
_one_at_a_time = trio.Lock()
_over_a_network = False  # set by open_connection for a URI with a host or a network transport
_calls_waiting: set[trio.CancelScope] = set()


async def run_blocking(fn: Callable[..., T], *args: Any) -> T:
    """Run a blocking libvirt call in a worker thread, one at a time; cancellation abandons the thread,
    and ``abandon_calls`` abandons it with CallAbandoned."""
    with trio.CancelScope() as scope:
        _calls_waiting.add(scope)
        try:
            if not _over_a_network:
                return await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=True)
            async with _one_at_a_time:
                return await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=True)
        finally:
            _calls_waiting.discard(scope)
    raise CallAbandoned("the libvirt connection died while the call waited for its answer")


def abandon_calls() -> int:
    """Give up every libvirt call waiting for its turn or its answer (CallAbandoned), when the connection
    is lost; how many there were."""
    scopes = list(_calls_waiting)
    for scope in scopes:
        scope.cancel()
    return len(scopes)


# What to configure, by what libvirt (or ssh through it) said: virtmount never prompts.
_LIBVIRT_CREDENTIALS = ("libvirt wants credentials: put them in libvirt's auth.conf (~/.config/libvirt/auth.conf) "
                        "or use SASL or TLS client certificates; virtmount never prompts")
_TLS_CERTIFICATES = "qemu+tls needs the CA and client certificates in /etc/pki (see libvirt's TLS set-up)"
_CREDENTIAL_HINTS = (
    ("Host key verification failed",
     "the host's ssh key is not in ~/.ssh/known_hosts: connect once with ssh to accept it"),
    ("Permission denied (publickey",
     "ssh refused the key: load it into an ssh agent or name it with keyfile=PATH in the URI "
     "(keys with a passphrase need the agent)"),
    ("Permission denied",
     "ssh refused the login: virtmount never prompts, so use an ssh key (agent or keyfile=PATH in the URI)"),
    ("authentication failed", _LIBVIRT_CREDENTIALS),
    ("authentication unavailable", _LIBVIRT_CREDENTIALS),
    ("Cannot read CA certificate", _TLS_CERTIFICATES),
    ("Cannot read certificate", _TLS_CERTIFICATES),
)


def credential_hint(message: str) -> str:
    """What to configure for a connection failure that is about credentials, or ""."""
    for needle, hint in _CREDENTIAL_HINTS:
        if needle in message:
            return hint
    return ""


def without_prompts(uri: str) -> str:
    """``uri`` with ssh told never to ask (``no_tty=1``: batch mode) unless the URI says otherwise."""
    parts = urllib.parse.urlsplit(uri)
    if not parts.scheme.endswith("+ssh"):
        return uri
    if "no_tty" in urllib.parse.parse_qs(parts.query, keep_blank_values=True):
        return uri
    return urllib.parse.urlunsplit(parts._replace(query="&".join(q for q in (parts.query, "no_tty=1") if q)))


def _refuse_interactive_credentials(credentials: list[list[Any]], _opaque: Any) -> int:
    """virtmount never prompts: credentials come from the environment (ssh agent, TLS certs, SASL config)."""
    return -1


def _open(uri: str) -> libvirt.virConnect:
    auth = [
        [libvirt.VIR_CRED_AUTHNAME, libvirt.VIR_CRED_PASSPHRASE, libvirt.VIR_CRED_NOECHOPROMPT],
        _refuse_interactive_credentials,
        None,
    ]
    return libvirt.openAuth(uri, auth, 0)


def uses_embedded_driver(conn: libvirt.virConnect) -> bool:
    """qemu:///embed: QEMU driven in this process, without auto-destroy or a second client (blocking)."""
    return str(conn.getURI()).startswith("qemu:///embed")


def _is_over_a_network(uri: str) -> bool:
    """Whether ``uri`` reaches libvirtd over a network (a host, or a transport other than unix)."""
    parts = urllib.parse.urlsplit(uri)
    transport = parts.scheme.partition("+")[2]
    return bool(parts.hostname) or transport not in ("", "unix")


async def open_connection(uri: str, timeout: float = 60.0) -> libvirt.virConnect:
    """Open ``uri`` with keep-alives so a dead host is noticed; one-line errors on failure."""
    check_uri(uri)
    ensure_event_loop()
    global _over_a_network
    _over_a_network = _over_a_network or _is_over_a_network(uri)
    with trio.move_on_after(timeout) as scope:
        try:
            # not one at a time: a connection that does not answer must not hold up calls on the others
            conn = await trio.to_thread.run_sync(_open, without_prompts(uri), abandon_on_cancel=True)
        except libvirt.libvirtError as exc:
            message = libvirt_message(exc)
            hint = credential_hint(message)
            raise ConnectionFailed(f"cannot connect to {uri}: {message}{f' ({hint})' if hint else ''}") from None
    if scope.cancelled_caught:
        raise ConnectionFailed(f"cannot connect to {uri}: no answer within {timeout:.0f} s")
    try:
        conn.setKeepAlive(KEEPALIVE_INTERVAL_S, KEEPALIVE_COUNT)
    except libvirt.libvirtError:
        pass  # local drivers (e.g. qemu:///embed) have no keep-alive
    log.debug("connected to %s (%s)", uri, conn.getURI())
    return conn


async def close_connection(conn: libvirt.virConnect) -> None:
    try:
        await run_blocking(conn.close)
    except libvirt.libvirtError as exc:
        log.debug("closing connection: %s", libvirt_message(exc))
