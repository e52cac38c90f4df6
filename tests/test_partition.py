"""partition/: Mshv, Partition, GuestMemory and Vp on the simulator."""

from __future__ import annotations

import errno
import os
import re
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mshvstack.abi import lib
from mshvstack.errors import ErrnoError, MshvError
from mshvstack.hvcall import HvRegister
from mshvstack.partition import (
    GuestMemoryError,
    Halt,
    Interrupted,
    IoPortIntercept,
    MemoryIntercept,
    Mshv,
    MsiRoute,
    PartitionConfig,
    Segment,
    UnmappedGpa,
    Vp,
    VpStateKind,
)

REAL_MODE_CS = Segment(base=0, limit=0xFFFF, selector=0, attributes=0x9B)


def _real_mode_vm(code: bytes, **config: bool):  # type: ignore[no-untyped-def]
    mshv = Mshv.open("sim")
    part = mshv.create_partition(PartitionConfig(**config))
    part.initialize()
    part.map_memory(0, 0x10000)
    part.memory.write(0x1000, code)
    vp = part.create_vp(0)
    sregs = vp.sregs
    sregs.cs = REAL_MODE_CS
    vp.sregs = sregs
    regs = vp.regs
    regs.rip, regs.rflags = 0x1000, 2
    vp.regs = regs
    return mshv, part, vp


def test_auto_backend_says_which_it_picked() -> None:
    with Mshv.open() as mshv:
        if not os.path.exists("/dev/mshv"):
            assert mshv.backend_name == "sim" and "not running as a Hyper-V root partition" in mshv.reason
    with pytest.raises(MshvError):
        Mshv.open("qemu")  # type: ignore[arg-type]


def test_host_backend_refuses_clearly_without_device() -> None:
    if os.path.exists("/dev/mshv"):
        pytest.skip("a real /dev/mshv is present")
    with pytest.raises(ErrnoError) as info:
        Mshv.open("host")
    assert info.value.errno == errno.ENOENT


def test_v2_partition_needs_a_newer_driver() -> None:
    config = PartitionConfig(disabled_processor_features=(1, 0))
    with Mshv.open("sim", profile="6.15") as mshv:
        with pytest.raises(MshvError, match="v2"):
            mshv.create_partition(config)
    with Mshv.open("sim") as mshv:
        part = mshv.create_partition(config)
        assert part.get_property(lib.HV_PARTITION_PROPERTY_PROCESSOR_FEATURES0) & 1 == 0
        part.close()


def test_run_io_then_halt_with_register_sets() -> None:
    mshv, part, vp = _real_mode_vm(bytes.fromhex("b048baf803eeb00aeef4"))
    try:
        exit_ = vp.run()
        assert isinstance(exit_, IoPortIntercept) and exit_.is_write and chr(exit_.data) == "H"
        regs = vp.regs  # from the register page, valid after the intercept
        assert regs.rip == exit_.header.rip and regs.rdx == 0x3F8
        regs.rip = exit_.header.next_rip
        vp.regs = regs
        exit_ = vp.run()
        assert isinstance(exit_, IoPortIntercept) and exit_.data == 0x0A
        vp.set_registers({HvRegister.RIP: exit_.header.next_rip})
        assert isinstance(vp.run(), Halt)
        assert vp.sregs.cs.selector == 0
    finally:
        part.close()
        mshv.close()


def test_mmio_exit_and_guest_memory_bounds() -> None:
    mshv, part, vp = _real_mode_vm(bytes.fromhex("a10080f4"))  # mov ax,[0x8000]; hlt
    try:
        part.unmap_memory(part.memory.regions[0])
        part.map_memory(0, 0x8000)
        part.memory.write(0x1000, bytes.fromhex("a10080f4"))
        exit_ = vp.run()
        assert isinstance(exit_, UnmappedGpa) and exit_.gpa == 0x8000 and not exit_.is_write
        with pytest.raises(GuestMemoryError):
            part.memory.read(0x7FFF, 2)
        with pytest.raises(GuestMemoryError):
            part.memory.view(0x7000, 0x2000)
        with pytest.raises(GuestMemoryError):
            part.memory.write(0x9000, b"x")
        part.map_memory(0x8000, 0x1000)
        part.memory.write(0x7FFE, b"abcd")  # spans two adjacent regions
        assert part.memory.read(0x7FFE, 4) == b"abcd"
        assert bytes(part.memory.view(0x8000, 2)) == b"cd"
        with pytest.raises(ErrnoError) as info:
            part.map_memory(0x8000, 0x1000)
        assert info.value.errno == errno.EEXIST
        with pytest.raises(GuestMemoryError):
            part.map_memory(0x10001, 0x1000)
    finally:
        part.close()
        mshv.close()


@settings(max_examples=50, deadline=None)
@given(gpa=st.integers(0, 0x30000), length=st.integers(0, 0x3000))
def test_guest_memory_never_touches_outside_ram(gpa: int, length: int) -> None:
    with Mshv.open("sim") as mshv:
        part = mshv.create_partition()
        part.initialize()
        part.map_memory(0x10000, 0x10000)
        inside = length == 0 or (0x10000 <= gpa and gpa + length <= 0x20000)
        try:
            data = part.memory.read(gpa, length)
            assert inside and len(data) == length
        except GuestMemoryError:
            assert not inside
        part.close()


def test_kick_interrupts_a_blocked_run() -> None:
    mshv, part, vp = _real_mode_vm(bytes.fromhex("fbf4"), lapic=True)  # sti; hlt
    try:
        threading.Timer(0.1, vp.kick).start()
        assert isinstance(vp.run(), Interrupted)
    finally:
        part.close()
        mshv.close()


def test_spurious_eintr_is_retried() -> None:
    mshv, part, vp = _real_mode_vm(bytes.fromhex("e610f4"))
    try:
        mshv.backend.faults.fail_ioctl("MSHV_RUN_VP", errno.EINTR, times=2)  # type: ignore[attr-defined]
        assert isinstance(vp.run(), IoPortIntercept)
    finally:
        part.close()
        mshv.close()


def test_vp_state_size_negotiation_and_msrs() -> None:
    mshv, part, vp = _real_mode_vm(b"\xf4")
    try:
        lapic = vp.get_state(VpStateKind.LAPIC)
        assert len(lapic) == 4096
        timers = vp.get_state(VpStateKind.SYNTHETIC_TIMERS)
        assert len(timers) == 200
        assert len(vp.get_state(VpStateKind.XSAVE)) == part.get_property(lib.HV_PARTITION_PROPERTY_MAX_XSAVE_DATA_SIZE)
        vp.set_msrs({0xC0000082: 0xFFFF800000001000, 0x40000000: 0x8100000000000000})
        assert vp.get_msrs([0xC0000082, 0x40000000, 0x40000002]) == {0xC0000082: 0xFFFF800000001000,
                                                                      0x40000000: 0x8100000000000000, 0x40000002: 0}
        with pytest.raises(MshvError, match="0x12345"):
            vp.get_msrs([0x12345])
        with pytest.raises(MshvError):
            part.create_vp(256)
    finally:
        part.close()
        mshv.close()


def test_pause_resume_freezes_time() -> None:
    mshv, part, vp = _real_mode_vm(b"\xf4")
    try:
        part.pause()
        (t0,) = vp.get_registers([HvRegister.TIME_REF_COUNT])
        assert part.get_property(lib.HV_PARTITION_PROPERTY_TIME_FREEZE) == 1
        part.resume()
        assert part.get_property(lib.HV_PARTITION_PROPERTY_TIME_FREEZE) == 0
        assert t0 >= 0
    finally:
        part.close()
        mshv.close()


def test_interrupt_plumbing_through_the_partition_api() -> None:
    mshv, part, vp = _real_mode_vm(bytes.fromhex("fbf4e611f4"), lapic=True)
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        part.memory.write(0x40 * 4, (0x1100).to_bytes(2, "little") + b"\0\0")  # IVT[0x40] -> 0:0x1100
        part.memory.write(0x1100, bytes.fromhex("e610cf"))  # out 0x10; iret
        part.set_msi_routing([MsiRoute.fixed(3, 0x40, 0)])
        part.irqfd(efd, 3)
        threading.Timer(0.05, os.eventfd_write, args=(efd, 1)).start()
        exit_ = vp.run()
        assert isinstance(exit_, IoPortIntercept) and exit_.port_number == 0x10
        part.remove_irqfd(efd, 3)
        part.ioeventfd(efd, 0xD0000000, 4)
        part.ioeventfd(efd, 0xD0000000, 4, remove=True)
        part.install_intercept(lib.HV_INTERCEPT_TYPE_X64_CPUID, 0, 0x1234)
        part.assert_interrupt(0x41, 0)
    finally:
        os.close(efd)
        part.close()
        mshv.close()


# Each writes [0x5000] once, then out 0x10, al ; hlt.
_WRITES = {
    "mov byte": "c606005001",
    "lock inc word": "f0ff060050",       # host atomics skip Unicorn's permission check:
    "xchg byte": "86060050",             # the core redoes them alone, with the checked stores
    "lock cmpxchg word": "31c0f00fb1060050",
}


@pytest.mark.parametrize("write", list(_WRITES))
def test_dirty_pages_after_guest_writes(write: str) -> None:
    mshv, part, vp = _real_mode_vm(bytes.fromhex(_WRITES[write] + "e610f4"))
    try:
        part.enable_dirty_tracking()
        part.dirty_pages(0, 0x10000)  # clear
        assert isinstance(vp.run(), IoPortIntercept)
        assert part.dirty_pages(0, 0x10000) == [0x5000]
        assert part.dirty_pages(0, 0x10000) == []
    finally:
        part.close()
        mshv.close()


def test_closed_objects_refuse_use() -> None:
    mshv, part, vp = _real_mode_vm(b"\xf4")
    part.close()
    with pytest.raises(MshvError):
        vp.run()
    with pytest.raises(MshvError):
        part.map_memory(0, 0x1000)
    mshv.close()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _mappings() -> int:
    return len(Path("/proc/self/maps").read_text().splitlines())


def test_no_leaks_over_1000_partitions() -> None:
    def one() -> None:
        with Mshv.open("sim") as mshv:
            part = mshv.create_partition()
            part.initialize()
            part.map_memory(0, 0x10000)
            part.create_vp(0)
            part.close()

    import gc

    for _ in range(5):
        one()  # warm caches, lazily created module state
    gc.collect()  # objects of earlier tests release their fds now, not during the loop
    fds, maps = _open_fds(), _mappings()
    for _ in range(1000):
        one()
    gc.collect()
    assert _open_fds() <= fds
    assert _mappings() <= maps + 4  # allocator arenas may move a little; no per-partition growth


def test_readme_example_runs() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    match = re.search(r"<!-- example:begin -->\s*```python\n(.*?)```\s*<!-- example:end -->", readme, re.S)
    assert match, "README example markers missing"
    namespace: dict[str, object] = {}
    exec(compile(match.group(1), "README.md", "exec"), namespace)  # noqa: S102 - the README's own example


def test_fpu_registers_round_trip_and_reach_the_guest(tmp_path: Path) -> None:
    from mshvstack.partition import FpuRegisters
    from mshvstack.vmm.loader.x86boot import long_mode

    from guests import assemble

    # movq %xmm3, %rax; out %eax, $0x10; hlt
    image, _ = assemble("movq %xmm3, %rax\nout %eax, $0x10\nhlt", tmp_path, origin=0x200000)
    with Mshv.open("sim") as mshv, mshv.create_partition() as part:
        part.initialize()
        part.map_memory(0, 4 << 20)
        part.memory.write(0x200000, image)
        vp = part.create_vp(0)
        boot = long_mode(part.memory, 0x200000, stack=0x80000)
        boot.sregs.cr4 |= (1 << 9) | (1 << 10)  # OSFXSR, OSXMMEXCPT: SSE enabled, as a kernel would
        vp.sregs, vp.regs = boot.sregs, boot.regs
        fpu = FpuRegisters()
        fpu.xmm[3] = (0xAABBCCDD << 64) | 0x11223344
        fpu.mxcsr, fpu.fcw = 0x1F80, 0x037F
        vp.fpu = fpu
        exit_ = vp.run()
        assert isinstance(exit_, IoPortIntercept) and exit_.rax == 0x11223344
        back = vp.fpu
        assert back.xmm[3] == fpu.xmm[3] and back.mxcsr == 0x1F80 and back.fcw == 0x037F


# Every public method with arguments that would work on an open object.
PARTITION_CALLS = {
    "initialize": (), "pause": (), "resume": (), "get_property": (lib.HV_PARTITION_PROPERTY_TIME_FREEZE,),
    "set_property": (lib.HV_PARTITION_PROPERTY_TIME_FREEZE, 0), "install_intercept": (lib.HV_INTERCEPT_TYPE_HYPERCALL,),
    "map_memory": (0x100000, 0x1000), "unmap_memory": None, "dirty_pages": (0, 0x1000), "enable_dirty_tracking": (),
    "set_msi_routing": ([MsiRoute.fixed(0, 0x30, 0)],), "irqfd": None, "remove_irqfd": None, "ioeventfd": None,
    "assert_interrupt": (0x30,), "create_vp": (1,),
}
VP_CALLS = {
    "get_registers": ([HvRegister.RAX],), "get_registers128": ([HvRegister.RAX],), "set_registers": ({HvRegister.RAX: 1},), "get_msrs": ([0xC0000080],),
    "set_msrs": ({0xC0000080: 0},), "run": (), "inject_exception": (6,), "get_state": (VpStateKind.LAPIC,),
    "set_state": (VpStateKind.LAPIC, bytes(1024)),
}


def _public_methods(cls: type) -> set[str]:
    return {name for name, value in vars(cls).items() if callable(value) and not name.startswith("_")} - {"close", "kick"}


def test_a_closed_object_never_touches_the_fd_number_it_had() -> None:
    """After a.close() the next partition gets a's fd number; no method of a (or of its
    VP, or of a's hypercall target kept from before) may reach it: ClosedError, and b
    is left exactly as it was."""
    from mshvstack.backend.handle import ClosedError
    from mshvstack.partition import Partition, Vp

    assert _public_methods(Partition) == set(PARTITION_CALLS), "a new public method needs a row here"
    assert _public_methods(Vp) == set(VP_CALLS), "a new public method needs a row here"
    with Mshv.open("sim") as mshv:
        a = mshv.create_partition(PartitionConfig(lapic=True))
        a.initialize()
        region = a.map_memory(0, 0x10000)
        vp = a.create_vp(0)
        target, number = a.hv, a.fd
        a.close()
        b = mshv.create_partition(PartitionConfig(lapic=True))
        assert b.fd == number   # the kernel (and the simulator) hand out the lowest free number
        efd = os.eventfd(0)
        try:
            dynamic = {"unmap_memory": (region,), "irqfd": (efd, 0), "remove_irqfd": (efd, 0), "ioeventfd": (efd, 0xD0000000, 4)}
            for name, args in PARTITION_CALLS.items():
                with pytest.raises(ClosedError, match="partition is closed"):
                    getattr(a, name)(*(args if args is not None else dynamic[name]))
            for name, args in VP_CALLS.items():
                with pytest.raises(ClosedError, match="VP 0 is closed"):
                    getattr(vp, name)(*args)
            with pytest.raises(ClosedError):
                _ = vp.regs
            with pytest.raises(ClosedError):
                from mshvstack.hvcall import calls
                calls.get_partition_property(target, lib.HV_PARTITION_PROPERTY_TIME_FREEZE)
            vp.kick()   # a no-op on a closed VP, never a signal to someone else's thread
            # b never saw any of it: still uninitialized, so its first initialize works.
            b.initialize()
            b.irqfd(efd, 0)   # nothing of a's was bound to b
        finally:
            os.close(efd)
            b.close()
    with pytest.raises(ClosedError, match="/dev/mshv is closed"):
        mshv.create_partition(PartitionConfig())


def test_a_32_bit_guests_hypercall_uses_the_32_bit_convention(tmp_path: Path) -> None:
    """EDX:EAX carries the control word, EBX:ECX the input GPA, and the result comes
    back in EDX:EAX: HvPostMessage from a 32-bit guest is a hypercall intercept."""
    from mshvstack.partition import Halt, HypercallIntercept
    from mshvstack.vmm.loader.x86boot import protected_mode

    from guests import assemble

    source = """
    xor %edx, %edx
    mov $0x5c, %eax      /* HVCALL_POST_MESSAGE, slow */
    xor %ebx, %ebx
    mov $0x3000, %ecx    /* the input GPA */
    xor %edi, %edi
    xor %esi, %esi
    vmcall
    hlt
    """
    image, _ = assemble(source, tmp_path, origin=0x200000, bits=32)
    for intercepted in (True, False):
        with Mshv.open("sim") as mshv, mshv.create_partition() as part:
            part.initialize()
            part.map_memory(0, 4 << 20)
            part.memory.write(0x200000, image)
            if intercepted:
                part.install_intercept(lib.HV_INTERCEPT_TYPE_HYPERCALL)
            vp = part.create_vp(0)
            boot = protected_mode(part.memory, 0x200000, ebx=0)
            boot.sregs.apic_base = vp.sregs.apic_base
            vp.sregs, vp.regs = boot.sregs, boot.regs
            exit_ = vp.run()
            if intercepted:
                assert isinstance(exit_, HypercallIntercept) and not exit_.long_mode
                assert (exit_.call_code, exit_.fast, exit_.input_value) == (lib.HVCALL_POST_MESSAGE, False, 0x3000)
                vp.set_registers({**exit_.result_registers(0x1234_0000_0012), HvRegister.RIP: exit_.header.next_rip})
                exit_ = vp.run()
                expected = (0x12, 0x1234)
            else:   # the hypervisor answers itself: nobody listens on the connection
                expected = (int(lib.HV_STATUS_INVALID_CONNECTION_ID), 0)
            assert isinstance(exit_, Halt)
            rax, rdx = vp.get_registers([HvRegister.RAX, HvRegister.RDX])
            assert (rax & 0xFFFFFFFF, rdx & 0xFFFFFFFF) == expected


def test_the_cores_hypercall_intercept_is_the_python_encoders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 64-bit HvSignalEvent or HvPostMessage under the hypercall intercept is written by the
    engine's core (no Python at the instruction); the message must be the one the Python
    encoder writes for the same state, field for field, and a code the hypervisor answers
    itself must still reach the Python half."""
    from mshvstack.backend.sim.engines.unicorn import UnicornEngine
    from mshvstack.partition import Halt, HypercallIntercept
    from mshvstack.vmm.loader.x86boot import long_mode

    from guests import assemble

    source = """
    mov $0x1111222233334444, %rax
    mov $0x5555666677778888, %rbx
    mov $0x0123456789abcdef, %rdx
    mov $0x7777, %r8
    mov $0x9999, %rsi
    mov $0xaaaa, %rdi
    mov $0x1005d, %rcx   /* HvSignalEvent, fast */
    vmcall
    mov $0x5c, %ecx      /* HvPostMessage, slow: RDX its input GPA */
    mov $0x3000, %edx
    stc
    vmcall
    mov $0x2, %ecx       /* not a SynIC call: the hypervisor answers it */
    vmcall
    hlt
    """
    image, _ = assemble(source, tmp_path, origin=0x200000)

    def run() -> tuple[list[object], int]:
        asked = 0
        original = UnicornEngine._on_special_code

        def counted(engine: UnicornEngine, address: int) -> int:
            nonlocal asked
            asked += 1
            return original(engine, address)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(UnicornEngine, "_on_special_code", counted)
            with Mshv.open("sim") as mshv, mshv.create_partition() as part:
                part.initialize()
                part.map_memory(0, 4 << 20)
                part.memory.write(0x200000, image)
                part.install_intercept(lib.HV_INTERCEPT_TYPE_HYPERCALL)
                vp = part.create_vp(0)
                boot = long_mode(part.memory, 0x200000, stack=0x80000)
                vp.sregs, vp.regs = boot.sregs, boot.regs
                exits: list[object] = []
                while not isinstance(exit_ := vp.run(), Halt):
                    assert isinstance(exit_, HypercallIntercept) and exit_.long_mode
                    exits.append(exit_)
                    vp.set_registers({**exit_.result_registers(0), HvRegister.RIP: exit_.header.next_rip})
                exits.append(vp.get_registers([HvRegister.RAX])[0])   # the third call's answer
        return exits, asked

    by_core, asked_core = run()
    monkeypatch.setattr(UnicornEngine, "intercept_hypercalls", lambda engine, on: None)   # the Python half encodes
    by_python, asked_python = run()
    assert [e.call_code for e in by_core[:2]] == [lib.HVCALL_SIGNAL_EVENT, lib.HVCALL_POST_MESSAGE]  # type: ignore[attr-defined]
    assert by_core == by_python
    assert by_core[-1] == lib.HV_STATUS_INVALID_HYPERCALL_CODE
    assert (asked_core, asked_python) == (2, 4)   # the core asked Python only for the call it does not intercept (and the HLT)


def test_a_vmm_rflags_write_replaces_the_guests_lazy_flags(tmp_path: Path) -> None:
    """The guest's last arithmetic left flags pending in the engine's lazy state; what
    the VMM writes to RFLAGS at the exit is what the guest then sees (pushfq, jumps)."""
    from mshvstack.vmm.loader.x86boot import long_mode

    from guests import assemble

    source = """
    mov $7, %eax
    cmp $1, %eax        /* a compare: ZF=0 CF=0, kept lazily */
    out %al, $0x10      /* the VMM writes RFLAGS here */
    pushfq
    pop %rbx
    mov %ebx, %eax
    out %eax, $0x11
    hlt
    """
    image, _ = assemble(source, tmp_path, origin=0x200000)
    with Mshv.open("sim") as mshv, mshv.create_partition(PartitionConfig()) as part:
        part.initialize()
        part.map_memory(0, 4 << 20)
        part.memory.write(0x200000, image)
        vp = part.create_vp(0)
        boot = long_mode(part.memory, 0x200000, stack=0x80000)
        boot.sregs.apic_base = vp.sregs.apic_base
        vp.sregs, vp.regs = boot.sregs, boot.regs
        for via_page in (True, False):
            exit_ = vp.run()
            assert isinstance(exit_, IoPortIntercept) and exit_.port_number == 0x10
            flags = 0x2 | 0x1 | 0x4 | 0x10 | 0x40 | 0x80 | 0x800   # CF PF AF ZF SF OF
            if via_page:
                vp.set_registers({HvRegister.RIP: exit_.header.next_rip, HvRegister.RFLAGS: flags})
            else:   # through HvSetVpRegisters
                from mshvstack.hvcall import calls
                calls.set_vp_registers(part.hv, 0, {HvRegister.RIP: exit_.header.next_rip, HvRegister.RFLAGS: flags})
            exit_ = vp.run()
            assert isinstance(exit_, IoPortIntercept) and exit_.port_number == 0x11
            assert exit_.rax & 0xFFF == flags
            vp.set_registers({HvRegister.RIP: 0x200000, HvRegister.RFLAGS: 2})


@pytest.mark.parametrize("write", list(_WRITES))
def test_a_write_to_read_only_memory_is_intercepted_and_not_done(write: str) -> None:
    """A read-only region at 0x10000 (DS = 0x1000 - 0x5000 / 16: the write goes to GPA 0x10000)."""
    mshv, part, vp = _real_mode_vm(bytes.fromhex("b8000b8ed8" + _WRITES[write] + "e610f4"))
    try:
        part.map_memory(0x10000, 0x1000, writable=False)
        part.memory.write(0x10000, b"\x5A\x5A")
        exit_ = vp.run()
        assert isinstance(exit_, MemoryIntercept) and not isinstance(exit_, UnmappedGpa), exit_
        assert exit_.is_write and exit_.gpa == 0x10000
        assert part.memory.read(0x10000, 2) == b"\x5A\x5A"
    finally:
        part.close()
        mshv.close()


def test_closing_a_partition_while_its_vps_run_stops_them_first() -> None:
    """The VPs' threads are stopped before the memory they run on goes away: each
    sees Interrupted or a clear 'closed' error, none runs on, nothing crashes."""
    # 1: inc dword [0x5000] ; jmp 1b  (touches guest memory on every iteration)
    mshv, part, vp0 = _real_mode_vm(bytes.fromhex("66ff060050ebf9"))
    vps = [vp0, part.create_vp(1)]
    sregs, regs = vp0.sregs, vp0.regs
    vps[1].sregs, vps[1].regs = sregs, regs
    outcomes: list[str] = []

    def run(vp: Vp) -> None:
        try:
            while True:
                if isinstance(vp.run(), Interrupted):
                    outcomes.append("interrupted")
        except MshvError as exc:
            outcomes.append(str(exc))

    threads = [threading.Thread(target=run, args=(vp,)) for vp in vps]
    try:
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 10
        while int.from_bytes(part.memory.read(0x5000, 4), "little") < 1000:
            assert time.monotonic() < deadline, "the VPs never ran"
        part.close()
        for thread in threads:
            thread.join(timeout=10)
        assert not any(thread.is_alive() for thread in threads), "a VP ran on after its partition was closed"
        assert sorted(set(outcomes) - {"interrupted"}) == ["VP 0 is closed", "VP 1 is closed"], outcomes
    finally:
        mshv.close()


def test_after_a_kick_the_register_page_shows_where_the_vp_stopped() -> None:
    """The page is the VMM's view of the VP: a run interrupted by kick() (EINTR) must
    leave it current, not at the last intercept (a snapshot then mixed the two)."""
    # 1: inc cx ; mov [0x5000], cx ; jmp 1b
    mshv, part, vp = _real_mode_vm(bytes.fromhex("41" "890e0050" "ebf9"))
    try:
        threading.Timer(0.2, vp.kick).start()
        assert isinstance(vp.run(), Interrupted)
        stored = int.from_bytes(part.memory.read(0x5000, 2), "little")
        assert stored > 0 and vp.regs.rcx & 0xFFFF in (stored, (stored + 1) & 0xFFFF)
    finally:
        part.close()
        mshv.close()
