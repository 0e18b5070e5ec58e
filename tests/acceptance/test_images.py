"""Sanity checks of the test fixtures themselves, independent of virtmount:
the domains are defined and shut off on their cached images.  That libguestfs
reads back from an image exactly what tests/images.py promises (files, links,
xattrs, filesystems, inspection) is checked when the image is built, in the
building appliance (``images.build_into``): an image that fails is never
cached, and no test boots a second appliance to read it again."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import libvirt
import pytest

from tests import images

pytestmark = pytest.mark.acceptance


def _check_domain(uri: str, guest: images.Guest) -> None:
    conn = libvirt.open(uri)
    try:
        dom = conn.lookupByName(guest.name)
        assert dom.isPersistent()
        assert dom.state()[0] == libvirt.VIR_DOMAIN_SHUTOFF
        root = ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
        assert root.get("type") == "qemu"
        disks = root.findall("./devices/disk")
        assert len(disks) == 1
        assert disks[0].find("source").get("file") == str(guest.image)  # type: ignore[union-attr]
        assert disks[0].find("driver").get("type") == "qcow2"  # type: ignore[union-attr]
        assert disks[0].find("target").get("dev") == "vda"  # type: ignore[union-attr]
    finally:
        conn.close()


def test_domains_defined_and_shut_off(
    test_guest: images.Guest, nos_guest: images.Guest
) -> None:
    for guest in (test_guest, nos_guest):
        assert guest.image.is_file()
        _check_domain(guest.uri, guest)


def test_tcp_uri_sees_the_domain(tcp_uri: str, test_guest: images.Guest) -> None:
    _check_domain(tcp_uri, test_guest)
