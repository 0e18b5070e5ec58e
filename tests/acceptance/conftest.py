"""Fixtures for tests that use a real virtmount mount of qemu:///system or qemu+tcp://127.0.0.1/system."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.acceptance.helpers import run_virtmount


def unmount(mountpoint: Path, timeout: float = 120) -> None:
    """fusermount3 -u, then wait until the virtmount process has shut its appliances down and gone."""
    subprocess.run(["fusermount3", "-u", str(mountpoint)], check=False, capture_output=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        running = subprocess.run(["pgrep", "-f", f"virtmount .*{mountpoint}$"], capture_output=True, text=True)
        if not running.stdout.strip():
            return
        time.sleep(0.5)
    raise AssertionError(f"virtmount for {mountpoint} still running {timeout} s after unmount")


@pytest.fixture(scope="session")
def mounted(libvirtd: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """qemu:///system mounted (in the background, as users run it) for the whole session.

    Appliances stay up for 10 minutes of idleness so that tests share them.
    """
    mountpoint = tmp_path_factory.mktemp("virtmount")
    result = run_virtmount("-o", "idle=600", libvirtd, str(mountpoint))
    assert result.returncode == 0, result.stderr
    assert os.path.ismount(mountpoint)
    try:
        yield mountpoint
    finally:
        unmount(mountpoint)


@pytest.fixture(scope="session")
def tcp_mounted(tcp_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """qemu+tcp://127.0.0.1/system mounted for the whole session (appliances idle for up to 10 minutes)."""
    mountpoint = tmp_path_factory.mktemp("virtmount-tcp")
    result = run_virtmount("-o", "idle=600", tcp_uri, str(mountpoint))
    assert result.returncode == 0, result.stderr
    try:
        yield mountpoint
    finally:
        unmount(mountpoint)
