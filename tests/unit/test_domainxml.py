"""Guest domain XML -> appliance domain XML (virtmount.virt.domainxml), checked on the parsed tree."""

from __future__ import annotations

import dataclasses
import socket
import xml.etree.ElementTree as ET
from typing import cast

import pytest

from virtmount.virt.domainxml import (
    APPLIANCE_NAME_PREFIX,
    DAEMON_CHANNEL,
    METADATA_NAMESPACE,
    ApplianceSpec,
    DomainXmlError,
    GuestDefinition,
    appliance_disk,
    appliance_guest_name,
    appliance_client,
    appliance_owner,
    build_appliance_xml,
    kernel_command_line,
    read_guest_definition,
    scsi_disk_name,
)

LUKS_SECRET = "0a81f5b2-8403-7b23-c8d6-21ccc2f80d6f"
CEPH_SECRET = "e9a8b1c2-0d3e-4f5a-8b6c-7d8e9f0a1b2c"
ROOT_UUID = "6f2a3b4c-1d2e-4f50-9a8b-7c6d5e4f3a2b"

GUEST_XML = f"""\
<domain type='kvm'>
  <name>guest1</name>
  <uuid>2d0c3e6a-1b7f-4c55-8e0e-5f4c3b2a1908</uuid>
  <memory unit='KiB'>2097152</memory>
  <os><type arch='x86_64' machine='pc-q35-7.2'>hvm</type></os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none' discard='unmap' iothread='1' queues='4'/>
      <source file='/var/lib/libvirt/images/guest1.qcow2'>
        <seclabel model='dac' relabel='no'/>
      </source>
      <encryption format='luks'>
        <secret type='passphrase' uuid='{LUKS_SECRET}'/>
      </encryption>
      <target dev='vda' bus='virtio'/>
      <boot order='1'/>
      <alias name='virtio-disk0'/>
      <address type='pci' domain='0x0000' bus='0x04' slot='0x00' function='0x0'/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <target dev='sdx' bus='sata'/>
      <readonly/>
      <address type='drive' controller='0' bus='0' target='0' unit='1'/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <source file='/srv/iso/install.iso'/>
      <target dev='sda' bus='sata'/>
      <readonly/>
      <boot order='2'/>
      <address type='drive' controller='0' bus='0' target='0' unit='0'/>
    </disk>
    <disk type='network' device='disk'>
      <driver name='qemu' type='raw' cache='writeback'/>
      <auth username='libvirt'>
        <secret type='ceph' uuid='{CEPH_SECRET}'/>
      </auth>
      <source protocol='rbd' name='rbdpool/guest1-data'>
        <host name='mon1.example.org' port='6789'/>
        <host name='mon2.example.org' port='6789'/>
      </source>
      <target dev='vdb' bus='virtio'/>
      <alias name='virtio-disk1'/>
    </disk>
    <disk type='block' device='disk'>
      <driver name='qemu' type='raw' cache='none' io='native' queue_size='256'/>
      <source dev='/dev/vg0/guest1-scratch'/>
      <target dev='sdb' bus='scsi'/>
      <address type='drive' controller='0' bus='0' target='0' unit='3'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='/srv/shared/reference.img'/>
      <target dev='vdc' bus='virtio'/>
      <readonly/>
    </disk>
    <interface type='network'><source network='default'/></interface>
  </devices>
  <seclabel type='dynamic' model='selinux' relabel='yes'/>
  <seclabel type='static' model='dac' relabel='no'>
    <label>107:107</label>
  </seclabel>
</domain>
"""

# The guest disks that have a source, in order, as (source attribute, value).
EXPECTED_SOURCES = [
    ("file", "/var/lib/libvirt/images/guest1.qcow2"),
    ("file", "/srv/iso/install.iso"),
    ("name", "rbdpool/guest1-data"),
    ("dev", "/dev/vg0/guest1-scratch"),
    ("file", "/srv/shared/reference.img"),
]

Canon = tuple[str, tuple[tuple[str, str], ...], str, tuple["Canon", ...]]


def canon(element: ET.Element) -> Canon:
    """An element as a comparable value: tag, attributes, text and children (whitespace ignored)."""
    return (
        element.tag,
        tuple(sorted(element.attrib.items())),
        (element.text or "").strip(),
        tuple(canon(child) for child in element),
    )


def guest_disks() -> list[ET.Element]:
    return ET.fromstring(GUEST_XML).findall("./devices/disk")


def make_spec(**changes: object) -> ApplianceSpec:
    spec = ApplianceSpec(
        name=APPLIANCE_NAME_PREFIX + "guest1-1a2b",
        guest=read_guest_definition(GUEST_XML),
        kernel_path="/var/lib/virtmount/kernel",
        initrd_path="/var/lib/virtmount/initrd",
        root_path="/var/lib/virtmount/root.qcow2",
        root_uuid=ROOT_UUID,
        domain_type="kvm",
        memory_mib=768,
        vcpus=2,
    )
    return dataclasses.replace(spec, **changes)  # type: ignore[arg-type]


def build(**changes: object) -> ET.Element:
    return ET.fromstring(build_appliance_xml(make_spec(**changes)))


def disks_of(domain: ET.Element) -> list[ET.Element]:
    return domain.findall("./devices/disk")


def source_location(disk: ET.Element) -> tuple[str, str]:
    source = disk.find("source")
    assert source is not None
    for attribute in ("file", "dev", "name"):
        if attribute in source.attrib:
            return attribute, source.attrib[attribute]
    raise AssertionError(f"no location in {source.attrib}")


def only(element: ET.Element, path: str) -> ET.Element:
    found = element.findall(path)
    assert len(found) == 1, f"{path}: {len(found)} elements"
    return found[0]


# --- reading the guest's XML ------------------------------------------------------


def test_read_guest_definition_keeps_disks_with_a_source_in_order() -> None:
    guest = read_guest_definition(GUEST_XML)
    assert guest.name == "guest1"
    assert [source_location(disk) for disk in guest.disks] == EXPECTED_SOURCES
    assert [label.get("model") for label in guest.seclabels] == ["selinux", "dac"]


def test_read_guest_definition_copies_the_elements() -> None:
    guest = read_guest_definition(GUEST_XML)
    guest.disks[0].set("type", "changed")
    assert read_guest_definition(GUEST_XML).disks[0].get("type") == "file"


def test_read_guest_definition_skips_empty_source_element() -> None:
    xml = """<domain><name>g</name><devices>
      <disk type='file' device='cdrom'><source/><target dev='hdc' bus='ide'/></disk>
      <disk type='file' device='disk'><source file='/a.img'/><target dev='vda' bus='virtio'/></disk>
    </devices></domain>"""
    guest = read_guest_definition(xml)
    assert [source_location(disk) for disk in guest.disks] == [("file", "/a.img")]
    assert guest.seclabels == ()


def test_read_guest_definition_skips_empty_cdrom_with_startup_policy() -> None:
    xml = """<domain><name>g</name><devices>
      <disk type='file' device='cdrom'>
        <driver name='qemu' type='raw'/>
        <source startupPolicy='optional'/>
        <target dev='hdc' bus='ide'/>
        <readonly/>
      </disk>
      <disk type='file' device='disk'><source file='/a.img'/><target dev='vda' bus='virtio'/></disk>
    </devices></domain>"""
    guest = read_guest_definition(xml)
    assert [cast(ET.Element, disk.find("source")).attrib for disk in guest.disks] == [{"file": "/a.img"}]


def test_read_guest_definition_without_name_or_disks() -> None:
    guest = read_guest_definition("<domain type='kvm'><devices/></domain>")
    assert guest == GuestDefinition(name="?", disks=(), seclabels=())


def test_read_guest_definition_rejects_malformed_xml() -> None:
    with pytest.raises(DomainXmlError, match="does not parse"):
        read_guest_definition("<domain><name>broken</domain>")


# --- the appliance's guest disks ------------------------------------------------------


def test_guest_disks_keep_order_and_get_scsi_targets_and_drive_addresses() -> None:
    disks = disks_of(build())[:-1]
    assert [source_location(disk) for disk in disks] == EXPECTED_SOURCES
    for index, disk in enumerate(disks):
        target = only(disk, "target")
        assert target.attrib == {"dev": "sda sdb sdc sdd sde".split()[index], "bus": "scsi"}
        address = only(disk, "address")
        assert address.attrib == {"type": "drive", "controller": "0", "bus": "0", "target": "0", "unit": str(index)}


def test_guest_disks_sit_on_one_virtio_scsi_controller() -> None:
    domain = build()
    controllers = domain.findall("./devices/controller")
    assert [(c.get("type"), c.get("index"), c.get("model")) for c in controllers] == [
        ("scsi", "0", "virtio-scsi"),
        ("usb", None, "none"),
    ]


@pytest.mark.parametrize("index", range(len(EXPECTED_SOURCES)))
def test_guest_disk_source_copied_exactly(index: int) -> None:
    originals = [disk for disk in guest_disks() if disk.find("source") is not None]
    original_source = originals[index].find("source")
    copied_source = disks_of(build())[index].find("source")
    assert original_source is not None and copied_source is not None
    assert canon(copied_source) == canon(original_source)


def test_disk_encryption_and_per_disk_seclabel_copied_exactly() -> None:
    original = guest_disks()[0]
    disk = disks_of(build())[0]
    assert canon(only(disk, "encryption")) == canon(only(original, "encryption"))
    assert only(disk, "encryption/secret").attrib == {"type": "passphrase", "uuid": LUKS_SECRET}
    assert only(disk, "source/seclabel").attrib == {"model": "dac", "relabel": "no"}


def test_network_disk_auth_and_hosts_copied_exactly() -> None:
    original = guest_disks()[3]
    disk = disks_of(build())[2]
    assert disk.get("type") == "network"
    assert canon(only(disk, "auth")) == canon(only(original, "auth"))
    assert only(disk, "auth/secret").attrib == {"type": "ceph", "uuid": CEPH_SECRET}
    assert [host.attrib for host in disk.findall("source/host")] == [
        {"name": "mon1.example.org", "port": "6789"},
        {"name": "mon2.example.org", "port": "6789"},
    ]


def test_driver_format_kept_and_virtio_only_attributes_removed() -> None:
    disks = disks_of(build())
    assert only(disks[0], "driver").attrib == {"name": "qemu", "type": "qcow2", "cache": "none", "discard": "unmap"}
    assert only(disks[1], "driver").attrib == {"name": "qemu", "type": "raw"}
    assert only(disks[2], "driver").attrib == {"name": "qemu", "type": "raw", "cache": "writeback"}
    assert only(disks[3], "driver").attrib == {"name": "qemu", "type": "raw", "cache": "none", "io": "native"}


def test_guest_placement_elements_removed() -> None:
    for disk in disks_of(build())[:-1]:
        assert disk.findall("boot") == []
        assert disk.findall("alias") == []
        assert only(disk, "address").get("type") == "drive"
        assert only(disk, "target").get("bus") == "scsi"


def test_cdrom_becomes_a_disk_and_lun_stays_a_lun() -> None:
    disks = disks_of(build())
    assert [disk.get("device") for disk in disks] == ["disk"] * 6
    lun = ET.fromstring("<disk type='block' device='lun'><source dev='/dev/sdz'/><target dev='sdq' bus='scsi'/></disk>")
    assert appliance_disk(lun, 0, writable=False).get("device") == "lun"


def test_read_only_mount_file_disks_get_a_throwaway_overlay_others_readonly() -> None:
    disks = disks_of(build())
    # (transient attributes or None, has <readonly/>) per guest disk
    seen = [
        ([t.attrib for t in disk.findall("transient")], len(disk.findall("readonly")))
        for disk in disks[:-1]
    ]
    assert seen == [
        ([{"shareBacking": "yes"}], 0),  # file qcow2: writable overlay, guest image untouched
        ([], 1),  # cdrom: already readonly in the guest's XML
        ([], 1),  # network: readonly
        ([], 1),  # block: readonly
        ([], 1),  # file, already readonly
    ]


def test_guest_transient_element_is_not_copied() -> None:
    disk = ET.fromstring(
        "<disk type='file' device='disk'><source file='/x.qcow2'/><target dev='vda'/><transient/></disk>")
    out = appliance_disk(disk, 3, writable=True)
    assert out.findall("transient") == []
    assert out.findall("readonly") == []
    assert only(out, "target").attrib == {"dev": "sdd", "bus": "scsi"}
    assert only(out, "address").get("unit") == "3"


def test_writable_adds_neither_overlay_nor_readonly() -> None:
    disks = disks_of(build(writable=True))
    seen = [(len(disk.findall("transient")), len(disk.findall("readonly"))) for disk in disks[:-1]]
    assert seen == [(0, 0), (0, 1), (0, 0), (0, 0), (0, 1)]


def test_appliance_disk_leaves_the_guest_element_alone() -> None:
    original = guest_disks()[0]
    before = canon(original)
    appliance_disk(original, 0, writable=False)
    assert canon(original) == before


def test_appliance_root_disk_is_last_qcow2_with_shared_backing_overlay() -> None:
    disks = disks_of(build())
    assert len(disks) == len(EXPECTED_SOURCES) + 1
    root = disks[-1]
    assert root.attrib == {"type": "file", "device": "disk"}
    assert only(root, "driver").attrib == {"name": "qemu", "type": "qcow2", "cache": "unsafe"}
    assert only(root, "source").attrib == {"file": "/var/lib/virtmount/root.qcow2"}
    assert only(root, "transient").attrib == {"shareBacking": "yes"}
    assert root.findall("readonly") == []
    assert only(root, "target").attrib == {"dev": "sdf", "bus": "scsi"}
    assert only(root, "address").get("unit") == "5"


def test_root_disk_alone_for_a_guest_without_disks() -> None:
    spec = make_spec(guest=GuestDefinition(name="empty", disks=()))
    disks = disks_of(ET.fromstring(build_appliance_xml(spec)))
    assert [source_location(disk) for disk in disks] == [("file", "/var/lib/virtmount/root.qcow2")]
    assert only(disks[0], "target").get("dev") == "sda"
    assert only(disks[0], "address").get("unit") == "0"


# --- the rest of the appliance domain ---------------------------------------------------


def test_name_memory_vcpus() -> None:
    domain = build()
    assert only(domain, "name").text == APPLIANCE_NAME_PREFIX + "guest1-1a2b"
    memory = only(domain, "memory")
    assert (memory.get("unit"), memory.text) == ("MiB", "768")
    assert only(domain, "vcpu").text == "2"


def test_kernel_initrd_and_quiet_command_line() -> None:
    domain = build()
    assert only(domain, "os/type").text == "hvm"
    assert only(domain, "os/kernel").text == "/var/lib/virtmount/kernel"
    assert only(domain, "os/initrd").text == "/var/lib/virtmount/initrd"
    cmdline = only(domain, "os/cmdline").text
    assert cmdline is not None
    words = cmdline.split()
    assert f"root=UUID={ROOT_UUID}" in words
    assert "console=ttyS0" in words
    assert "guestfs_verbose=1" not in words
    # quiet for the appliance's init, yet the kernel's early notices reach the console (accelerator.py
    # waits for them): the loglevel must come after quiet, which sets its own
    assert words[-2:] == ["quiet", "loglevel=6"]
    assert "earlyprintk=ttyS0" in words


def test_emulator_only_when_asked_for() -> None:
    assert build().find("devices/emulator") is None
    domain = build(emulator="/opt/qemu/bin/qemu-system-x86_64")
    assert only(domain, "devices/emulator").text == "/opt/qemu/bin/qemu-system-x86_64"


def test_verbose_command_line_with_extra_arguments() -> None:
    spec = make_spec(verbose=True, extra_kernel_args="debug foo=bar")
    words = kernel_command_line(spec).split()
    assert "quiet" not in words
    assert words[-3:] == ["guestfs_verbose=1", "debug", "foo=bar"]
    assert words.count(f"root=UUID={ROOT_UUID}") == 1
    cmdline = only(ET.fromstring(build_appliance_xml(spec)), "os/cmdline").text
    assert cmdline == kernel_command_line(spec)


@pytest.mark.parametrize(("domain_type", "cpu_mode"), [("kvm", "host-passthrough"), ("qemu", "maximum")])
def test_domain_type_and_cpu(domain_type: str, cpu_mode: str) -> None:
    domain = build(domain_type=domain_type)
    assert domain.tag == "domain"
    assert domain.get("type") == domain_type
    assert only(domain, "cpu").attrib == {"mode": cpu_mode}


def test_every_lifecycle_event_destroys() -> None:
    domain = build()
    assert [only(domain, event).text for event in ("on_poweroff", "on_reboot", "on_crash")] == ["destroy"] * 3


def test_daemon_channel_is_a_bound_unix_socket() -> None:
    domain = build()
    channel = only(domain, "devices/channel")
    assert channel.attrib == {"type": "unix"}
    assert only(channel, "source").attrib == {"mode": "bind"}
    assert only(channel, "target").attrib == {"type": "virtio", "name": DAEMON_CHANNEL}
    assert DAEMON_CHANNEL == "org.libguestfs.channel.0"


def test_console_on_the_serial_port() -> None:
    domain = build()
    assert only(domain, "devices/serial").get("type") == "pty"
    assert only(domain, "devices/console/target").attrib == {"type": "serial", "port": "0"}


def test_domain_seclabels_copied_in_order() -> None:
    domain = build()
    original = ET.fromstring(GUEST_XML).findall("seclabel")
    assert [canon(label) for label in domain.findall("seclabel")] == [canon(label) for label in original]
    assert only(domain, "seclabel[@model='dac']/label").text == "107:107"


def test_metadata_marks_the_guest_the_owner_and_its_client() -> None:
    xml = build_appliance_xml(make_spec(owner="4242"))
    marker = only(ET.fromstring(xml), f"metadata/{{{METADATA_NAMESPACE}}}appliance")
    assert marker.attrib == {"guest": "guest1", "owner": "4242", "client": socket.gethostname()}
    assert appliance_guest_name(xml) == "guest1" and appliance_owner(xml) == "4242"
    assert appliance_client(xml) == socket.gethostname()


def test_a_root_overlay_replaces_the_throwaway_one() -> None:
    [root] = disks_of(build(guest=GuestDefinition(name="saved", disks=()), root_overlay="/pool/saved-root.qcow2"))
    assert only(root, "source").attrib == {"file": "/pool/saved-root.qcow2"}
    assert root.findall("transient") == []


def test_appliance_guest_name_round_trips_unusual_names() -> None:
    name = "weird <&> 'name' \"é\""
    spec = make_spec(guest=GuestDefinition(name=name, disks=()))
    assert appliance_guest_name(build_appliance_xml(spec)) == name


@pytest.mark.parametrize("xml", [
    GUEST_XML,
    "<domain><metadata><other xmlns='https://example.org/x' guest='g'/></metadata></domain>",
    "not xml at all",
    "",
])
def test_appliance_guest_name_is_none_for_foreign_xml(xml: str) -> None:
    assert appliance_guest_name(xml) is None


@pytest.mark.parametrize(("index", "name"), [
    (0, "sda"), (1, "sdb"), (25, "sdz"), (26, "sdaa"), (27, "sdab"), (51, "sdaz"), (52, "sdba"),
    (701, "sdzz"), (702, "sdaaa"),
])
def test_scsi_disk_name(index: int, name: str) -> None:
    assert scsi_disk_name(index) == name


def test_scsi_disk_names_are_distinct() -> None:
    names = [scsi_disk_name(i) for i in range(1000)]
    assert len(set(names)) == 1000


def test_a_written_disk_honours_flushes_and_has_no_overlay() -> None:
    unsafe = ET.fromstring("<disk type='file' device='disk'><driver name='qemu' type='qcow2' cache='unsafe'/>"
                           "<source file='/a.qcow2'/></disk>")
    written = appliance_disk(unsafe, 0, writable=True)
    assert only(written, "driver").attrib == {"name": "qemu", "type": "qcow2"}  # QEMU's default: writeback
    assert written.find("transient") is None and written.find("readonly") is None
    read = appliance_disk(unsafe, 0, writable=False)
    assert only(read, "driver").get("cache") == "unsafe" and read.find("transient") is not None
