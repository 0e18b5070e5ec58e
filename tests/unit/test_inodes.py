"""Inode numbers (virtmount.fs.inodes): stable, distinct, never the root's."""

from __future__ import annotations

import hashlib
import itertools
from typing import Callable

import pyfuse3
import pytest

from virtmount.fs import inodes
from virtmount.fs.inodes import GUEST_INODE_BITS, InodeNumbers

UUID_A = "2d0c3e6a-1b7f-4c55-8e0e-5f4c3b2a1908"
UUID_B = "9b6f1d2e-7c3a-4e8b-a5d0-0f1e2d3c4b5a"
PREFIX_LIMIT = 1 << (64 - GUEST_INODE_BITS)
OVERFLOW_PREFIX = PREFIX_LIMIT - 1


def hashed_prefix(uuid: str, view: str, filesystem: str, salt: int = 0) -> int:
    """The documented derivation, written out independently: a change breaks remount stability."""
    digest = hashlib.sha256(f"{uuid}\0{view}\0{filesystem}\0{salt}".encode()).digest()
    return int.from_bytes(digest[:3], "big") % PREFIX_LIMIT


def test_layout_constants() -> None:
    assert GUEST_INODE_BITS == 40
    assert pyfuse3.ROOT_INODE == 1


def test_prefix_is_the_hash_of_uuid_view_filesystem() -> None:
    numbers = InodeNumbers()
    for key in [(UUID_A, "fs", "sda1"), (UUID_A, "sda1", "sda1"), (UUID_B, "fs", "vg0-root")]:
        expected = hashed_prefix(*key)
        assert expected not in (0, OVERFLOW_PREFIX)  # not a salted one for these inputs
        assert numbers.filesystem_prefix(*key) == expected


def test_same_inputs_same_numbers_in_another_instance_and_order() -> None:
    keys = [(uuid, view, fs) for uuid in (UUID_A, UUID_B) for view in ("fs", "sda1", "sda2")
            for fs in ("sda1", "sda2", "vg0-root")]
    first, second = InodeNumbers(), InodeNumbers()
    prefixes_first = {key: first.filesystem_prefix(*key) for key in keys}
    prefixes_second = {key: second.filesystem_prefix(*key) for key in reversed(keys)}
    assert prefixes_first == prefixes_second
    for key in keys:
        assert first.guest_inode(prefixes_first[key], 1234) == second.guest_inode(prefixes_second[key], 1234)


def test_prefix_cached_per_key() -> None:
    numbers = InodeNumbers()
    assert numbers.filesystem_prefix(UUID_A, "fs", "sda1") == numbers.filesystem_prefix(UUID_A, "fs", "sda1")


def test_distinct_prefixes_for_distinct_keys() -> None:
    numbers = InodeNumbers()
    keys = [(uuid, view, fs) for uuid in (UUID_A, UUID_B) for view in ("fs", "sda1", "sda2", "vg0-root")
            for fs in ("sda1", "sda2", "vg0-root", "dev2049")]
    prefixes = [numbers.filesystem_prefix(*key) for key in keys]
    assert len(set(prefixes)) == len(keys)
    assert all(0 < prefix < OVERFLOW_PREFIX for prefix in prefixes)


def test_guest_inode_is_prefix_and_guest_number() -> None:
    numbers = InodeNumbers()
    prefix = numbers.filesystem_prefix(UUID_A, "fs", "sda1")
    assert numbers.guest_inode(prefix, 2) == (prefix << 40) | 2
    assert numbers.guest_inode(prefix, (1 << 40) - 1) == (prefix << 40) | ((1 << 40) - 1)
    assert numbers.guest_inode(prefix, 0) == prefix << 40


def test_hard_links_same_number_filesystems_differ() -> None:
    numbers = InodeNumbers()
    root_fs = numbers.filesystem_prefix(UUID_A, "fs", "sda1")
    boot_fs = numbers.filesystem_prefix(UUID_A, "fs", "sda2")
    device_view = numbers.filesystem_prefix(UUID_A, "sda1", "sda1")
    assert numbers.guest_inode(root_fs, 131) == numbers.guest_inode(root_fs, 131)
    values = {numbers.guest_inode(p, 131) for p in (root_fs, boot_fs, device_view)}
    assert len(values) == 3


def test_virtual_numbers_are_sequential_after_the_root() -> None:
    numbers = InodeNumbers()
    assert [numbers.new_virtual() for _ in range(3)] == [2, 3, 4]


def test_root_inode_never_produced() -> None:
    numbers = InodeNumbers()
    produced = [numbers.new_virtual() for _ in range(100)]
    for index in range(200):
        prefix = numbers.filesystem_prefix(UUID_A, f"view{index}", "fs")
        produced += [numbers.guest_inode(prefix, ino) for ino in (0, 1, 2)]
    produced += [numbers.guest_inode(1, ino) for ino in (0, 1, 1 << 40)]
    assert pyfuse3.ROOT_INODE not in produced
    assert min(produced) == 2
    assert all(0 < number < 1 << 64 for number in produced)


def test_guest_numbers_beyond_40_bits_fall_back_to_unique_numbers() -> None:
    numbers = InodeNumbers()
    prefix_a = numbers.filesystem_prefix(UUID_A, "fs", "sda1")
    prefix_b = numbers.filesystem_prefix(UUID_A, "fs", "sda2")
    big = [1 << 40, (1 << 40) + 1, (1 << 63) + 5, (1 << 64) - 1]
    fallback_a = [numbers.guest_inode(prefix_a, ino) for ino in big]
    fallback_b = [numbers.guest_inode(prefix_b, ino) for ino in big]
    everything = fallback_a + fallback_b
    assert len(set(everything)) == len(everything)
    assert all(number >> 40 == OVERFLOW_PREFIX for number in everything)
    assert all(number < 1 << 64 for number in everything)
    # the same guest file keeps its fallback number for the life of the mount
    assert [numbers.guest_inode(prefix_a, ino) for ino in big] == fallback_a
    # and no fallback number is a regular one
    regular = {numbers.guest_inode(p, ino) for p in (prefix_a, prefix_b) for ino in (0, 1, 2, (1 << 40) - 1)}
    assert regular.isdisjoint(everything)


class _FakeDigest:
    def __init__(self, prefix: int) -> None:
        self._prefix = prefix

    def digest(self) -> bytes:
        return self._prefix.to_bytes(3, "big") + bytes(29)


class _FakeHashlib:
    """hashlib stand-in: the 24-bit prefix for each hashed input comes from ``table``."""

    def __init__(self, table: dict[str, int]) -> None:
        self.table = table
        self.inputs: list[str] = []

    def sha256(self, data: bytes) -> _FakeDigest:
        text = data.decode()
        self.inputs.append(text)
        return _FakeDigest(self.table[text])


def key_text(uuid: str, view: str, filesystem: str, salt: int) -> str:
    return f"{uuid}\0{view}\0{filesystem}\0{salt}"


@pytest.fixture
def fake_hashlib(monkeypatch: pytest.MonkeyPatch) -> Callable[[dict[str, int]], _FakeHashlib]:
    def install(table: dict[str, int]) -> _FakeHashlib:
        fake = _FakeHashlib(table)
        monkeypatch.setattr(inodes, "hashlib", fake)
        return fake
    return install


def test_prefix_collision_is_resolved_with_the_next_salt(
        fake_hashlib: Callable[[dict[str, int]], _FakeHashlib]) -> None:
    fake_hashlib({
        key_text(UUID_A, "fs", "sda1", 0): 0x1234,
        key_text(UUID_A, "fs", "sda2", 0): 0x1234,  # collides with the first
        key_text(UUID_A, "fs", "sda2", 1): 0x1234,  # and again
        key_text(UUID_A, "fs", "sda2", 2): 0x5678,
    })
    results = []
    for _ in range(2):  # a fresh instance (a remount) asked in the same order
        numbers = InodeNumbers()
        first = numbers.filesystem_prefix(UUID_A, "fs", "sda1")
        second = numbers.filesystem_prefix(UUID_A, "fs", "sda2")
        results.append((first, second))
        assert numbers.filesystem_prefix(UUID_A, "fs", "sda2") == second  # cached, no new salt
    assert results == [(0x1234, 0x5678), (0x1234, 0x5678)]


def test_prefix_zero_and_overflow_prefix_are_never_handed_out(
        fake_hashlib: Callable[[dict[str, int]], _FakeHashlib]) -> None:
    fake = fake_hashlib({
        key_text(UUID_A, "fs", "sda1", 0): 0,
        key_text(UUID_A, "fs", "sda1", 1): OVERFLOW_PREFIX,
        key_text(UUID_A, "fs", "sda1", 2): 42,
    })
    numbers = InodeNumbers()
    assert numbers.filesystem_prefix(UUID_A, "fs", "sda1") == 42
    assert fake.inputs == [key_text(UUID_A, "fs", "sda1", salt) for salt in range(3)]


def test_prefix_reduced_modulo_24_bits() -> None:
    # the real hash: every prefix fits in 24 bits, so shifted by 40 it stays below 2**64
    numbers = InodeNumbers()
    for view, fs in itertools.product(("fs", "a", "b"), ("x", "y", "z")):
        prefix = numbers.filesystem_prefix(UUID_B, view, fs)
        assert 0 < prefix < PREFIX_LIMIT - 1
        assert numbers.guest_inode(prefix, (1 << 40) - 1) < 1 << 64
