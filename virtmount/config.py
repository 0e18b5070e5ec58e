"""`-o opt,opt=value` mount options -> a frozen configuration; anything unknown is a usage error.

Two kinds of options: virtmount's own (``_OPTIONS``), and the standard ones that mount(8),
mount.fuse3, fstab and systemd pass to every filesystem (``_standard_option``), which are accepted
and either handed to the kernel through FUSE or dropped, since libfuse refuses what it does not know.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from .accelerator import ACCELERATORS
from .appliance import ApplianceSettings
from .virt.backup import SCRATCH_RESERVE_BYTES
from .errors import UsageError
from .fs.guestview import DEFAULT_CACHED_ENTRIES
from .inspection_cache import default_directory


@dataclass(frozen=True)
class Config:
    """Everything a virtmount run was asked to do, after parsing."""

    appliance: ApplianceSettings = field(default_factory=ApplianceSettings)
    idle_seconds: float = 60.0
    cached_entries: int = DEFAULT_CACHED_ENTRIES
    inspection_cache: Path | None = field(default_factory=default_directory)  # None: always inspect
    allow_other: bool = False
    debug: bool = False
    kernel_flags: tuple[str, ...] = ()  # standard mount options handed to the kernel (ro, noexec, …)
    given: tuple[str, ...] = field(default=(), compare=False)  # every option as given, for `virtmount status`


def _positive_number(name: str, text: str, *, integer: bool = False) -> float:
    try:
        value = int(text) if integer else float(text)
    except ValueError:
        raise UsageError(f"option {name} needs a {'whole ' if integer else ''}number, not {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise UsageError(f"option {name} must be greater than 0")
    return value


def _pool_name(text: str, option: str = "pool") -> str:
    if not text:
        raise UsageError(f"option {option} needs a storage pool name")
    return text


def _accelerator(text: str) -> str:
    if text not in ACCELERATORS:
        raise UsageError(f"option accel must be one of {', '.join(ACCELERATORS)}, not {text!r}")
    return text


def _emulator(text: str) -> str:
    if not text.startswith("/"):
        raise UsageError(f"option emulator needs an absolute path on the libvirt host, not {text!r}")
    return text


def _inspection_cache(text: str) -> Path | None:
    if not text:
        raise UsageError("option inspection_cache needs a directory or off")
    return None if text == "off" else Path(os.path.abspath(text))


def _on_off(name: str, text: str) -> bool:
    if text not in ("on", "off"):
        raise UsageError(f"option {name} must be on or off, not {text!r}")
    return text == "on"


def _with_appliance(config: Config, **changes: object) -> Config:
    return replace(config, appliance=replace(config.appliance, **changes))  # type: ignore[arg-type]


# name -> (takes a value, apply(config, value) -> config, help text)
_OPTIONS: dict[str, tuple[bool, Callable[[Config, str], Config], str]] = {
    "accel": (True, lambda c, v: _with_appliance(c, accelerator=_accelerator(v)),
              "appliance accelerator: auto (default: KVM where it boots appliances, else TCG; the verdict is "
              "remembered per host), kvm or tcg"),
    "memory": (True, lambda c, v: _with_appliance(c, memory_mib=int(_positive_number("memory", v, integer=True))),
               "appliance memory in MiB (default 1024)"),
    "cpus": (True, lambda c, v: _with_appliance(c, vcpus=int(_positive_number("cpus", v, integer=True))),
             "appliance virtual CPUs (default 1)"),
    "boot_timeout": (True, lambda c, v: _with_appliance(c, boot_timeout=_positive_number("boot_timeout", v)),
                     "seconds to wait for an appliance to boot (default 300)"),
    "call_timeout": (True, lambda c, v: _with_appliance(c, call_timeout=_positive_number("call_timeout", v)),
                     "seconds one daemon call may take before the appliance is given up (default 120)"),
    "pool": (True, lambda c, v: _with_appliance(c, pool=_pool_name(v)),
             "storage pool on the host for the appliance files (default virtmount)"),
    "scratch_pool": (True, lambda c, v: _with_appliance(c, scratch_pool=_pool_name(v, "scratch_pool")),
                     "storage pool on the host for the scratch volumes of running domains' "
                     "point-in-time views (default: the pool option's); it needs at least "
                     f"{SCRATCH_RESERVE_BYTES >> 20} MiB free, and views end when it has less"),
    "emulator": (True, lambda c, v: _with_appliance(c, emulator=_emulator(v)),
                 "QEMU binary on the libvirt host to run appliances with (default: libvirt's choice)"),
    "kernel_args": (True, lambda c, v: _with_appliance(c, extra_kernel_args=v),
                    "extra appliance kernel arguments, space-separated"),
    "fast_start": (True, lambda c, v: _with_appliance(c, fast_start=_on_off("fast_start", v)),
                   "on (default): restore a saved, booted appliance (made once per host and settings) and "
                   "plug the guest's disks in; off: boot every appliance cold"),
    "idle": (True, lambda c, v: replace(c, idle_seconds=_positive_number("idle", v)),
             "seconds without access before an appliance is shut down (default 60)"),
    "cache_entries": (True, lambda c, v: replace(
                          c, cached_entries=int(_positive_number("cache_entries", v, integer=True))),
                      f"directory entries kept in memory, about 800 bytes each (default {DEFAULT_CACHED_ENTRIES})"),
    "inspection_cache": (True, lambda c, v: replace(c, inspection_cache=_inspection_cache(v)),
                         "directory where guest layouts are remembered between boots, or off "
                         f"(default {default_directory()})"),
    "allow_other": (False, lambda c, _v: replace(c, allow_other=True), "let other users see the mount"),
    "debug": (False, lambda c, _v: replace(c, debug=True, appliance=replace(c.appliance, verbose=True)),
              "log every step, including the appliance's console"),
}


# Standard mount options that virtmount gives the kernel (libfuse knows these as mount flags).
_KERNEL_FLAGS = ("ro", "exec", "noexec", "sync", "async", "dirsync", "atime", "noatime")
_OPPOSITE_FLAGS = {"exec": "noexec", "noexec": "exec", "sync": "async", "async": "sync",
                   "atime": "noatime", "noatime": "atime"}
# Standard mount options accepted and not passed on.
_DROPPED = frozenset({
    # for mount(8) and systemd (_netdev: needs the network; auto/noauto: for mount -a)
    "defaults", "_netdev", "nofail", "auto", "noauto", "user", "users", "nouser", "owner", "group",
    # appliances never write access times, so the atime policies have nothing to act on
    "relatime", "norelatime", "strictatime", "nostrictatime", "lazytime", "nolazytime", "diratime", "nodiratime",
    # guest disks are not trusted: their device nodes and set-user-ID files never act on this host,
    # so the mount is always nodev,nosuid (mount.fuse3 adds dev,suid unless told otherwise)
    "dev", "nodev", "suid", "nosuid",
})
_DROPPED_PREFIXES = ("x-", "comment=")


def _standard_option(config: Config, item: str) -> Config | None:
    """``config`` with the standard mount option ``item`` applied, or None if it is not one."""
    if item in ("rw", "ro"):
        # the last of the two wins, as with mount(8); rw writes to shut-off domains and volumes only
        others = tuple(flag for flag in config.kernel_flags if flag != "ro")
        return replace(config, kernel_flags=others + (("ro",) if item == "ro" else ()),
                       appliance=replace(config.appliance, writable=item == "rw"))
    if item in _KERNEL_FLAGS:
        # the last of two opposites wins, as with mount(8)
        kept = (flag for flag in config.kernel_flags if flag not in (item, _OPPOSITE_FLAGS.get(item)))
        return replace(config, kernel_flags=(*kept, item))
    if item in _DROPPED or item.startswith(_DROPPED_PREFIXES):
        return config
    return None


def option_names() -> list[str]:
    """virtmount's own ``-o`` options (the man page describes each)."""
    return list(_OPTIONS)


def options_help() -> str:
    own = [f"  {name}{'=VALUE' if takes_value else ''}: {text}" for name, (takes_value, _, text) in _OPTIONS.items()]
    standard = ("  standard mount options: ro, noexec, sync, dirsync and noatime go to the kernel; "
                "defaults, _netdev, nofail, auto, noauto, user, users, the atime policies, dev, suid, nodev, "
                "nosuid, x-* and comment= are accepted (the mount is always nodev,nosuid); "
                "rw writes to shut-off domains and volumes (running domains stay read-only)")
    return "\n".join([*own, standard])


def parse_options(option_strings: list[str], config: Config | None = None) -> Config:
    """Apply every ``-o`` argument (each a comma-separated list) in order."""
    config = config or Config()
    for option_string in option_strings:
        for item in option_string.split(","):
            if not item:
                continue
            config = replace(config, given=(*config.given, item))
            if (standard := _standard_option(config, item)) is not None:
                config = standard
                continue
            name, has_value, value = item.partition("=")
            if name not in _OPTIONS:
                raise UsageError(f"unknown option {name!r} (see virtmount --help)")
            takes_value, apply, _ = _OPTIONS[name]
            if takes_value != bool(has_value):
                raise UsageError(f"option {name} {'needs a value' if takes_value else 'takes no value'}")
            config = apply(config, value)
    return config
