"""The small interface every CPU engine implements (Unicorn today, KVM next)."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable, Protocol


class Special(enum.Enum):
    """Instructions the hypervisor must see before they execute."""

    IO = "io"
    RDMSR = "rdmsr"
    WRMSR = "wrmsr"
    CPUID = "cpuid"
    HLT = "hlt"
    VMCALL = "vmcall"
    FARJUMP = "farjump"   # in 16/32-bit engines: may enter long mode


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
    EXCEPTION = "exception"     # the guest raised an exception / int n
    CANCELLED = "cancelled"     # cancel() from another thread (kick, interrupt)


@dataclass(frozen=True)
class EngineStop:
    kind: StopKind
    instruction: Instruction | None = None
    address: int = 0            # faulting address (virtual when paging is on)
    write: bool = False
    execute: bool = False
    size: int = 0
    value: int = 0
    vector: int = 0


# Returns None to stop at this instruction (before it executes), CONTINUE to
# let it execute natively, or the RIP at which to continue (handled).
CONTINUE = -1
SpecialHandler = Callable[[Instruction], "int | None"]
MmioRead = Callable[[int, int], int]          # (offset, size) -> value
MmioWrite = Callable[[int, int, int], None]   # (offset, size, value)


class CodeReader(Protocol):
    """How an engine reads guest code: through the guest's own page tables."""

    def translate(self, linear: int) -> int | None: ...
    def read_physical(self, gpa: int, size: int) -> bytes | None: ...


class Engine(Protocol):
    bits: int

    def map(self, gpa: int, size: int, host_address: int, writable: bool, executable: bool) -> None: ...
    def unmap(self, gpa: int, size: int) -> None: ...
    def protect(self, gpa: int, size: int, writable: bool, executable: bool) -> None: ...
    def reg(self, name: int) -> int: ...
    def set_reg(self, name: int, value: int) -> None: ...
    def segment(self, name: int) -> tuple[int, int, int, int]: ...
    def set_segment(self, name: int, base: int, limit: int, selector: int, attributes: int) -> None: ...
    def map_mmio(self, gpa: int, size: int, read: MmioRead, write: MmioWrite) -> None: ...
    def holds(self, name: int) -> bool: ...
    def snapshot(self) -> dict[int, int]: ...
    def run(self, timeout_us: int = 0) -> EngineStop: ...
    def cancel(self) -> None: ...
    def flush_code(self, gpa: int, size: int) -> None: ...
    def close(self) -> None: ...
