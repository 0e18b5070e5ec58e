"""Which volumes `virtmount gc` deletes: leftovers.collectable, on volume lists made up here."""

from __future__ import annotations

from virtmount.leftovers import FoundVolume, InUse, collectable
from virtmount.virt.provision import UPLOAD_LOCK_STALE_S

POOL = "/var/lib/libvirt/virtmount"
CURRENT = "0123456789abcdef"
OLD = "fedcba9876543210"
OLDER = "00000000aaaaaaaa"
OLD_AGE = UPLOAD_LOCK_STALE_S * 10


def volume(name: str, backing: str = "", age: float = OLD_AGE, directory: str = POOL) -> FoundVolume:
    return FoundVolume(pool="virtmount", name=name, path=f"{directory}/{name}", backing=backing, age_s=age,
                       allocation=1 << 20)


def build(digest: str, age: float = OLD_AGE, complete: bool = True) -> list[FoundVolume]:
    parts = ["kernel", "initrd", "root.qcow2"] + (["complete"] if complete else ["uploading"])
    return [volume(f"virtmount-appliance-{digest}-{part}", age=age) for part in parts]


def saved(name: str, build_digest: str, state: bool = True, age: float = OLD_AGE) -> list[FoundVolume]:
    root = f"{POOL}/virtmount-appliance-{build_digest}-root.qcow2"
    volumes = [volume(f"{name}-root.qcow2", backing=root, age=age),
               volume(f"{name}-run.qcow2", backing=f"{POOL}/{name}-root.qcow2", age=age)]
    return volumes + ([volume(f"{name}.state", age=age)] if state else [])


def names(volumes: list[FoundVolume]) -> set[str]:
    return {v.name for v in volumes}


def in_use(saved_names: tuple[str, ...] = (), domains: tuple[str, ...] = (), paths: tuple[str, ...] = ()) -> InUse:
    return InUse(build=CURRENT, saved=frozenset(saved_names), domains=frozenset(domains), paths=frozenset(paths))


CURRENT_SAVED = f"virtmount-appliance-saved-{'1' * 16}"
OTHER_SETTINGS = f"virtmount-appliance-saved-{'2' * 16}-3"
OLD_BUILD_SAVED = f"virtmount-appliance-saved-{'3' * 16}"


def test_older_builds_and_their_saved_appliances_go_this_clients_stay() -> None:
    volumes = (build(CURRENT) + build(OLD) + saved(CURRENT_SAVED, CURRENT) + saved(OTHER_SETTINGS, CURRENT)
               + saved(OLD_BUILD_SAVED, OLD))
    deleted = collectable(volumes, in_use(saved_names=(CURRENT_SAVED,)))
    assert names(deleted) == names(build(OLD) + saved(OTHER_SETTINGS, CURRENT) + saved(OLD_BUILD_SAVED, OLD))
    # saved appliances go before the builds they back onto
    positions = {v.name: i for i, v in enumerate(deleted)}
    assert positions[f"{OLD_BUILD_SAVED}-root.qcow2"] < positions[f"virtmount-appliance-{OLD}-root.qcow2"]


def test_a_saved_appliance_whose_domain_exists_stays_with_its_build() -> None:
    volumes = build(CURRENT) + build(OLD) + saved(OLD_BUILD_SAVED, OLD)
    assert collectable(volumes, in_use(domains=(OLD_BUILD_SAVED,))) == []


def test_a_build_a_running_domain_uses_stays() -> None:
    volumes = build(CURRENT) + build(OLD) + build(OLDER)
    kernel = f"{POOL}/virtmount-appliance-{OLD}-kernel"
    assert names(collectable(volumes, in_use(paths=(kernel,)))) == names(build(OLDER))


def test_uploads_and_saves_under_way_stay_until_stale() -> None:
    young = build(OLD, age=5.0, complete=False) + saved(OTHER_SETTINGS, OLD, state=False, age=5.0)
    assert collectable(build(CURRENT) + young, in_use()) == []
    stale = build(OLD, complete=False) + saved(OTHER_SETTINGS, OLD, state=False)
    assert names(collectable(build(CURRENT) + stale, in_use())) == names(stale)
    finished_young = build(OLD, age=5.0) + saved(OTHER_SETTINGS, OLD, age=5.0)
    assert names(collectable(build(CURRENT) + finished_young, in_use())) == names(finished_young)


def test_overlays_go_only_when_their_appliance_is_gone_and_never_anyone_elses() -> None:
    gone = volume("guest.qcow2.TRANSIENT-virtmount-appliance-web-4711", directory="/srv/images")
    running = volume("guest.qcow2.TRANSIENT-virtmount-appliance-db-4712", directory="/srv/images")
    not_ours = volume("guest.qcow2.TRANSIENT-web", directory="/srv/images")
    assert collectable([gone, running, not_ours], in_use(domains=("virtmount-appliance-db-4712",))) == [gone]


def test_names_virtmount_does_not_make_are_never_touched() -> None:
    volumes = [volume("keep-me.qcow2"), volume("virtmount-appliance-notes.txt"),
               volume(f"virtmount-appliance-{OLD}-kernel.bak"), volume(f"virtmount-appliance-saved-{OLD}.state.old"),
               volume("virtmount-scratch-host.1-uuid-vda.qcow2")]
    assert collectable(volumes, InUse(build="", saved=frozenset(), domains=frozenset(), paths=frozenset())) == []
