"""Malformed or surprising XML and names from the server: the readers pick what they can or say why, never a traceback.

Domain XML as real libvirt servers write it (empty cdroms, network disks, backing chains, foreign
metadata, several seclabels), and as a broken or hostile one might (truncated, not XML, entity
bombs, the wrong root, a default namespace); volume XML of every pool kind; names that cannot be
file names in listings from libvirt.
"""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET

import pytest

from tests.unit.test_tree import ALPHA_UUID, FakeConnection, FakeDomain, make_world, names_in
from virtmount.sources import SourceUnavailable
from virtmount.sources.running import _has_guestfs_channel
from virtmount.sources.volume import volume_disk
from virtmount.virt.backup import dac_label
from virtmount.virt.domainxml import (
    ApplianceSpec,
    DomainXmlError,
    appliance_disk,
    appliance_owner,
    build_appliance_xml,
    read_guest_definition,
)

REAL_WORLD_DOMAIN = """<?xml version='1.0' encoding='UTF-8'?>
<!-- written by virt-manager, then edited by hand -->
<domain type='kvm' id='7' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>web &amp; db — prod</name>
  <uuid>0b0a3c1e-8d59-4a4e-9a53-3c6a2f0b7d11</uuid>
  <description><![CDATA[<not> an element & never parsed]]></description>
  <metadata>
    <libosinfo:libosinfo xmlns:libosinfo='http://libosinfo.org/xmlns/libvirt/domain/1.0'>
      <libosinfo:os id='http://debian.org/debian/12'/>
    </libosinfo:libosinfo>
  </metadata>
  <devices>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>
    <disk type='file' device='cdrom'>
      <source startupPolicy='optional'/>
      <target dev='sdb' bus='sata'/>
    </disk>
    <disk type='file'>
      <driver name='qemu' type='qcow2' iothread='1' queues='4' discard='unmap'/>
      <source file='/var/lib/libvirt/images/web.qcow2' index='2'>
        <seclabel model='dac' relabel='no'/>
      </source>
      <backingStore type='file' index='3'>
        <format type='qcow2'/>
        <source file='/var/lib/libvirt/images/base.qcow2'/>
        <backingStore/>
      </backingStore>
      <target dev='vda' bus='virtio'/>
      <boot order='1'/>
      <address type='pci' domain='0x0000' bus='0x04' slot='0x00' function='0x0'/>
    </disk>
    <disk type='file' device='disk'>
      <source file=''/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='network' device='disk'>
      <driver name='qemu' type='raw'/>
      <source protocol='nbd' name='export'>
        <host name='nbd.example' port='10809'/>
      </source>
      <target dev='vdc' bus='virtio'/>
    </disk>
    <disk type='volume' device='disk'>
      <source pool='default' volume='data.img'/>
      <target dev='vdd' bus='virtio'/>
    </disk>
    <disk type='block' device='lun' sgio='unfiltered'>
      <source dev='/dev/disk/by-id/wwn-0x5000c500a1b2c3d4'/>
      <target dev='sdc' bus='scsi'/>
    </disk>
    <channel type='pty'>
      <target type='virtio' name='org.libguestfs.channel.0'/>
    </channel>
    <channel type='unix'>
      <source mode='bind'/>
    </channel>
  </devices>
  <seclabel type='dynamic' model='selinux' relabel='yes'>
    <label>system_u:system_r:svirt_t:s0:c1,c2</label>
  </seclabel>
  <seclabel type='dynamic' model='dac' relabel='yes'>
    <label>+64055:+64055</label>
    <imagelabel>+64055:+64055</imagelabel>
  </seclabel>
  <qemu:commandline><qemu:arg value='-no-user-config'/></qemu:commandline>
</domain>
"""

BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE domain [
 <!ENTITY a "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa">
 <!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">
 <!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;">
 <!ENTITY d "&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;">
 <!ENTITY e "&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;">
 <!ENTITY f "&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;">
 <!ENTITY g "&f;&f;&f;&f;&f;&f;&f;&f;&f;&f;&f;&f;&f;&f;&f;&f;">
]>
<domain><name>&g;</name></domain>
"""

UNREADABLE_DOMAINS = {
    "empty": "",
    "truncated": REAL_WORLD_DOMAIN[: len(REAL_WORLD_DOMAIN) // 2],
    "not XML": "Domain not found: no domain with matching uuid",
    "NUL bytes": "<domain>\0<name>x</name></domain>",
    "two roots": "<domain/><domain/>",
    "undefined entity": "<domain><name>&nbsp;</name></domain>",
    "entity bomb": BILLION_LAUGHS,
}


def test_a_real_world_domain_gives_its_disks_with_a_source_and_its_labels() -> None:
    definition = read_guest_definition(REAL_WORLD_DOMAIN)
    assert definition.name == "web & db — prod"
    targets = [disk.find("target").get("dev") for disk in definition.disks]  # type: ignore[union-attr]
    assert targets == ["vda", "vdc", "vdd", "sdc"]  # no empty cdroms, no empty source
    assert [label.get("model") for label in definition.seclabels] == ["selinux", "dac"]
    assert dac_label(REAL_WORLD_DOMAIN) == ("64055", "64055")
    assert not _has_guestfs_channel(REAL_WORLD_DOMAIN)  # a pty channel cannot be opened, a unix one has no target


def test_odd_disks_become_appliance_disks_that_libvirt_can_parse() -> None:
    definition = read_guest_definition(REAL_WORLD_DOMAIN)
    spec = ApplianceSpec(name="virtmount-appliance-x", guest=definition, kernel_path="/k", initrd_path="/i",
                         root_path="/r", root_uuid="u", domain_type="qemu")
    root = ET.fromstring(build_appliance_xml(spec))
    disks = root.findall("./devices/disk")
    assert len(disks) == len(definition.disks) + 1  # and the appliance's root
    for index, guest_disk in enumerate(definition.disks):
        disk = appliance_disk(guest_disk, index, writable=False)
        assert disk.find("boot") is None and disk.find("address").get("type") == "drive"  # type: ignore[union-attr]
        driver = disk.find("driver")
        assert driver is None or "iothread" not in driver.attrib


@pytest.mark.parametrize("case", sorted(UNREADABLE_DOMAINS))
def test_unreadable_domain_xml_is_a_domain_xml_error(case: str) -> None:
    started = time.monotonic()
    with pytest.raises(DomainXmlError, match="does not parse"):
        read_guest_definition(UNREADABLE_DOMAINS[case])
    with pytest.raises(SourceUnavailable, match="does not parse"):
        _has_guestfs_channel(UNREADABLE_DOMAINS[case])
    assert appliance_owner(UNREADABLE_DOMAINS[case]) is None
    assert time.monotonic() - started < 5  # the entity bomb is refused, not expanded


@pytest.mark.parametrize("xml", [
    "<domain xmlns='http://example.com/not-libvirt'><devices><disk><source file='/x'/></disk></devices></domain>",
    "<volume><devices><disk><source file='/x'/></disk></devices></volume>",
    "<domain><devices><disk><source><host/></source></disk><disk/></devices></domain>",
    "<domain><devices>text<disk>more text</disk></devices><seclabel/></domain>",
])
def test_surprising_but_well_formed_domain_xml_yields_what_it_has(xml: str) -> None:
    definition = read_guest_definition(xml)
    assert definition.name == "?"
    assert len(definition.disks) <= 1


def volume(kind: str = "file", target: str = "<target><path>/p/v.img</path><format type='qcow2'/></target>") -> str:
    return f"<volume type='{kind}'><name>v.img</name><key>/p/v.img</key>{target}</volume>"


@pytest.mark.parametrize(("xml", "disk_type", "driver_type"), [
    (volume(), "file", "qcow2"),
    (volume("block", "<target><path>/dev/vg/lv</path></target>"), "block", "raw"),
    (volume(target=""), "volume", "raw"),  # no target at all: libvirt resolves the volume itself
    (volume(target="<target><format type=''/></target>"), "volume", "raw"),
    (volume("network", "<target><path>rbd:pool/v</path><format type='raw'/></target>"), "volume", "raw"),
    (volume(target="<target><path>/p/v.iso</path><format type='iso'/></target>"), "file", "raw"),
    (volume(target="<target><path>/p/v.vhd</path><format type='vhd'/></target>"), "file", "vpc"),
    ("<volume><name>v</name><target><path>/p/v</path></target><capacity unit='bytes'>-1</capacity></volume>",
     "file", "raw"),
])
def test_volume_xml_of_every_kind_gives_a_disk(xml: str, disk_type: str, driver_type: str) -> None:
    disk = volume_disk(xml, "pool")
    assert disk.get("type") == disk_type
    assert disk.find("driver").get("type") == driver_type  # type: ignore[union-attr]
    assert disk.find("source") is not None


@pytest.mark.parametrize("xml", [
    "", "<volume", "not xml at all", BILLION_LAUGHS,
    volume("netdir", "<target><path>/p/d</path><format type='dir'/></target>"),
    volume("ploop", "<target><path>/p/c</path><format type='ploop'/></target>"),
])
def test_unusable_volume_xml_is_source_unavailable(xml: str) -> None:
    with pytest.raises(SourceUnavailable):
        volume_disk(xml, "pool")


async def test_names_that_cannot_be_file_names_are_left_out_of_listings() -> None:
    """libvirt names with ``/`` exist (gluster pools name volumes in subdirectories ``dir/file``); one
    such entry in a readdir reply makes the kernel fail the whole listing, so it is left out."""
    conn = FakeConnection(FakeDomain("alpha", ALPHA_UUID), FakeDomain("a/b", "1" * 8 + "-1111-1111-1111-" + "1" * 12),
                          FakeDomain("..", "2" * 8 + "-2222-2222-2222-" + "2" * 12),
                          FakeDomain("", "3" * 8 + "-3333-3333-3333-" + "3" * 12))
    world = make_world(conn)
    assert await names_in(world.tree, world.tree.domains_dir) == [b"alpha"]
