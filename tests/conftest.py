"""Session fixtures for the acceptance tests: libvirtd, test guests.

Fixtures:

* ``libvirtd`` -> ``"qemu:///system"``: virtlogd and libvirtd are running
  (also with the loopback TCP listener, see ``tcp_uri``).
* ``tcp_uri`` -> ``"qemu+tcp://127.0.0.1/system"``: libvirtd answers there.
* ``test_guest`` -> ``images.Guest`` for domain ``virtmount-test-guest``
  (image ``images.STANDARD``: Debian 12 look-alike, LVM, ext4 + XFS).
* ``nos_guest`` -> ``images.Guest`` for domain ``virtmount-test-noos``
  (image ``images.NOOS``: one bare ext4 filesystem, no OS).

Guest domains are persistent and shut off; images are built on first use
(a few minutes under TCG) and cached, see tests/images.py.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests import images

REPO = Path(__file__).resolve().parent.parent
START_LIBVIRTD = REPO / "contrib" / "start-libvirtd.sh"
TCP_CONF = REPO / "tests" / "libvirtd-tcp.conf"

SYSTEM_URI = "qemu:///system"
TCP_URI = "qemu+tcp://127.0.0.1/system"

TEST_GUEST_NAME = "virtmount-test-guest"
NOOS_GUEST_NAME = "virtmount-test-noos"


def _start_libvirtd(*args: str) -> None:
    proc = subprocess.run(
        [str(START_LIBVIRTD), *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode != 0:
        msg = proc.stderr.strip() or f"{START_LIBVIRTD} exited with {proc.returncode}"
        raise RuntimeError(msg)


@pytest.fixture(scope="session")
def libvirtd() -> str:
    """Ensure virtlogd and libvirtd run; return the qemu:///system URI.

    libvirtd is started (or restarted, once) with the loopback TCP listener
    right away, so that requesting ``tcp_uri`` later in the session never
    restarts libvirtd under connections other tests hold open.
    """
    # NB: the TCP listener has no authentication (tests/libvirtd-tcp.conf):
    # acceptable on throw-away test machines only.
    _start_libvirtd("--tcp", str(TCP_CONF))
    return SYSTEM_URI


@pytest.fixture(scope="session")
def tcp_uri(libvirtd: str) -> str:
    """qemu+tcp://127.0.0.1/system, served by libvirtd without authentication.

    If nothing listens on 127.0.0.1:16509, libvirtd is restarted with
    ``-l -f tests/libvirtd-tcp.conf`` (running domains are left alone).
    """
    _start_libvirtd("--tcp", str(TCP_CONF))  # cheap check when already listening
    return TCP_URI


def _guest(uri: str, name: str, spec: images.ImageSpec) -> images.Guest:
    image = images.build(spec)
    images.ensure_domain(uri, name, image)
    return images.Guest(name=name, uri=uri, image=image, spec=spec)


@pytest.fixture(scope="session")
def test_guest(libvirtd: str) -> images.Guest:
    """Shut-off domain virtmount-test-guest on the standard image."""
    return _guest(libvirtd, TEST_GUEST_NAME, images.STANDARD)


@pytest.fixture(scope="session")
def nos_guest(libvirtd: str) -> images.Guest:
    """Shut-off domain virtmount-test-noos on the no-OS image."""
    return _guest(libvirtd, NOOS_GUEST_NAME, images.NOOS)
