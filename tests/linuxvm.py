"""Run Debian's Linux under the CLI as a subprocess and follow its console.

Shared by the tests that boot the real kernel: the guest's /init prints
``MARK name value`` lines through /dev/kmsg, and the test waits for them
while the VMM runs, so it can act (a control-socket command, a SIGKILL)
at the moment the guest reaches a point.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from mshvstack.vmm.control import request
from mshvstack.vmm.linuxguest import GuestUnavailable, LinuxGuest, debian_guest, debian_program, kernel_modules, module_files

MARK = re.compile(r"MARK (\w+) ?(.*)")


# hv_utils runs /sbin/poweroff for the shutdown IC; busybox's would signal our
# shell /init, so this one powers off directly, saying it was asked to.
POWEROFF = """#!/bin/sh
echo "MARK poweroff_requested" >/dev/kmsg
exec /bin/busybox poweroff -f
"""

VMBUS_MODULES = ("hv_vmbus", "hv_utils", "hv_storvsc", "sd_mod")
OS_NAME = "Debian GNU/Linux"


def vmbus_guest_files(linux: LinuxGuest) -> dict[str, bytes]:
    """What an initramfs needs for Linux's VMBus drivers and their host-facing parts: the
    modules, the shutdown IC's /sbin/poweroff, Debian's KVP daemon with the files it reads
    (OS name, host name: no resolver in the guest, names come from /etc/hosts)."""
    files = module_files(kernel_modules(linux, VMBUS_MODULES))
    files["sbin/poweroff"] = POWEROFF.encode()
    files.update(debian_program("hyperv-daemons", "/usr/sbin/hv_kvp_daemon"))
    files["etc/os-release"] = f'NAME="{OS_NAME}"\nVERSION_ID="12"\n'.encode()
    files["etc/hosts"] = b"127.0.0.1 localhost\n127.0.1.1 mshvstack-guest.example mshvstack-guest\n"
    files["etc/nsswitch.conf"] = b"hosts: files\n"
    return files


def require_debian_guest() -> LinuxGuest:
    if shutil.which("apt-get") is None:
        pytest.skip("apt-get is not available: Debian's kernel cannot be fetched here")
    try:
        return debian_guest()
    except GuestUnavailable as exc:
        pytest.skip(f"Debian's packages are unavailable: {exc}")


class LinuxVm:
    """``mshvstack run`` of a kernel and initramfs, run outside the checkout."""

    def __init__(self, workdir: Path, kernel: Path | None, initrd: Path | None, *extra: str, cmdline: str = "console=ttyS0",
                 vcpus: int = 1, incoming: str | None = None, name: str = "") -> None:
        """``incoming``: restore from this URI (``run --incoming``) instead of booting
        ``kernel``; ``name``: tells the console and QMP socket files of several VMs apart."""
        self.vcpus = vcpus
        self.console = workdir / f"console{name}.txt"
        self.socket = workdir / f"api{name}.sock"
        self._read = 0
        self._seen = ""
        self.marks: list[tuple[str, str, float]] = []   # (name, value, host time when seen)
        if incoming is not None:
            machine = ["--incoming", incoming]
        else:
            machine = [str(kernel), "--extract-vmlinux", "--initrd", str(initrd), "--memory", "512M", "--vcpus", str(vcpus),
                       "--cmdline", cmdline]
        args = [sys.executable, "-X", "faulthandler", "-m", "mshvstack.cli", "run", *machine, "--console", str(self.console),
                "--api-socket", str(self.socket), "--json", *extra]
        # Not the checkout's root: run the installed package, as a user would (-X faulthandler: a crash
        # in C prints every thread's Python stack to the VMM log the assertions show).
        self.process = subprocess.Popen(args, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # Follow the console continuously, so each mark is stamped when the guest printed it.
        self._lock = threading.Lock()
        self._follower = threading.Thread(target=self._follow, daemon=True)
        self._follower.start()

    def _follow(self) -> None:
        while self.process.poll() is None:
            self._poll_console()
            time.sleep(0.05)
        self._poll_console()

    def _poll_console(self) -> None:
        with self._lock:
            self._poll_console_locked()

    def _poll_console_locked(self) -> None:
        if not self.console.exists():
            return
        with self.console.open("rb") as f:
            f.seek(self._read)
            chunk = f.read()
        end = chunk.rfind(b"\n") + 1   # whole lines only
        self._read += end
        text = chunk[:end].decode(errors="replace")
        self._seen += text
        now = time.time()
        for line in text.splitlines():
            match = MARK.search(line)
            if match:
                self.marks.append((match.group(1), match.group(2).strip(), now))

    def wait_for(self, name: str, timeout: float = 300.0, after: int = 0) -> tuple[str, float]:
        """The value of the first ``MARK name`` at index >= ``after``, and when it was seen."""
        deadline = time.monotonic() + timeout
        while True:
            self._poll_console()
            for found, value, seen in self.marks[after:]:
                if found == name:
                    return value, seen
            if self.process.poll() is not None:
                self._poll_console()
                if not any(found == name for found, _v, _s in self.marks[after:]):
                    status = self.process.returncode   # negative: the signal that ended it (no traceback then)
                    stderr = self.process.stderr.read() if self.process.stderr else ""
                    raise AssertionError(f"the VMM exited (status {status}) before MARK {name}:\n{self.log[-3000:]}\n{stderr}")
            if time.monotonic() > deadline:
                self.process.kill()   # its log says what the VMM saw (read once it is gone: the pipe then ends)
                stderr = self.process.stderr.read() if self.process.stderr else ""
                raise AssertionError(f"no MARK {name} within {timeout:.0f} s:\n{self.log[-3000:]}\nVMM log:\n{stderr[-3000:]}")
            time.sleep(0.2)

    def values(self, name: str) -> list[str]:
        self._poll_console()
        return [value for found, value, _s in self.marks if found == name]

    @property
    def log(self) -> str:
        self._poll_console()
        return self._seen

    def ctl(self, command: str, **arguments: str) -> dict[str, Any]:
        reply = request(self.socket, command, arguments)
        assert reply.get("ok"), reply
        return reply

    def finish(self, timeout: float = 120.0) -> tuple[int, str, str]:
        """Wait for the VMM to exit by itself; returns (code, stdout, stderr)."""
        try:
            stdout, stderr = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the VMM did not exit within {timeout:.0f} s:\n{self.log[-3000:]}") from None
        self._poll_console()
        return self.process.returncode, stdout, stderr

    def shut_down_through_the_ic(self) -> tuple[int, str, str]:
        """Ask for a graceful shutdown (QMP system_powerdown: the shutdown IC, which runs
        the guest's /sbin/poweroff), wait for the guest to say so and for the VMM to exit;
        (code, stdout, stderr)."""
        self.ctl("shutdown")
        self.wait_for("poweroff_requested", timeout=60)
        return self.finish()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)
