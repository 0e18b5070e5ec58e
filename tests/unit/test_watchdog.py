"""The watchdog's side of the pipe (virtmount.watchdog): what it destroys when its owner dies."""

from __future__ import annotations

import io
from typing import Any, cast

import libvirt
import pytest

from virtmount.virt.domainxml import METADATA_NAMESPACE
from virtmount.watchdog import _watch


class FakeDomain:
    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.destroyed = False

    def XMLDesc(self, flags: int) -> str:
        return (f"<domain><metadata><virtmount:appliance xmlns:virtmount='{METADATA_NAMESPACE}' "
                f"guest='g' owner='{self.owner}'/></metadata></domain>")

    def destroy(self) -> None:
        self.destroyed = True


class FakeConnection:
    def __init__(self, **domains: FakeDomain) -> None:
        self.domains = domains

    def getLibVersion(self) -> int:
        return 9000000

    def lookupByName(self, name: str) -> FakeDomain:
        if name not in self.domains:
            raise libvirt.libvirtError("Domain not found")
        return self.domains[name]


def run(commands: str, conn: FakeConnection) -> None:
    _watch(io.StringIO(commands), "test:///default", cast(Any, conn), "100")


def test_when_the_owner_dies_its_running_restored_appliances_are_destroyed() -> None:
    conn = FakeConnection(a=FakeDomain("100"), b=FakeDomain("100"), c=FakeDomain("200"))
    run("+a\n+b\n-b\n+c\n+gone\n", conn)  # no goodbye: the pipe ended with the process
    assert conn.domains["a"].destroyed
    assert not conn.domains["b"].destroyed  # shut down before
    assert not conn.domains["c"].destroyed  # restored again since, by another virtmount


def test_a_goodbye_destroys_nothing() -> None:
    conn = FakeConnection(a=FakeDomain("100"))
    run("+a\nbye\n", conn)
    assert not conn.domains["a"].destroyed


def test_a_connection_lost_meanwhile_is_opened_again_before_destroying(monkeypatch: pytest.MonkeyPatch) -> None:
    class ClosedConnection(FakeConnection):
        def getLibVersion(self) -> int:
            raise libvirt.libvirtError("internal error: client socket is closed")

    fresh = FakeConnection(a=FakeDomain("100"))
    opened: list[str] = []

    def open_again(uri: str) -> FakeConnection:
        opened.append(uri)
        return fresh

    monkeypatch.setattr(libvirt, "open", open_again)
    run("+a\n", ClosedConnection(a=FakeDomain("100")))  # libvirtd restarted while the owner lived
    assert opened == ["test:///default"] and fresh.domains["a"].destroyed
