"""Debian's kernel to `Run /init` and to power-off: the simulator against QEMU TCG.

Both boot the same kernel and initramfs (busybox, an /init that powers off
at once).  The simulator's column is the documented CLI; QEMU's is
`qemu-system-x86_64 -machine q35,accel=tcg` from the bzImage, skipped with a
reason when QEMU is not installed.  The simulator's own exit and delivery
counts say where its time goes.

    python benchmarks/linux_boot.py [VCPUS]
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mshvstack.vmm.linuxguest import GuestUnavailable, LinuxGuest, busybox_initramfs, debian_guest

INIT = "#!/bin/sh\n/bin/busybox mount -t devtmpfs devtmpfs /dev\necho BOOTED > /dev/kmsg\n/bin/busybox poweroff -f\n"
MILESTONES = ("Run /init as init process", "BOOTED", "reboot: Power down")


def _timed(command: list[str], timeout: float) -> dict[str, float]:
    """Wall time at which each milestone first appears in the output."""
    seen: dict[str, float] = {}
    start = time.monotonic()
    environment = dict(os.environ, PYTHONUNBUFFERED="1")   # milestones are timed as they are printed
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace", env=environment,
                               cwd=tempfile.gettempdir())   # the installed package, not a source tree without its extensions
    assert process.stdout is not None
    lines: list[str] = []
    for line in process.stdout:
        lines.append(line)
        for milestone in MILESTONES:
            if milestone in line and milestone not in seen:
                seen[milestone] = time.monotonic() - start
        if time.monotonic() - start > timeout:
            process.kill()
            break
    process.wait()
    seen["exit"] = time.monotonic() - start
    tail = "".join(lines[-12:])
    print(tail if "exits" in tail else "", end="")
    return seen


def compare(linux: LinuxGuest, initrd: Path, vcpus: int) -> None:
    """Boot both with ``vcpus`` CPUs (QEMU with multi-threaded TCG) and print the milestones."""
    sim = _timed([sys.executable, "-m", "mshvstack.cli", "run", str(linux.kernel), "--extract-vmlinux", "--initrd", str(initrd),
                  "--memory", "512M", "--vcpus", str(vcpus), "--cmdline", "console=ttyS0", "--stats"], 900)
    qemu_binary = shutil.which("qemu-system-x86_64")
    qemu: dict[str, float] | None = None
    if qemu_binary:
        qemu = _timed([qemu_binary, "-machine", "q35", "-accel", "tcg,thread=multi", "-smp", str(vcpus), "-m", "512",
                       "-nographic", "-no-reboot", "-kernel", str(linux.kernel), "-initrd", str(initrd),
                       "-append", "console=ttyS0 panic=-1"], 900)
    print(f"Debian kernel {linux.version}, {vcpus} vCPU{'s' if vcpus > 1 else ''}, 512 MiB")
    print(f"{'milestone':32} {'simulator s':>12} {'QEMU TCG s':>12} {'ratio':>8}")
    for milestone in MILESTONES + ("exit",):
        s = sim.get(milestone, float("nan"))
        q = qemu.get(milestone, float("nan")) if qemu else float("nan")
        ratio = s / q if qemu and q == q and q > 0 else float("nan")
        print(f"{milestone:32} {s:12.1f} {q:12.1f} {ratio:8.2f}")
    if not qemu_binary:
        print("QEMU column skipped: qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")


def boot_initrd(linux: LinuxGuest) -> Path:
    initrd = Path(tempfile.mkdtemp()) / "initrd.cpio"
    initrd.write_bytes(busybox_initramfs(linux.busybox, INIT))
    return initrd


def main() -> int:
    argument = sys.argv[1] if len(sys.argv) > 1 else "1"
    if not argument.isdigit() or not 1 <= int(argument) <= 64:
        print(f"usage: python benchmarks/linux_boot.py [VCPUS]  (a number of vCPUs from 1 to 64, not {argument!r})")
        return 2
    vcpus = int(argument)
    try:
        linux = debian_guest()
    except GuestUnavailable as exc:
        print(f"skipped: {exc}")
        return 0
    compare(linux, boot_initrd(linux), vcpus)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
