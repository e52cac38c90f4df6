"""Debian's kernel on two and four VPs, with its Hyper-V drivers bound to every CPU.

/init loads hv_vmbus and friends on CPU 1 (Linux's hv_vmbus checks the
hypercall MSR on the CPU it is loaded on: that MSR is partition-wide, and
was per VP here, so the insmod failed with -ENODEV), then moves the disk's
channel to CPU 1 through sysfs (MODIFYCHANNEL), reads the disk, and reports
the per-CPU VMBus and synthetic-timer interrupt counts.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mshvstack.vmbus.providers.storage import Storage
from mshvstack.vmm.linuxguest import INIT_PROLOGUE, GuestUnavailable, busybox_initramfs, debian_guest, kernel_modules, module_files

MODULES = ("hv_vmbus", "hv_utils", "hv_storvsc", "sd_mod")
DISK_BYTES = 8 << 20

INIT = INIT_PROLOGUE + """exec >/dev/kmsg 2>&1
echo "MARK cpus $(cat /sys/devices/system/cpu/online)"
for module in $(cat /modules.order); do
    taskset 2 insmod /lib/modules/$module.ko || echo "MARK insmod_failed $module"
done
n=0; while [ ! -b /dev/sda ] && [ $n -lt 60 ]; do sleep 1; n=$((n + 1)); done
disk=$(dirname $(grep -l %(storage)s /sys/bus/vmbus/devices/*/class_id))
channel=$(ls -d $disk/channels/* | head -n 1)
echo "MARK channel_cpu_before $(cat $channel/cpu)"
echo 1 > $channel/cpu || echo "MARK move_failed"
echo "MARK channel_cpu $(cat $channel/cpu)"
echo "MARK hyp_before $(grep HYP: /proc/interrupts | tr -s ' ')"
echo 3 > /proc/sys/vm/drop_caches
echo "MARK read $(dd if=/dev/sda bs=65536 2>/dev/null | wc -c)"
echo "MARK hyp_after $(grep HYP: /proc/interrupts | tr -s ' ')"
echo "MARK hvs $(grep HVS: /proc/interrupts | tr -s ' ')"
echo "MARK poweroff"
poweroff -f
""" % {"storage": Storage.class_id}


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if shutil.which("apt-get") is None:
        pytest.skip("apt-get is not available: Debian's kernel cannot be fetched here")
    try:
        linux = debian_guest()
        files = module_files(kernel_modules(linux, MODULES))
    except GuestUnavailable as exc:
        pytest.skip(f"Debian's packages are unavailable: {exc}")
    initrd = tmp_path_factory.mktemp("linux-smp") / "initrd.cpio"
    initrd.write_bytes(busybox_initramfs(linux.busybox, INIT, files))
    return linux.kernel, initrd


def _per_cpu(line: str, cpus: int) -> tuple[int, ...]:
    """'HYP: 12 34 Hypervisor callback interrupts' -> (12, 34)."""
    return tuple(int(field) for field in line.split()[1 : 1 + cpus])


@pytest.mark.parametrize("vcpus", [2, 4])
def test_hyperv_drivers_load_on_cpu1_and_a_channel_moves_there(guest: tuple[Path, Path], tmp_path: Path, vcpus: int) -> None:
    kernel, initrd = guest
    console = tmp_path / "console.txt"
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(DISK_BYTES))
    result = subprocess.run(
        [sys.executable, "-m", "mshvstack.cli", "run", str(kernel), "--extract-vmlinux", "--initrd", str(initrd),
         "--memory", "512M", "--vcpus", str(vcpus), "--cmdline", "console=ttyS0 loglevel=7", "--console", str(console),
         "--disk", str(disk), "--json"],
        capture_output=True, text=True, timeout=900, cwd=tmp_path)
    log = console.read_text(errors="replace")
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}\n{log[-3000:]}"
    marks = dict(re.findall(r"MARK (\w+) ?(.*)", log))
    assert f"smpboot: Total of {vcpus} processors activated" in log, log[-3000:]
    assert marks.get("cpus") == f"0-{vcpus - 1}"
    assert "insmod_failed" not in marks, log[-3000:]      # hv_vmbus on CPU 1: no -ENODEV
    assert re.search(r"hv_vmbus: Vmbus version:5\.3", log)
    assert marks.get("channel_cpu") == "1" and "move_failed" not in marks, log[-3000:]
    assert int(marks["read"]) == DISK_BYTES
    before, after = _per_cpu(marks["hyp_before"], vcpus), _per_cpu(marks["hyp_after"], vcpus)
    assert after[1] > before[1], (before, after)          # the disk's interrupts now come on CPU 1
    timers = _per_cpu(marks["hvs"], vcpus)
    assert len(timers) == vcpus and min(timers) > 0, timers                        # each CPU's own synthetic timer ticks
    assert "guest powered off (ACPI S5)" in result.stdout
    assert not any(bad in log for bad in ("Kernel panic", "BUG:", "WARNING:", "Oops")), log[-3000:]
