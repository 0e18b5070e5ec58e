"""Issue 2: boot an appliance through libvirt and talk to its daemon over the libvirt channel.

Real libvirtd, real QEMU (TCG) and the real libguestfs appliance; the guest
images are built by tests/images.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import libvirt
import pytest
import trio

from tests import images, volumes
from tests.acceptance.helpers import (
    appliances_of,
    assert_one_line_error,
    run_virtmount,
    wait_for_no_appliances,
)
from virtmount.appliance import ApplianceSettings, boot_appliance
from virtmount.sources.domain import domain_source
from virtmount.inspection import inspect_guest
from virtmount.virt.connection import close_connection, open_connection
from virtmount.virt import provision as provision_module
from virtmount.virt.provision import provision, volume_names

pytestmark = pytest.mark.acceptance


def test_inspect_command_prints_os_and_filesystems(test_guest: images.Guest) -> None:
    result = run_virtmount("inspect", test_guest.uri, test_guest.name)
    assert result.returncode == 0, result.stderr
    inspection = test_guest.inspection
    assert inspection is not None
    first_line = result.stdout.splitlines()[0]
    assert f"({inspection.os_type}, {inspection.distro} {inspection.major}.{inspection.minor})" in first_line
    assert f"root {inspection.root}" in first_line
    assert f"hostname {inspection.hostname}" in first_line
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()[2:] if line.strip()}
    for fs in test_guest.spec.filesystems:
        assert fs.device in rows, result.stdout
        _, fstype, size, mountpoint = rows[fs.device]
        assert fstype == fs.fstype
        assert mountpoint == (fs.mountpoint or "-")
        assert size != "-"
    assert wait_for_no_appliances(test_guest.uri) == []


def test_inspect_command_on_a_guest_without_os(nos_guest: images.Guest) -> None:
    result = run_virtmount("inspect", nos_guest.uri, nos_guest.name)
    assert result.returncode == 0, result.stderr
    assert "no operating system found" in result.stdout
    assert "/dev/sda  ext4" in result.stdout
    assert wait_for_no_appliances(nos_guest.uri) == []


async def test_client_over_tcp_reads_what_was_written(test_guest: images.Guest, tcp_uri: str) -> None:
    """Boot over qemu+tcp, mount the root read-only and read files through the daemon protocol."""
    conn = await open_connection(tcp_uri)
    try:
        host_appliance = await provision(conn, "virtmount")
        async with trio.open_nursery() as nursery:
            source = await domain_source(conn, test_guest.name)
            appliance = await boot_appliance(conn, source, host_appliance, ApplianceSettings(), nursery)
            try:
                client = appliance.client
                report = await inspect_guest(client, test_guest.name, appliance.naming)
                assert test_guest.inspection is not None
                assert [os_.root for os_ in report.operating_systems] == [test_guest.inspection.root]
                assert report.operating_systems[0].mountpoints == test_guest.mountpoints
                await client.mount_ro(test_guest.inspection.root, "/")
                # the daemon's own names (sdb1 in a restored appliance) are shown in the guest's order
                in_appliance = await client.inspect_get_mountpoints(test_guest.inspection.root)
                assert appliance.naming.to_guest(in_appliance["/boot"]) == test_guest.mountpoints["/boot"]
                for mountpoint, device in sorted(in_appliance.items()):
                    if mountpoint != "/":
                        await client.mount_ro(device, mountpoint)
                for path, content in test_guest.files.items():
                    st = await client.lstatns(path.encode())
                    assert st.st_size == len(content), path
                    data = b""
                    while len(data) < len(content):
                        chunk = await client.pread(path.encode(), 1 << 20, len(data))
                        assert chunk, path
                        data += chunk
                    assert data == content, path
                names = {d.name for d in await client.readdir(b"/etc")}
                assert {b".", b"..", b"os-release", b"fstab"} <= names
                # many calls in flight at once come back matched to their callers
                paths = sorted(test_guest.files)
                results: dict[str, int] = {}

                async def stat_one(path: str) -> None:
                    results[path] = (await client.lstatns(path.encode())).st_size

                async with trio.open_nursery() as calls:
                    for path in paths:
                        calls.start_soon(stat_one, path)
                assert results == {path: len(test_guest.files[path]) for path in paths}
            finally:
                await appliance.shutdown()
    finally:
        await close_connection(conn)
    assert wait_for_no_appliances() == []


async def test_second_provision_reuses_the_uploaded_appliance(libvirtd: str) -> None:
    conn = await open_connection(libvirtd)
    try:
        first = await provision(conn, "virtmount")
        root_mtime = os.stat(first.root_path).st_mtime_ns
        second = await provision(conn, "virtmount")
        assert second == first
        assert os.stat(second.root_path).st_mtime_ns == root_mtime  # not uploaded again
        pool = conn.storagePoolLookupByName("virtmount")
        digest = os.path.basename(first.root_path).split("-")[2]
        names = volume_names(digest + "0" * 48)
        assert {names[k] for k in ("kernel", "initrd", "root", "marker")} <= set(pool.listVolumes())
    finally:
        await close_connection(conn)


def test_sigkill_of_the_client_leaves_no_appliance(nos_guest: images.Guest) -> None:
    script = textwrap.dedent(
        f"""
        import sys, trio
        from virtmount.appliance import ApplianceSettings, boot_appliance
        from virtmount.sources.domain import domain_source
        from virtmount.virt.connection import open_connection
        from virtmount.virt.provision import provision

        async def main():
            conn = await open_connection({nos_guest.uri!r})
            host = await provision(conn, "virtmount")
            async with trio.open_nursery() as nursery:
                source = await domain_source(conn, {nos_guest.name!r})
                await boot_appliance(conn, source, host, ApplianceSettings(), nursery)
                print("booted", flush=True)
                await trio.sleep_forever()

        trio.run(main)
        """
    )
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "booted"
        assert len(appliances_of(process.pid, nos_guest.uri)) == 1
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        deadline = time.monotonic() + 60
        while appliances_of(process.pid, nos_guest.uri) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert appliances_of(process.pid, nos_guest.uri) == []
    finally:
        process.kill()


# --- bad input: one line, non-zero exit, nothing left running -------------------------


def test_unknown_domain(libvirtd: str) -> None:
    assert_one_line_error(run_virtmount("inspect", libvirtd, "no-such-domain"), "no domain named 'no-such-domain'")


def test_malformed_uri() -> None:
    result = run_virtmount("inspect", "not a uri", "x")
    assert_one_line_error(result, "is not a libvirt URI")
    assert result.returncode == 2


def test_unreachable_host() -> None:
    # nothing listens on port 1 of the loopback address
    assert_one_line_error(run_virtmount("inspect", "qemu+tcp://127.0.0.1:1/system", "x"), "cannot connect to")


def test_unknown_driver() -> None:
    assert_one_line_error(run_virtmount("inspect", "nosuchdriver:///system", "x"), "cannot connect to")


def test_unknown_option(libvirtd: str) -> None:
    result = run_virtmount("inspect", "-o", "frobnicate=1", libvirtd, "x")
    assert_one_line_error(result, "unknown option 'frobnicate'")
    assert result.returncode == 2


def test_guest_disk_that_does_not_exist(libvirtd: str, tmp_path: object) -> None:
    name = "virtmount-test-missing-disk"
    conn = libvirt.open(libvirtd)
    try:
        try:
            conn.lookupByName(name).undefine()
        except libvirt.libvirtError:
            pass
        conn.defineXML(images.domain_xml(name, images.IMAGE_DIR / "does-not-exist.qcow2"))
        result = run_virtmount("inspect", libvirtd, name)
        assert_one_line_error(result, "does-not-exist.qcow2")
    finally:
        conn.lookupByName(name).undefine()
        conn.close()
    assert wait_for_no_appliances(libvirtd) == []


def test_appliance_that_fails_to_boot_shows_its_console(nos_guest: images.Guest) -> None:
    # the appliance kernel finds no init: it panics, reboots, and the domain ends (on_reboot=destroy)
    started = time.monotonic()
    result = run_virtmount("inspect", "-o", "kernel_args=rdinit=/no-such-init", nos_guest.uri, nos_guest.name)
    assert_one_line_error(result, "failed to boot", "last console lines:", "Kernel panic")
    assert time.monotonic() - started < 240
    assert wait_for_no_appliances(nos_guest.uri) == []


async def test_concurrent_provisions_upload_once_and_a_dead_uploaders_lock_is_broken(
        libvirtd: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two virtmounts provisioning one pool at once (one upload, the other waits for its marker), after
    an uploader that died left its lock behind. That lock counts as stale after 1 s; the live lock taken
    next keeps the real 15 minutes (an upload here can take longer than 1 s: the other provisioner would
    break a live lock, as it should after 15 minutes)."""
    pool_name = "virtmount-test-provision"
    volumes.start_dir_pool(libvirtd, pool_name)
    delete_if_older = provision_module._delete_if_older
    broken: list[float] = []

    def break_the_dead_lock_only(pool: libvirt.virStoragePool, name: str, seconds: float) -> float | None:
        age = delete_if_older(pool, name, 1.0 if not broken else seconds)
        if age is not None:
            broken.append(age)
        return age

    monkeypatch.setattr(provision_module, "_delete_if_older", break_the_dead_lock_only)
    conn = await open_connection(libvirtd)
    try:
        local = await trio.to_thread.run_sync(provision_module.prepare_local_appliance)
        pool = conn.storagePoolLookupByName(pool_name)
        names = volume_names(local.content_hash)
        provision_module._create_raw_volume(pool, names["uploading"], 0)  # a dead uploader's
        await trio.sleep(1.5)
        results: list[provision_module.HostAppliance] = []

        async def provision_into_pool() -> None:
            results.append(await provision(conn, pool_name))

        async with trio.open_nursery() as both:
            both.start_soon(provision_into_pool)
            both.start_soon(provision_into_pool)
        assert len(results) == 2 and results[0] == results[1]
        assert len(broken) == 1, broken
        with open(results[0].root_path, "rb") as host_root:
            assert host_root.read() == local.root_qcow2.read_bytes()
        assert names["uploading"] not in pool.listVolumes()
        for volume in pool.listAllVolumes(0):
            volume.delete(0)
    finally:
        await close_connection(conn)
        volumes.stop_pool(libvirtd, pool_name)
