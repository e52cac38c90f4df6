"""MachineConfig: everything a run needs, validated up front with one-line errors."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mshvstack.errors import MshvError

if TYPE_CHECKING:
    from mshvstack.vmm.netconfig import NetSpec

MAX_VCPUS = 256
MIN_MEMORY = 2 << 20
MAX_MEMORY = 3 << 30  # one region below the 32-bit MMIO hole
_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
DEMO_GUESTS = ("hello", "iotest", "pioloop")
LINUX_DEMO = "linux"   # not built in: Debian's kernel, fetched and cached (vmm.linuxdemo)


class ConfigError(MshvError):
    """Bad user input for a machine."""


@dataclass(frozen=True)
class DiskSpec:
    path: Path
    read_only: bool = False

    @classmethod
    def parse(cls, text: str) -> DiskSpec:
        """'IMG' or 'IMG,ro' (as given to --disk)."""
        path, _, options = text.partition(",")
        if options not in ("", "ro", "rw"):
            raise ConfigError(f"--disk {text!r}: options are ro or rw (e.g. --disk disk.img,ro)")
        return cls(Path(path), options == "ro")


def parse_size(text: str) -> int:
    """'256M' -> bytes.  Binary units K, M, G, T; a bare number is bytes."""
    match = _SIZE.match(text)
    if not match:
        raise ConfigError(f"bad size {text!r}: use a number with an optional K, M, G or T suffix (e.g. 256M)")
    return int(match.group(1)) * _UNITS[match.group(2).upper()]


@dataclass(frozen=True)
class MachineConfig:
    kernel: Path | None = None
    demo: str | None = None
    memory: int = 256 << 20
    vcpus: int = 1
    cmdline: str = "console=ttyS0"
    initrd: Path | None = None
    backend: str = "auto"
    profile: str = "newest"
    test_devices: bool = False
    extract_vmlinux: bool = False   # boot a bzImage's vmlinux through its PVH entry
    vmbus: bool = True              # offer VMBus devices (heartbeat, shutdown, time sync, KVP, disks)
    disks: tuple[DiskSpec, ...] = ()
    nets: tuple[NetSpec, ...] = ()  # one synthetic NIC each (vmm/netconfig.py)
    shutdown_timeout: float = 30.0  # graceful shutdown falls back to power-off after this

    def validate(self, boot_files: bool = True) -> MachineConfig:
        """Check everything; ``boot_files=False`` for a machine restored from a snapshot
        (its memory already holds what the kernel and initrd loaded)."""
        if (self.kernel is None) == (self.demo is None):
            raise ConfigError("give exactly one of a KERNEL file or --demo")
        if self.demo is not None and self.demo not in DEMO_GUESTS:
            raise ConfigError(f"unknown demo {self.demo!r}: choose one of {', '.join(DEMO_GUESTS)}")
        if not 1 <= self.vcpus <= MAX_VCPUS:
            raise ConfigError(f"--vcpus must be between 1 and {MAX_VCPUS}, not {self.vcpus}")
        if not MIN_MEMORY <= self.memory <= MAX_MEMORY:
            raise ConfigError(f"--memory must be between {MIN_MEMORY >> 20}M and {MAX_MEMORY >> 20}M, not {self.memory >> 20}M")
        if self.memory % (2 << 20):
            raise ConfigError("--memory must be a multiple of 2M")
        for label, path in (("kernel", self.kernel), ("initrd", self.initrd)) if boot_files else ():
            if path is not None and not path.is_file():
                raise ConfigError(f"{label} {str(path)!r}: no such file")
            if path is not None and path.stat().st_size > self.memory:
                raise ConfigError(f"{label} {str(path)!r} ({path.stat().st_size >> 20} MiB) is larger than --memory")
        for disk in self.disks:
            if not disk.path.is_file():
                raise ConfigError(f"--disk {str(disk.path)!r}: no such file")
            if disk.path.stat().st_size < 512:
                raise ConfigError(f"--disk {str(disk.path)!r}: smaller than one 512-byte block")
        if self.disks and not self.vmbus:
            raise ConfigError("--disk needs VMBus (drop --no-vmbus)")
        if self.nets and not self.vmbus:
            raise ConfigError("--net needs VMBus (drop --no-vmbus)")
        ids = [n.id for n in self.nets if n.id is not None]
        if len(ids) != len(set(ids)):
            raise ConfigError("--net: two NICs with the same id")
        if self.backend not in ("auto", "host", "sim"):
            raise ConfigError(f"--backend must be auto, host or sim, not {self.backend!r}")
        return self
