"""Issue 16, item 6: `virtmount gc` deletes what virtmount left on the host and nothing uses, and only that.

Real libvirtd (over qemu+tcp), a dir pool of the test's own standing in for the appliance pool (``-o pool=``),
volumes named as virtmount names them, and a defined domain that uses one of them. No appliance is booted:
which volumes go depends on their names, their age and what domains use, not on their content.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.acceptance.helpers import run_virtmount
from tests.volumes import POOL_PARENT, start_dir_pool, stop_pool, virsh
from virtmount.appliance import ApplianceSettings
from virtmount.faststart import SavedAppliance
from virtmount.virt.provision import HostAppliance, prepare_local_appliance, volume_names

pytestmark = pytest.mark.acceptance

GC_POOL = "virtmount-test-gc"
USER_DOMAIN = "virtmount-test-gc-user"


def build(digest: str) -> dict[str, str]:
    """The volume names of an appliance build whose content hash starts with ``digest``."""
    return volume_names(digest.ljust(64, "0"))


def host_appliance(names: dict[str, str], root_uuid: str) -> HostAppliance:
    def path(role: str) -> str:
        return str(POOL_PARENT / GC_POOL / names[role])

    return HostAppliance(path("kernel"), path("initrd"), path("root"), root_uuid)


def saved_volumes(saved: SavedAppliance) -> list[str]:
    return [f"{saved.name}.state", saved.root_volume, saved.run_volume]


def pool_volumes(uri: str) -> set[str]:
    virsh(uri, "pool-refresh", GC_POOL)
    return {line.split()[0] for line in virsh(uri, "vol-list", "--pool", GC_POOL).stdout.splitlines()}


def domain_xml(disk: str) -> str:
    return (f"<domain type='qemu'><name>{USER_DOMAIN}</name><memory unit='MiB'>64</memory>"
            "<os><type arch='x86_64'>hvm</type></os><devices><disk type='file' device='disk'>"
            f"<driver name='qemu' type='raw'/><source file='{disk}'/><target dev='vda' bus='virtio'/>"
            "</disk></devices></domain>")


def test_gc_deletes_only_what_virtmount_left_and_nothing_uses(libvirtd: str, tcp_uri: str, tmp_path: Path) -> None:
    local = prepare_local_appliance()
    current, old, in_use, uploading = (volume_names(local.content_hash), build("f" * 16), build("e" * 16),
                                       build("d" * 16))
    settings = ApplianceSettings()
    current_host = host_appliance(current, local.root_uuid)

    def saved(host: HostAppliance, memory_mib: int, slot: int) -> SavedAppliance:
        return SavedAppliance.for_boot(host, "qemu", memory_mib, settings.vcpus, settings.extra_kernel_args,
                                       settings.verbose, settings.emulator, slot)

    current_saved = saved(current_host, settings.memory_mib, 1)  # what a mount with these settings restores
    other_settings_saved = saved(current_host, settings.memory_mib * 2, 0)
    old_build_saved = saved(host_appliance(old, local.root_uuid), settings.memory_mib, 0)
    build_roles = ("kernel", "initrd", "root", "marker")
    gone_overlay = "guest.img.TRANSIENT-virtmount-appliance-gone-999999999"
    to_delete = ({old[role] for role in build_roles} | set(saved_volumes(other_settings_saved))
                 | set(saved_volumes(old_build_saved)) | {gone_overlay})
    to_keep = ({current[role] for role in build_roles} | set(saved_volumes(current_saved))
               | {in_use[role] for role in build_roles}  # the defined domain's disk is its root
               | {uploading["kernel"], uploading["uploading"]}  # an upload under way: no marker yet
               | {"guest.img.TRANSIENT-someone", "keep-me.img", "virtmount-appliance-notes.txt"})

    start_dir_pool(libvirtd, GC_POOL)
    xml = tmp_path / "user.xml"
    xml.write_text(domain_xml(str(POOL_PARENT / GC_POOL / in_use["root"])))
    virsh(libvirtd, "undefine", USER_DOMAIN, check=False)
    try:
        for name in sorted(to_delete | to_keep):
            virsh(libvirtd, "vol-create-as", GC_POOL, name, "64K", "--format", "raw")
        virsh(libvirtd, "define", str(xml))

        result = run_virtmount("gc", "-o", f"pool={GC_POOL}", tcp_uri, timeout=300)
        assert result.returncode == 0, result.stderr
        assert result.stderr == ""
        lines = result.stdout.splitlines()
        assert {line.split()[1] for line in lines[:-1]} == {f"{GC_POOL}/{name}" for name in to_delete}
        assert lines[-1].startswith(f"{len(to_delete)} volume(s) deleted, ")
        assert pool_volumes(libvirtd) == to_keep

        virsh(libvirtd, "undefine", USER_DOMAIN)
        again = run_virtmount("gc", "-o", f"pool={GC_POOL}", tcp_uri, timeout=300)
        assert again.returncode == 0, again.stderr
        assert {line.split()[1] for line in again.stdout.splitlines()[:-1]} == {
            f"{GC_POOL}/{in_use[role]}" for role in build_roles}  # no domain uses that build any more
        assert pool_volumes(libvirtd) == to_keep - {in_use[role] for role in build_roles}
    finally:
        virsh(libvirtd, "undefine", USER_DOMAIN, check=False)
        stop_pool(libvirtd, GC_POOL)
