"""The Hyper-V MSRs the TLFS makes partition-wide, seen from every VP.

Linux sets the guest OS id and the hypercall page once, on the boot CPU
(hyperv_init), and later checks the hypercall MSR on whichever CPU it runs
(hv_is_hyperv_initialized, from hv_vmbus's init): with per-VP copies an
insmod that ran on CPU 1 failed with -ENODEV.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from mshvstack.abi import lib
from mshvstack.hvcall import HvRegister
from mshvstack.partition import IoPortIntercept, Partition, Vp

from guests import assemble
from smpguest import CODE, DATA, Runner, lapic_partition, long_mode_vp, prepare


@pytest.fixture
def part() -> Iterator[Partition]:
    with lapic_partition() as part:
        yield part


HYPERCALL_PAGE = 0x300000
TSC_PAGE = 0x301000
OS_ID = 0x8100_0000_0601_0000
SEEN = DATA                  # VP i: 8 u64 at SEEN + 0x40 * i
WRITTEN = DATA + 0x400       # VP 0 done writing
DONE = 0x10

_MSRS = (lib.HV_X64_MSR_GUEST_OS_ID, lib.HV_X64_MSR_HYPERCALL, lib.HV_X64_MSR_REFERENCE_TSC, lib.HV_MSR_CRASH_P0,
         lib.HV_X64_MSR_VP_INDEX)


def _rdmsr_into(msr: int, slot: int) -> str:
    return f"""
    mov ${msr}, %ecx
    rdmsr
    shl $32, %rdx
    or %rdx, %rax
    mov %rax, {SEEN + 8 * slot}(%rsi)
"""


def _wrmsr(msr: int, value: int) -> str:
    return f"""
    mov ${msr}, %ecx
    mov ${value & 0xFFFFFFFF}, %eax
    mov ${value >> 32}, %edx
    wrmsr
"""


GUEST = f"""
    mov %rbx, %rsi
    shl $6, %rsi                          /* my row */
    test %rbx, %rbx
    jnz 1f
{_wrmsr(int(lib.HV_X64_MSR_GUEST_OS_ID), OS_ID)}
{_wrmsr(int(lib.HV_X64_MSR_HYPERCALL), HYPERCALL_PAGE | int(lib.HV_X64_MSR_HYPERCALL_ENABLE))}
{_wrmsr(int(lib.HV_X64_MSR_REFERENCE_TSC), TSC_PAGE | int(lib.HV_X64_MSR_TSC_REFERENCE_ENABLE))}
{_wrmsr(int(lib.HV_MSR_CRASH_P0), 0x1234)}
    movl $1, {WRITTEN}
    jmp 2f
1:  cmpl $1, {WRITTEN}                    /* the others: once VP 0 wrote them */
    jne 1b
2:
{"".join(_rdmsr_into(int(msr), slot) for slot, msr in enumerate(_MSRS))}
    mov ${int(lib.HVCALL_POST_MESSAGE)}, %ecx   /* a hypercall through the page VP 0 enabled */
    mov $7, %edx                          /* misaligned input: the hypervisor refuses it */
    xor %r8, %r8
    mov ${HYPERCALL_PAGE}, %rax
    call *%rax
    mov %rax, {SEEN + 8 * len(_MSRS)}(%rsi)
    out %al, ${DONE}
    sti
3:  hlt
    jmp 3b
"""


@pytest.mark.parametrize("vcpus", [2, 4])
def test_partition_wide_msrs_read_the_same_on_every_vp(part: Partition, tmp_path: Path, vcpus: int) -> None:
    image, _ = assemble(GUEST, tmp_path, origin=CODE)
    prepare(part, image, {})
    done: set[int] = set()

    def on_port(vp: Vp, exit_: IoPortIntercept) -> bool:
        assert exit_.port_number == DONE
        done.add(vp.index)
        return len(done) == vcpus

    vps = [long_mode_vp(part, index) for index in range(vcpus)]
    Runner(vps, on_port).run()
    for index in range(vcpus):
        seen = struct.unpack(f"<{len(_MSRS) + 1}Q", part.memory.read(SEEN + 0x40 * index, 8 * (len(_MSRS) + 1)))
        os_id, hypercall, reference_tsc, crash_p0, vp_index, status = seen
        assert os_id == OS_ID, f"VP {index}: guest OS id {os_id:#x}"
        assert hypercall == HYPERCALL_PAGE | lib.HV_X64_MSR_HYPERCALL_ENABLE, f"VP {index}: hypercall MSR {hypercall:#x}"
        assert reference_tsc == TSC_PAGE | lib.HV_X64_MSR_TSC_REFERENCE_ENABLE, f"VP {index}: {reference_tsc:#x}"
        assert crash_p0 == 0x1234, f"VP {index}: crash P0 {crash_p0:#x}"
        assert vp_index == index                      # per VP
        assert status & 0xFFFF == lib.HV_STATUS_INVALID_ALIGNMENT, f"VP {index}: hypercall status {status:#x}"
    # The VMM reads the same through any VP.
    for vp in vps:
        assert vp.get_registers([HvRegister.GUEST_OS_ID])[0] == OS_ID
