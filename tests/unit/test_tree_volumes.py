"""volumes/<pool>/<volume>/ in the virtual tree, over a fake libvirt connection with storage pools."""

from __future__ import annotations

import errno
import os

import libvirt
import pytest

from virtmount.fs.nodes import GuestNode, VirtualDir, VirtualFile
from virtmount.fs import tree as tree_module
from virtmount.fs.tree import RELEASE_XATTR

from .test_tree import FakeConnection, FakeDomain, World, fs_error, libvirt_error, make_layout, make_world, names_in, walk

POOL_UUID = "3c2b1a09-8f7e-4d6c-9b5a-493827161504"


class FakeVolume:
    def __init__(self, name: str, key: str) -> None:
        self._name = name
        self._key = key

    def name(self) -> str:
        return self._name

    def key(self) -> str:
        return self._key

    def XMLDesc(self, flags: int = 0) -> str:
        return f"<volume type='file'><name>{self._name}</name><key>{self._key}</key></volume>\n"


class FakePool:
    def __init__(self, name: str, uuid: str, *volumes: FakeVolume) -> None:
        self._name = name
        self._uuid = uuid
        self.active = True
        self.volumes = {volume.name(): volume for volume in volumes}
        self.list_calls = 0

    def name(self) -> str:
        return self._name

    def UUIDString(self) -> str:
        return self._uuid

    def isActive(self) -> int:
        return int(self.active)

    def _check_active(self) -> None:
        if not self.active:
            raise libvirt_error(libvirt.VIR_ERR_OPERATION_INVALID, f"storage pool '{self._name}' is not active")

    def listAllVolumes(self, flags: int = 0) -> list[FakeVolume]:
        self._check_active()
        self.list_calls += 1
        return list(self.volumes.values())

    def storageVolLookupByName(self, name: str) -> FakeVolume:
        self._check_active()
        if name not in self.volumes:
            raise libvirt_error(libvirt.VIR_ERR_NO_STORAGE_VOL, f"Storage volume not found: '{name}'")
        return self.volumes[name]


class StorageConnection(FakeConnection):
    def __init__(self, *pools: FakePool) -> None:
        super().__init__()
        self.pools = {pool.name(): pool for pool in pools}
        self.pool_list_calls = 0

    def listAllStoragePools(self, flags: int = 0) -> list[FakePool]:
        self._check()
        self.pool_list_calls += 1
        assert flags == libvirt.VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE
        return [pool for pool in self.pools.values() if pool.active]

    def storagePoolLookupByName(self, name: str) -> FakePool:
        self._check()
        if name not in self.pools:
            raise libvirt_error(libvirt.VIR_ERR_NO_STORAGE_POOL, f"Storage pool not found: '{name}'")
        return self.pools[name]

    def storageVolLookupByKey(self, key: str) -> FakeVolume:
        for pool in self.pools.values():
            for volume in pool.volumes.values():
                if volume.key() == key and pool.active:
                    return volume
        raise libvirt_error(libvirt.VIR_ERR_NO_STORAGE_VOL, f"Storage volume not found: no volume with key '{key}'")


@pytest.fixture
def world() -> World:
    images = FakePool("images", POOL_UUID, FakeVolume("disk.qcow2", "/pool/disk.qcow2"),
                      FakeVolume("blank.raw", "/pool/blank.raw"))
    stopped = FakePool("stopped", "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d", FakeVolume("x", "/stopped/x"))
    stopped.active = False
    world = make_world(StorageConnection(images, stopped))
    world.results["images/disk.qcow2"] = make_layout(world.client)
    world.results["images/blank.raw"] = make_layout(world.client, has_os=False)
    return world


def pool(world: World, name: str = "images") -> FakePool:
    assert isinstance(world.conn, StorageConnection)
    return world.conn.pools[name]


async def test_volumes_lists_active_pools_and_their_volumes_without_booting(world: World) -> None:
    tree = world.tree
    assert await names_in(tree, tree.volumes_dir) == [b"images"]
    images = await walk(tree, b"volumes", b"images")
    assert await names_in(tree, images) == [b"blank.raw", b"disk.qcow2"]
    assert await names_in(tree, images) == [b"blank.raw", b"disk.qcow2"]
    assert pool(world).list_calls == 1  # cached for a second
    volume = await walk(tree, b"volumes", b"images", b"disk.qcow2")
    assert isinstance(volume, VirtualDir)
    assert await names_in(tree, volume) == [b"volume.xml", b"fs", b"devices"]
    assert all(a.layout_calls == 0 for a in world.made)


async def test_inactive_and_unknown_pools_are_enoent(world: World) -> None:
    tree = world.tree
    assert await fs_error(tree.lookup(tree.volumes_dir.inode, b"stopped")) == errno.ENOENT
    assert await fs_error(tree.lookup(tree.volumes_dir.inode, b"nosuch")) == errno.ENOENT
    images = await walk(tree, b"volumes", b"images")
    assert await fs_error(tree.lookup(images.inode, b"nosuch")) == errno.ENOENT


async def test_volume_files_through_fs_and_devices(world: World) -> None:
    tree = world.tree
    hostname = await walk(tree, b"volumes", b"images", b"disk.qcow2", b"fs", b"etc", b"hostname")
    handle = await tree.open(hostname.inode, os.O_RDONLY)
    assert await tree.read(handle, 0, 100) == b"guest1\n"
    tree.release(handle)
    devices = await walk(tree, b"volumes", b"images", b"disk.qcow2", b"devices")
    assert await names_in(tree, devices) == [b"sda1", b"sda2"]
    assert world.appliance("images/disk.qcow2").layout_calls >= 1
    blank = await walk(tree, b"volumes", b"images", b"blank.raw")
    await names_in(tree, await tree.lookup(blank.inode, b"devices"))
    assert await names_in(tree, blank) == [b"volume.xml", b"devices"]  # no OS found: no fs/


async def test_volume_xml_comes_from_libvirt(world: World) -> None:
    tree = world.tree
    node = await walk(tree, b"volumes", b"images", b"disk.qcow2", b"volume.xml")
    assert isinstance(node, VirtualFile)
    handle = await tree.open(node.inode, os.O_RDONLY)
    assert await tree.read(handle, 0, 1 << 20) == pool(world).volumes["disk.qcow2"].XMLDesc().encode()
    assert world.appliance("images/disk.qcow2").layout_calls == 0


async def test_a_volume_and_a_domain_with_the_same_files_get_distinct_inode_numbers(world: World) -> None:
    world.conn.domains["alpha"] = FakeDomain("alpha", "2d0c3e6a-1b7f-4c55-8e0e-5f4c3b2a1908")
    in_volume = await walk(world.tree, b"volumes", b"images", b"disk.qcow2", b"fs", b"etc")
    in_domain = await walk(world.tree, b"domains", b"alpha", b"fs", b"etc")
    assert isinstance(in_volume, GuestNode) and isinstance(in_domain, GuestNode)
    assert in_volume.inode != in_domain.inode


async def test_volume_inode_numbers_are_stable_across_mounts(world: World) -> None:
    first = await walk(world.tree, b"volumes", b"images", b"disk.qcow2", b"fs", b"etc")
    again = make_world(world.conn)  # type: ignore[arg-type]
    again.results["images/disk.qcow2"] = make_layout(again.client)
    second = await walk(again.tree, b"volumes", b"images", b"disk.qcow2", b"fs", b"etc")
    assert first.inode == second.inode


async def test_volumes_created_and_deleted_while_mounted(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    tree = world.tree
    images = await walk(tree, b"volumes", b"images")
    await walk(tree, b"volumes", b"images", b"disk.qcow2", b"fs")
    appliance = world.appliance("images/disk.qcow2")
    pool(world).volumes["new.img"] = FakeVolume("new.img", "/pool/new.img")
    world.results["images/new.img"] = make_layout(world.client)
    del pool(world).volumes["disk.qcow2"]
    monkeypatch.setattr(tree_module, "LIST_TTL_S", -1.0)  # the listings kept for a second have expired
    assert await names_in(tree, images) == [b"blank.raw", b"new.img"]
    assert appliance.release_calls == 1  # a deleted volume's appliance goes
    assert await fs_error(tree.lookup(images.inode, b"disk.qcow2")) == errno.ENOENT


async def test_a_volume_recreated_under_its_name_is_a_new_source(world: World) -> None:
    first = await walk(world.tree, b"volumes", b"images", b"disk.qcow2")
    old = world.appliance("images/disk.qcow2")
    pool(world).volumes["disk.qcow2"] = FakeVolume("disk.qcow2", "/pool/elsewhere/disk.qcow2")
    second = await walk(world.tree, b"volumes", b"images", b"disk.qcow2")
    assert second is not first and old.release_calls == 1


async def test_a_pool_stopped_while_mounted_is_enoent_below_and_releases_its_volumes(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    tree = world.tree
    images = await walk(tree, b"volumes", b"images")
    volume = await walk(tree, b"volumes", b"images", b"disk.qcow2")
    await walk(tree, b"volumes", b"images", b"disk.qcow2", b"fs", b"etc")
    pool(world).active = False
    assert await fs_error(tree.lookup(images.inode, b"disk.qcow2")) == errno.ENOENT
    assert await fs_error(tree.list_directory(images.inode)) == errno.ENOENT
    assert world.appliance("images/disk.qcow2").release_calls == 1
    monkeypatch.setattr(tree_module, "LIST_TTL_S", -1.0)  # the listings kept for a second have expired
    assert await names_in(tree, tree.volumes_dir) == []
    assert await fs_error(tree.lookup(tree.volumes_dir.inode, b"images")) == errno.ENOENT
    assert isinstance(volume, VirtualDir)  # the node stays valid for the kernel; its children are gone


async def test_release_xattr_on_a_volume_dir(world: World) -> None:
    volume = await walk(world.tree, b"volumes", b"images", b"disk.qcow2")
    await world.tree.setxattr(volume.inode, RELEASE_XATTR, b"")
    assert world.appliance("images/disk.qcow2").release_calls == 1


async def test_libvirt_failure_listing_pools_is_eio(world: World) -> None:
    world.conn.broken = True
    assert await fs_error(world.tree.list_directory(world.tree.volumes_dir.inode)) == errno.EIO
