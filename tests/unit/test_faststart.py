"""The saved appliance's names, volume and restore XML (virtmount.faststart)."""

from __future__ import annotations

from xml.etree import ElementTree as ET

import pytest

from virtmount.faststart import FastStartUnavailable, SavedAppliance, overlay_volume_xml, restore_xml
from virtmount.virt.domainxml import (
    APPLIANCE_NAME_PREFIX,
    ApplianceSpec,
    GuestDefinition,
    appliance_guest_name,
    appliance_owner,
    build_appliance_xml,
)
from virtmount.virt.provision import HostAppliance

HOST = HostAppliance("/pool/a-kernel", "/pool/a-initrd", "/pool/a-root.qcow2", "0123-4567")


def saved_for(host: HostAppliance = HOST, domain_type: str = "qemu", memory_mib: int = 1024, vcpus: int = 1,
              kernel_args: str = "", verbose: bool = False) -> SavedAppliance:
    return SavedAppliance.for_boot(host, domain_type, memory_mib, vcpus, kernel_args, verbose)


def saved_domain_xml(saved: SavedAppliance) -> str:
    """What a saved appliance's XML looks like: built as virtmount builds the appliance it saves."""
    spec = ApplianceSpec(name=saved.name, guest=GuestDefinition("(saved appliance)", ()),
                         kernel_path=HOST.kernel_path, initrd_path=HOST.initrd_path, root_path=HOST.root_path,
                         root_uuid=HOST.root_uuid, domain_type="qemu", root_overlay=f"/pool/{saved.root_volume}")
    return build_appliance_xml(spec)


def test_one_saved_appliance_per_files_and_settings() -> None:
    first = saved_for()
    assert first == saved_for()
    assert first.name.startswith(APPLIANCE_NAME_PREFIX)  # found and ended like every appliance
    others = [saved_for(domain_type="kvm"), saved_for(memory_mib=2048), saved_for(vcpus=2),
              saved_for(kernel_args="mitigations=off"), saved_for(verbose=True),
              saved_for(HostAppliance(HOST.kernel_path, HOST.initrd_path, "/pool/b-root.qcow2", HOST.root_uuid))]
    assert len({saved.name for saved in [first, *others]}) == 7


def test_saved_state_and_root_live_beside_the_appliance_volumes() -> None:
    saved = saved_for()
    assert saved.state_path(HOST) == f"/pool/{saved.name}.state"
    assert saved.path(HOST, saved.root_volume) == f"/pool/{saved.name}-root.qcow2"
    assert saved.path(HOST, saved.run_volume) == f"/pool/{saved.name}-run.qcow2"
    volume = ET.fromstring(overlay_volume_xml(saved.run_volume, saved.path(HOST, saved.root_volume), 4 << 30))
    assert volume.findtext("name") == saved.run_volume
    assert volume.findtext("capacity") == str(4 << 30)
    assert volume.find("./target/format").get("type") == "qcow2"  # type: ignore[union-attr]
    assert volume.findtext("./backingStore/path") == saved.path(HOST, saved.root_volume)
    assert volume.find("./backingStore/format").get("type") == "qcow2"  # type: ignore[union-attr]


def test_the_saved_appliance_boots_from_a_root_it_keeps() -> None:
    saved = saved_for()
    [root] = ET.fromstring(saved_domain_xml(saved)).findall("./devices/disk")
    assert root.find("source").get("file") == f"/pool/{saved.root_volume}"  # type: ignore[union-attr]
    assert root.findall("transient") == []


def test_a_restore_marks_the_guest_and_runs_on_an_overlay_of_the_saved_root() -> None:
    saved = saved_for()
    root, run = saved.path(HOST, saved.root_volume), saved.path(HOST, saved.run_volume)
    original = saved_domain_xml(saved)
    restored = restore_xml(original, root, run, "web 1 ☃", "4242")
    assert appliance_guest_name(original) == "(saved appliance)"
    assert appliance_guest_name(restored) == "web 1 ☃" and appliance_owner(restored) == "4242"
    domain = ET.fromstring(restored)
    assert domain.findtext("name") == saved.name  # libvirt restores under the saved name only
    [disk] = domain.findall("./devices/disk")
    assert disk.find("source").get("file") == run  # type: ignore[union-attr]
    assert disk.findall("transient") == []  # a restore refuses the device changes it would make
    assert len(ET.fromstring(original).findall("./metadata/*")) == len(domain.findall("./metadata/*")) == 1


def test_a_saved_domain_without_that_root_is_not_restored() -> None:
    saved = saved_for()
    with pytest.raises(FastStartUnavailable):
        restore_xml(saved_domain_xml(saved), "/elsewhere/root.qcow2", "/pool/run.qcow2", "web1", "4242")
