"""Connection set-up without prompts (virtmount.virt.connection): URIs and what a failure tells to configure."""

from __future__ import annotations

import pytest

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
