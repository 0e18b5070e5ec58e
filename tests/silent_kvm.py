"""A QEMU that behaves as hosts where KVM hangs do, for tests of ``accel=auto`` (``-o emulator=``).

On such hosts an appliance started under KVM never prints a console line and spins at 100% CPU.
``install()`` writes a wrapper of the real QEMU that, for a guest started with ``-accel kvm`` and a
``-kernel``, runs instead a kernel that is one endless jump (a multiboot image: ``jmp $``), under
TCG so that it behaves the same on hosts whose KVM aborts at once. Everything else (TCG guests,
libvirt's capability probes) runs the real QEMU untouched. Each such KVM start is logged, one
line with the guest's name, to ``SilentKvm.boots_log``. ``install(..., spin_under=("kvm", "tcg"))``
makes TCG guests spin too: an appliance whose boot never ends.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

REAL_QEMU = "/usr/bin/qemu-system-x86_64"

_MULTIBOOT_MAGIC = 0x1BADB002
_MULTIBOOT_ADDRESS_FIELDS = 0x00010000
_LOAD_ADDRESS = 0x100000
_HEADER_SIZE = 32


def spinning_kernel() -> bytes:
    """A multiboot kernel (address fields given, no ELF) whose entry point jumps to itself."""
    checksum = -(_MULTIBOOT_MAGIC + _MULTIBOOT_ADDRESS_FIELDS) & 0xFFFFFFFF
    header = struct.pack(
        "<8I", _MULTIBOOT_MAGIC, _MULTIBOOT_ADDRESS_FIELDS, checksum,
        _LOAD_ADDRESS,  # header_addr: the header is the first thing loaded
        _LOAD_ADDRESS,  # load_addr
        0,  # load_end_addr: the whole file
        0,  # bss_end_addr: no bss
        _LOAD_ADDRESS + _HEADER_SIZE,  # entry_addr: the code after the header
    )
    return header + b"\xeb\xfe"  # jmp $


_WRAPPER = """#!/bin/bash
# Written by tests/silent_kvm.py: QEMU, except that a guest started under KVM spins silently.
args=("$@")
spin=no
for ((i = 0; i + 1 < ${{#args[@]}}; i++)); do
    [[ ${{args[i]}} == -accel && " {spin_under} " == *" ${{args[i+1]}} "* ]] && spin=yes
    [[ ${{args[i]}} == -name ]] && name=${{args[i+1]}}
done
if [[ $spin == yes && " ${{args[*]}} " == *" -kernel "* ]]; then
    echo "$name" >> {boots_log}
    echo "silent-kvm: spinning instead of booting" >&2
    for ((i = 0; i + 1 < ${{#args[@]}}; i++)); do
        case ${{args[i]}} in
            -accel) args[i+1]=tcg ;;
            -cpu) args[i+1]=max ;;
            -kernel) args[i+1]={kernel} ;;
        esac
    done
fi
exec {real} "${{args[@]}}"
"""


@dataclass(frozen=True)
class SilentKvm:
    emulator: Path  # pass as -o emulator=
    boots_log: Path

    def kvm_boots(self) -> list[str]:
        """The guests made to spin so far (QEMU's ``-name`` argument, e.g. ``guest=NAME,...``)."""
        return self.boots_log.read_text().splitlines()


def install(directory: Path, spin_under: tuple[str, ...] = ("kvm",)) -> SilentKvm:
    """Write the wrapper, its kernel and an empty boots log into ``directory``, which QEMU's user
    (libvirt-qemu) must be able to reach; guests started with an accelerator in ``spin_under`` spin."""
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o755)
    kernel = directory / "spinning-kernel"
    kernel.write_bytes(spinning_kernel())
    boots_log = directory / "kvm-boots.log"
    boots_log.write_text("")
    os.chmod(boots_log, 0o666)  # QEMU runs as libvirt-qemu
    emulator = directory / "qemu-with-silent-kvm"
    emulator.write_text(_WRAPPER.format(boots_log=boots_log, kernel=kernel, real=REAL_QEMU,
                                        spin_under=" ".join(spin_under)))
    os.chmod(emulator, 0o755)
    os.chmod(kernel, 0o644)
    return SilentKvm(emulator=emulator, boots_log=boots_log)
