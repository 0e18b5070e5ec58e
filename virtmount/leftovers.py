"""What virtmount leaves on a libvirt host, found by virtmount's own names and removed when nothing uses it.

Every start removes what dead virtmounts of this client left running:
appliance domains and backup jobs (with their scratch volumes).
``virtmount gc URI`` does that too, and also deletes, through libvirt's
storage API (the host may be remote):

- appliance builds (``virtmount-appliance-<digest>-kernel``, ``-initrd``,
  ``-root.qcow2``, ``-complete``) other than this client's, in the appliance
  pool (``-o pool``);
- saved appliances (``virtmount-appliance-saved-<digest>[-<slot>]`` ``.state``,
  ``-root.qcow2``, ``-run.qcow2``: ~150 MB each) other than those of this
  client's build for the settings given (``-o``), for either accelerator;
- throw-away overlays libvirt forgot (``*.TRANSIENT-virtmount-appliance-*``,
  see virt/overlays.py), once no domain of that name exists: in any active
  pool, and beside the images of existing domains that no active pool holds
  (listed through a transient dir pool made for that directory, then removed).

It never deletes what a domain that exists uses (disks with their backing
chains, kernel, initrd: another client's running appliance, say), a saved
appliance whose domain exists (restored, or being saved), an upload or a
save still under way (no ``-complete`` or ``.state`` yet, made in the last
``UPLOAD_LOCK_STALE_S``), or anything not named as virtmount's. Another
client whose build is deleted uploads it again at its next boot.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass, field
from typing import Iterable, Sequence
from xml.etree import ElementTree as ET

import libvirt

from .appliance import ApplianceSettings
from .faststart import SLOTS, SavedAppliance
from .virt.backup import end_leftover_jobs, owner_is_gone
from .virt.connection import domain_exists, libvirt_message, pool_directory, run_blocking, uses_embedded_driver
from .virt.domainxml import APPLIANCE_NAME_PREFIX, appliance_client, appliance_owner
from .virt.overlays import dir_pool_xml
from .virt.provision import UPLOAD_LOCK_STALE_S, HostAppliance, prepare_local_appliance, volume_names

log = logging.getLogger(__name__)

_BUILD_VOLUME = re.compile(rf"^{APPLIANCE_NAME_PREFIX}([0-9a-f]{{16}})-(kernel|initrd|root\.qcow2|complete|uploading)$")
_SAVED_VOLUME = re.compile(rf"^({APPLIANCE_NAME_PREFIX}saved-[0-9a-f]{{16}}(?:-[0-9]+)?)(\.state|-root\.qcow2|-run\.qcow2)$")
_OVERLAY_MARK = ".TRANSIENT-"
_DOMAIN_TYPES = ("kvm", "qemu")  # the accelerator `auto` may pick either


async def remove_leftover_appliances(conn: libvirt.virConnect) -> None:
    """End appliances that a virtmount of this client left running when it died: without auto-destroy
    (embedded driver) any; otherwise restored ones (a restore cannot ask for auto-destroy), whose
    watchdog died with their virtmount."""
    embedded = await run_blocking(uses_embedded_driver, conn)
    for domain in await run_blocking(conn.listAllDomains, libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
        try:
            name = await run_blocking(domain.name)
            if not name.startswith(APPLIANCE_NAME_PREFIX):
                continue
            xml = await run_blocking(domain.XMLDesc, 0)
            if not embedded and not owner_is_gone(f"{appliance_client(xml)}.{appliance_owner(xml)}"):
                continue  # another client's, a live virtmount's, or one from before clients were recorded
            log.info("destroying leftover appliance %s", name)
            await run_blocking(domain.destroy)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() not in (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_OPERATION_INVALID):
                log.warning("cannot destroy a leftover appliance: %s", libvirt_message(exc))
            # else it ended meanwhile: a restored appliance powers off once its virtmount's channel closes


async def end_leftover_backup_jobs(conn: libvirt.virConnect, pool: str, ours_too: bool = False) -> None:
    """A virtmount of this host that died (and its watchdog too) may have left backup jobs and scratch volumes;
    so may this one when its connection was lost (``ours_too``: the lost connection could not end them)."""
    try:
        for name in await run_blocking(end_leftover_jobs, conn, pool, ours_too):
            log.info("ended a leftover backup job of virtmount's on %s", name)
    except libvirt.libvirtError as exc:
        log.warning("cannot look for leftover backup jobs: %s", libvirt_message(exc))


@dataclass(frozen=True)
class FoundVolume:
    """A storage volume as ``virtmount gc`` weighs it."""

    pool: str  # "" for a file in a directory that no pool holds
    name: str
    path: str
    backing: str  # the path of its backing file, "" if none
    age_s: float  # since it was made
    allocation: int  # bytes it takes on the host

    @property
    def place(self) -> str:
        """Where it is, as ``virtmount gc`` reports it: POOL/NAME, or the path outside any pool."""
        return f"{self.pool}/{self.name}" if self.pool else self.path


@dataclass(frozen=True)
class InUse:
    """What must stay: this client's build and saved appliances, and whatever existing domains use."""

    build: str  # this client's appliance build (the digest in its volume names), "" if unknown
    saved: frozenset[str]  # the saved appliances of that build for the settings given
    domains: frozenset[str]  # names of the domains that exist
    paths: frozenset[str]  # every file those domains use (disks with backing chains, kernel, initrd)


def collectable(volumes: Sequence[FoundVolume], in_use: InUse) -> list[FoundVolume]:
    """Those of ``volumes`` that ``virtmount gc`` deletes, overlays and saved appliances before the builds
    they back onto (see the module's docstring for the rules)."""
    builds: dict[str, list[FoundVolume]] = {}
    saved: dict[str, list[FoundVolume]] = {}
    overlays = []
    for volume in volumes:
        if (match := _BUILD_VOLUME.match(volume.name)) is not None:
            builds.setdefault(match.group(1), []).append(volume)
        elif (match := _SAVED_VOLUME.match(volume.name)) is not None:
            saved.setdefault(match.group(1), []).append(volume)
        elif _overlay_domain(volume.name).startswith(APPLIANCE_NAME_PREFIX):
            overlays.append(volume)

    def used(group: Iterable[FoundVolume]) -> bool:
        return any(volume.path in in_use.paths for volume in group)

    def under_way(group: list[FoundVolume], done_suffix: str) -> bool:
        return (not any(volume.name.endswith(done_suffix) for volume in group)
                and min(volume.age_s for volume in group) < UPLOAD_LOCK_STALE_S)

    kept_saved = {name for name, group in saved.items()
                  if name in in_use.saved or name in in_use.domains or used(group) or under_way(group, ".state")}
    backing_of_kept = {volume.backing for name in kept_saved for volume in saved[name]}
    kept_builds = {digest for digest, group in builds.items()
                   if digest == in_use.build or used(group) or under_way(group, "-complete")
                   or any(volume.path in backing_of_kept for volume in group)}
    return ([volume for volume in overlays
             if _overlay_domain(volume.name) not in in_use.domains and volume.path not in in_use.paths]
            + [volume for name, group in sorted(saved.items()) if name not in kept_saved for volume in group]
            + [volume for digest, group in sorted(builds.items()) if digest not in kept_builds for volume in group])


def _overlay_domain(name: str) -> str:
    """The domain a throw-away overlay was made for (``IMAGE.TRANSIENT-DOMAIN``), "" for other names."""
    at = name.rfind(_OVERLAY_MARK)
    return "" if at < 0 else name[at + len(_OVERLAY_MARK):]


def _found_volume(pool_name: str, volume: libvirt.virStorageVol) -> FoundVolume:
    xml = ET.fromstring(volume.XMLDesc(0))
    ctime = xml.findtext("./target/timestamps/ctime")
    return FoundVolume(pool=pool_name, name=volume.name(), path=xml.findtext("./target/path", ""),
                       backing=xml.findtext("./backingStore/path", ""),
                       age_s=float("inf") if not ctime else time.time() - float(ctime),
                       allocation=int(xml.findtext("./allocation", "0")))


@dataclass
class Candidates:
    """Volumes named as virtmount's, with their handles by path, and the transient pools made to list
    directories that no pool holds (destroyed by ``close``)."""

    found: list[FoundVolume] = field(default_factory=list)
    handles: dict[str, libvirt.virStorageVol] = field(default_factory=dict)
    loose_pools: list[libvirt.virStoragePool] = field(default_factory=list)

    def add(self, pool_name: str, pool: libvirt.virStoragePool, appliance_pool: str) -> None:
        """The volumes of ``pool`` that may be virtmount's leftovers (blocking)."""
        try:
            pool.refresh(0)  # files libvirtd wrote itself (saved states) or that a restart forgot
        except libvirt.libvirtError as exc:
            log.debug("pool %s not refreshed: %s", pool_name, libvirt_message(exc))
        for volume in pool.listAllVolumes(0):
            name = volume.name()
            ours_here = pool_name == appliance_pool and (_BUILD_VOLUME.match(name) or _SAVED_VOLUME.match(name))
            if ours_here or _overlay_domain(name).startswith(APPLIANCE_NAME_PREFIX):
                try:
                    entry = _found_volume(pool_name, volume)
                except libvirt.libvirtError:
                    continue  # deleted meanwhile
                self.found.append(entry)
                self.handles[entry.path] = volume

    def close(self) -> None:
        for pool in self.loose_pools:
            try:
                pool.destroy()
            except libvirt.libvirtError as exc:
                log.warning("cannot remove the transient pool %s: %s", pool.name(), libvirt_message(exc))


def _candidates(conn: libvirt.virConnect, appliance_pool: str, domain_files: frozenset[str]) -> Candidates:
    """Builds and saved appliances in the appliance pool, forgotten overlays in any active pool and in the
    directories of ``domain_files`` (files existing domains use) that no active pool holds (blocking)."""
    candidates = Candidates()
    pooled = set()
    for pool in conn.listAllStoragePools(libvirt.VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE):
        pooled.add(pool_directory(pool))
        candidates.add(pool.name(), pool, appliance_pool)
    loose = sorted({os.path.dirname(path) for path in domain_files if path.startswith("/")} - pooled)
    try:
        for number, directory in enumerate(loose):
            try:
                pool = conn.storagePoolCreateXML(dir_pool_xml(f"virtmount-gc-{os.getpid()}-{number}", directory), 0)
            except libvirt.libvirtError as exc:  # gone, or an inactive pool's directory
                log.info("not looking for overlays in %s: %s", directory, libvirt_message(exc))
                continue
            candidates.loose_pools.append(pool)
            candidates.add("", pool, appliance_pool)
    except BaseException:
        candidates.close()
        raise
    return candidates


def _domains_in_use(conn: libvirt.virConnect) -> tuple[frozenset[str], frozenset[str]]:
    """The names of every domain that exists, and every file they use (blocking)."""
    names: set[str] = set()
    paths: set[str] = set()
    for domain in conn.listAllDomains(0):
        try:
            xml = ET.fromstring(domain.XMLDesc(0))
        except libvirt.libvirtError:
            continue  # gone meanwhile
        names.add(xml.findtext("name", ""))
        paths.update(element.get("file", "") for element in xml.iter("source"))
        paths.update(xml.findtext(f"./os/{part}", "") for part in ("kernel", "initrd"))
    paths.discard("")
    return frozenset(names), frozenset(paths)


def _this_build(conn: libvirt.virConnect, settings: ApplianceSettings) -> tuple[str, frozenset[str]]:
    """This client's build (its digest) and, if the host holds it whole, the names of its saved appliances
    for ``settings`` (blocking)."""
    local = prepare_local_appliance()
    names = volume_names(local.content_hash)
    digest = names["root"][len(APPLIANCE_NAME_PREFIX):].split("-")[0]
    try:
        pool = conn.storagePoolLookupByName(settings.pool)
        paths = {role: pool.storageVolLookupByName(names[role]).path() for role in ("kernel", "initrd", "root")}
        pool.storageVolLookupByName(names["marker"])
    except libvirt.libvirtError:
        return digest, frozenset()  # not on this host (whole): no saved appliance can be of it
    host = HostAppliance(paths["kernel"], paths["initrd"], paths["root"], local.root_uuid)
    return digest, frozenset(
        SavedAppliance.for_boot(host, domain_type, settings.memory_mib, settings.vcpus, settings.extra_kernel_args,
                                settings.verbose, settings.emulator, slot).name
        for domain_type in _DOMAIN_TYPES for slot in range(SLOTS))


async def collect(conn: libvirt.virConnect, settings: ApplianceSettings) -> list[FoundVolume]:
    """``virtmount gc``: remove what dead virtmounts left running, then delete the volumes nothing uses
    any more; the volumes deleted."""
    await remove_leftover_appliances(conn)
    await end_leftover_backup_jobs(conn, settings.scratch_pool_name)
    build, saved = await run_blocking(_this_build, conn, settings)
    _names, files_before = await run_blocking(_domains_in_use, conn)
    candidates = await run_blocking(_candidates, conn, settings.pool, files_before)
    try:
        # Domains listed after the files: an overlay seen with no domain of its name is one libvirt forgot,
        # or one it is deleting as its domain ends (checked again below); never one of a domain starting.
        domains, paths = await run_blocking(_domains_in_use, conn)
        deleted = []
        for volume in collectable(candidates.found, InUse(build, saved, domains, paths)):
            try:
                if not await run_blocking(_still_collectable, conn, volume, candidates.handles[volume.path]):
                    continue
                await run_blocking(candidates.handles[volume.path].delete, 0)
            except libvirt.libvirtError as exc:
                log.warning("cannot delete %s: %s", volume.place, libvirt_message(exc))
                continue
            deleted.append(volume)
        return deleted
    finally:
        await run_blocking(candidates.close)


def _still_collectable(conn: libvirt.virConnect, volume: FoundVolume, handle: libvirt.virStorageVol) -> bool:
    """Just before deleting: the file is still there (libvirt's delete does not fail on a missing file, so
    one whose domain ended meanwhile would be reported as deleted), and an overlay's domain still absent."""
    try:
        handle.info()  # stats the file
    except libvirt.libvirtError:
        return False
    domain = _overlay_domain(volume.name)
    return not domain or not domain_exists(conn, domain)
