"""A machine saved while its guest computes, and started again from the snapshot in
a new machine: the guest goes on where it was (nothing lost, nothing repeated),
as if it had never stopped; a damaged or foreign snapshot is refused with one
clear error and nothing started."""

from __future__ import annotations

import asyncio
import io
import re
import socket as socketlib
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mshvstack.snapshot import SnapshotError
from mshvstack.vmm import machinestate
from mshvstack.vmm.config import MachineConfig
from mshvstack.vmm.machine import Machine, MachineError, StopKind

from guests import assemble_elf

LETTERS = 20


def counting(shift: int = 20) -> str:
    """An x87 sum and a counter, a letter on COM1 every 2^shift steps ('A', 'B', ...);
    at the end the debug exit gets 1 when the x87 sum still equals the counter."""
    return f"""
    fninit
    fldz
    xor %ecx, %ecx
1:  fld1
    faddp
    inc %ecx
    test ${(1 << shift) - 1:#x}, %ecx
    jnz 1b
    mov %ecx, %eax
    shr ${shift}, %eax
    add $0x40, %al
    mov $0x3f8, %dx
    out %al, (%dx)
    cmp ${LETTERS << shift}, %ecx
    jb 1b
    fistpl sum
    xor %eax, %eax
    cmp sum, %ecx
    sete %al
    out %al, $0xf4
    hlt
sum: .long 0
"""


COUNTING = counting()
SLOW_COUNTING = counting(24)   # seconds: long enough to be saved from another process
EXPECTED = bytes(range(ord("A"), ord("A") + LETTERS))


def _config(kernel: Path, vcpus: int = 1) -> MachineConfig:
    return MachineConfig(kernel=kernel, backend="sim", memory=32 << 20, vcpus=vcpus, vmbus=False)


def _saved_half_way(kernel: Path, vcpus: int = 1) -> tuple[bytes, bytes]:
    """Run until a few letters are out, pause, save; (console so far, snapshot)."""
    out = bytearray()
    machine = Machine(_config(kernel, vcpus), console=out.extend)
    try:
        machine.start()
        deadline = time.monotonic() + 60
        while len(out) < 5:
            assert time.monotonic() < deadline and machine.reason is None, (bytes(out), machine.reason)
            time.sleep(0.005)
        machine.pause()
        snapshot = io.BytesIO()
        size = machine.snapshot(snapshot)
        assert size == len(snapshot.getvalue())
        return bytes(out), snapshot.getvalue()
    finally:
        machine.close()


def _restored(snapshot: bytes) -> tuple[Machine, bytearray]:
    reader, config = machinestate.read_config(io.BytesIO(snapshot), "snapshot", "sim")
    out = bytearray()
    return Machine(config, console=out.extend, incoming=reader), out


@pytest.mark.parametrize("vcpus", [1, 2])
def test_a_machine_restored_from_a_snapshot_goes_on_where_it_was(tmp_path: Path, vcpus: int) -> None:
    kernel = assemble_elf(COUNTING, tmp_path)
    before, snapshot = _saved_half_way(kernel, vcpus)
    assert 5 <= len(before) < LETTERS, before
    kernel.unlink()   # the restored machine needs none of its boot files
    machine, after = _restored(snapshot)
    reason = machine.run()
    assert (reason.kind, reason.exit_code) == (StopKind.DEBUG_EXIT, 1), reason   # the x87 sum went on with the count
    assert before + bytes(after) == EXPECTED                                      # no letter lost or repeated


def test_one_snapshot_restored_twice_runs_twice(tmp_path: Path) -> None:
    _, snapshot = _saved_half_way(assemble_elf(COUNTING, tmp_path))
    results = []
    for _ in range(2):
        machine, after = _restored(snapshot)
        results.append((machine.run().exit_code, bytes(after)))
    assert results[0] == results[1] and results[0][0] == 1


def test_a_machine_paused_as_it_starts_is_saved(tmp_path: Path) -> None:
    """Paused at once after start, with its VMBus host: every VP leaves its run.  (A kick
    that came before a VP's engine existed was lost, and the VP ran on; the snapshot
    then waited for it in vain.)"""
    kernel = assemble_elf("1: pause\njmp 1b", tmp_path)
    for _ in range(10):
        machine = Machine(MachineConfig(kernel=kernel, backend="sim", memory=32 << 20, vcpus=2))
        try:
            machine.start()
            machine.pause()
            snapshot = io.BytesIO()
            assert machine.snapshot(snapshot, timeout=5) == len(snapshot.getvalue()) > 0
        finally:
            machine.close()


def test_a_running_machine_is_not_saved(tmp_path: Path) -> None:
    machine = Machine(_config(assemble_elf("1: pause\njmp 1b", tmp_path)))
    try:
        machine.start()
        with pytest.raises(MachineError, match="pause it first"):
            machine.snapshot(io.BytesIO())
    finally:
        machine.close()


def test_damaged_snapshots_are_refused_before_anything_starts(tmp_path: Path) -> None:
    _, snapshot = _saved_half_way(assemble_elf(COUNTING, tmp_path))
    with pytest.raises(SnapshotError, match="truncated"):
        machine, _ = _restored(snapshot[: len(snapshot) // 2])
    corrupt = bytearray(snapshot)
    corrupt[len(corrupt) // 3] ^= 0x10
    with pytest.raises(SnapshotError, match="corrupt"):
        _restored(bytes(corrupt))
    with pytest.raises(SnapshotError, match="not an mshvstack snapshot"):
        _restored(b"\x7fELF" + bytes(100))


def test_qmp_migrate_to_a_file_then_run_incoming_goes_on(tmp_path: Path) -> None:
    """As a user does it: QMP ``migrate`` with ``file:`` (qemu.qmp as the client), the
    source ends in ``postmigrate``; ``mshvstack run --incoming file:`` goes on."""
    qmp = pytest.importorskip("qemu.qmp", reason="the qemu.qmp client is part of the test extras")
    kernel = assemble_elf(SLOW_COUNTING, tmp_path)
    first, second, socket, snapshot = (tmp_path / "console1", tmp_path / "console2", tmp_path / "qmp.sock",
                                       tmp_path / "snap.bin")
    source = subprocess.Popen([sys.executable, "-m", "mshvstack.cli", "run", str(kernel), "--no-vmbus", "--memory", "32M",
                               "--backend", "sim", "--api-socket", str(socket), "--console", str(first)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)

    async def migrate() -> tuple[list[str], str]:
        client = qmp.QMPClient("migrate-test")
        deadline = time.monotonic() + 60
        while not socket.exists() or not first.exists() or len(first.read_bytes()) < 2:
            assert time.monotonic() < deadline and source.poll() is None, "the source never started"
            await asyncio.sleep(0.02)
        await client.connect(str(socket))
        statuses = []
        with client.listener("MIGRATION") as events:
            await client.execute("migrate", {"uri": f"file:{snapshot}"})
            while not statuses or statuses[-1] not in ("completed", "failed"):
                statuses.append((await asyncio.wait_for(events.get(), 60))["data"]["status"])
        info = await client.execute("query-migrate")
        # Pre-copied into the file while the guest ran: paused only for its end.
        assert info["status"] == "completed" and 0 < info["ram"]["transferred"] <= snapshot.stat().st_size, info
        assert info["downtime"] <= info["total-time"], info
        status = (await client.execute("query-status"))["status"]
        await client.execute("quit")
        await client.disconnect()
        return statuses, status

    try:
        statuses, status = asyncio.run(migrate())
        source.wait(timeout=60)
    finally:
        source.kill()
    assert statuses == ["setup", "active", "completed"] and status == "postmigrate"
    before = first.read_bytes()
    kernel.unlink()
    result = subprocess.run([sys.executable, "-m", "mshvstack.cli", "run", "--incoming", f"file:{snapshot}", "--backend",
                             "sim", "--console", str(second)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr   # the debug exit's value: the x87 sum went on
    assert before + second.read_bytes() == EXPECTED and before


def test_run_incoming_refuses_a_bad_snapshot_in_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"MSHVSNAP" + bytes(8))
    for uri, message in ((f"file:{bad}", "format version 0; this mshvstack reads version 1"), (f"file:{tmp_path / 'none'}", "No such file"),
                         ("ftp:host", "use file:PATH, unix:PATH or tcp:HOST:PORT")):
        result = subprocess.run([sys.executable, "-m", "mshvstack.cli", "run", "--incoming", uri, "--backend", "sim"],
                                capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert result.returncode != 0 and message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_ctl_snapshot_saves_a_running_machine(tmp_path: Path) -> None:
    kernel = assemble_elf(SLOW_COUNTING, tmp_path)
    socket, snapshot, console = tmp_path / "qmp.sock", tmp_path / "saved.snap", tmp_path / "console"
    source = subprocess.Popen([sys.executable, "-m", "mshvstack.cli", "run", str(kernel), "--no-vmbus", "--memory", "32M",
                               "--backend", "sim", "--api-socket", str(socket), "--console", str(console)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 60
        while not socket.exists():
            assert time.monotonic() < deadline and source.poll() is None
            time.sleep(0.02)
        ctl = [sys.executable, "-m", "mshvstack.cli", "ctl", str(socket)]
        saved = subprocess.run([*ctl, "snapshot", str(snapshot)], capture_output=True, text=True, timeout=60)
        assert saved.returncode == 0 and f"saved {snapshot}" in saved.stdout and "postmigrate" in saved.stdout, saved
        assert snapshot.stat().st_size < 2 << 20   # 32 MiB of RAM, nearly all zero pages
        status = subprocess.run([*ctl, "status", "--json"], capture_output=True, text=True, timeout=60)
        assert '"paused"' in status.stdout or '"postmigrate"' in status.stdout, status.stdout
        missing = subprocess.run([*ctl, "snapshot"], capture_output=True, text=True, timeout=60)
        assert missing.returncode != 0 and "ctl SOCKET snapshot PATH" in missing.stderr
        subprocess.run([*ctl, "poweroff"], capture_output=True, timeout=60)
        source.wait(timeout=60)
    finally:
        source.kill()
    result = subprocess.run([sys.executable, "-m", "mshvstack.cli", "run", "--incoming", f"file:{snapshot}", "--backend", "sim",
                             "--console", str(tmp_path / "after")], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 1 and console.read_bytes() + (tmp_path / "after").read_bytes() == EXPECTED


LOG = 0x1000000        # a page per 2^18 steps: slot i holds i << 18 once written
LOG_SHIFT = 18


def logging_counting(shift: int = 24) -> str:
    """counting(), also storing the count into a page of its own every 2^18 steps, and
    at the end checking every page holds what was stored (a page a migration lost or
    sent stale fails it)."""
    slots = (LETTERS << shift) >> LOG_SHIFT
    return counting(shift).replace("""    inc %ecx
""", f"""    inc %ecx
    test ${(1 << LOG_SHIFT) - 1:#x}, %ecx
    jnz 2f
    mov %ecx, %eax
    shr ${LOG_SHIFT - 12}, %eax
    mov %ecx, {LOG:#x}(%rax)
2:
""").replace("""    fistpl sum
""", f"""    mov $1, %esi
3:  mov %esi, %eax
    shl $12, %eax
    mov {LOG:#x}(%rax), %edx
    mov %esi, %eax
    shl ${LOG_SHIFT}, %eax
    cmp %eax, %edx
    jne 4f
    inc %esi
    cmp ${slots}, %esi
    jbe 3b
    fistpl sum
""").replace("""    sete %al
""", """    sete %al
    jmp 5f
4:  xor %eax, %eax
5:
""")


def _source(kernel: Path, tmp_path: Path, name: str) -> tuple[subprocess.Popen[bytes], Path, Path]:
    socket, console = tmp_path / f"{name}.qmp", tmp_path / f"{name}.console"
    process = subprocess.Popen([sys.executable, "-m", "mshvstack.cli", "run", str(kernel), "--no-vmbus", "--memory", "32M",
                                "--backend", "sim", "--api-socket", str(socket), "--console", str(console)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    return process, socket, console


async def _migrate(qmp: object, socket: Path, console: Path, uri: str, cancel: bool = False) -> tuple[list[str], str]:
    client = qmp.QMPClient("live-migration")   # type: ignore[attr-defined]
    deadline = time.monotonic() + 60
    while not socket.exists() or not console.exists() or len(console.read_bytes()) < 2:
        assert time.monotonic() < deadline, "the source never got going"
        await asyncio.sleep(0.02)
    await client.connect(str(socket))
    statuses: list[str] = []
    await client.execute("migrate-set-parameters", {"downtime-limit": 100, "max-bandwidth": 256 << 20})
    assert await client.execute("query-migrate-parameters") == {"downtime-limit": 100, "max-bandwidth": 256 << 20}
    with pytest.raises(qmp.ExecuteError, match="downtime-limit must be"):   # type: ignore[attr-defined]
        await client.execute("migrate-set-parameters", {"downtime-limit": 1 << 40})
    with client.listener("MIGRATION") as events:
        await client.execute("migrate", {"uri": uri})
        if cancel:
            await asyncio.sleep(0.5)
            await client.execute("migrate_cancel")
        while not statuses or statuses[-1] not in ("completed", "failed", "cancelled"):
            statuses.append((await asyncio.wait_for(events.get(), 120))["data"]["status"])
    status = (await client.execute("query-status"))["status"]
    if not cancel:
        await client.execute("quit")
    await client.disconnect()
    return statuses, status


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_live_migration_moves_a_running_guest_between_processes(tmp_path: Path, transport: str) -> None:
    """Pre-copy while the guest keeps writing its log pages, then the last pages and the
    CPU state: the destination goes on and finds every page it wrote."""
    qmp = pytest.importorskip("qemu.qmp", reason="the qemu.qmp client is part of the test extras")
    kernel = assemble_elf(logging_counting(), tmp_path)
    if transport == "unix":
        uri = f"unix:{tmp_path / 'incoming.sock'}"
    else:
        with socketlib.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            uri = f"tcp:127.0.0.1:{probe.getsockname()[1]}"
    after = tmp_path / "destination.console"
    destination = subprocess.Popen([sys.executable, "-m", "mshvstack.cli", "run", "--incoming", uri, "--backend", "sim",
                                    "--console", str(after)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    source, socket, before = _source(kernel, tmp_path, "source")
    try:
        time.sleep(0.5)   # the destination listens
        statuses, status = asyncio.run(_migrate(qmp, socket, before, uri))
        source.wait(timeout=60)
        code = destination.wait(timeout=180)
    finally:
        source.kill()
        destination.kill()
    assert statuses[0] == "setup" and statuses[-1] == "completed" and status == "postmigrate", statuses
    assert code == 1, destination.stderr.read() if destination.stderr else code   # every log page and the x87 sum right
    assert before.read_bytes() + after.read_bytes() == EXPECTED


def test_migrate_cancel_leaves_the_source_running(tmp_path: Path) -> None:
    qmp = pytest.importorskip("qemu.qmp", reason="the qemu.qmp client is part of the test extras")
    kernel = assemble_elf(logging_counting(), tmp_path)
    sink = socketlib.socket(socketlib.AF_UNIX)
    sink.bind(str(tmp_path / "sink.sock"))
    sink.listen(1)   # accepts and never reads: the source blocks sending until cancelled
    source, socket, console = _source(kernel, tmp_path, "source")
    try:
        statuses, status = asyncio.run(_migrate(qmp, socket, console, f"unix:{tmp_path / 'sink.sock'}", cancel=True))
        code = source.wait(timeout=180)   # the guest goes on to its end on the source
    finally:
        source.kill()
        sink.close()
    assert statuses[-1] == "cancelled" and status == "running", (statuses, status)
    assert code == 1 and console.read_bytes() == EXPECTED


def test_ctl_migrate_moves_a_running_guest(tmp_path: Path) -> None:
    """The friendly verb: `ctl SOCK migrate unix:PATH` waits for the end and says what moved."""
    kernel = assemble_elf(logging_counting(), tmp_path)
    uri = f"unix:{tmp_path / 'incoming.sock'}"
    after = tmp_path / "destination.console"
    destination = subprocess.Popen([sys.executable, "-m", "mshvstack.cli", "run", "--incoming", uri, "--backend", "sim",
                                    "--console", str(after)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    source, socket, before = _source(kernel, tmp_path, "source")
    try:
        deadline = time.monotonic() + 60
        while not socket.exists() or not (tmp_path / "incoming.sock").exists() or len(before.read_bytes() if before.exists() else b"") < 2:
            assert time.monotonic() < deadline and source.poll() is None and destination.poll() is None
            time.sleep(0.02)
        moved = subprocess.run([sys.executable, "-m", "mshvstack.cli", "ctl", str(socket), "migrate", uri],
                               capture_output=True, text=True, timeout=120)
        assert moved.returncode == 0 and f"migrated to {uri}" in moved.stdout and "the guest paused" in moved.stdout, moved
        subprocess.run([sys.executable, "-m", "mshvstack.cli", "ctl", str(socket), "poweroff"], capture_output=True, timeout=60)
        code = destination.wait(timeout=180)
    finally:
        source.kill()
        destination.kill()
    assert code == 1, destination.stderr.read() if destination.stderr else code
    assert before.read_bytes() + after.read_bytes() == EXPECTED


def test_disks_reopen_by_their_recorded_paths_or_as_given_of_the_same_size(tmp_path: Path) -> None:
    from mshvstack.vmbus.providers.storage import Storage
    from mshvstack.vmm.config import DiskSpec

    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    config = MachineConfig(kernel=assemble_elf("1: pause\njmp 1b", tmp_path), backend="sim", memory=32 << 20,
                           disks=(DiskSpec(disk),))
    machine = Machine(config)
    try:
        machine.start()
        machine.pause()
        saved = io.BytesIO()
        machine.snapshot(saved)
        assert machine.vmbus is not None
        instance = next(p.instance_id for p in machine.vmbus.providers() if isinstance(p, Storage))
    finally:
        machine.close()
    snapshot = saved.getvalue()
    copy = tmp_path / "copy.img"
    copy.write_bytes(bytes(1 << 20))
    small = tmp_path / "small.img"
    small.write_bytes(bytes(1 << 19))
    for disks, message in (((DiskSpec(small),), f"disk {str(small)!r} is 524288 bytes; the snapshot's disk was 1048576"),
                           ((DiskSpec(copy), DiskSpec(copy)), "the snapshot's machine has 1 disks, 2 given with --disk"),
                           ((DiskSpec(tmp_path / "gone.img"),), "No such file or directory (give the image with --disk)")):
        with pytest.raises(SnapshotError, match=re.escape(message)):
            machinestate.read_config(io.BytesIO(snapshot), "snapshot", "sim", disks)
    for disks, expected in ((None, disk), ((DiskSpec(copy),), copy)):
        reader, restored_config = machinestate.read_config(io.BytesIO(snapshot), "snapshot", "sim", disks)
        assert restored_config.disks == (DiskSpec(expected.resolve() if disks is None else expected),)
        restored = Machine(restored_config, incoming=reader)
        try:
            assert restored.vmbus is not None
            assert [p.instance_id for p in restored.vmbus.providers() if isinstance(p, Storage)] == [instance]
        finally:
            restored.close()
