"""Small multi-VP long-mode guests run through the public partition API.

Every VP starts at CODE in 64-bit mode with its index in RBX and its own
4 KiB stack (interrupt handlers find their VP index from RSP); RAM is
identity mapped with 2 MiB pages, and so is the xAPIC page.  Each VP runs
on its own host thread; port writes reach a host callback on that thread
(which may change registers before the VP goes on), and the other VPs are
kicked out of their runs once the callback says the test is over.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from mshvstack.hvcall import HvRegister
from mshvstack.partition import Interrupted, IoPortIntercept, Mshv, Partition, PartitionConfig, Segment, Vp, VpExit
from mshvstack.partition.registers import TableRegister

RAM = 4 << 20
GDT, PML4, PDPT, PD0, PD3, IDT = 0x1000, 0x2000, 0x3000, 0x4000, 0x5000, 0x6000
# An AP's way from real mode (its GDT loaded) to ``ap_long`` in long mode: PAE, the
# page tables at PML4, EFER.LME, then paging and protection together.
AP_TO_LONG_MODE = f"""    mov %cr4, %eax
    or $0x20, %eax
    mov %eax, %cr4
    mov ${PML4}, %eax
    mov %eax, %cr3
    mov $0xC0000080, %ecx
    rdmsr
    or $0x100, %eax
    wrmsr
    mov %cr0, %eax
    or $0x80000001, %eax
    mov %eax, %cr0
    ljmpl $0x08, $ap_long
"""
CODE = 0x10000
DATA = 0x40000            # guest variables (see each test)
STACKS = 0x70000          # VP i: [STACKS + i * 0x1000, STACKS + (i + 1) * 0x1000)
STACK_SHIFT = 12
XAPIC_PAGE = 0xFEE00000
MSR_APIC_BASE = 0x1B

# Handlers: the VP index from RSP, in RDX (RDX saved by the caller's stub).
VP_INDEX_FROM_RSP = f"""
    mov %rsp, %rdx
    sub ${STACKS}, %rdx
    shr ${STACK_SHIFT}, %rdx
"""


@contextmanager
def lapic_partition(x2apic: bool = False) -> Iterator[Partition]:
    """A partition with the hypervisor's LAPIC and RAM mapped at GPA 0 (each test module's ``part`` fixture)."""
    with Mshv.open() as mshv, mshv.create_partition(PartitionConfig(lapic=True, x2apic=x2apic)) as part:
        part.initialize()
        part.map_memory(gpa=0, size=RAM)
        yield part


def prepare(part: Partition, image: bytes, gates: dict[int, int]) -> None:
    """Page tables, GDT, IDT (``gates``: vector -> handler) and the code."""
    memory = part.memory
    memory.write(PML4, struct.pack("<Q", PDPT | 3))
    memory.write(PDPT, struct.pack("<Q", PD0 | 3))
    memory.write(PDPT + 3 * 8, struct.pack("<Q", PD3 | 3))
    memory.write(PD0, b"".join(struct.pack("<Q", (i << 21) | 0x83) for i in range(RAM >> 21)))
    memory.write(PD3 + ((XAPIC_PAGE - 0xC0000000) >> 21) * 8, struct.pack("<Q", XAPIC_PAGE | 0x83 | 0x10))  # PCD
    memory.write(GDT, struct.pack("<QQQ", 0, 0x00AF9A000000FFFF, 0x00CF92000000FFFF))
    for vector, handler in gates.items():
        low = (handler & 0xFFFF) | (0x08 << 16) | (0x8E00 << 32) | ((handler >> 16) & 0xFFFF) << 48
        memory.write(IDT + 16 * vector, struct.pack("<QQ", low, handler >> 32))
    memory.write(CODE, image)


def long_mode_vp(part: Partition, index: int, entry: int = CODE) -> Vp:
    """VP ``index`` in 64-bit mode at ``entry``, RBX = index, IF clear."""
    vp = part.create_vp(index)
    sregs = vp.sregs
    sregs.cs = Segment(base=0, limit=0xFFFFFFFF, selector=0x08, attributes=0xA09B)
    for name in ("ds", "es", "ss", "fs", "gs"):
        setattr(sregs, name, Segment(base=0, limit=0xFFFFFFFF, selector=0x10, attributes=0xC093))
    sregs.gdt = TableRegister(base=GDT, limit=23)
    sregs.idt = TableRegister(base=IDT, limit=0xFFF)
    sregs.cr3, sregs.cr4, sregs.efer, sregs.cr0 = PML4, 1 << 5, (1 << 8) | (1 << 10), 0x80000011
    vp.sregs = sregs
    regs = vp.regs
    regs.rip, regs.rflags, regs.rbx, regs.rsp = entry, 2, index, STACKS + (index + 1) * 0x1000 - 16
    vp.regs = regs
    return vp


# A port callback: (vp, exit) -> True when the whole test is over.
PortHandler = Callable[[Vp, IoPortIntercept], bool]


@dataclass
class Runner:
    """Runs VPs on their own threads until a port handler ends the test."""

    vps: list[Vp]
    on_port: PortHandler
    timeout: float = 120.0
    errors: list[BaseException] = field(default_factory=list)
    _done: threading.Event = field(default_factory=threading.Event)

    def _run(self, vp: Vp) -> None:
        try:
            while not self._done.is_set():
                exit_: VpExit = vp.run()
                if isinstance(exit_, Interrupted):
                    continue
                if not isinstance(exit_, IoPortIntercept):
                    raise AssertionError(f"VP {vp.index}: unexpected exit {exit_}")
                vp.set_registers({HvRegister.RIP: exit_.header.next_rip})
                if self.on_port(vp, exit_):
                    self.finish()
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            self.errors.append(exc)
            self.finish()

    def finish(self) -> None:
        self._done.set()
        for vp in self.vps:
            vp.kick()

    def run(self) -> None:
        threads = [threading.Thread(target=self._run, args=(vp,), name=f"test-vp{vp.index}") for vp in self.vps]
        for thread in threads:
            thread.start()
        finished = self._done.wait(self.timeout)
        if not finished:
            self.finish()
        for thread in threads:
            thread.join(timeout=30)
        if self.errors:
            raise self.errors[0]
        assert finished, f"the guest did not finish within {self.timeout:.0f} s"
        assert not any(thread.is_alive() for thread in threads), "a VP thread did not stop"

