"""`-o` mount options -> Config (virtmount.config)."""

from __future__ import annotations

from pathlib import Path

import pytest

from virtmount.appliance import ApplianceSettings
from virtmount.config import Config, options_help, parse_options
from virtmount.errors import UsageError

ALL_OPTIONS = ("accel", "memory", "cpus", "boot_timeout", "call_timeout", "pool", "scratch_pool", "emulator",
               "kernel_args", "fast_start", "idle", "cache_entries", "inspection_cache", "allow_other", "debug")


def usage_error(*option_strings: str) -> str:
    with pytest.raises(UsageError) as info:
        parse_options(list(option_strings))
    assert info.value.exit_code == 2
    message = str(info.value)
    assert "\n" not in message
    return message


def test_defaults() -> None:
    config = parse_options([])
    assert config == Config()
    assert config.idle_seconds == 60.0
    assert config.allow_other is False
    assert config.debug is False
    settings = config.appliance
    assert settings == ApplianceSettings()
    assert (settings.accelerator, settings.memory_mib, settings.vcpus) == ("auto", 1024, 1)
    assert (settings.boot_timeout, settings.call_timeout) == (300.0, 120.0)
    assert (settings.pool, settings.extra_kernel_args) == ("virtmount", "")
    assert (settings.writable, settings.verbose) == (False, False)


def test_every_option_in_one_group() -> None:
    config = parse_options([
        "accel=tcg,memory=2048,cpus=4,boot_timeout=90.5,call_timeout=30,pool=vmpool,"
        "kernel_args=edd=on loglevel=7,idle=12.5,allow_other,debug"
    ])
    settings = config.appliance
    assert settings.accelerator == "tcg"
    assert settings.memory_mib == 2048 and type(settings.memory_mib) is int
    assert settings.vcpus == 4 and type(settings.vcpus) is int
    assert settings.boot_timeout == 90.5 and type(settings.boot_timeout) is float
    assert settings.call_timeout == 30.0 and type(settings.call_timeout) is float
    assert settings.pool == "vmpool"
    assert settings.extra_kernel_args == "edd=on loglevel=7"
    assert config.idle_seconds == 12.5 and type(config.idle_seconds) is float
    assert config.allow_other is True
    assert config.debug is True
    assert settings.verbose is True  # debug shows the appliance console too
    assert settings.writable is False


@pytest.mark.parametrize("accel", ["auto", "kvm", "tcg"])
def test_accel_values(accel: str) -> None:
    assert parse_options([f"accel={accel}"]).appliance.accelerator == accel


@pytest.mark.parametrize("value", ["hvf", "KVM", "", "kvm tcg"])
def test_accel_rejects_other_values(value: str) -> None:
    assert usage_error(f"accel={value}") == f"option accel must be one of auto, kvm, tcg, not {value!r}"


def test_comma_separates_options_even_after_a_value() -> None:
    assert usage_error("accel=kvm,tcg") == "unknown option 'tcg' (see virtmount --help)"


def test_one_option_changes_only_its_setting() -> None:
    assert parse_options(["memory=512"]) == Config(appliance=ApplianceSettings(memory_mib=512))
    assert parse_options(["idle=5"]) == Config(idle_seconds=5.0)
    assert parse_options(["cache_entries=5000"]) == Config(cached_entries=5000)


def test_fast_start_is_on_or_off() -> None:
    assert Config().appliance.fast_start
    assert not parse_options(["fast_start=off"]).appliance.fast_start
    assert parse_options(["fast_start=off,fast_start=on"]).appliance.fast_start
    assert usage_error("fast_start=yes") == "option fast_start must be on or off, not 'yes'"


def test_inspection_cache_is_a_directory_made_absolute_or_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    default = Config().inspection_cache
    assert default is not None and default.is_absolute()
    monkeypatch.chdir(tmp_path)
    assert parse_options(["inspection_cache=layouts"]).inspection_cache == tmp_path / "layouts"
    assert parse_options(["inspection_cache=off"]).inspection_cache is None
    usage_error("inspection_cache=")
    assert parse_options(["allow_other"]) == Config(allow_other=True)
    assert parse_options(["debug"]) == Config(debug=True, appliance=ApplianceSettings(verbose=True))
    assert parse_options(["kernel_args=a b=c"]) == Config(appliance=ApplianceSettings(extra_kernel_args="a b=c"))


def test_later_options_override_earlier_ones() -> None:
    config = parse_options(["memory=512,cpus=2,memory=2048,accel=kvm,accel=tcg"])
    assert config.appliance.memory_mib == 2048
    assert config.appliance.accelerator == "tcg"
    assert config.appliance.vcpus == 2


def test_several_groups_apply_in_order() -> None:
    config = parse_options(["memory=512,pool=first", "cpus=3", "pool=second,allow_other"])
    assert config.appliance.memory_mib == 512
    assert config.appliance.vcpus == 3
    assert config.appliance.pool == "second"
    assert config.allow_other is True


def test_empty_items_are_ignored() -> None:
    assert parse_options(["", ",", "cpus=2,,", ",idle=3"]) == Config(
        appliance=ApplianceSettings(vcpus=2), idle_seconds=3.0)


def test_starts_from_a_given_config() -> None:
    base = Config(idle_seconds=7.0, appliance=ApplianceSettings(pool="base"))
    config = parse_options(["cpus=2"], base)
    assert (config.idle_seconds, config.appliance.pool, config.appliance.vcpus) == (7.0, "base", 2)
    assert base.appliance.vcpus == 1  # frozen: the given config is not changed


@pytest.mark.parametrize("item", ["bogus", "bogus=1", "Memory=512", "memory_mib=512", "writable", "RO"])
def test_unknown_option(item: str) -> None:
    name = item.partition("=")[0]
    message = usage_error(f"cpus=1,{item}")
    assert message == f"unknown option {name!r} (see virtmount --help)"


@pytest.mark.parametrize("name", ["accel", "memory", "cpus", "boot_timeout", "call_timeout", "pool",
                                  "kernel_args", "idle"])
def test_value_missing(name: str) -> None:
    assert usage_error(name) == f"option {name} needs a value"


@pytest.mark.parametrize("item", ["allow_other=1", "debug=yes", "debug="])
def test_value_given_to_a_flag(item: str) -> None:
    name = item.partition("=")[0]
    assert usage_error(item) == f"option {name} takes no value"


@pytest.mark.parametrize(("item", "fragment"), [
    ("memory=lots", "option memory needs a whole number, not 'lots'"),
    ("memory=1.5", "option memory needs a whole number, not '1.5'"),
    ("memory=", "option memory needs a whole number, not ''"),
    ("cpus=two", "option cpus needs a whole number, not 'two'"),
    ("boot_timeout=soon", "option boot_timeout needs a number, not 'soon'"),
    ("call_timeout=1s", "option call_timeout needs a number, not '1s'"),
    ("idle=", "option idle needs a number, not ''"),
])
def test_non_numeric_values(item: str, fragment: str) -> None:
    assert usage_error(item) == fragment


@pytest.mark.parametrize("item", ["memory=0", "memory=-512", "cpus=0", "cpus=-1", "boot_timeout=0",
                                  "call_timeout=-0.5", "idle=0", "idle=-60", "cache_entries=0"])
def test_non_positive_values(item: str) -> None:
    name = item.partition("=")[0]
    assert usage_error(item) == f"option {name} must be greater than 0"


@pytest.mark.parametrize("item", ["boot_timeout=nan", "call_timeout=nan", "idle=nan"])
def test_nan_is_rejected(item: str) -> None:
    usage_error(item)


def test_empty_pool_is_rejected() -> None:
    usage_error("pool=")


def test_emulator_is_an_absolute_path_on_the_host() -> None:
    assert parse_options(["emulator=/usr/local/bin/qemu-system-x86_64"]).appliance.emulator == \
        "/usr/local/bin/qemu-system-x86_64"
    assert parse_options([]).appliance.emulator == ""
    assert usage_error("emulator=qemu-kvm") == \
        "option emulator needs an absolute path on the libvirt host, not 'qemu-kvm'"


def test_error_stops_at_the_first_bad_option() -> None:
    assert usage_error("memory=512", "bogus,cpus=0") == "unknown option 'bogus' (see virtmount --help)"


def test_options_help_lists_every_option() -> None:
    *lines, standard = options_help().splitlines()
    assert standard.strip().startswith("standard mount options:")
    names = [line.strip().split(":")[0] for line in lines]
    assert names == [
        "accel=VALUE", "memory=VALUE", "cpus=VALUE", "boot_timeout=VALUE", "call_timeout=VALUE",
        "pool=VALUE", "scratch_pool=VALUE", "emulator=VALUE", "kernel_args=VALUE", "fast_start=VALUE", "idle=VALUE",
        "cache_entries=VALUE", "inspection_cache=VALUE",
        "allow_other", "debug",
    ]
    assert [name.partition("=")[0] for name in names] == list(ALL_OPTIONS)


# --- standard mount options (mount(8), mount.fuse3, fstab, systemd) ------------------------------

def test_rw_writes_and_the_last_of_ro_and_rw_wins() -> None:
    assert not parse_options([]).appliance.writable  # read-only is the default
    config = parse_options(["rw,dev,suid"])
    assert config.appliance.writable and "ro" not in config.kernel_flags
    config = parse_options(["rw", "ro"])
    assert not config.appliance.writable and config.kernel_flags == ("ro",)
    config = parse_options(["ro,noatime,rw"])
    assert config.appliance.writable and config.kernel_flags == ("noatime",)


def test_an_fstab_line_s_options_are_accepted() -> None:
    config = parse_options(["ro,noatime,_netdev,nofail,x-systemd.automount,x-gvfs-hide,comment=backup,defaults,"
                            "user,users,nouser,auto,noauto,relatime,strictatime,lazytime,dev,suid,nodev,nosuid,"
                            "idle=30"])
    assert config.kernel_flags == ("ro", "noatime")
    assert config.idle_seconds == 30


def test_kernel_flags_keep_the_last_of_two_opposites() -> None:
    config = parse_options(["ro,noexec,sync,noatime", "exec,atime,async,noexec,dirsync,ro"])
    assert config.kernel_flags == ("atime", "async", "noexec", "dirsync", "ro")


@pytest.mark.parametrize("item", ["rw=1", "ro=yes", "comment", "noatim", "X-systemd.automount"])
def test_near_misses_of_standard_options_are_unknown(item: str) -> None:
    name = item.partition("=")[0]
    assert usage_error(item) == f"unknown option {name!r} (see virtmount --help)"
