"""Interrupts between VPs: every LAPIC destination mode, on 2 and 4 VPs.

VP 0 sends each IPI the host asks for (a table below: ICR, destination,
who must take it), waits until the handlers ran (or, when nobody must, a
while), and reports; the host compares each VP's per-vector handler counts
with the table, so an interrupt taken twice, taken by the wrong VP or never
taken fails.  The xAPIC tests use the MMIO page (and Hyper-V's ICR MSR), the
x2APIC test the MSRs; logical destinations go through each VP's LDR (and
the xAPIC DFR's flat or cluster model), lowest priority through the TPRs.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mshvstack.abi import lib
from mshvstack.hvcall import HvRegister
from mshvstack.partition import CpuidIntercept, IoPortIntercept, Partition, Vp

from guests import assemble
from smpguest import AP_TO_LONG_MODE, CODE, DATA, MSR_APIC_BASE, VP_INDEX_FROM_RSP, Runner, lapic_partition, long_mode_vp, prepare

READY, TOTAL, NVPS, CONFIG_DFR = DATA, DATA + 0x40, DATA + 0x80, DATA + 0xC0
CONFIG_LDR, CONFIG_TPR, LDR_SEEN, ID_SEEN = DATA + 0x100, DATA + 0x140, DATA + 0x180, DATA + 0x1C0
COUNTS = DATA + 0x1000          # VP i, vector v: u32 at COUNTS + 0x400 * i + 4 * v
ASK, REPORT, DONE = 0x20, 0x21, 0x10
VECTORS = range(0x40, 0x70)
NMI_VECTOR = 2
HV_ICR_MSR = int(lib.HV_X64_MSR_ICR)

# ICR bits (SDM vol. 3A, 10.6.1)
FIXED, LOWEST, NMI = 0 << 8, 1 << 8, 4 << 8
LOGICAL = 1 << 11
ASSERT = 1 << 14
SELF, ALL, ALL_BUT_SELF = 1 << 18, 2 << 18, 3 << 18
FLAT_DFR, CLUSTER_DFR = 0xFFFFFFFF, 0x0FFFFFFF
XAPIC_EOI = "    mov $0xFEE000B0, %rdx\n    movl $0, (%rdx)\n"
X2APIC_EOI = "    mov $0x80B, %ecx\n    xor %eax, %eax\n    xor %edx, %edx\n    wrmsr\n"

XAPIC_SETUP = f"""
    mov $0xFEE00000, %rbp
    movl $0x1FF, 0xF0(%rbp)                 /* SVR: software enabled */
    mov {CONFIG_DFR}, %eax
    mov %eax, 0xE0(%rbp)
    mov {CONFIG_LDR}(,%rbx,4), %eax
    mov %eax, 0xD0(%rbp)
    mov {CONFIG_TPR}(,%rbx,4), %eax
    mov %eax, 0x80(%rbp)
    mov 0xD0(%rbp), %eax
    mov %eax, {LDR_SEEN}(,%rbx,4)
    mov 0x20(%rbp), %eax
    shr $24, %eax
    mov %eax, {ID_SEEN}(,%rbx,4)
"""
X2APIC_SETUP = f"""
    mov ${MSR_APIC_BASE}, %ecx
    rdmsr
    or $0xC00, %eax                         /* enable, x2APIC */
    wrmsr
    mov $0x80F, %ecx
    mov $0x1FF, %eax
    xor %edx, %edx
    wrmsr
    mov $0x808, %ecx
    mov {CONFIG_TPR}(,%rbx,4), %eax
    wrmsr
    mov $0x80D, %ecx
    rdmsr
    mov %eax, {LDR_SEEN}(,%rbx,4)
    mov $0x802, %ecx
    rdmsr
    mov %eax, {ID_SEEN}(,%rbx,4)
"""
# VP 0 sends through the APIC (xAPIC MMIO or x2APIC MSR) when RDI = 0, Hyper-V's ICR MSR when 1.
XAPIC_SEND = f"""
    test %r11d, %r11d
    jnz 1f
    mov %r9d, 0x310(%rbp)
    mov %r8d, 0x300(%rbp)
    jmp 2f
1:  mov ${HV_ICR_MSR}, %ecx
    mov %r8d, %eax
    mov %r9d, %edx
    wrmsr
2:
"""
X2APIC_SEND = f"""
    mov $0x830, %ecx
    test %r11d, %r11d
    jz 1f
    mov ${HV_ICR_MSR}, %ecx
1:  mov %r8d, %eax
    mov %r9d, %edx
    wrmsr
"""


def _guest(setup: str, send: str, eoi: str) -> str:
    stubs = "".join(f"vector_{v}:\n    push %rax\n    push %rdx\n    push %rcx\n    mov ${v}, %eax\n    jmp common\n"
                    for v in [NMI_VECTOR, *VECTORS])
    return f"""
{setup}
    lock incl {READY}
    test %rbx, %rbx
    jnz receiver
1:  mov {READY}, %eax                     /* VP 0: every APIC is set up */
    cmp {NVPS}, %eax
    jb 1b
    sti
next:
    out %al, ${ASK}                       /* RAX ICR low (0: done), RDX destination field, RCX expected, RSI wait, RDI method */
    test %eax, %eax
    jz finish
    mov %eax, %r8d
    mov %edx, %r9d
    mov %edi, %r11d
    mov {TOTAL}, %r12d
    add %ecx, %r12d                       /* the total once every expected handler ran */
    test %ecx, %ecx
    jnz 1f
    mov $-1, %r12d                        /* nobody must take it: wait the whole time */
1:  rdtsc
    shl $32, %rdx
    or %rax, %rdx
    add %rsi, %rdx
    mov %rdx, %r14
{send}
2:  mov {TOTAL}, %eax
    cmp %r12d, %eax
    jae 3f
    pause
    rdtsc
    shl $32, %rdx
    or %rax, %rdx
    cmp %r14, %rdx
    jb 2b
3:  out %al, ${REPORT}
    jmp next
finish:
    cli
    out %al, ${DONE}
    hlt
receiver:
    sti
4:  hlt
    jmp 4b
{stubs}
common:
    cmp ${NMI_VECTOR}, %eax               /* EOI before counting: once the sender sees its total, */
    je 5f                                 /* no handler still holds its vector in service (which */
    push %rax                             /* would raise its processor priority for the next IPI) */
{eoi}
    pop %rax
5:
{VP_INDEX_FROM_RSP}
    shl $10, %rdx
    lock incl {COUNTS}(%rdx,%rax,4)
    lock incl {TOTAL}
    pop %rcx
    pop %rdx
    pop %rax
    iretq
"""


@dataclass(frozen=True)
class Ipi:
    name: str
    icr: int                 # ICR low (the vector is filled in per case)
    destination: int         # x2APIC: the 32-bit destination; xAPIC: the 8-bit one
    takers: frozenset[int]   # the VPs that must take it, once each
    hv_msr: bool = False     # send through HV_X64_MSR_ICR


def _ipi(name: str, icr: int, destination: int, takers: set[int] | range, hv_msr: bool = False) -> Ipi:
    return Ipi(name, icr, destination, frozenset(takers), hv_msr)


class IpiTable:
    """Runs a table of IPIs through the guest and collects every mismatch."""

    def __init__(self, part: Partition, cases: list[Ipi], x2apic: bool) -> None:
        self.part = part
        self.cases = cases
        self.x2apic = x2apic
        self.vcpus = 0
        self.next = 0
        self.expected: dict[tuple[int, int], int] = {}
        self.before: dict[tuple[int, int], int] = {}
        self.failures: list[str] = []
        self.checks = 0
        self.tsc_hz = part.get_property(lib.HV_PARTITION_PROPERTY_PROCESSOR_CLOCK_FREQUENCY)

    def counts(self) -> dict[tuple[int, int], int]:
        out = {}
        for vp in range(self.vcpus):
            values = struct.unpack("<256I", self.part.memory.read(COUNTS + 0x400 * vp, 0x400))
            out.update({(vp, vector): n for vector, n in enumerate(values) if n})
        return out

    def vector(self, index: int) -> int:
        return VECTORS[index % len(VECTORS)]

    def on_port(self, vp: Vp, exit_: IoPortIntercept) -> bool:
        assert vp.index == 0, f"VP {vp.index} wrote port {exit_.port_number:#x}"
        if exit_.port_number == ASK:
            if self.next == len(self.cases):
                vp.set_registers({HvRegister.RAX: 0})
                return False
            case = self.cases[self.next]
            mode = case.icr & (7 << 8)
            vector = self.vector(self.next)
            field = case.destination if self.x2apic else case.destination << 24
            wait = self.tsc_hz * (5 if case.takers else 0.05)
            self.before = self.counts()
            vp.set_registers({HvRegister.RAX: case.icr | (0 if mode == NMI else vector) | ASSERT, HvRegister.RDX: field,
                              HvRegister.RCX: len(case.takers), HvRegister.RSI: int(wait), HvRegister.RDI: int(case.hv_msr)})
            return False
        if exit_.port_number == REPORT:
            case = self.cases[self.next]
            vector = NMI_VECTOR if case.icr & (7 << 8) == NMI else self.vector(self.next)
            after = self.counts()
            self.next += 1
            for index in range(self.vcpus):
                taken = after.get((index, vector), 0) - self.before.get((index, vector), 0)
                want = 1 if index in case.takers else 0
                self.checks += 1
                if taken != want:
                    self.failures.append(f"{case.name}: VP {index} took vector {vector:#x} {taken} times, not {want}")
                self.expected[(index, vector)] = self.expected.get((index, vector), 0) + want
            others = {key: n - self.before.get(key, 0) for key, n in after.items()
                      if key[1] != vector and n != self.before.get(key, 0)}
            if others:
                self.failures.append(f"{case.name}: other vectors taken meanwhile: {others}")
            return False
        assert exit_.port_number == DONE, exit_.port_number
        return True

    def final_check(self) -> None:
        time.sleep(0.2)   # a late duplicate would land now
        final = self.counts()
        if final != {k: v for k, v in self.expected.items() if v}:
            self.failures.append(f"the totals differ at the end: {final} instead of {self.expected}")


@pytest.fixture
def part() -> Iterator[Partition]:
    with lapic_partition(x2apic=True) as part:
        yield part


def _run_table(part: Partition, tmp_path: Path, vcpus: int, cases: list[Ipi], x2apic: bool,
               dfr: int, ldrs: list[int], tprs: list[int]) -> IpiTable:
    setup, send, eoi = (X2APIC_SETUP, X2APIC_SEND, X2APIC_EOI) if x2apic else (XAPIC_SETUP, XAPIC_SEND, XAPIC_EOI)
    image, symbols = assemble(_guest(setup, send, eoi), tmp_path, origin=CODE)
    prepare(part, image, {v: symbols[f"vector_{v}"] for v in [NMI_VECTOR, *VECTORS]})
    memory = part.memory
    memory.write(NVPS, struct.pack("<I", vcpus))
    memory.write(CONFIG_DFR, struct.pack("<I", dfr))
    memory.write(CONFIG_LDR, struct.pack(f"<{vcpus}I", *ldrs[:vcpus]))
    memory.write(CONFIG_TPR, struct.pack(f"<{vcpus}I", *tprs[:vcpus]))
    table = IpiTable(part, cases, x2apic)
    table.vcpus = vcpus
    vps = [long_mode_vp(part, index) for index in range(vcpus)]
    Runner(vps, table.on_port).run()
    table.final_check()
    assert table.next == len(cases)
    return table


def _common(vcpus: int) -> list[Ipi]:
    """Cases every mode shares: physical ids, shorthands, NMIs."""
    everyone = range(vcpus)
    cases = [_ipi(f"physical to {i}", FIXED, i, {i}) for i in everyone]
    cases += [
        _ipi("physical to a VP that does not exist", FIXED, vcpus, set()),
        _ipi("self", FIXED | SELF, 0, {0}),
        _ipi("all including self", FIXED | ALL, 0, everyone),
        _ipi("all excluding self", FIXED | ALL_BUT_SELF, 0, set(everyone) - {0}),
        _ipi("NMI physical to the last VP", NMI, vcpus - 1, {vcpus - 1}),
        _ipi("NMI to all excluding self", NMI | ALL_BUT_SELF, 0, set(everyone) - {0}),
        _ipi("lowest priority to VP 0 alone", LOWEST, 0, {0}),
    ]
    return cases


TPRS = [0x20, 0x10, 0x30, 0x00]   # lowest priority goes to the lowest TPR among the addressed VPs


def _lowest(among: set[int] | range) -> set[int]:
    return {min(among, key=lambda i: (TPRS[i], i))}


@pytest.mark.parametrize("vcpus", [2, 4])
def test_xapic_physical_flat_shorthands_nmi_lowest_priority(part: Partition, tmp_path: Path, vcpus: int) -> None:
    """Logical flat: VP i has LDR bit i + 2, so 0x3c, 0x7c and 0xfc address every VP of 4 (the
    destinations that were never delivered), 0x03 nobody, 0xff is the broadcast."""
    everyone = range(vcpus)
    ldr_bits = [1 << (i + 2) for i in range(4)]
    cases = _common(vcpus) + [_ipi("physical broadcast 0xff", FIXED, 0xFF, everyone)]
    for destination in (0x3C, 0x7C, 0xFC, 0x04, 0x08, 0x0C, 0x30, 0x03, 0xFF):
        cases.append(_ipi(f"logical flat {destination:#04x}", FIXED | LOGICAL, destination,
                          {i for i in everyone if ldr_bits[i] & destination or destination == 0xFF}))
    cases += [
        _ipi("NMI logical flat 0x3c", NMI | LOGICAL, 0x3C, everyone),
        _ipi("lowest priority logical flat 0x3c", LOWEST | LOGICAL, 0x3C, _lowest(everyone)),
        _ipi("lowest priority physical broadcast", LOWEST, 0xFF, _lowest(everyone)),
        _ipi("Hyper-V ICR MSR, physical to the last VP", FIXED, vcpus - 1, {vcpus - 1}, hv_msr=True),
        _ipi("Hyper-V ICR MSR, logical flat 0x0c", FIXED | LOGICAL, 0x0C, {0, 1}, hv_msr=True),
        _ipi("Hyper-V ICR MSR, all excluding self", FIXED | ALL_BUT_SELF, 0, set(everyone) - {0}, hv_msr=True),
    ]
    table = _run_table(part, tmp_path, vcpus, cases, False, FLAT_DFR, [b << 24 for b in ldr_bits], TPRS)
    seen = part.memory.read(LDR_SEEN, 4 * vcpus)
    assert struct.unpack(f"<{vcpus}I", seen) == tuple(b << 24 for b in ldr_bits[:vcpus])
    assert struct.unpack(f"<{vcpus}I", part.memory.read(ID_SEEN, 4 * vcpus)) == tuple(everyone)
    assert not table.failures, f"{len(table.failures)} of {table.checks} checks failed:\n" + "\n".join(table.failures)


@pytest.mark.parametrize("vcpus", [2, 4])
def test_xapic_logical_cluster(part: Partition, tmp_path: Path, vcpus: int) -> None:
    """Cluster model (DFR 0x0fffffff): VP i is member i % 2 of cluster i // 2."""
    everyone = range(vcpus)
    logical = [(i // 2) << 4 | 1 << (i % 2) for i in range(4)]

    def members(destination: int) -> set[int]:
        return {i for i in everyone if destination == 0xFF or (destination >> 4 == logical[i] >> 4 and destination & logical[i] & 0xF)}

    cases = _common(vcpus)
    for destination in (0x01, 0x02, 0x03, 0x12, 0x13, 0x11, 0x23, 0x0F, 0xFF):
        cases.append(_ipi(f"logical cluster {destination:#04x}", FIXED | LOGICAL, destination, members(destination)))
    cases += [
        _ipi("lowest priority cluster 0x03", LOWEST | LOGICAL, 0x03, _lowest(members(0x03))),
        _ipi("NMI logical cluster 0x13", NMI | LOGICAL, 0x13, members(0x13)),
    ]
    if vcpus == 4:
        cases.append(_ipi("lowest priority cluster 0x13", LOWEST | LOGICAL, 0x13, _lowest(members(0x13))))
    table = _run_table(part, tmp_path, vcpus, cases, False, CLUSTER_DFR, [v << 24 for v in logical], TPRS)
    assert not table.failures, f"{len(table.failures)} of {table.checks} checks failed:\n" + "\n".join(table.failures)


@pytest.mark.parametrize("vcpus", [2, 4])
def test_x2apic_physical_cluster_shorthands(part: Partition, tmp_path: Path, vcpus: int) -> None:
    """x2APIC: 32-bit destinations, the LDR derived from the APIC id (cluster id / 16 in
    bits 16-31, bit id % 16), 0xffffffff the broadcast (0xff is just APIC id 255)."""
    everyone = range(vcpus)
    cases = _common(vcpus) + [
        _ipi("physical 0xffffffff broadcast", FIXED, 0xFFFFFFFF, everyone),
        _ipi("physical 0xff is APIC id 255", FIXED, 0xFF, set()),
        _ipi("logical cluster 0, members 0-3", FIXED | LOGICAL, 0x0000000F, everyone),
        _ipi("logical cluster 0, members 1-2", FIXED | LOGICAL, 0x00000006, {1, 2} & set(everyone)),
        _ipi("logical cluster 1", FIXED | LOGICAL, 0x0001000F, set()),
        _ipi("logical broadcast", FIXED | LOGICAL, 0xFFFFFFFF, everyone),
        _ipi("NMI logical cluster 0, member 1", NMI | LOGICAL, 0x00000002, {1}),
        _ipi("lowest priority logical cluster 0", LOWEST | LOGICAL, 0x0000000F, _lowest(everyone)),
        _ipi("Hyper-V ICR MSR, physical to the last VP", FIXED, vcpus - 1, {vcpus - 1}, hv_msr=True),
    ]
    table = _run_table(part, tmp_path, vcpus, cases, True, FLAT_DFR, [0] * 4, TPRS)
    assert struct.unpack(f"<{vcpus}I", part.memory.read(LDR_SEEN, 4 * vcpus)) == tuple(
        (i >> 4) << 16 | 1 << (i & 15) for i in everyone)
    assert struct.unpack(f"<{vcpus}I", part.memory.read(ID_SEEN, 4 * vcpus)) == tuple(everyone)
    assert not table.failures, f"{len(table.failures)} of {table.checks} checks failed:\n" + "\n".join(table.failures)


# ---- INIT and SIPI: AP start-up
TRAMPOLINE_VECTOR, WRONG_VECTOR = 0x11, 0x12       # pages 0x11000 and 0x12000 (the image starts at 0x10000)
STARTS = 0x100               # in the DATA segment, 64 bytes per AP: starts, EDX, CS, EFLAGS, CR0, CR4, EFER, APIC base, DR7, SS, IP, CPUID.1.EAX
WRONG_STARTS = 0x80
RUNNING = DATA + 0x800       # u32 per AP, incremented in a loop once the AP is in long mode
SEND, SENT = 0x20, 0x21
INIT_ASSERT, INIT_DEASSERT = 0x4500, 0x8500        # INIT, level assert / level-triggered de-assert
STARTUP = 0x4600

_STARTUP_GUEST = f"""
    mov $0xFEE00000, %rbp                 /* VP 0: writes the ICRs the host asks for */
    movl $0x1FF, 0xF0(%rbp)
next:
    out %al, ${SEND}
    test %eax, %eax
    jz finish
    mov %edx, 0x310(%rbp)
    mov %eax, 0x300(%rbp)
    out %al, ${SENT}
    jmp next
finish:
    out %al, ${DONE}
    hlt

ap_long:                                  /* the AP in long mode: runs until INIT stops it */
    mov $0x10, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    mov $1, %eax
    cpuid
    shr $24, %ebx
1:  lock incl {RUNNING}(,%rbx,4)
    pause
    jmp 1b

.code16
.balign 4096
trampoline:                               /* CS = 0x1100, IP = 0 */
    mov $0x8000, %sp
    mov %edx, %esi                        /* EDX at reset: the processor signature */
    mov %cs, %di
    pushfl
    popl %ebp
    mov %ss, %ax
    mov %ax, %gs                          /* SS selector, kept */
    mov $1, %eax
    cpuid
    mov %eax, %edx
    shr $24, %ebx                         /* the initial APIC id */
    shl $6, %bx
    mov ${DATA >> 4}, %ax
    mov %ax, %ds
    mov %edx, {STARTS + 40}(%bx)
    lock incl {STARTS}(%bx)
    mov %esi, {STARTS + 4}(%bx)
    mov %di, {STARTS + 8}(%bx)
    mov %ebp, {STARTS + 12}(%bx)
    mov %cr0, %eax
    mov %eax, {STARTS + 16}(%bx)
    mov %cr4, %eax
    mov %eax, {STARTS + 20}(%bx)
    mov $0xC0000080, %ecx
    rdmsr
    mov %eax, {STARTS + 24}(%bx)
    mov ${MSR_APIC_BASE}, %ecx
    rdmsr
    mov %eax, {STARTS + 28}(%bx)
    mov %dr7, %eax
    mov %eax, {STARTS + 32}(%bx)
    mov %gs, {STARTS + 36}(%bx)
    call ip_probe
ip_probe:
    pop %ax
    mov %ax, {STARTS + 38}(%bx)
    cmpl $1, {STARTS}(%bx)
    jne park
    lgdtl %cs:(gdt_pointer - trampoline)  /* first start: on to long mode */
{AP_TO_LONG_MODE}park:                                     /* a later start: sleep */
    sti
3:  hlt
    jmp 3b
gdt_pointer:
    .word 23
    .long 0x1000

.balign 4096
wrong:                                    /* a second SIPI must not start anything */
    mov ${DATA >> 4}, %ax
    mov %ax, %ds
    lock incl {WRONG_STARTS}
    sti
4:  hlt
    jmp 4b
"""

# What the trampoline records (offset in the AP's 64 bytes, size).
_RECORD = {"starts": (0, "I"), "edx": (4, "I"), "cs": (8, "H"), "eflags": (12, "I"), "cr0": (16, "I"), "cr4": (20, "I"),
           "efer": (24, "I"), "apic_base": (28, "I"), "dr7": (32, "I"), "ss": (36, "H"), "ip": (38, "H"), "signature": (40, "I")}


def _record(part: Partition, ap: int) -> dict[str, int]:
    raw = part.memory.read(DATA + STARTS + 64 * ap, 64)
    return {name: struct.unpack_from("<" + kind, raw, offset)[0] for name, (offset, kind) in _RECORD.items()}


def _running(part: Partition, ap: int) -> int:
    return int(struct.unpack("<I", part.memory.read(RUNNING + 4 * ap, 4))[0])


def _wait_until(what: str, condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.005)


@pytest.mark.parametrize("vcpus", [2, 4])
def test_init_sipi_start_aps_in_the_reset_state_and_init_stops_a_running_one(part: Partition, tmp_path: Path,
                                                                             vcpus: int) -> None:
    """VP 0 starts each AP with INIT, an INIT de-assert (no effect), SIPI and a second SIPI
    at once and a third once it runs (both ignored: it started once, at the first's vector).
    The AP records its state in real mode (the architectural reset state, CS = vector << 8,
    its APIC base without the BSP flag), enters long mode and loops; then an INIT de-assert
    leaves it running, an INIT stops it, and a SIPI starts it again in the reset state."""
    image, symbols = assemble(_STARTUP_GUEST, tmp_path, origin=CODE)
    assert symbols["trampoline"] == TRAMPOLINE_VECTOR << 12 and symbols["wrong"] == WRONG_VECTOR << 12
    prepare(part, image, {})
    vps = [long_mode_vp(part, 0)]
    for index in range(1, vcpus):
        ap = part.create_vp(index)
        ap.set_registers({HvRegister.INTERNAL_ACTIVITY_STATE: 1})   # waits for INIT/SIPI, as the machine creates APs
        vps.append(ap)
    failures: list[str] = []

    def reset_state(ap: int, starts: int, where: str) -> None:
        record = _record(part, ap)
        expected = {"starts": starts, "edx": record["signature"], "cs": TRAMPOLINE_VECTOR << 8, "eflags": 0x2,
                    "cr0": 0x60000010, "cr4": 0, "efer": 0, "apic_base": 0xFEE00800, "dr7": 0x400, "ss": 0,
                    "ip": symbols["ip_probe"] - symbols["trampoline"]}
        wrong = {k: (record[k], v) for k, v in expected.items() if record[k] != v}
        if wrong:
            failures.append(f"AP {ap} {where}: (seen, architectural) {wrong}")

    def script() -> Iterator[tuple[int, int]]:
        for ap in range(1, vcpus):
            yield INIT_ASSERT, ap
            yield INIT_DEASSERT, ap
            yield STARTUP | TRAMPOLINE_VECTOR, ap
            yield STARTUP | WRONG_VECTOR, ap          # at once: the first is still being taken
            _wait_until(f"AP {ap} runs in long mode", lambda ap=ap: _running(part, ap) > 0)
            yield STARTUP | WRONG_VECTOR, ap          # to a running AP
            reset_state(ap, 1, "at its first start")
        for ap in range(1, vcpus):
            yield INIT_DEASSERT, ap
            first = _running(part, ap)
            _wait_until(f"AP {ap} keeps running after an INIT de-assert", lambda ap=ap, first=first: _running(part, ap) > first + 100)
            yield INIT_ASSERT, ap
            time.sleep(0.05)
            stopped = _running(part, ap)
            time.sleep(0.1)
            if _running(part, ap) != stopped:
                failures.append(f"AP {ap} still runs after INIT")
            yield STARTUP | TRAMPOLINE_VECTOR, ap
            _wait_until(f"AP {ap} starts again", lambda ap=ap: _record(part, ap)["starts"] == 2)
            reset_state(ap, 2, "after INIT from long mode")
        for ap in range(1, vcpus):
            if _running(part, ap) == 0:
                failures.append(f"AP {ap} never ran")

    steps = script()

    def on_port(vp: Vp, exit_: IoPortIntercept) -> bool:
        if exit_.port_number == SEND:
            step = next(steps, None)
            if step is None:
                vp.set_registers({HvRegister.RAX: 0})
            else:
                icr, ap = step
                vp.set_registers({HvRegister.RAX: icr, HvRegister.RDX: ap << 24})
            return False
        return exit_.port_number == DONE

    Runner(vps, on_port).run()
    time.sleep(0.1)
    wrong_starts = struct.unpack("<I", part.memory.read(DATA + WRONG_STARTS, 4))[0]
    assert wrong_starts == 0, f"a second SIPI started an AP {wrong_starts} times"
    assert not failures, "\n".join(failures)


# ---- an interrupt against an exit: the exit is composed at the instruction, and nothing is
# delivered between it and the VMM's completion of it
EXIT_RACE_LEAF, EXIT_RACE_VECTOR, EXIT_RACE_ROUNDS = 0x1234, 0x50, 200
TAKEN = DATA + 0x200


def test_an_interrupt_arriving_as_an_exit_is_composed_waits_for_the_vmm(tmp_path: Path) -> None:
    """An interrupt that arrives while a hook is stopping the engine for an intercept (here
    a CPUID the VMM intercepts; the interrupt is accepted inside the hook, the narrowest
    window there is) must not be delivered before the VMM has completed the instruction.
    Delivered there (a bug this simulator had, which Linux saw as an HvPostMessage arriving
    twice), the VMM's RIP update lands on the handler's first instruction: the handler is
    lost with its frame on the stack and its vector in service.  So: every round's exit
    comes once and in order, each interrupt is taken once, and the stack ends where it began."""
    guest = f"""
    mov $0xFEE00000, %rbp
    movl $0x1FF, 0xF0(%rbp)                 /* SVR: software enabled */
    mov ${EXIT_RACE_ROUNDS}, %r12
    sti
1:  mov ${EXIT_RACE_LEAF}, %eax
    cpuid
    dec %r12
    jnz 1b
    out %al, ${DONE}
    hlt
handler:
    lock incl {TAKEN}
    movl $0, 0xB0(%rbp)                     /* EOI */
    iretq
"""
    with lapic_partition() as part:
        image, symbols = assemble(guest, tmp_path, origin=CODE)
        prepare(part, image, {EXIT_RACE_VECTOR: symbols["handler"]})
        part.install_intercept(lib.HV_INTERCEPT_TYPE_X64_CPUID, 0, EXIT_RACE_LEAF)
        vp = long_mode_vp(part, 0)
        start_rsp = vp.regs.rsp
        sim_vp = part.backend._entry(vp.fd).vp   # type: ignore[attr-defined]
        on_special = sim_vp.stops.on_special

        def interrupt_while_stopping(insn: Any) -> int | None:
            resume_at = on_special(insn)
            if resume_at is None:   # an intercept: the engine stops at this instruction
                sim_vp.lapic.accept(EXIT_RACE_VECTOR)
            return resume_at

        sim_vp.stops.on_special = interrupt_while_stopping
        rounds = []
        while True:
            exit_ = vp.run()
            if isinstance(exit_, IoPortIntercept) and exit_.port_number == DONE:
                break
            assert isinstance(exit_, CpuidIntercept), exit_
            rounds.append(vp.get_registers([HvRegister.R12])[0])
            vp.set_registers({HvRegister.RAX: 0, HvRegister.RBX: 0, HvRegister.RCX: 0, HvRegister.RDX: 0,
                              HvRegister.RIP: exit_.header.next_rip})
        assert rounds == list(range(EXIT_RACE_ROUNDS, 0, -1)), "an exit came twice, or out of order"
        assert struct.unpack("<I", part.memory.read(TAKEN, 4))[0] == EXIT_RACE_ROUNDS, "an interrupt was lost"
        assert vp.regs.rsp == start_rsp, "an interrupt frame was left on the stack (its handler skipped)"
