"""The protocol every CPU engine implements (Unicorn today; KVM can follow).

An engine executes one VP's instructions and owns everything that is
specific to how it does so: mode changes, event delivery with the
architecture's interruptibility rules, the TSC rate and workarounds for
its library.  It stops only where its state is precise: before an
instruction the hypervisor must see, at a faulting access, or at a block
boundary in its own thread (cancel and deadlines).  Nothing above the
engine imports the engine's library.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol


class Special(enum.Enum):
    """Instructions the hypervisor must see before they execute."""

    IO = "io"
    RDMSR = "rdmsr"
    WRMSR = "wrmsr"
    CPUID = "cpuid"
    HLT = "hlt"
    VMCALL = "vmcall"


@dataclass(frozen=True)
class Instruction:
    address: int        # linear address (RIP + CS base)
    rip: int
    length: int
    raw: bytes
    kind: Special | None
    mnemonic: str
    op_str: str


class StopKind(enum.Enum):
    SPECIAL = "special"         # the handler asked to exit at this instruction
    UNMAPPED = "unmapped"       # access to an address with no RAM behind it
    PROTECTION = "protection"   # access the mapping does not allow
    EXCEPTION = "exception"     # an intercepted exception (not delivered)
    CANCELLED = "cancelled"     # cancel(): at a block boundary
    DEADLINE = "deadline"       # the run's deadline passed (at a block boundary)
    SHUTDOWN = "shutdown"       # triple fault: the processor shuts down
    WRITTEN = "written"         # the engine wrote the intercept message and register page itself (attach_vp)


@dataclass(frozen=True)
class EngineStop:
    kind: StopKind
    instruction: Instruction | None = None
    address: int = 0            # faulting address: physical for UNMAPPED/PROTECTION
    write: bool = False
    execute: bool = False
    size: int = 0
    value: int = 0
    vector: int = 0
    error_code: int | None = None
    linear: int | None = None   # the access's linear address, where the engine knows it


# Returns None to stop at this instruction (before it executes), CONTINUE to
# let it execute natively, or the RIP at which to continue (handled).
CONTINUE = -1
SpecialHandler = Callable[[Instruction], "int | None"]
MmioRead = Callable[[int, int], int]          # (offset, size) -> value
MmioWrite = Callable[[int, int, int], None]   # (offset, size, value)
# Called when the engine delivers the offered interrupt vector; returns the
# next vector to offer (or -1): the interrupt controller acknowledges it.
InterruptAcknowledge = Callable[[int], int]
InterruptOffer = Callable[[], int]   # the vector to deliver when the guest can take it (-1: none)


class CodeReader(Protocol):
    """How an engine reads guest code: through the guest's own page tables."""

    def translate(self, linear: int) -> int | None: ...
    def read_physical(self, gpa: int, size: int) -> bytes | None: ...
    def host_address(self, gpa: int) -> int | None: ...   # where the page's bytes live in this process


@dataclass
class EngineTime:
    """Where a VP's engine time went: running guest code, and of that, scanning new blocks."""

    running: float = 0.0
    scanning: float = 0.0
    blocks: int = 0


class Engine(Protocol):
    @property
    def time(self) -> EngineTime: ...

    @property
    def blocks_filtered(self) -> int: ...   # new blocks the engine found plain without scanning them in Python

    @property
    def blocks_redone(self) -> tuple[int, int]: ...   # new blocks translated again for coherence (all, and alone)

    def map(self, gpa: int, size: int, host_address: int, writable: bool, executable: bool) -> None: ...
    def unmap(self, gpa: int, size: int) -> None: ...
    def protect(self, gpa: int, size: int, writable: bool, executable: bool) -> None: ...
    def map_mmio(self, gpa: int, size: int, read: MmioRead, write: MmioWrite) -> None: ...
    def reg(self, name: int) -> int: ...
    def set_reg(self, name: int, value: int) -> None: ...
    def holds(self, name: int) -> bool: ...
    def segment(self, name: int) -> tuple[int, int, int, int]: ...
    def set_segment(self, name: int, base: int, limit: int, selector: int, attributes: int) -> None: ...
    def code_bits(self) -> int: ...
    def snapshot(self) -> dict[int, int]: ...
    def paging(self) -> tuple[int, int, int, int]: ...   # CR0, CR3, CR4, EFER
    def offer_interrupt(self, vector: int) -> None: ...
    def inject_nmi(self) -> None: ...
    def inject_exception(self, vector: int, error_code: int | None) -> None: ...
    def intercept_exceptions(self, vectors: int) -> None: ...
    def intercept_hypercalls(self, on: bool) -> None: ...
    def run_msrs_natively(self, msrs: Iterable[int], first: int, last: int) -> None: ...
    def interrupt_shadow(self) -> bool: ...
    def nmi_blocked(self) -> bool: ...
    def set_interrupt_state(self, shadow: bool, nmi_blocked: bool) -> None: ...
    def run(self, deadline_ns: int = 0) -> EngineStop: ...
    def attach_vp(self, vp_index: int, register_page: int, message_page: int) -> None: ...
    def publish_registers(self) -> None: ...
    def consume_registers(self) -> bool: ...
    def set_deadline(self, deadline_ns: int) -> None: ...
    def cancel(self) -> None: ...
    def offer_soon(self) -> None: ...
    def flush_code(self, gpa: int, size: int) -> None: ...
    def close(self) -> None: ...
