"""The guest's disk I/O: storvsc on the simulator against virtio-blk on QEMU TCG.

Both boot Debian's kernel with the same initramfs, which loads the Hyper-V
storage stack (hv_vmbus, hv_storvsc, sd_mod) and virtio-blk, finds the disk
(/dev/sda on ours, /dev/vda on QEMU) and runs, timed by the guest's own clock:

* sequential reads with `dd`: 64 MiB at bs=1M through the page cache, 64 MiB
  at bs=1M (six times over: see MODES) and 16 MiB at bs=4k with iflag=direct;
* sequential writes with `dd`: the same sizes with oflag=direct (1 MiB four times over);
* random 4 KiB direct reads (IOPS): a small static program built here with
  the host's C compiler (skipped with a reason when there is none);
* the engine's ceiling: 100 MiB through `dd` from /dev/zero to /dev/null at
  bs=512, kernel work with no device at all.  Its ratio is how fast the
  engine runs this guest's kernel against QEMU's TCG; a disk ratio cannot be
  expected much above it, since most of a small request is guest kernel code.

Both run with printk.devkmsg=on (the results go through /dev/kmsg, rate-limited otherwise).
The QEMU column is skipped with a reason where QEMU is absent.

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
    LinuxGuest,
    busybox_initramfs,
    debian_guest,
    kernel_modules,
    module_files,
)

DISK_MIB = 64
RANDOM_READS = 2048
MODULES = ("hv_vmbus", "hv_storvsc", "sd_mod", "virtio_pci", "virtio_blk")
ENGINE_CEILING = "no device (ceiling)"
# (name, dd's if, of and other arguments, MiB one dd moves, dd runs in the timed window); $disk is
# the guest's disk.  The guest's clock (/proc/uptime) counts in 10 ms steps: the fast direct modes run
# dd several times, so that a window lasts long enough for its figure to mean something (the
# buffered read runs once: a second run would read the page cache).
MODES = (
    ("read 1M", "$disk", "/dev/null", "bs=1M count=64", 64, 1),
    ("read 1M direct", "$disk", "/dev/null", "bs=1M count=64 iflag=direct", 64, 6),
    ("read 4k direct", "$disk", "/dev/null", "bs=4k count=4096 iflag=direct", 16, 1),
    ("write 1M direct", "/dev/zero", "$disk", "bs=1M count=64 oflag=direct", 64, 4),
    ("write 4k direct", "/dev/zero", "$disk", "bs=4k count=4096 oflag=direct", 16, 1),
    (ENGINE_CEILING, "/dev/zero", "/dev/null", "bs=512 count=204800", 100, 1),
)
# Random 4 KiB reads with O_DIRECT over the whole disk: IOPS by the guest's monotonic clock.
RANDREAD_C = r"""
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
int main(int argc, char **argv) {
    int fd = open(argv[1], O_RDONLY | O_DIRECT);
    long reads = atol(argv[2]), blocks = atol(argv[3]);
    void *buffer;
    if (fd < 0 || posix_memalign(&buffer, 4096, 4096)) { perror("randread"); return 1; }
    unsigned long long x = 88172645463325252ULL;
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < reads; i++) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        if (pread(fd, buffer, 4096, (off_t)(x % blocks) * 4096) != 4096) { perror("pread"); return 1; }
    }
    clock_gettime(CLOCK_MONOTONIC, &b);
    printf("RANDREAD %ld %.6f\n", reads, (b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) / 1e9);
    return 0;
}
"""


def _init(randread: bool) -> str:
    lines = [INIT_PROLOGUE, "exec >/dev/kmsg 2>&1\n", LOAD_MODULES,
             "n=0\nwhile [ ! -b /dev/sda ] && [ ! -b /dev/vda ] && [ $n -lt 60 ]; do sleep 1; n=$((n + 1)); done\n",
             "disk=/dev/sda; [ -b /dev/vda ] && disk=/dev/vda\n",
             "dd if=$disk of=/dev/null bs=1M count=8 2>/dev/null\n"]
    for name, source, target, args, _mib, runs in MODES:
        lines.append("sync; echo 3 > /proc/sys/vm/drop_caches\n")
        lines.append(f"start=$(cut -d' ' -f1 /proc/uptime)\n"
                     f"for run in $(seq {runs}); do "
                     f"dd if={source} of={target} {args} 2>&1 | tail -1 | sed 's/^/DDRESULT {name}: /'; done\n"
                     f"end=$(cut -d' ' -f1 /proc/uptime)\n"
                     f"echo \"TIMED {_tag(name)} $start $end\"\n")
    if randread:
        lines.append(f"chmod +x /randread; /randread $disk {RANDOM_READS} {(DISK_MIB << 20) // 4096}\n")
    lines.append("poweroff -f\n")
    return "".join(lines)


def _tag(name: str) -> str:
    """A mode's name as one word of the guest's output."""
    return re.sub(r"\W+", "_", name).strip("_")


def _randread_binary(work: Path) -> bytes | None:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    source = work / "randread.c"
    source.write_text(RANDREAD_C)
    binary = work / "randread"
    result = subprocess.run([compiler, "-O2", "-static", "-o", str(binary), str(source)], capture_output=True, text=True)
    return binary.read_bytes() if result.returncode == 0 else None


def _run(command: list[str], console: Path | None = None) -> dict[str, float]:
    """Each mode's MB/s (random reads: IOPS), from the guest's clock."""
    result = subprocess.run(command, capture_output=True, text=True, errors="replace", timeout=1800, cwd=tempfile.gettempdir())
    output = console.read_text(errors="replace") if console is not None and console.exists() else result.stdout + result.stderr
    figures: dict[str, float] = {}
    for dd in sorted(set(re.findall(r"DDRESULT (.+)", output))):
        print(f"  dd {dd.strip()}")
    for name, _source, _target, _args, mib, runs in MODES:
        timed = re.search(rf"TIMED {re.escape(_tag(name))} ([\d.]+) ([\d.]+)", output)
        if timed and float(timed.group(2)) > float(timed.group(1)):
            figures[name] = runs * mib * (1 << 20) / 1e6 / (float(timed.group(2)) - float(timed.group(1)))
    random = re.search(r"RANDREAD (\d+) ([\d.]+)", output)
    if random and float(random.group(2)) > 0:
        figures["random 4k read IOPS"] = int(random.group(1)) / float(random.group(2))
    if not figures:
        print(output[-2000:])
    return figures


def main() -> int:
    try:
        linux = debian_guest()
        modules = kernel_modules(linux, MODULES)
    except GuestUnavailable as exc:
        print(f"skipped: {exc}")
        return 0
    with tempfile.TemporaryDirectory() as work_dir, tempfile.TemporaryDirectory(dir=_memory_backed_dir()) as image_dir:
        return _compare(linux, modules, Path(work_dir), Path(image_dir) / "disk.img")


def _memory_backed_dir() -> str | None:
    """Where the image goes: tmpfs when there is one.  Both machines read the same file, and what
    is measured is their I/O paths, not the host's disk: the host's page cache may drop a file
    it thinks cold (proactive reclaim, as DAMON's on this machine) and send a run to the disk."""
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None


def _compare(linux: LinuxGuest, modules: list[tuple[str, bytes]], work: Path, disk: Path) -> int:
    files = module_files(modules)
    randread = _randread_binary(work)
    if randread is not None:
        files["randread"] = randread
    initrd = work / "initrd.cpio"
    initrd.write_bytes(busybox_initramfs(linux.busybox, _init(randread is not None), files))
    disk.write_bytes(os.urandom(DISK_MIB << 20))
    print(f"Debian kernel {linux.version}, 1 vCPU, 512 MiB, a {DISK_MIB} MiB disk")
    print("simulator (hv_storvsc over our storvsp):")
    sim = _run([sys.executable, "-m", "mshvstack.cli", "run", str(linux.kernel), "--extract-vmlinux", "--initrd", str(initrd),
                "--memory", "512M", "--cmdline", "console=ttyS0 printk.devkmsg=on", "--disk", str(disk), "--console", str(work / "sim.txt")],
               console=work / "sim.txt")
    qemu_binary = shutil.which("qemu-system-x86_64")
    qemu: dict[str, float] = {}
    if qemu_binary:
        print("QEMU TCG (virtio-blk):")
        qemu = _run([qemu_binary, "-machine", "q35,accel=tcg", "-m", "512", "-nographic", "-no-reboot", "-kernel", str(linux.kernel),
                     "-initrd", str(initrd), "-append", "console=ttyS0 panic=-1 printk.devkmsg=on",
                     "-drive", f"file={disk},if=virtio,format=raw"])
    print(f"{'(MB/s; random: IOPS)':24} {'simulator':>10} {'QEMU TCG':>10} {'ratio':>7}")
    for name in [m[0] for m in MODES] + ["random 4k read IOPS"]:
        s, q = sim.get(name, float("nan")), qemu.get(name, float("nan"))
        print(f"{name:24} {s:10.1f} {q:10.1f} {s / q if q == q and q > 0 else float('nan'):7.2f}")
    if ENGINE_CEILING in sim and qemu.get(ENGINE_CEILING):
        print(f"the engine runs this guest's kernel at {sim[ENGINE_CEILING] / qemu[ENGINE_CEILING]:.2f}x QEMU TCG's speed "
              f"(the '{ENGINE_CEILING}' row): the disk ratios' ceiling here")
    if randread is None:
        print("random reads skipped: no C compiler to build the guest's static reader")
    if not qemu_binary:
        print("QEMU column skipped: qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
