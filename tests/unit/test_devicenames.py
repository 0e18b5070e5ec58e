"""Guest disk names as cold-booted and restored appliances give them (virtmount.devicenames)."""

from __future__ import annotations

import pytest

from virtmount.devicenames import COLD_BOOTED, RESTORED
from virtmount.guestlayout import GuestLayout

# (restored appliance's name, the guest's own name)
PAIRS = [
    ("/dev/sdb", "/dev/sda"),
    ("/dev/sdb1", "/dev/sda1"),
    ("/dev/sdc15", "/dev/sdb15"),
    ("/dev/sdaa", "/dev/sdz"),
    ("/dev/sdab2", "/dev/sdaa2"),
    ("btrfsvol:/dev/sdc2/@home", "btrfsvol:/dev/sdb2/@home"),
    ("/dev/vg0/root", "/dev/vg0/root"),
    ("/dev/mapper/luks-1", "/dev/mapper/luks-1"),
    ("/dev/md127", "/dev/md127"),
]


@pytest.mark.parametrize("appliance, guest", PAIRS)
def test_a_restored_appliance_names_guest_disks_one_letter_on(appliance: str, guest: str) -> None:
    assert RESTORED.to_guest(appliance) == guest
    assert RESTORED.to_appliance(guest) == appliance


@pytest.mark.parametrize("name", [name for pair in PAIRS for name in pair])
def test_a_cold_booted_appliance_uses_the_guest_order(name: str) -> None:
    assert COLD_BOOTED.to_guest(name) == COLD_BOOTED.to_appliance(name) == name


def test_device_views_are_named_in_the_guest_order() -> None:
    client = object()
    restored = GuestLayout(client=client, has_os=True, naming=RESTORED)  # type: ignore[arg-type]
    cold = GuestLayout(client=client, has_os=True)  # type: ignore[arg-type]
    assert restored.view_name("/dev/sdb1") == cold.view_name("/dev/sda1") == "sda1"
    assert restored.view_name("btrfsvol:/dev/sdb2/@") == "sda2-@"
    assert restored.view_name("/dev/vg0/root") == "vg0-root"
