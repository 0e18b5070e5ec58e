"""The accelerator plan and the remembered verdicts (virtmount.accelerator), without libvirt."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest

from virtmount.accelerator import (
    KVM,
    KVM_FIRST_OUTPUT_WINDOW_S,
    TCG,
    AcceleratorPlan,
    HostIdentity,
    Verdict,
    VerdictStore,
    is_local_uri,
)

HOST = HostIdentity(uri="qemu:///system", hostname="vm", libvirt_version=9_000_000, qemu_version=7_002_000,
                    cpu="AMD EPYC 25/1/1 123", kernel="6.1.0-57-amd64", emulator="")


@pytest.fixture
def store(tmp_path: Path) -> VerdictStore:
    return VerdictStore(tmp_path / "accelerators")


def test_auto_tries_kvm_first_with_a_short_window_for_it_only(store: VerdictStore) -> None:
    plan = AcceleratorPlan(HOST, "auto", True, store)
    assert plan.domain_types == [KVM, TCG]
    assert plan.first_output_window(KVM) == KVM_FIRST_OUTPUT_WINDOW_S
    assert plan.first_output_window(TCG) is None


def test_a_host_without_kvm_gets_tcg_only(store: VerdictStore) -> None:
    assert AcceleratorPlan(HOST, "auto", False, store).domain_types == [TCG]


def test_kvm_failing_and_tcg_working_is_remembered_and_logged_once(
    store: VerdictStore, caplog: pytest.LogCaptureFixture
) -> None:
    first = AcceleratorPlan(HOST, "auto", True, store)
    with caplog.at_level(logging.INFO, logger="virtmount.accelerator"):
        first.failed(KVM, "no console output in 10 s")
        first.worked(TCG)
        first.worked(TCG)  # e.g. the saved appliance made, then restored
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["KVM does not start appliances on vm (no console output in 10 s); using TCG"]
    later = AcceleratorPlan(HOST, "auto", True, store)
    assert later.domain_types == [TCG]
    assert later.remembered is not None and later.remembered.kvm_failure == "no console output in 10 s"


def test_kvm_working_is_remembered_and_keeps_tcg_as_the_fallback(store: VerdictStore) -> None:
    plan = AcceleratorPlan(HOST, "auto", True, store)
    plan.worked(KVM)
    assert store.load(HOST) is not None and store.load(HOST).domain_type == KVM  # type: ignore[union-attr]
    assert AcceleratorPlan(HOST, "auto", True, store).domain_types == [KVM, TCG]


def test_a_failure_that_tcg_shares_teaches_nothing(store: VerdictStore) -> None:
    plan = AcceleratorPlan(HOST, "auto", True, store)
    plan.failed(KVM, "cannot access storage file")
    plan.failed(TCG, "cannot access storage file")
    assert store.load(HOST) is None


@pytest.mark.parametrize("change", [
    {"qemu_version": 8_000_000}, {"libvirt_version": 10_000_000}, {"kernel": "6.12.0"},
    {"cpu": "AMD EPYC 25/1/1 124"}, {"hostname": "other"}, {"uri": "qemu+ssh://other/system"},
    {"emulator": "/opt/qemu/bin/qemu-system-x86_64"},
])
def test_any_change_of_the_host_identity_tests_kvm_again(store: VerdictStore, change: dict[str, object]) -> None:
    store.store(HOST, Verdict(TCG, "no console output in 10 s"))
    changed = dataclasses.replace(HOST, **change)  # type: ignore[arg-type]
    assert store.load(changed) is None
    assert AcceleratorPlan(changed, "auto", True, store).domain_types == [KVM, TCG]


@pytest.mark.parametrize("accelerator, expected", [("kvm", [KVM]), ("tcg", [TCG])])
def test_explicit_accelerators_ignore_and_keep_no_verdict(
    store: VerdictStore, accelerator: str, expected: list[str]
) -> None:
    store.store(HOST, Verdict(TCG, "no console output in 10 s"))
    plan = AcceleratorPlan(HOST, accelerator, True, store)  # type: ignore[arg-type]
    assert plan.domain_types == expected
    plan.failed(KVM, "no console output in 10 s")
    plan.worked(TCG)
    plan.worked(KVM)
    loaded = store.load(HOST)
    assert loaded is not None and loaded.domain_type == TCG


@pytest.mark.parametrize("content", ["", "{", "[]", '{"domain_type": "hvf", "kvm_failure": "", "decided_at": 1}',
                                     '{"domain_type": "qemu"}'])
def test_a_damaged_verdict_counts_as_none(store: VerdictStore, content: str) -> None:
    store.store(HOST, Verdict(TCG))
    [path] = store.directory.iterdir()
    path.write_text(content)
    assert store.load(HOST) is None


def test_an_unwritable_store_costs_a_warning_only(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    store = VerdictStore(blocker / "accelerators")
    store.store(HOST, Verdict(TCG))
    assert store.load(HOST) is None
    assert "cannot remember the accelerator verdict" in caplog.text


@pytest.mark.parametrize("uri, local", [
    ("qemu:///system", True), ("qemu+tcp://127.0.0.1/system", True), ("qemu+ssh://localhost/system", True),
    ("qemu+ssh://root@host.example/system", False), ("qemu+tls://[2001:db8::1]/system", False),
])
def test_local_uris(uri: str, local: bool) -> None:
    assert is_local_uri(uri) is local


def test_qemu_s_own_error_names_why_kvm_failed(store: VerdictStore, caplog: pytest.LogCaptureFixture) -> None:
    plan = AcceleratorPlan(HOST, "auto", True, store)
    plan.failed(KVM, "internal error: qemu unexpectedly closed the monitor: 2026-12-02T04:19:47.967729Z "
                     "qemu-system-x86_64: error: failed to set MSR 0x10a to 0x69 qemu-system-x86_64: "
                     "../../target/i386/kvm/kvm.c:3183: kvm_buf_set_msrs: Assertion `ret == n' failed.")
    plan.worked(TCG)
    assert "KVM does not start appliances on vm (QEMU: failed to set MSR 0x10a to 0x69); using TCG" in caplog.text


def test_a_failed_kvm_is_not_tried_again_by_the_same_boot(store: VerdictStore) -> None:
    """After the fast path's KVM attempt failed, the cold boot goes straight to TCG."""
    plan = AcceleratorPlan(HOST, "auto", True, store)
    plan.failed(KVM, "cannot access storage file")
    assert plan.domain_types == [TCG]
    assert store.load(HOST) is None  # a failure TCG may share: nothing learnt yet


def test_a_silent_kvm_is_remembered_at_once(store: VerdictStore, caplog: pytest.LogCaptureFixture) -> None:
    """No console output is KVM's own failure: TCG is remembered even if TCG then fails too."""
    plan = AcceleratorPlan(HOST, "auto", True, store)
    plan.failed(KVM, "no console output in 10 s", silent=True)
    loaded = store.load(HOST)
    assert loaded is not None and loaded.domain_type == TCG
    plan.failed(TCG, "cannot access storage file")
    plan.worked(TCG)
    assert caplog.text.count("KVM does not start appliances") == 1


def test_accel_kvm_keeps_kvm_after_a_failure(store: VerdictStore) -> None:
    plan = AcceleratorPlan(HOST, "kvm", True, store)
    plan.failed(KVM, "no console output in 10 s", silent=True)
    assert plan.domain_types == [KVM] and store.load(HOST) is None
