"""An appliance whose end libvirt did not confirm (virtmount.appliance.Appliance.shutdown): its throw-away
overlays are kept for the mount to delete once connected again (take_unconfirmed_ends)."""

from __future__ import annotations

from typing import Any, cast

import libvirt
import pytest

from tests.unit.test_failures import FakeLibvirtError
from virtmount.appliance import Appliance, take_unconfirmed_ends
from virtmount.guestfs.client import GuestfsClient
from virtmount.virt.console import ConsoleLog

OVERLAY = "/images/guest.qcow2.TRANSIENT-virtmount-appliance-saved-1"


class Client:
    async def internal_autosync(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


class Domain:
    def __init__(self, error: int | None) -> None:
        self.error = error

    def name(self) -> str:
        return "virtmount-appliance-saved-1"

    def destroy(self) -> None:
        if self.error is not None:
            raise FakeLibvirtError(self.error, "no answer")


@pytest.mark.parametrize("destroy_error, kept", [
    (None, []),
    (libvirt.VIR_ERR_NO_DOMAIN, []),  # ended by itself already
    (libvirt.VIR_ERR_SYSTEM_ERROR, [("virtmount-appliance-saved-1", [OVERLAY])]),  # libvirtd restarting
])
async def test_overlays_are_kept_only_when_libvirt_did_not_confirm_the_end(destroy_error: int | None,
                                                                           kept: list[Any]) -> None:
    appliance = Appliance("guest", cast(libvirt.virDomain, Domain(destroy_error)),
                          cast(GuestfsClient, Client()), ConsoleLog("guest"))
    appliance.overlays = [OVERLAY]
    await appliance.shutdown()
    assert take_unconfirmed_ends() == kept
    assert take_unconfirmed_ends() == []  # taken once
