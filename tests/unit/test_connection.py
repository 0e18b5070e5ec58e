"""Connection set-up without prompts (virtmount.virt.connection): URIs and what a failure tells to configure."""

from __future__ import annotations

import threading

import libvirt
import pytest
import trio

from virtmount.virt import connection
from virtmount.virt.connection import credential_hint, without_prompts


@pytest.mark.parametrize(("uri", "expected"), [
    ("qemu+ssh://host/system", "qemu+ssh://host/system?no_tty=1"),
    ("qemu+ssh://root@host:2222/system?keyfile=/k", "qemu+ssh://root@host:2222/system?keyfile=/k&no_tty=1"),
    ("qemu+ssh://host/system?no_tty=0", "qemu+ssh://host/system?no_tty=0"),  # the user's choice stands
    ("qemu+ssh://host/system?keyfile=/k,1&no_tty=1", "qemu+ssh://host/system?keyfile=/k,1&no_tty=1"),
    ("qemu:///system", "qemu:///system"),
    ("qemu+tcp://127.0.0.1/system", "qemu+tcp://127.0.0.1/system"),
    ("qemu+libssh2://host/system", "qemu+libssh2://host/system"),
])
def test_ssh_never_asks(uri: str, expected: str) -> None:
    assert without_prompts(uri) == expected


@pytest.mark.parametrize(("message", "fragment"), [
    ("Cannot recv data: Host key verification failed.: Connection reset by peer", "known_hosts"),
    ("Cannot recv data: root@h: Permission denied (publickey).: Connection reset by peer", "keyfile=PATH"),
    ("authentication failed: no client username was provided", "auth.conf"),
    ("Cannot read CA certificate '/etc/pki/CA/cacert.pem': No such file or directory", "certificates"),
])
def test_credential_failures_say_what_to_configure(message: str, fragment: str) -> None:
    assert fragment in credential_hint(message)


def test_other_failures_get_no_hint() -> None:
    assert credential_hint("Cannot recv data: ssh: connect to host h port 22: Connection refused") == ""


async def test_calls_in_flight_are_given_up_when_their_connection_dies() -> None:
    """A libvirt call that libvirt never returns (a dead network path) is abandoned with a libvirtError
    that says why, so that its caller answers instead of hanging."""
    release = threading.Event()
    failures: list[str] = []

    async def call() -> None:
        try:
            await connection.run_blocking(release.wait)
        except libvirt.libvirtError as exc:
            failures.append(connection.libvirt_message(exc))

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(call)
            await trio.sleep(0.1)
            assert connection.abandon_calls() == 1
        assert failures == ["the libvirt connection died while the call waited for its answer"]
        assert connection.abandon_calls() == 0
    finally:
        release.set()


@pytest.mark.parametrize("uri, over_a_network", [
    ("qemu:///system", False), ("qemu+unix:///system", False), ("test:///default", False),
    ("qemu+tcp://127.0.0.1/system", True), ("qemu+ssh://host/system", True), ("qemu+tls:///system", True),
])
def test_only_connections_over_a_network_make_one_call_at_a_time(uri: str, over_a_network: bool) -> None:
    """A dead network path is what one call at a time is for; a local socket keeps its calls concurrent."""
    assert connection._is_over_a_network(uri) is over_a_network
