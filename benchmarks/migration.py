"""Snapshot, restore and live migration of a Debian guest: the simulator against QEMU TCG.

Both run Debian's kernel with 512 MiB and a busybox /init that prints a tick a
second and, when asked on its command line, rewrites N MiB of a tmpfs file
every second (its dirty rate).  Over QMP, in the same run:

* snapshot: ``migrate`` to a file (ours ``file:``; QEMU 7.2 has no ``file:``,
  so ``exec:cat > FILE``), its total time, the guest's pause and the file's size;
* restore: ``run --incoming file:`` / ``qemu -incoming "exec:cat FILE"`` until
  the restored guest prints its next tick;
* live: ``migrate`` over TCP on the loopback with the guest idle and dirtying
  memory: total time, downtime and bytes sent.

Both get the same migration parameters (downtime limit 300 ms, no bandwidth
limit).  QEMU's columns are skipped with a reason when it is not installed.

    python benchmarks/migration.py [DIRTY_MIB_PER_S ...]     (default: 0 8 32)
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mshvstack.vmm.control import QmpClient
from mshvstack.vmm.linuxguest import GuestUnavailable, LinuxGuest, busybox_initramfs, debian_guest

MEMORY_MIB = 512
PARAMETERS = {"downtime-limit": 300, "max-bandwidth": 1 << 40}
INIT = """#!/bin/sh
/bin/busybox mount -t devtmpfs devtmpfs /dev
/bin/busybox mount -t tmpfs tmpfs /tmp
rate=$(sed -n 's/.*mshvbench=\\([0-9]*\\).*/\\1/p' /proc/cmdline)
i=0
while true; do
    i=$((i + 1))
    [ "${rate:-0}" -gt 0 ] && dd if=/dev/zero of=/tmp/dirty bs=1M count=$rate conv=notrunc 2>/dev/null
    echo "TICK $i"
    sleep 1
done
"""


@dataclass
class Vm:
    process: subprocess.Popen[bytes]
    socket: Path
    console: Path

    def ticks(self) -> int:
        return self.console.read_bytes().count(b"TICK ") if self.console.exists() else 0

    def wait_tick(self, after: int, timeout: float = 300) -> float:
        """Seconds until the console shows more than ``after`` ticks."""
        start = time.monotonic()
        while self.ticks() <= after:
            if time.monotonic() - start > timeout or self.process.poll() is not None:
                raise RuntimeError(f"no tick from {self.console} (exit {self.process.poll()})")
            time.sleep(0.02)
        return time.monotonic() - start

    def qmp(self) -> QmpClient:
        deadline = time.monotonic() + 60
        while not self.socket.exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"no QMP socket at {self.socket}")
            time.sleep(0.05)
        return QmpClient(self.socket, timeout=300)

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


class Engine:
    name = ""

    def __init__(self, linux: LinuxGuest, initrd: Path, workdir: Path) -> None:
        self.linux, self.initrd, self.workdir = linux, initrd, workdir
        self._count = 0

    def _files(self) -> tuple[Path, Path]:
        self._count += 1
        return self.workdir / f"{self.name}{self._count}.qmp", self.workdir / f"{self.name}{self._count}.console"

    def boot(self, dirty_mib: int) -> Vm:
        raise NotImplementedError

    def incoming(self, uri: str) -> Vm:
        raise NotImplementedError

    def snapshot_uri(self, path: Path) -> str:
        raise NotImplementedError

    def restore_uri(self, path: Path) -> str:
        raise NotImplementedError


class Simulator(Engine):
    name = "sim"

    def _run(self, *args: str) -> Vm:
        qmp, console = self._files()
        command = [sys.executable, "-m", "mshvstack.cli", "run", *args, "--api-socket", str(qmp), "--console", str(console)]
        return Vm(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=self.workdir), qmp, console)

    def boot(self, dirty_mib: int) -> Vm:
        return self._run(str(self.linux.kernel), "--extract-vmlinux", "--initrd", str(self.initrd), "--memory", f"{MEMORY_MIB}M",
                         "--cmdline", f"console=ttyS0 quiet mshvbench={dirty_mib}")

    def incoming(self, uri: str) -> Vm:
        return self._run("--incoming", uri)

    def snapshot_uri(self, path: Path) -> str:
        return f"file:{path}"

    restore_uri = snapshot_uri


class Qemu(Engine):
    name = "qemu"

    def _run(self, *args: str, cmdline: str = "") -> Vm:
        qmp, console = self._files()
        command = ["qemu-system-x86_64", "-machine", "q35", "-accel", "tcg", "-m", str(MEMORY_MIB), "-display", "none",
                   "-no-reboot", "-kernel", str(self.linux.kernel), "-initrd", str(self.initrd),
                   "-append", f"console=ttyS0 quiet {cmdline}", "-serial", f"file:{console}",
                   "-qmp", f"unix:{qmp},server=on,wait=off", *args]
        return Vm(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=self.workdir), qmp, console)

    def boot(self, dirty_mib: int) -> Vm:
        return self._run(cmdline=f"mshvbench={dirty_mib}")

    def incoming(self, uri: str) -> Vm:
        return self._run("-incoming", uri, cmdline="mshvbench=0")

    def snapshot_uri(self, path: Path) -> str:
        return f"exec:cat > {path}"   # QEMU 7.2 has no file: URI

    def restore_uri(self, path: Path) -> str:
        return f"exec:cat {path}"


def _migrate(vm: Vm, uri: str) -> dict[str, Any]:
    with vm.qmp() as client:
        client.execute("migrate-set-parameters", PARAMETERS)
        client.execute("migrate", {"uri": uri})
        while True:
            info = client.execute("query-migrate")
            if info.get("status") in ("completed", "failed", "cancelled"):
                if info["status"] != "completed":
                    raise RuntimeError(f"migration {info}")
                return dict(info)
            time.sleep(0.05)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_listening(port: int, timeout: float = 60) -> None:
    """Until something listens on the loopback ``port`` (without connecting: a destination
    takes one connection only)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open("/proc/net/tcp") as table:   # slot, local address, remote address, state (0A: LISTEN)
            rows = [line.split() for line in table.readlines()[1:]]
        if any(row[1].endswith(f":{port:04X}") and row[3] == "0A" for row in rows):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


def snapshot_and_restore(engine: Engine) -> dict[str, float]:
    source = engine.boot(0)
    try:
        source.wait_tick(3)
        path = engine.workdir / f"{engine.name}.snapshot"
        info = _migrate(source, engine.snapshot_uri(path))
    finally:
        source.stop()
    started = time.monotonic()
    restored = engine.incoming(engine.restore_uri(path))
    try:
        restored.wait_tick(restored.ticks())
        restore_s = time.monotonic() - started
    finally:
        restored.stop()
    return {"save_s": info["total-time"] / 1000, "pause_ms": info["downtime"], "file_mib": path.stat().st_size / 2**20,
            "restore_s": restore_s}


def live(engine: Engine, dirty_mib: int) -> dict[str, float]:
    source = engine.boot(dirty_mib)
    destination = None
    try:
        source.wait_tick(3)
        uri = f"tcp:127.0.0.1:{_free_port()}"
        destination = engine.incoming(uri)
        _wait_listening(int(uri.rsplit(":", 1)[1]))
        info = _migrate(source, uri)
        destination.wait_tick(0)
        return {"total_s": info["total-time"] / 1000, "downtime_ms": info["downtime"],
                "sent_mib": info["ram"]["transferred"] / 2**20}
    finally:
        source.stop()
        if destination is not None:
            destination.stop()


def _row(label: str, ours: float, theirs: float | None) -> None:
    ratio = f"{ours / theirs:8.2f}" if theirs else f"{'-':>8}"
    print(f"{label:40} {ours:12.2f} {theirs if theirs is not None else float('nan'):12.2f} {ratio}")


def main() -> int:
    rates = [int(arg) for arg in sys.argv[1:]] or [0, 8, 32]
    try:
        linux = debian_guest()
    except GuestUnavailable as exc:
        print(f"skipped: {exc}")
        return 0
    workdir = Path(tempfile.mkdtemp())
    initrd = workdir / "initrd.cpio"
    initrd.write_bytes(busybox_initramfs(linux.busybox, INIT))
    engines: list[Engine] = [Simulator(linux, initrd, workdir)]
    have_qemu = shutil.which("qemu-system-x86_64") is not None
    if have_qemu:
        engines.append(Qemu(linux, initrd, workdir))
    snapshots = [snapshot_and_restore(engine) for engine in engines]
    lives = {rate: [live(engine, rate) for engine in engines] for rate in rates}
    print(f"Debian kernel {linux.version}, {MEMORY_MIB} MiB, 1 vCPU; downtime limit {PARAMETERS['downtime-limit']} ms")
    print(f"{'':40} {'simulator':>12} {'QEMU TCG':>12} {'ratio':>8}")
    for key, label in (("save_s", "snapshot: total s"), ("pause_ms", "snapshot: guest paused ms"),
                       ("file_mib", "snapshot: file MiB"), ("restore_s", "restore: to the next tick s")):
        _row(label, snapshots[0][key], snapshots[1][key] if have_qemu else None)
    for rate, results in lives.items():
        for key, label in (("total_s", "total s"), ("downtime_ms", "downtime ms"), ("sent_mib", "sent MiB")):
            _row(f"live, guest dirtying {rate} MiB/s: {label}", results[0][key], results[1][key] if have_qemu else None)
    if not have_qemu:
        print("QEMU columns skipped: qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
