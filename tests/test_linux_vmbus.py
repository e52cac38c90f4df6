"""Linux's own Hyper-V drivers (hv_vmbus, hv_utils, hv_storvsc) against our VMBus devices.

Debian's unmodified kernel and its modules, loaded by our /init; everything
asserted comes from what the guest itself prints (sysfs, /dev, dmesg), or
from the host image after the VMM is gone.  Each test runs with 1 and with
4 vCPUs.  Linux binds every channel to CPU 0 here (the IC channels are not
"performance" channels, and the disk has no subchannels, so its one channel
takes the first CPU), so /init moves them (MODIFYCHANNEL) and the test
checks in /proc/interrupts that each channel's interrupts follow it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any

import pytest

from mshvstack.vmbus.providers.heartbeat import Heartbeat
from mshvstack.vmbus.providers.kvp import Kvp
from mshvstack.vmbus.providers.shutdown import Shutdown
from mshvstack.vmbus.providers.storage import Storage
from mshvstack.vmbus.providers.timesync import TimeSync
from mshvstack.vmm.linuxguest import INIT_PROLOGUE, LOAD_MODULES, busybox_initramfs

from linuxvm import OS_NAME, LinuxVm, require_debian_guest, vmbus_guest_files

DISK_BYTES = 16 << 20
WRITE_OFFSET, WRITE_BYTES = 2 << 20, 256 << 10

# Where /init moves each channel (modulo the CPU count): the disk and time sync
# share CPU 1, heartbeat and KVP CPU 2, and the shutdown channel, silent
# until the end, is alone on CPU 3, where no VMBus interrupt may then arrive.
CHANNEL_CPUS = {Storage.class_id: 1, TimeSync.class_id: 1, Heartbeat.class_id: 2, Kvp.class_id: 2, Shutdown.class_id: 3}

# One MARK line per write to /dev/kmsg; "on" lifts its rate limit (10 lines
# in 5 s, the rest dropped without a word while /init keeps it open).
INIT = INIT_PROLOGUE + "exec >/dev/kmsg 2>&1\necho on >/proc/sys/kernel/printk_devkmsg\n" + LOAD_MODULES + """if grep -q mshvtest=panic /proc/cmdline; then
    echo "MARK panicking"
    echo c >/proc/sysrq-trigger
fi
n=0; while [ ! -b /dev/sda ] && [ $n -lt 60 ]; do sleep 1; n=$((n + 1)); done
for d in /sys/bus/vmbus/devices/*; do
    echo "MARK device $(cat $d/class_id) $(basename "$(readlink $d/driver)")"
done
echo "MARK sda_sectors $(cat /sys/block/sda/size)"
echo "MARK sda_sha256 $(dd if=/dev/sda bs=1M count=1 2>/dev/null | sha256sum | cut -d' ' -f1)"
dd if=/dev/urandom of=/tmp/random bs=4096 count=%(write_blocks)d 2>/dev/null
dd if=/tmp/random of=/dev/sda bs=4096 seek=%(write_block)d conv=fsync 2>/dev/null
sync
echo "MARK synced $(sha256sum /tmp/random | cut -d' ' -f1)"
if grep -q mshvtest=hold /proc/cmdline; then while true; do sleep 60; done; fi
cpus=$(nproc)
echo "MARK hyp_bound $(grep HYP: /proc/interrupts)"
for c in /sys/bus/vmbus/devices/*/channels/*; do
    class=$(cat ${c%%/channels/*}/class_id)
    echo "MARK channel_bound $class $(cat $c/cpu)"
    case $class in
%(channel_cases)s
    esac
    echo $((cpu %% cpus)) >$c/cpu || echo "MARK move_failed $class"
    echo "MARK channel $class $(cat $c/cpu)"
done
echo "MARK hyp_moved $(grep HYP: /proc/interrupts)"
echo 3 >/proc/sys/vm/drop_caches
echo "MARK sda_reread $(dd if=/dev/sda bs=1M count=1 2>/dev/null | sha256sum | cut -d' ' -f1)"
[ -c /dev/ptp0 ] && echo "MARK ptp $(cat /sys/class/ptp/ptp0/clock_name)"
mkdir -p /var/lib
hostname mshvstack-guest
/usr/sbin/hv_kvp_daemon -n &
date -s "@$(( $(date +%%s) - 3600 ))" >/dev/null
echo "MARK clock_set $(date +%%s)"
while true; do
    echo "MARK clock $(date +%%s)"
    echo "through the interrupt-driven 8250" >/dev/ttyS0
    echo "MARK com1_irq $(grep ttyS0 /proc/interrupts)"
    echo "MARK hyp $(grep HYP: /proc/interrupts)"
    echo "MARK hvs $(grep HVS: /proc/interrupts)"
    pool=/var/lib/hyperv/.kvp_pool_0
    [ -s $pool ] && echo "MARK kvp_pool $(strings $pool | tr '\n' ' ')"
    sleep 1
done
""" % {"write_blocks": WRITE_BYTES // 4096, "write_block": WRITE_OFFSET // 4096,
       "channel_cases": "\n".join(f"        {{{uuid}}}) cpu={cpu} ;;" for uuid, cpu in CHANNEL_CPUS.items())}



@pytest.fixture(scope="module")
def initrd(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    linux = require_debian_guest()
    files = vmbus_guest_files(linux)
    path = tmp_path_factory.mktemp("linux-vmbus") / "initrd.cpio"
    path.write_bytes(busybox_initramfs(linux.busybox, INIT, files))
    return linux.kernel, path


def _disk(path: Path) -> bytes:
    image = os.urandom(DISK_BYTES)
    path.write_bytes(image)
    return image


def _written(path: Path) -> str:
    with path.open("rb") as f:
        f.seek(WRITE_OFFSET)
        return hashlib.sha256(f.read(WRITE_BYTES)).hexdigest()


def _per_cpu(line: str, cpus: int) -> tuple[int, ...]:
    """A /proc/interrupts row ('HYP: 12 34 Hypervisor callback interrupts') -> (12, 34)."""
    counts = tuple(int(field) for field in line.split()[1 : 1 + cpus])
    assert len(counts) == cpus, line
    return counts


VCPUS = pytest.mark.parametrize("vcpus", [1, 4])


@VCPUS
def test_linux_drivers_use_our_vmbus_devices(initrd: tuple[Path, Path], tmp_path: Path, vcpus: int) -> None:
    kernel, ramdisk = initrd
    disk = tmp_path / "disk.img"
    image = _disk(disk)
    vm = LinuxVm(tmp_path, kernel, ramdisk, "--disk", str(disk), vcpus=vcpus)
    try:
        synced, _ = vm.wait_for("synced", timeout=400)
        log = vm.log
        assert re.search(r"hv_vmbus: Vmbus version:\d+\.\d+", log), log[-3000:]
        assert not vm.values("insmod_failed")
        bound = dict(value.split(" ", 1) for value in vm.values("device"))
        expected = {Heartbeat.class_id: "hv_utils", Shutdown.class_id: "hv_utils", TimeSync.class_id: "hv_utils",
                    Kvp.class_id: "hv_utils", Storage.class_id: "hv_storvsc"}
        assert bound == {f"{{{uuid}}}": driver for uuid, driver in expected.items()}, bound
        assert int(vm.values("sda_sectors")[0]) * 512 == DISK_BYTES
        assert vm.values("sda_sha256")[0] == hashlib.sha256(image[: 1 << 20]).hexdigest()
        assert _written(disk) == synced   # in the host image while the guest still runs

        # Linux binds every channel to CPU 0; /init moves each where CHANNEL_CPUS says.
        vm.wait_for("hyp_moved")
        assert not vm.values("move_failed"), vm.values("move_failed")
        assert all(value.endswith(" 0") for value in vm.values("channel_bound")), vm.values("channel_bound")
        placed = dict(value.split(" ", 1) for value in vm.values("channel"))
        assert placed == {f"{{{uuid}}}": str(cpu % vcpus) for uuid, cpu in CHANNEL_CPUS.items()}, placed
        moved = _per_cpu(vm.values("hyp_moved")[0], vcpus)
        assert vm.wait_for("sda_reread")[0] == vm.values("sda_sha256")[0]   # the disk through its moved channel

        ptp, _ = vm.wait_for("ptp")
        assert ptp == "hyperv"
        # Heartbeat: the host's sequence advances and the guest answers.
        first = vm.ctl("status")["vmbus"]["heartbeat"]
        time.sleep(11)
        second = vm.ctl("status")["vmbus"]["heartbeat"]
        assert second["sequence"] > first["sequence"] and (second["acknowledged"] or 0) > first["sequence"]
        assert second["guest_alive"]

        # Time sync: an hour wrong, then one SYNC sample brings the guest back.
        wrong, seen = vm.wait_for("clock_set")
        assert int(wrong) < seen - 3000
        after = len(vm.marks)
        vm.ctl("timesync")
        deadline = time.monotonic() + 60
        while True:
            value, seen = vm.wait_for("clock", after=after)
            after = next(i for i in range(after, len(vm.marks)) if vm.marks[i][0] == "clock") + 1
            if abs(int(value) - seen) <= 2:
                break
            assert time.monotonic() < deadline, f"guest clock {value} vs host {seen:.0f} after the sync"

        # KVP through Debian's hv_kvp_daemon: the guest's intrinsic items, and a host key in its pool.
        fqdn = vm.ctl("kvp", operation="get", pool="auto", key="FullyQualifiedDomainName")["pairs"][0]["value"]
        assert fqdn == "mshvstack-guest.example"
        assert vm.ctl("kvp", operation="get", pool="auto", key="OSName")["pairs"][0]["value"] == OS_NAME
        vm.ctl("kvp", operation="set", pool="external", key="mshvstack-key", value="set-by-the-host")
        deadline = time.monotonic() + 30
        # The pool file is fixed-size records (key, then value), so the two strings come in that order.
        while not re.search(r"mshvstack-key .*set-by-the-host", " ".join(vm.values("kvp_pool"))):
            assert time.monotonic() < deadline, vm.values("kvp_pool")[-1:]
            time.sleep(0.5)

        # The 8250 console is interrupt-driven through our I/O APIC (MSI routes + irqfd): pin 4,
        # edge, from COM1's _CRS.  (A hardware-reduced platform has no legacy PIC, so Linux
        # numbers the interrupt dynamically, after the 24 GSIs.)
        com1 = [line.split() for line in vm.values("com1_irq") if line]
        assert com1 and com1[-1][1 + vcpus :] == ["IO-APIC", "4-edge", "ttyS0"], com1[-1:]
        assert sum(map(int, com1[-1][1 : 1 + vcpus])) > sum(map(int, com1[0][1 : 1 + vcpus])) > 0

        # Every CPU's own synthetic timer ticks ("HVS", direct mode) ...
        timers = [_per_cpu(line, vcpus) for line in vm.values("hvs")]
        assert all(last > first for first, last in zip(timers[0], timers[-1])), (timers[0], timers[-1])
        # ... and each channel's interrupts ("HYP") arrive on the CPU it is bound to: since the
        # move, the disk, heartbeat, time sync and KVP have all spoken, and neither the silent
        # shutdown channel's CPU nor CPU 0 (VMBus's messages, none after the moves) has had any.
        hyp = _per_cpu(vm.values("hyp")[-1], vcpus)
        talking = {cpu % vcpus for uuid, cpu in CHANNEL_CPUS.items() if uuid != Shutdown.class_id}
        assert all((hyp[cpu] > moved[cpu]) == (cpu in talking) for cpu in range(vcpus)), (moved, hyp, talking)

        # Graceful shutdown: hv_utils runs the guest's /sbin/poweroff.
        code, stdout, stderr = vm.shut_down_through_the_ic()
    finally:
        vm.kill()
    log = vm.log
    assert code == 0, f"{stdout}\n{stderr}"
    assert "guest powered off (ACPI S5)" in stdout
    assert _written(disk) == synced
    assert "Kernel panic" not in log and "BUG:" not in log and "WARNING:" not in log


@VCPUS
def test_a_synced_write_survives_sigkill(initrd: tuple[Path, Path], tmp_path: Path, vcpus: int) -> None:
    kernel, ramdisk = initrd
    disk = tmp_path / "disk.img"
    _disk(disk)
    vm = LinuxVm(tmp_path, kernel, ramdisk, "--disk", str(disk), cmdline="console=ttyS0 mshvtest=hold", vcpus=vcpus)
    try:
        synced, _ = vm.wait_for("synced", timeout=400)
    finally:
        vm.kill()   # at once, the moment the guest's sync returned
    assert _written(disk) == synced


@VCPUS
def test_a_guest_panic_reaches_the_operator(initrd: tuple[Path, Path], tmp_path: Path, vcpus: int) -> None:
    """Linux's hv_vmbus reports its panic through the crash MSRs, with the kernel log's
    last page: the run ends with exit code 4 and the panic line, and a QMP client
    (qemu.qmp) hears GUEST_PANICKED with Hyper-V's five parameters, then SHUTDOWN."""
    qmp = pytest.importorskip("qemu.qmp", reason="the qemu.qmp client is part of the test extras")
    kernel, ramdisk = initrd
    vm = LinuxVm(tmp_path, kernel, ramdisk, cmdline="console=ttyS0 mshvtest=panic", vcpus=vcpus)

    async def watch() -> list[dict[str, Any]]:
        client = qmp.QMPClient("panic-watch")
        deadline = time.monotonic() + 60
        while not vm.socket.exists():   # connected before the guest boots: no event can be missed
            assert time.monotonic() < deadline and vm.process.poll() is None, "the VMM never opened its socket"
            await asyncio.sleep(0.05)
        await client.connect(str(vm.socket))
        with client.listener(("GUEST_PANICKED", "SHUTDOWN")) as events:
            found = [dict(await asyncio.wait_for(events.get(), 400)) for _ in range(2)]
        await client.disconnect()
        return found

    try:
        panicked, shutdown = asyncio.run(watch())
        code, stdout, stderr = vm.finish()
    finally:
        vm.kill()
    assert vm.values("panicking") == [""], vm.log[-3000:]
    assert code == 4, f"{stdout}\n{stderr}"
    summary = json.loads(stdout[stdout.index("{"):])
    assert summary["reason"] == "guest-panic"
    assert "guest panicked: Kernel panic - not syncing: sysrq triggered crash" in summary["detail"], summary["detail"]
    assert "sysrq triggered crash" in summary["crash"]["message"]
    assert panicked["event"] == "GUEST_PANICKED" and panicked["data"]["action"] == "poweroff"
    info = panicked["data"]["info"]
    assert info["type"] == "hyper-v" and info["arg5"] == summary["crash"]["parameters"][4] > 0  # P4: the message's length
    assert shutdown["data"] == {"guest": True, "reason": "guest-panic"}
