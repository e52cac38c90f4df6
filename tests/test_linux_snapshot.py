"""Debian's Linux, with its VMBus devices in use, saved and restored and moved live.

The guest's /init writes 64 KiB of random data every second to a tmpfs file and
to the same place on its disk (synced), prints a numbered tick with its uptime,
and every third tick drops its caches and prints the hashes of both: they agree
only if neither memory nor disk lost or replayed a write across the move.  A
QMP client (qemu.qmp) asks for the snapshot or the migration, as it would of
QEMU; the destination must go on from the tick it was at, with its heartbeat,
KVP and shutdown integration components working.
"""

from __future__ import annotations

import asyncio
import shutil
import socket as socketlib
import time
from pathlib import Path
from typing import Any

import pytest

from mshvstack.vmm.linuxguest import INIT_PROLOGUE, LOAD_MODULES, busybox_initramfs

from linuxvm import OS_NAME, LinuxVm, require_debian_guest, vmbus_guest_files

DISK_BYTES = 32 << 20     # 64 KiB a tick: room for 500 ticks

INIT = INIT_PROLOGUE + "exec >/dev/kmsg 2>&1\necho on >/proc/sys/kernel/printk_devkmsg\n" + LOAD_MODULES + """
n=0; while [ ! -b /dev/sda ] && [ $n -lt 60 ]; do sleep 1; n=$((n + 1)); done
mkdir -p /var/lib
hostname mshvstack-guest
/usr/sbin/hv_kvp_daemon -n &
: >/tmp/data
i=0
while true; do
    i=$((i + 1))
    dd if=/dev/urandom of=/tmp/chunk bs=4096 count=16 2>/dev/null
    cat /tmp/chunk >>/tmp/data
    dd if=/tmp/chunk of=/dev/sda bs=65536 seek=$i conv=fsync 2>/dev/null
    echo "MARK tick $i $(cut -d' ' -f1 /proc/uptime)"
    if [ $((i % 3)) -eq 0 ]; then
        echo 3 >/proc/sys/vm/drop_caches
        echo "MARK check $i $(dd if=/dev/sda bs=65536 skip=1 count=$i 2>/dev/null | sha256sum | cut -d' ' -f1) $(sha256sum </tmp/data | cut -d' ' -f1)"
    fi
    sleep 1
done
"""


@pytest.fixture(scope="module")
def initrd(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    linux = require_debian_guest()
    files = vmbus_guest_files(linux)
    path = tmp_path_factory.mktemp("linux-snapshot") / "initrd.cpio"
    path.write_bytes(busybox_initramfs(linux.busybox, INIT, files))
    return linux.kernel, path


def _disk(path: Path) -> Path:
    path.write_bytes(bytes(DISK_BYTES))
    return path


def _ticks(vm: LinuxVm) -> list[tuple[int, float]]:
    return [(int(number), float(uptime)) for number, uptime in (value.split() for value in vm.values("tick"))]


def _checks(vm: LinuxVm) -> list[tuple[int, str, str]]:
    return [(int(number), disk, data) for number, disk, data in (value.split() for value in vm.values("check"))]


def _goes_on(before: LinuxVm, after: LinuxVm, running_s: float = 0.0, checks: int = 2, timeout: float = 300) -> None:
    """``after`` (restored from ``before``) ticks on from where ``before`` stopped: no tick
    missing or repeated, uptime never going back nor jumping over the pause (only over
    ``running_s``, the seconds the guest ran on while it was moved, a live migration's
    pre-copy), and ``checks`` more disk-against-memory checks that agree."""
    ticks_before = _ticks(before)
    last, last_uptime = ticks_before[-1]
    first = ticks_before[0][0]   # 1, or where ``before`` itself was restored
    deadline = time.monotonic() + timeout
    while not [c for c in _checks(after) if c[0] > last + 3 * (checks - 1)]:
        assert time.monotonic() < deadline, f"no checks after tick {last}:\n{after.log[-3000:]}"
        after.wait_for("check", timeout=max(1.0, deadline - time.monotonic()))
        time.sleep(0.5)
    ticks_after = _ticks(after)
    numbers = [n for n, _ in ticks_before] + [n for n, _ in ticks_after if n > last]
    assert numbers == list(range(first, numbers[-1] + 1)), numbers
    assert ticks_after[0][0] <= last + 1, (last, ticks_after[:3])   # a line printed into the pause may come again
    uptimes = [u for _, u in ticks_before] + [u for n, u in ticks_after if n > last]
    assert uptimes == sorted(uptimes), uptimes
    first_after = next(u for n, u in ticks_after if n > last)
    assert first_after - last_uptime < 10 + running_s, (last_uptime, first_after, running_s)   # still while saved
    for number, disk, data in _checks(before) + _checks(after):
        assert disk == data, f"tick {number}: disk {disk} != memory {data}"
    log = after.log
    assert "Kernel panic" not in log and "BUG:" not in log and "WARNING:" not in log, log[-3000:]


def _integration_components_work(vm: LinuxVm) -> None:
    """Heartbeat answered, KVP read from the guest's daemon, then the guest powered off
    through the shutdown IC."""
    first = vm.ctl("status")["vmbus"]["heartbeat"]
    deadline = time.monotonic() + 60
    while True:
        beat = vm.ctl("status")["vmbus"]["heartbeat"]
        if beat["sequence"] > first["sequence"] and (beat["acknowledged"] or 0) > first["sequence"]:
            break
        assert time.monotonic() < deadline, (first, beat)
        time.sleep(1)
    assert vm.ctl("kvp", operation="get", pool="auto", key="OSName")["pairs"][0]["value"] == OS_NAME
    code, stdout, stderr = vm.shut_down_through_the_ic()
    assert code == 0 and "guest powered off (ACPI S5)" in stdout, f"{stdout}\n{stderr}"


async def _migrate(qmp: Any, socket: Path, uri: str) -> tuple[list[str], str, dict[str, Any]]:
    """QMP ``migrate`` as a QEMU client does it; (MIGRATION statuses, run status, query-migrate)."""
    client = qmp.QMPClient("linux-migration")
    await client.connect(str(socket))
    statuses: list[str] = []
    with client.listener("MIGRATION") as events:
        await client.execute("migrate", {"uri": uri})
        while not statuses or statuses[-1] not in ("completed", "failed", "cancelled"):
            statuses.append((await asyncio.wait_for(events.get(), 300))["data"]["status"])
    status = (await client.execute("query-status"))["status"]
    info = await client.execute("query-migrate")
    await client.disconnect()
    return statuses, status, info


def _wait_listening(uri: str, timeout: float = 60) -> None:
    """Until the destination listens (without connecting: it takes one connection only)."""
    deadline = time.monotonic() + timeout
    while True:
        if uri.startswith("unix:"):
            if Path(uri[5:]).exists():
                return
        else:
            port = f":{int(uri.rsplit(':', 1)[1]):04X}"
            with open("/proc/net/tcp") as table:   # slot, local address, remote address, state (0A: LISTEN)
                rows = [line.split() for line in table.readlines()[1:]]
            if any(row[1].endswith(port) and row[3] == "0A" for row in rows):
                return
        assert time.monotonic() < deadline, f"nothing listens on {uri}"
        time.sleep(0.1)


def _snapshot_and_restore(qmp: Any, source: LinuxVm, workdir: Path, disk: Path, copies: int) -> list[LinuxVm]:
    """Snapshot ``source`` to a file (QMP migrate file:), SIGKILL it, and restore the file
    into ``copies`` new VMMs, the first on the same disk, the others on copies of it;
    each goes on where the source was."""
    snapshot = workdir / "guest.snap"
    statuses, status, info = asyncio.run(_migrate(qmp, source.socket, f"file:{snapshot}"))
    assert statuses[-1] == "completed" and status == "postmigrate", (statuses, status, info)
    source.kill()
    restored = []
    for i in range(copies):
        extra = ("--disk", str(shutil.copy(disk, workdir / f"copy{i}.img"))) if i else ()
        restored.append(LinuxVm(workdir, None, None, *extra, vcpus=source.vcpus, incoming=f"file:{snapshot}", name=f"restored{i}"))
    for vm in restored:
        _goes_on(source, vm, running_s=info["total-time"] / 1000)
    return restored


def _live_migration(qmp: Any, source: LinuxVm, workdir: Path, transport: str) -> LinuxVm:
    """Move ``source`` live to a new VMM over ``transport`` (unix or tcp on the loopback):
    the source ends postmigrate, the destination goes on where it was."""
    if transport == "unix":
        uri = f"unix:{workdir / 'incoming.sock'}"
    else:
        with socketlib.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            uri = f"tcp:127.0.0.1:{probe.getsockname()[1]}"
    destination = LinuxVm(workdir, None, None, vcpus=source.vcpus, incoming=uri, name="destination")
    try:
        _wait_listening(uri)
        statuses, status, info = asyncio.run(_migrate(qmp, source.socket, uri))
        assert statuses[0] == "setup" and statuses[-1] == "completed" and status == "postmigrate", (statuses, status, info)
        assert info["status"] == "completed" and info["downtime"] <= info["total-time"], info
        source.kill()
        _goes_on(source, destination, running_s=info["total-time"] / 1000)
    except BaseException:
        destination.kill()
        raise
    return destination


@pytest.mark.parametrize("vcpus,transport", [(1, "unix"), (4, "tcp")], ids=["1vcpu-unix", "4vcpus-tcp"])
def test_a_linux_guest_saved_restored_and_moved_live_goes_on(initrd: tuple[Path, Path], tmp_path: Path, vcpus: int,
                                                             transport: str) -> None:
    """One boot, moved twice.  With one vCPU: a snapshot restored twice at once (the second
    on a copy of the disk), then the first restored guest moved live over a UNIX socket.
    With four: moved live over TCP, then the destination snapshotted and restored.  The
    last one's heartbeat, KVP and shutdown ICs work."""
    qmp = pytest.importorskip("qemu.qmp", reason="the qemu.qmp client is part of the test extras")
    kernel, ramdisk = initrd
    disk = _disk(tmp_path / "disk.img")
    vms = [LinuxVm(tmp_path, kernel, ramdisk, "--disk", str(disk), vcpus=vcpus, name="source")]
    try:
        vms[0].wait_for("check", timeout=400)
        if vcpus == 1:
            vms += _snapshot_and_restore(qmp, vms[0], tmp_path, disk, copies=2)
            vms[2].kill()
            vms.append(_live_migration(qmp, vms[1], tmp_path, transport))
        else:
            vms.append(_live_migration(qmp, vms[0], tmp_path, transport))
            vms += _snapshot_and_restore(qmp, vms[1], tmp_path, disk, copies=1)
        _integration_components_work(vms[-1])
    finally:
        for vm in vms:
            vm.kill()
