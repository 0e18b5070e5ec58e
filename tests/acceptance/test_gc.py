"""Issue 16, item 6: `virtmount gc` deletes what virtmount left on the host and nothing uses, and only that.

Real libvirtd (over qemu+tcp), a dir pool of the test's own standing in for the appliance pool (``-o pool=``),
volumes named as virtmount names them, a directory that no pool holds with guest images and throw-away
overlays beside them, and defined domains that use some of them. No appliance is booted: which volumes go
depends on their names, their age and what domains use, not on their content.

gc deletes forgotten overlays host-wide: those that earlier tests or runs left elsewhere on the host are
deleted too, and only checked to be such overlays.
"""

from __future__ import annotations

from pathlib import Path

import shutil

import pytest

from tests.acceptance.helpers import run_virtmount
from tests.volumes import POOL_PARENT, start_dir_pool, stop_pool, virsh
from virtmount.appliance import ApplianceSettings
from virtmount.virt.domainxml import APPLIANCE_NAME_PREFIX
from virtmount.faststart import SavedAppliance
from virtmount.virt.provision import HostAppliance, prepare_local_appliance, volume_names

pytestmark = pytest.mark.acceptance

GC_POOL = "virtmount-test-gc"
USER_DOMAIN = "virtmount-test-gc-user"
LOOSE_DIR = POOL_PARENT / "virtmount-test-gc-loose"  # guest images in no pool
APPLIANCE_DOMAIN = f"{APPLIANCE_NAME_PREFIX}test-gc-defined"  # a domain named as an appliance, that exists


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


def domain_xml(name: str, *disks: Path) -> str:
    devices = "".join(f"<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{disk}'/>"
                      f"<target dev='vd{chr(ord('a') + number)}' bus='virtio'/></disk>"
                      for number, disk in enumerate(disks))
    return (f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory>"
            f"<os><type arch='x86_64'>hvm</type></os><devices>{devices}</devices></domain>")


def define(uri: str, xml: Path, name: str, *disks: Path) -> None:
    xml.write_text(domain_xml(name, *disks))
    virsh(uri, "undefine", name, check=False)
    virsh(uri, "define", str(xml))


def gc_deletions(uri: str) -> set[str]:
    """What ``virtmount gc`` deleted in the test's pool and loose directory; anything else it deleted must
    be a throw-away overlay of an appliance (left on the host by earlier tests or runs)."""
    result = run_virtmount("gc", "-o", f"pool={GC_POOL}", uri, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    places = [line.split()[1] for line in lines[:-1]]
    assert lines[-1].startswith(f"{len(places)} volume(s) deleted, ")
    ours = {place for place in places if place.startswith((f"{GC_POOL}/", f"{LOOSE_DIR}/"))}
    assert all(f".TRANSIENT-{APPLIANCE_NAME_PREFIX}" in place for place in set(places) - ours), places
    return ours


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

    loose_to_delete = {"guest.img.TRANSIENT-virtmount-appliance-gone-1"}
    loose_files = {"guest.img", "other.img", "guest.img.TRANSIENT-someone", f"other.img.TRANSIENT-{APPLIANCE_DOMAIN}",
                   *loose_to_delete}

    start_dir_pool(libvirtd, GC_POOL)
    shutil.rmtree(LOOSE_DIR, ignore_errors=True)
    LOOSE_DIR.mkdir()
    try:
        for name in sorted(to_delete | to_keep):
            virsh(libvirtd, "vol-create-as", GC_POOL, name, "64K", "--format", "raw")
        for name in loose_files:
            with open(LOOSE_DIR / name, "wb") as file:
                file.truncate(64 * 1024)
        define(libvirtd, tmp_path / "user.xml", USER_DOMAIN, POOL_PARENT / GC_POOL / in_use["root"],
               LOOSE_DIR / "guest.img")
        define(libvirtd, tmp_path / "appliance.xml", APPLIANCE_DOMAIN, LOOSE_DIR / "other.img")

        assert gc_deletions(tcp_uri) == ({f"{GC_POOL}/{name}" for name in to_delete}
                                         | {f"{LOOSE_DIR}/{name}" for name in loose_to_delete})
        assert pool_volumes(libvirtd) == to_keep
        assert {path.name for path in LOOSE_DIR.iterdir()} == loose_files - loose_to_delete
        assert not [line for line in virsh(libvirtd, "pool-list", "--all", "--name").stdout.split()
                    if line.startswith("virtmount-gc-")]  # its pool for the loose directory is gone

        virsh(libvirtd, "undefine", USER_DOMAIN)
        assert gc_deletions(tcp_uri) == {
            f"{GC_POOL}/{in_use[role]}" for role in build_roles}  # no domain uses that build any more
        assert pool_volumes(libvirtd) == to_keep - {in_use[role] for role in build_roles}
        assert {path.name for path in LOOSE_DIR.iterdir()} == loose_files - loose_to_delete
    finally:
        for name in (USER_DOMAIN, APPLIANCE_DOMAIN):
            virsh(libvirtd, "undefine", name, check=False)
        for name in pool_volumes(libvirtd):  # nothing of the test's stays on the host
            virsh(libvirtd, "vol-delete", "--pool", GC_POOL, name, check=False)
        stop_pool(libvirtd, GC_POOL)
        shutil.rmtree(LOOSE_DIR, ignore_errors=True)
