"""Which leftover appliances a mount ends when it starts (virtmount.leftovers.remove_leftover_appliances), and
which of its own it ends once its connection is back (_destroy_own_appliances)."""

from __future__ import annotations

import os
import socket
from typing import Any, cast

import libvirt
import pytest

from tests.unit.test_failures import FakeLibvirtError
from virtmount.leftovers import remove_leftover_appliances
from virtmount.mount import _destroy_own_appliances
from virtmount.virt.domainxml import APPLIANCE_NAME_PREFIX, METADATA_NAMESPACE

DEAD_PID = "999999999"


class Domain:
    def __init__(self, name: str, client: str | None, owner: str, devices: str = "") -> None:
        self._name, self.destroyed = name, False
        client_attribute = "" if client is None else f" client='{client}'"
        self._xml = (f"<domain><name>{name}</name><metadata><v:appliance xmlns:v='{METADATA_NAMESPACE}' "
                     f"guest='g' owner='{owner}'{client_attribute}/></metadata><devices>{devices}</devices></domain>")

    def name(self) -> str:
        return self._name

    def XMLDesc(self, flags: int) -> str:
        return self._xml

    def destroy(self) -> None:
        self.destroyed = True


class Conn:
    def __init__(self, embedded: bool, *domains: Domain) -> None:
        self.domains, self.embedded = list(domains), embedded

    def getURI(self) -> str:
        return "qemu:///embed?root=/x" if self.embedded else "qemu:///system"

    def listAllDomains(self, flags: int) -> list[Domain]:
        return self.domains


def appliances() -> dict[str, Domain]:
    here = socket.gethostname()
    return {
        "dead here": Domain(APPLIANCE_NAME_PREFIX + "saved-1", here, DEAD_PID),
        "alive here": Domain(APPLIANCE_NAME_PREFIX + "saved-2", here, str(os.getpid())),
        "another client": Domain(APPLIANCE_NAME_PREFIX + "saved-3", "elsewhere", DEAD_PID),
        "no client recorded": Domain(APPLIANCE_NAME_PREFIX + "saved-4", None, DEAD_PID),
        "not an appliance": Domain("web1", here, DEAD_PID),
    }


async def test_only_appliances_of_dead_virtmounts_of_this_client_are_ended() -> None:
    domains = appliances()
    await remove_leftover_appliances(cast(libvirt.virConnect, cast(Any, Conn(False, *domains.values()))))
    assert {key for key, domain in domains.items() if domain.destroyed} == {"dead here"}


async def test_without_auto_destroy_every_appliance_is_a_leftover() -> None:
    domains = appliances()
    await remove_leftover_appliances(cast(libvirt.virConnect, cast(Any, Conn(True, *domains.values()))))
    assert {key for key, domain in domains.items() if domain.destroyed} == set(domains) - {"not an appliance"}


async def test_own_appliances_of_a_lost_connection_are_ended_with_their_overlays_named() -> None:
    """One that was still booting when the connection went had not noted its throw-away overlays: the XML names
    them, for the leftover cleanup."""
    booting = APPLIANCE_NAME_PREFIX + "web1-1-abc"
    disk = ("<disk type='file'><source file='/img/web1.qcow2'/><transient shareBacking='yes'/></disk>"
            "<disk type='file'><source file='/pool/root.qcow2'/></disk>")
    domains = {
        "ours, booting": Domain(booting, socket.gethostname(), str(os.getpid()), disk),
        "another virtmount's": Domain(APPLIANCE_NAME_PREFIX + "web1-2-def", socket.gethostname(), DEAD_PID, disk),
        "not an appliance": Domain("web1", socket.gethostname(), str(os.getpid())),
    }
    ended = await _destroy_own_appliances(cast(libvirt.virConnect, cast(Any, Conn(False, *domains.values()))))
    assert {key for key, domain in domains.items() if domain.destroyed} == {"ours, booting"}
    assert ended == [(booting, [f"/img/web1.qcow2.TRANSIENT-{booting}"])]


class EndedMeanwhile(Domain):
    """A dead virtmount's restored appliance that powered off by itself between the listing and the destroy."""

    def destroy(self) -> None:
        raise FakeLibvirtError(libvirt.VIR_ERR_NO_DOMAIN, f"no domain {self._name}")


class Refused(Domain):
    def destroy(self) -> None:
        raise FakeLibvirtError(libvirt.VIR_ERR_OPERATION_FAILED, "refused")


async def test_an_appliance_that_ended_meanwhile_is_not_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    gone = EndedMeanwhile(APPLIANCE_NAME_PREFIX + "saved-5", socket.gethostname(), DEAD_PID)
    refused = Refused(APPLIANCE_NAME_PREFIX + "saved-6", socket.gethostname(), DEAD_PID)
    await remove_leftover_appliances(cast(libvirt.virConnect, cast(Any, Conn(False, gone, refused))))
    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert warnings == ["cannot destroy a leftover appliance: refused"]
