"""The guest's sequential disk read: storvsc on the simulator against virtio-blk on QEMU TCG.

Both boot Debian's kernel with the same initramfs, which loads the Hyper-V
storage stack (hv_vmbus, hv_storvsc, sd_mod) and virtio-blk, finds the disk
(/dev/sda on ours, /dev/vda on QEMU) and reads 64 MiB with
`dd bs=1M of=/dev/null`, timed by the guest itself (dd's own figure, and the
guest's clock around it).  The QEMU column is skipped with a reason where
QEMU is absent.

    python benchmarks/linux_disk.py
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from mshvstack.vmm.linuxguest import (
    INIT_PROLOGUE,
    LOAD_MODULES,
    GuestUnavailable,
    busybox_initramfs,
    debian_guest,
    kernel_modules,
    module_files,
)

DISK_MIB = 64
MODULES = ("hv_vmbus", "hv_storvsc", "sd_mod", "virtio_pci", "virtio_blk")
INIT = INIT_PROLOGUE + "exec >/dev/kmsg 2>&1\n" + LOAD_MODULES + """n=0
while [ ! -b /dev/sda ] && [ ! -b /dev/vda ] && [ $n -lt 60 ]; do sleep 1; n=$((n + 1)); done
disk=/dev/sda; [ -b /dev/vda ] && disk=/dev/vda
dd if=$disk of=/dev/null bs=1M count=8 2>/dev/null
start=$(cut -d' ' -f1 /proc/uptime)
dd if=$disk of=/dev/null bs=1M count=%d 2>&1 | tail -1 | sed 's/^/DDRESULT /'
end=$(cut -d' ' -f1 /proc/uptime)
echo "READTIME $start $end"
poweroff -f
""" % DISK_MIB


def _run(command: list[str], console: Path | None = None) -> float | None:
    """MB/s of the guest's timed read, from the guest's uptime clock around dd."""
    result = subprocess.run(command, capture_output=True, text=True, errors="replace", timeout=1200, cwd=tempfile.gettempdir())
    output = console.read_text(errors="replace") if console is not None and console.exists() else result.stdout + result.stderr
    dd = re.search(r"DDRESULT (.+)", output)
    timed = re.search(r"READTIME ([\d.]+) ([\d.]+)", output)
    if dd:
        print(f"  dd: {dd.group(1).strip()}")
    if not timed:
        print(output[-2000:])
        return None
    seconds = float(timed.group(2)) - float(timed.group(1))
    return DISK_MIB * (1 << 20) / 1e6 / seconds if seconds > 0 else None


def main() -> int:
    try:
        linux = debian_guest()
        modules = kernel_modules(linux, MODULES)
    except GuestUnavailable as exc:
        print(f"skipped: {exc}")
        return 0
    work = Path(tempfile.mkdtemp())
    files = module_files(modules)
    initrd = work / "initrd.cpio"
    initrd.write_bytes(busybox_initramfs(linux.busybox, INIT, files))
    disk = work / "disk.img"
    disk.write_bytes(os.urandom(DISK_MIB << 20))
    print(f"Debian kernel {linux.version}, 1 vCPU, 512 MiB, {DISK_MIB} MiB sequential read with dd bs=1M")
    print("simulator (hv_storvsc over our storvsp):")
    sim = _run([sys.executable, "-m", "mshvstack.cli", "run", str(linux.kernel), "--extract-vmlinux", "--initrd", str(initrd),
                "--memory", "512M", "--cmdline", "console=ttyS0", "--disk", str(disk), "--console", str(work / "sim.txt")],
               console=work / "sim.txt")
    qemu_binary = shutil.which("qemu-system-x86_64")
    qemu = None
    if qemu_binary:
        print("QEMU TCG (virtio-blk):")
        qemu = _run([qemu_binary, "-machine", "q35,accel=tcg", "-m", "512", "-nographic", "-no-reboot", "-kernel", str(linux.kernel),
                     "-initrd", str(initrd), "-append", "console=ttyS0 panic=-1",
                     "-drive", f"file={disk},if=virtio,format=raw"])
    print(f"{'':24} {'MB/s':>8}")
    print(f"{'simulator (storvsc)':24} {sim or float('nan'):8.1f}")
    if qemu_binary:
        print(f"{'QEMU TCG (virtio-blk)':24} {qemu or float('nan'):8.1f}")
        if sim and qemu:
            print(f"{'ratio':24} {sim / qemu:8.2f}")
    else:
        print("QEMU column skipped: qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
