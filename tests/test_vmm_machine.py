"""The machine end to end on the simulator: demo boots, lifecycle, control socket."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from mshvstack.abi import lib
from mshvstack.partition import ApicEoi, InvalidVpRegisterValue, TimerExpired, UnknownExit, UnsupportedFeature
from mshvstack.vmm.config import ConfigError, MachineConfig, parse_size
from mshvstack.vmm.control import ControlError, request
from mshvstack.vmm.machine import Machine, MachineError, RunState, StopKind
from mshvstack.vmm.qmp import QmpServer

from guests import assemble_elf


def _machine(**kwargs) -> tuple[Machine, bytearray]:  # type: ignore[no-untyped-def]
    out = bytearray()
    return Machine(MachineConfig(backend="sim", memory=32 << 20, **kwargs), console=out.extend), out


def test_hello_demo_prints_and_exits_cleanly() -> None:
    machine, out = _machine(demo="hello")
    reason = machine.run()
    assert reason.kind is StopKind.DEBUG_EXIT and reason.exit_code == 0
    assert out.startswith(b"Hello from an mshvstack guest")
    assert machine.stats.as_dict()["IoPortIntercept"]["count"] > len(out)  # LSR polls + THR writes


def test_iotest_demo_exercises_mmio_and_string_io() -> None:
    machine, out = _machine(demo="iotest")
    reason = machine.run()
    assert (reason.kind, reason.exit_code) == (StopKind.DEBUG_EXIT, 0), reason
    assert out == b"MMIO forms and rep outsb OK\n"
    assert machine.platform.scratch is not None and machine.platform.scratch.data[:4] == (0x92345678).to_bytes(4, "little")


def test_boot_keeps_the_local_apic_enabled(tmp_path: Path) -> None:
    """The loaders set up the boot CPU but must not clear IA32_APIC_BASE (Linux BUGs on a dead LAPIC)."""
    from mshvstack.backend.sim.lapic import VERSION_VALUE, XAPIC_BASE

    kernel = assemble_elf(f"mov {XAPIC_BASE + 0x30:#x}, %eax\nout %al, $0xf4\nhlt", tmp_path)
    machine, _ = _machine(kernel=kernel)
    reason = machine.run()
    assert reason.kind is StopKind.DEBUG_EXIT
    assert reason.exit_code == VERSION_VALUE & 0xFF, "all-ones means the LAPIC was disabled"


def test_triple_fault_ends_the_run(tmp_path: Path) -> None:
    kernel = assemble_elf("lidt bad_idt\nud2\nbad_idt: .word 0\n.quad 0", tmp_path)
    machine, _ = _machine(kernel=kernel)
    reason = machine.run()
    assert reason.kind is StopKind.TRIPLE_FAULT and reason.exit_code == 3


def test_reset_through_the_i8042(tmp_path: Path) -> None:
    kernel = assemble_elf("mov $0xfe, %al\nout %al, $0x64\nhlt", tmp_path)
    machine, _ = _machine(kernel=kernel)
    assert machine.run().kind is StopKind.RESET


def test_all_vps_halted_stops_the_machine(tmp_path: Path) -> None:
    machine, _ = _machine(kernel=assemble_elf("cli\nhlt", tmp_path))
    assert machine.run().kind is StopKind.HALTED


SPIN = "1: mov $0x41, %al\nout %al, $0x80\njmp 1b"


def test_pause_resume_poweroff_over_the_control_socket(tmp_path: Path) -> None:
    machine, _ = _machine(kernel=assemble_elf(SPIN, tmp_path))
    path = tmp_path / "api.sock"
    server = QmpServer(machine, path)
    try:
        machine.start()
        time.sleep(0.05)
        assert request(path, "status")["state"] == "running"
        reply = request(path, "pause")
        assert reply["ok"] and reply["state"] == "paused"
        exits = request(path, "status")["exits"]
        time.sleep(0.1)
        assert request(path, "status")["exits"] <= exits + 2  # no progress while paused
        assert request(path, "pause")["state"] == "paused"  # already paused: nothing to do (QEMU's `stop`)
        assert request(path, "resume")["state"] == "running"
        time.sleep(0.05)
        assert request(path, "status")["exits"] > exits
        assert request(path, "poweroff")["ok"]
        reason = machine.wait(timeout=10)
        assert reason is not None and reason.kind is StopKind.POWEROFF
    finally:
        server.close()
        machine.close()


def test_socket_path_taken_is_refused(tmp_path: Path) -> None:
    taken = tmp_path / "file"
    taken.write_text("precious")
    machine, _ = _machine(demo="hello")
    try:
        with pytest.raises(ControlError, match="taken"):
            QmpServer(machine, taken)
        assert taken.read_text() == "precious"
    finally:
        machine.close()
    with pytest.raises(ControlError, match="cannot reach"):
        request(tmp_path / "nobody", "status")


def test_lifecycle_guards() -> None:
    machine, _ = _machine(demo="hello")
    with pytest.raises(MachineError):
        machine.resume()
    with pytest.raises(MachineError):
        machine.pause()
    machine.run()
    with pytest.raises(MachineError):
        machine.start()


def test_config_validation() -> None:
    assert parse_size("256M") == 256 << 20 and parse_size("1G") == 1 << 30 and parse_size("4096") == 4096
    for bad in ("12Q", "", "M", "-1M", "1.5G"):
        with pytest.raises(ConfigError):
            parse_size(bad)
    for kwargs in ({"demo": "hello", "vcpus": 0}, {"demo": "hello", "vcpus": 257}, {"demo": "nope"},
                   {"demo": "hello", "memory": 1 << 20}, {}, {"demo": "hello", "backend": "qemu"}):
        with pytest.raises(ConfigError):
            MachineConfig(**kwargs).validate()  # type: ignore[arg-type]


def test_multiple_vcpus_aps_wait_for_sipi() -> None:
    machine, out = _machine(demo="hello", vcpus=2)
    reason = machine.run()
    assert reason.kind is StopKind.DEBUG_EXIT and out.startswith(b"Hello")


def test_vmbus_in_status_and_shutdown_falls_back_to_poweroff(tmp_path: Path) -> None:
    machine, _ = _machine(kernel=assemble_elf(SPIN, tmp_path))
    machine.start()
    status = machine.status()
    assert status["vmbus"]["state"] == "disconnected"
    assert [c["device"] for c in status["vmbus"]["channels"]] == ["heartbeat", "shutdown", "timesync", "kvp"]
    machine.shutdown()  # the guest never connected VMBus: power off at once
    reason = machine.wait(timeout=10)
    assert reason is not None and reason.kind is StopKind.POWEROFF
    machine.close()
    machine, _ = _machine(demo="hello", vmbus=False)
    assert machine.status()["vmbus"] is None
    machine.run()


def test_disks_and_kvp_over_the_control_api(tmp_path: Path) -> None:
    from mshvstack.vmm.config import DiskSpec

    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    machine, _ = _machine(kernel=assemble_elf(SPIN, tmp_path), disks=(DiskSpec(image, read_only=True),))
    path = tmp_path / "api.sock"
    server = QmpServer(machine, path)
    try:
        machine.start()
        status = request(path, "status")
        assert [c["device"] for c in status["vmbus"]["channels"]][-1] == "storage"
        assert status["vmbus"]["disks"][0]["read_only"] is True
        reply = request(path, "kvp", {"operation": "get", "key": "x"})
        assert reply["ok"] is False and "KVP channel" in reply["error"]  # the spinning guest never opened it
        reply = request(path, "timesync")
        assert reply["ok"] is False and "time-sync channel" in reply["error"]
    finally:
        machine.poweroff()
        server.close()
        machine.close()
    with pytest.raises(ConfigError, match="no such file"):
        MachineConfig(demo="hello", disks=(DiskSpec(tmp_path / "nope"),)).validate()
    with pytest.raises(ConfigError, match="ro or rw"):
        DiskSpec.parse("disk.img,fast")


UD_HANDLER_GUEST = """
lea ud_handler(%rip), %rax
lea idt+6*16(%rip), %rdi
mov %ax, (%rdi)
mov %cs, %bx
mov %bx, 2(%rdi)
movw $0x8E00, 4(%rdi)
shr $16, %rax
mov %ax, 6(%rdi)
shr $16, %rax
mov %eax, 8(%rdi)
lidt idtr(%rip)
mov $0xC0000000, %rax
{instruction}
mov $1, %al
out %al, $0xf4
ud_handler:
mov (%rsp), %rbx
lea faulting(%rip), %rcx
cmp %rbx, %rcx
jne 1f
mov $0x42, %al
out %al, $0xf4
1: mov $2, %al
out %al, $0xf4
.align 16
idt: .fill 32, 16, 0
idtr: .word 32*16-1
.quad idt
"""


@pytest.mark.parametrize("instruction", ["mov (%rax), %es", "movss (%rax), %xmm0", "movshdup (%rax), %xmm1"])
def test_an_mmio_instruction_the_vmm_cannot_emulate_is_ud_in_the_guest(tmp_path: Path, instruction: str) -> None:
    kernel = assemble_elf(UD_HANDLER_GUEST.replace("{instruction}", f"faulting: {instruction}"), tmp_path)
    machine, _ = _machine(kernel=kernel)
    reason = machine.run()
    assert (reason.kind, reason.exit_code) == (StopKind.DEBUG_EXIT, 0x42), reason   # #UD at the instruction itself


def test_a_huge_rep_stos_into_mmio_does_not_hold_the_vmm(tmp_path: Path) -> None:
    kernel = assemble_elf("mov $0xC0000000, %rdi\nmov $0x10000000000, %rcx\nrep stosq\nmov $1, %al\nout %al, $0xf4", tmp_path)
    machine, _ = _machine(kernel=kernel)
    machine.start()
    deadline = time.monotonic() + 30
    while machine.stats.total < 5:   # exits keep coming: each does a bounded part of the instruction
        assert time.monotonic() < deadline and machine.state is RunState.RUNNING, machine.reason
        time.sleep(0.01)
    machine.pause()
    (rcx,) = machine.vps[0].get_registers([int(lib.HV_X64_REGISTER_RCX)])
    assert 0 < rcx < 0x10000000000 and rcx % 4096 == 0
    machine.poweroff()
    machine.close()
    assert machine.reason is not None and machine.reason.kind is StopKind.POWEROFF


def test_machines_that_fail_to_build_leak_nothing(tmp_path: Path) -> None:
    """A kernel that does not load, with disks attached: every fd and thread is given back."""
    import os
    import threading

    from mshvstack.vmm.config import DiskSpec
    from mshvstack.vmm.loader import LoaderError

    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    bad = tmp_path / "bad.elf"
    bad.write_bytes(b"\x7fELF" + b"\0" * 60)
    fds, threads = len(os.listdir("/proc/self/fd")), threading.active_count()
    for _ in range(30):
        with pytest.raises(LoaderError):
            _machine(kernel=bad, disks=(DiskSpec(image), DiskSpec(image, read_only=True)))
    assert len(os.listdir("/proc/self/fd")) <= fds and threading.active_count() <= threads


def test_a_disk_that_cannot_be_opened_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from mshvstack.vmbus.providers.scsi import DiskError, DiskImage

    with pytest.raises(DiskError, match="Is a directory"):
        DiskImage(tmp_path)
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4096))

    def refuse(path: object, flags: int, *args: object) -> int:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "open", refuse)   # root ignores file modes, so the refusal is simulated
    with pytest.raises(DiskError, match=r"Permission denied \(add ,ro to attach it read-only\)"):
        DiskImage(image)


@pytest.mark.parametrize(("exit_", "named"), [
    (ApicEoi(vp_index=0, interrupt_vector=0x30), "ApicEoi message"),
    (TimerExpired(timer_index=0, expiration_time=1, delivery_time=2), "TimerExpired message"),
    (InvalidVpRegisterValue(vp_index=0), "a register value the hypervisor could not run with"),
    (UnsupportedFeature(vp_index=0, feature_code=1, feature_parameter=0x10), "unsupported feature (code 1, parameter 0x10)"),
    (UnknownExit(message_type_raw=0x12345678, raw=bytes(256)), "message type 0x12345678"),
], ids=lambda value: type(value).__name__)
def test_an_exit_the_machine_never_asks_for_ends_the_run_naming_it(exit_: object, named: str) -> None:
    """Nothing is dropped silently: the run ends with an error that names the exit."""
    machine, _ = _machine(demo="hello", vmbus=False)
    try:
        machine.exits.handle(machine.vps[0], exit_)   # type: ignore[arg-type]
        assert machine.state is RunState.STOPPED and machine.reason is not None
        assert machine.reason.kind is StopKind.ERROR and machine.reason.exit_code == 1
        assert machine.reason.detail.startswith("VP 0: ") and named in machine.reason.detail, machine.reason.detail
    finally:
        machine.close()
