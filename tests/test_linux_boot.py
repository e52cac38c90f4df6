"""Debian's unmodified kernel boots to userspace on the simulator, through the CLI.

The kernel and busybox come from Debian's archive (apt-get download, checked
against apt-cache's SHA256, cached outside the checkout).  /init is ours: it
proves userspace ran by mounting the pseudo filesystems, piping data through
several processes, copying a file the host made and hashing the copy, and
reading the timer interrupt counts; then it powers off through ACPI S5.
Its output goes through /dev/kmsg (the kernel's console), which needs no
serial interrupt.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mshvstack.vmm.linuxguest import INIT_PROLOGUE, GuestUnavailable, busybox_initramfs, debian_guest

INIT = INIT_PROLOGUE + """exec >/dev/kmsg 2>&1
echo "MARK mounts $(grep -c -E ' (proc|sysfs|devtmpfs) ' /proc/mounts)"
echo "MARK pipe $(seq 1 3000 | tr 0-9 a-j | sort -r | uniq | wc -l)"
cat /payload.bin | dd of=/tmp/copy bs=4096 2>/dev/null
echo "MARK sha256 $(sha256sum /tmp/copy | cut -d' ' -f1)"
grep -E 'HVS|LOC' /proc/interrupts | while read name count rest; do echo "MARK irq $name $count"; done
echo "MARK poweroff"
poweroff -f
"""


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, bytes]:
    if shutil.which("apt-get") is None:
        pytest.skip("apt-get is not available: Debian's kernel cannot be fetched here")
    try:
        linux = debian_guest()
    except GuestUnavailable as exc:
        pytest.skip(f"Debian's packages are unavailable: {exc}")
    payload = os.urandom(192 * 1024)
    initrd = tmp_path_factory.mktemp("linux") / "initrd.cpio"
    initrd.write_bytes(busybox_initramfs(linux.busybox, INIT, {"payload.bin": payload}))
    return linux.kernel, initrd, payload


def test_debian_kernel_reaches_userspace_and_powers_off(guest: tuple[Path, Path, bytes], tmp_path: Path) -> None:
    kernel, initrd, payload = guest
    console = tmp_path / "console.txt"
    result = subprocess.run(
        [sys.executable, "-m", "mshvstack.cli", "run", str(kernel), "--extract-vmlinux", "--initrd", str(initrd),
         "--memory", "512M", "--vcpus", "1", "--cmdline", "console=ttyS0", "--console", str(console), "--json"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)   # not the checkout: run the installed package
    log = console.read_text(errors="replace")
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}\n{log[-3000:]}"
    marks = dict(re.findall(r"MARK (\w+) (.+)", log))
    assert "Run /init as init process" in log
    assert marks.get("mounts") == "3", log[-2000:]
    assert marks.get("pipe") == "3000"
    assert marks.get("sha256") == hashlib.sha256(payload).hexdigest()
    interrupts = {name.rstrip(":"): int(count) for name, count in re.findall(r"MARK irq (\S+) (\d+)", log)}
    assert sum(interrupts.values()) > 100, interrupts   # the clock ticked in the guest
    assert "MARK poweroff" in log
    assert "guest powered off (ACPI S5)" in result.stdout   # ended by the guest, not a timeout
    assert "Kernel panic" not in log and "BUG:" not in log and "soft lockup" not in log
