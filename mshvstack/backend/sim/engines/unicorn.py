"""The Unicorn engine: portable, deterministic software execution of guest code.

One 64-bit Unicorn CPU runs every mode (real, protected, long): QEMU's x86
target decodes by the CPU's own mode flags, so registers keep their full
width everywhere and a guest switches modes without the engine noticing.
The segment caches, EFER and the interrupt flags the public API does not
reach are set through the C core (x86core.c), which also delivers
interrupts and exceptions with QEMU's own x86 code and takes every stop at
a precise point.

Exits are exact: each new translation block is decoded once, when it is
translated (capstone, in Python, called from the C core), and gets a code
hook on exactly the instructions the hypervisor must see (IN/OUT/INS/OUTS,
RDMSR/WRMSR, CPUID, HLT, VMCALL/VMMCALL); a code hook that stops does so
before its instruction.  Nothing runs per executed block.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import capstone
import capstone.x86 as cx
import unicorn
import unicorn.x86_const as ux
from unicorn.unicorn_py3.unicorn import uclib

from mshvstack.abi import lib
from mshvstack.backend.sim.engines._fastpath import ffi as core_ffi
from mshvstack.backend.sim.engines._fastpath import lib as core
from mshvstack.backend.sim.engines.base import (
    CONTINUE,
    CodeReader,
    EngineStop,
    EngineTime,
    Instruction,
    InterruptAcknowledge,
    InterruptOffer,
    MmioRead,
    MmioWrite,
    Special,
    SpecialHandler,
    StopKind,
)
from mshvstack.backend.sim.engines.plainram import PlainRam
from mshvstack.backend.sim.engines.unicornsyms import SymbolsMissing, exported_addresses, library_addresses

# Stops with nothing to describe (one object each).
_WRITTEN = EngineStop(StopKind.WRITTEN)   # the core wrote the intercept message and the register page
_CANCELLED = EngineStop(StopKind.CANCELLED)
_DEADLINE = EngineStop(StopKind.DEADLINE)

_SPECIAL_IDS: dict[int, Special] = {
    cx.X86_INS_IN: Special.IO, cx.X86_INS_OUT: Special.IO,
    cx.X86_INS_INSB: Special.IO, cx.X86_INS_INSW: Special.IO, cx.X86_INS_INSD: Special.IO,
    cx.X86_INS_OUTSB: Special.IO, cx.X86_INS_OUTSW: Special.IO, cx.X86_INS_OUTSD: Special.IO,
    cx.X86_INS_RDMSR: Special.RDMSR, cx.X86_INS_WRMSR: Special.WRMSR,
    cx.X86_INS_CPUID: Special.CPUID, cx.X86_INS_HLT: Special.HLT,
    cx.X86_INS_VMCALL: Special.VMCALL, cx.X86_INS_VMMCALL: Special.VMCALL,
}
# How the core treats each kind before asking the Python half (x86core.c's special hook).
_CORE_KINDS = {Special.IO: core.SPECIAL_KIND_IO, Special.RDMSR: core.SPECIAL_KIND_MSR, Special.WRMSR: core.SPECIAL_KIND_MSR,
               Special.VMCALL: core.SPECIAL_KIND_HYPERCALL}

# Guests with at most this many translated code pages have them compared with their bytes at
# translation before every run (host writes through the VMM's own mapping; see _track).  A
# run paid up to two streams of 2 MiB at 512 pages (7% of a Debian boot, which passes 512
# early and then had no check anyway); small guests, which write code that way, keep it.
MAX_TRACKED_CODE_PAGES = 64
# Unicorn's translation buffer (1 GiB by default).  Generated code calls into
# the library at every block start, directly only within 2 GiB of it: a buffer
# mapped further away (a second engine, a large guest mapped first) halved
# guest speed.  A Debian boot translates well under this.
TCG_BUFFER_SIZE = 256 << 20

# env->error_code in unicorn 2.1.4's CPUX86State (pinned in setup.py); it is
# used only when the engine's saved context has the size of that version.
_ERROR_CODE_OFFSET = 5384
_CONTEXT_SIZE = 5608

# QEMU's hidden flags (target/i386/cpu.h): the code segment's width.
_HF_CS32 = 1 << 4
_HF_CS64 = 1 << 15

_CS_MODE = {16: capstone.CS_MODE_16, 32: capstone.CS_MODE_32, 64: capstone.CS_MODE_64}

_GPRS = ("RAX", "RCX", "RDX", "RBX", "RSP", "RBP", "RSI", "RDI") + tuple(f"R{i}" for i in range(8, 16))
_CONTROL = ("CR0", "CR2", "CR3", "CR4", "CR8", "DR0", "DR1", "DR2", "DR3", "DR6", "DR7")

# hv_register_name → index in QEMU's segment caches (ES CS SS DS FS GS, LDTR, TR, GDTR, IDTR).
_SEGMENT_INDEX = {
    int(lib.HV_X64_REGISTER_ES): 0, int(lib.HV_X64_REGISTER_CS): 1, int(lib.HV_X64_REGISTER_SS): 2,
    int(lib.HV_X64_REGISTER_DS): 3, int(lib.HV_X64_REGISTER_FS): 4, int(lib.HV_X64_REGISTER_GS): 5,
    int(lib.HV_X64_REGISTER_LDTR): 6, int(lib.HV_X64_REGISTER_TR): 7,
    int(lib.HV_X64_REGISTER_GDTR): 8, int(lib.HV_X64_REGISTER_IDTR): 9,
}
_CS_INDEX = 1
# Registers backed by an MSR inside Unicorn (EFER goes through the core: WRMSR cannot set LMA).
_MSRS = {
    lib.HV_X64_REGISTER_KERNEL_GS_BASE: 0xC0000102,
    lib.HV_X64_REGISTER_STAR: 0xC0000081, lib.HV_X64_REGISTER_LSTAR: 0xC0000082,
    lib.HV_X64_REGISTER_CSTAR: 0xC0000083, lib.HV_X64_REGISTER_SFMASK: 0xC0000084,
    lib.HV_X64_REGISTER_SYSENTER_CS: 0x174, lib.HV_X64_REGISTER_SYSENTER_ESP: 0x175,
    lib.HV_X64_REGISTER_SYSENTER_EIP: 0x176, lib.HV_X64_REGISTER_PAT: 0x277,
    lib.HV_X64_REGISTER_TSC_AUX: 0xC0000103,
}
_TSC = int(lib.HV_X64_REGISTER_TSC)
_EFER = int(lib.HV_X64_REGISTER_EFER)
_RIP = int(lib.HV_X64_REGISTER_RIP)
_RFLAGS = int(lib.HV_X64_REGISTER_RFLAGS)
_MODE_REGISTERS = frozenset({int(lib.HV_X64_REGISTER_CR0), int(lib.HV_X64_REGISTER_CR4)})
# x87 and SSE state beyond the XMM registers: ST(0)..ST(7) (Hyper-V names them by stack
# position; QEMU keeps them by physical register, ST(i) = physical (TOP + i) mod 8).
_FP_STACK = {int(getattr(lib, f"HV_X64_REGISTER_FP_MMX{i}")): i for i in range(8)}
_FP_CONTROL = int(lib.HV_X64_REGISTER_FP_CONTROL_STATUS)
_XMM_CONTROL = int(lib.HV_X64_REGISTER_XMM_CONTROL_STATUS)
_FP_TAG_EMPTY = 3
_MXCSR_MASK = int(lib.X86_MXCSR_MASK)
U64 = (1 << 64) - 1

# Probe values written to RAX..R15 so the core can find QEMU's CPU state.
_PROBE = [0x6D736876_00000000 | i << 8 | 0xA5 for i in range(16)]
# The CPU state the core mirrors (x86core.c, enum mirror_field order): checked through
# the register API when an engine starts (the GPRs are found with _PROBE).
_MIRRORED_REGISTERS = {name: getattr(ux, f"UC_X86_REG_{name}")
                       for name in ("RIP", "EFLAGS", "CR0", "CR3", "CR4", "FS_BASE", "GS_BASE", "GDTR", "IDTR")}
_MIRRORED_OTHERS = ("EFER", "the long-mode hflags")


class EngineUnavailable(RuntimeError):
    """The installed Unicorn is not the version whose internals the core knows."""


@functools.cache
def tsc_hz() -> int:
    """The rate of the guest's TSC: Unicorn's RDTSC reads the host's counter.

    Measured once against the monotonic clock (20 ms, well under 0.1%) so the
    frequency MSR and partition property tell the guest its real TSC rate
    and Linux skips calibrating it against a PIT the simulator lacks.
    """
    uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
    uc.mem_map(0x1000, 0x1000)
    uc.mem_write(0x1000, b"\x0f\x31")  # rdtsc

    def sample() -> tuple[int, int]:
        uc.emu_start(0x1000, 0x1002)
        return int(uc.reg_read(ux.UC_X86_REG_RDX)) << 32 | int(uc.reg_read(ux.UC_X86_REG_RAX)), time.perf_counter_ns()

    tsc0, ns0 = sample()
    time.sleep(0.02)
    tsc1, ns1 = sample()
    return (tsc1 - tsc0) * 1_000_000_000 // max(ns1 - ns0, 1)


def read_tsc() -> int:
    """The TSC every guest on this engine reads (the host's counter)."""
    return int(core.mshvstack_host_tsc())


def _plain_registers() -> dict[int, int]:
    """hv_register_name → Unicorn register id."""
    table = {int(getattr(lib, f"HV_X64_REGISTER_{n}")): getattr(ux, f"UC_X86_REG_{n}") for n in _GPRS + _CONTROL}
    table[_RIP] = ux.UC_X86_REG_RIP
    table[int(lib.HV_X64_REGISTER_RFLAGS)] = ux.UC_X86_REG_RFLAGS
    return table


_REGS = _plain_registers()
_SNAPSHOT_IDS = core_ffi.new("int[]", list(_REGS.values()))
_PAGING_IDS = core_ffi.new("int[]", [ux.UC_X86_REG_CR0, ux.UC_X86_REG_CR3, ux.UC_X86_REG_CR4])
_PAGE_REGISTER_IDS = core_ffi.new("int[6]", [ux.UC_X86_REG_RFLAGS, ux.UC_X86_REG_CR0, ux.UC_X86_REG_CR3,
                                             ux.UC_X86_REG_CR4, ux.UC_X86_REG_CR8, ux.UC_X86_REG_DR7])
_VECTORS = {int(getattr(lib, f"HV_X64_REGISTER_XMM{i}")): getattr(ux, f"UC_X86_REG_XMM{i}") for i in range(16)}


def hv_attributes(qemu_flags: int) -> int:
    """QEMU keeps descriptor bits 8-23; hv_x64_segment_register packs them in 16 bits."""
    return (qemu_flags >> 8) & 0xFF | (qemu_flags >> 8) & 0xF000


def qemu_flags(attributes: int) -> int:
    return (attributes & 0xFF) << 8 | (attributes & 0xF000) << 8


@core_ffi.def_extern(error=0)  # type: ignore[untyped-decorator]
def mshvstack_on_new_block(owner: object, address: int, size: int) -> int:
    """Called from the C core before a block whose code it has not scanned runs (and at
    a hooked instruction whose code changed); 1: it must be translated again."""
    return int(core_ffi.from_handle(owner)._scan_block(address, size))


@core_ffi.def_extern(error=core.SPECIAL_STOP)  # type: ignore[untyped-decorator]
def mshvstack_on_special(owner: object, address: int) -> int:
    """A special instruction is about to run: continue, stop, or resume at cpu.resume_rip."""
    return int(core_ffi.from_handle(owner)._on_special_code(address))


@core_ffi.def_extern()  # type: ignore[untyped-decorator]
def mshvstack_on_memory_fault(owner: object, access: int, address: int, size: int, value: int) -> None:
    """An unmapped or protected access: the core stops at the instruction after this."""
    core_ffi.from_handle(owner)._on_memory_fault(access, address, size, value)


@core_ffi.def_extern(error=-1)  # type: ignore[untyped-decorator]
def mshvstack_on_injected(owner: object, vector: int) -> int:
    """The core delivered the offered interrupt: acknowledge it, offer the next."""
    engine = core_ffi.from_handle(owner)
    return int(engine._acknowledge(vector))


@core_ffi.def_extern(error=-1)  # type: ignore[untyped-decorator]
def mshvstack_on_offer(owner: object) -> int:
    """An interrupt arrived while the engine ran (offer_soon): what to offer now."""
    return int(core_ffi.from_handle(owner)._offer())


@functools.cache
def _library() -> Any:
    """The libunicorn internals the core patches, its translator wrapped once per process."""
    try:
        addresses = library_addresses()
        exported = exported_addresses()
    except (OSError, SymbolsMissing) as exc:
        raise EngineUnavailable(f"unicorn {unicorn.__version__}: {exc}; install the pinned version "
                                "(pip install 'unicorn==2.1.4')") from None
    library = core_ffi.new("struct mshvstack_library *")
    for field, address in addresses.items():
        setattr(library, field, core_ffi.cast("void *", address))
    for field, functions in exported.items():
        for i, address in enumerate(functions):
            getattr(library, field)[i] = core_ffi.cast("void *", address)
    status = core.mshvstack_parallel_install(library)
    if status != 0:
        raise EngineUnavailable(f"unicorn {unicorn.__version__}: its x86 translator is not the one the engine core "
                                f"knows (status {status}); install the pinned version (pip install 'unicorn==2.1.4')")
    return library


class EngineGroup:
    """The engines of one partition, run as one SMP machine (x86parallel.c).

    Each engine translates guest code with host atomics, so locked
    instructions are atomic between VPs; an instruction no host atomic can
    do runs while every other engine of the group is parked.
    """

    def __init__(self) -> None:
        self.world = core_ffi.new("struct mshvstack_world *")
        core.mshvstack_world_init(self.world)

    def code_written(self, ranges: Sequence[tuple[int, int]]) -> None:
        """The host wrote guest RAM at these (host address, length) ranges: each engine
        drops its translations of code there at its next block boundary (at once when
        running, else before it runs)."""
        flat = core_ffi.new("uint64_t[]", [value for pair in ranges for value in pair])
        core.mshvstack_world_code_written(self.world, flat, len(ranges))

    def __del__(self) -> None:   # engines hold a reference: none is attached any more
        core.mshvstack_world_destroy(self.world)


class UnicornEngine:
    """One VP's CPU on Unicorn."""

    def __init__(self, on_special: SpecialHandler, code: CodeReader, acknowledge: InterruptAcknowledge,
                 group: EngineGroup | None = None, offer: InterruptOffer = lambda: -1) -> None:
        self._group = group if group is not None else EngineGroup()
        self._uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
        self._disassemblers = {bits: capstone.Cs(capstone.CS_ARCH_X86, mode) for bits, mode in _CS_MODE.items()}
        self._operand_decoders: dict[int, capstone.Cs] = {}   # with operand detail, built on first use
        self._on_special = on_special
        self._code = code
        self._acknowledge = acknowledge
        self._offer = offer
        self._hooked: set[int] = set()
        self._guarded: set[int] = set()   # guest pages with code, guarded (mshvstack_guard_code)
        self._specials: dict[int, Instruction] = {}
        self._stop: EngineStop | None = None
        self._code_pages: dict[tuple[int, int], bytes] = {}  # (linear page, guest page) -> its bytes at translation
        # The same, as the C check reads them: keys in order, host addresses, saved bytes (page i at i * 4 KiB).
        self._tracked_keys: list[tuple[int, int]] = []
        self._tracked_hosts = core_ffi.new("uint64_t[]", MAX_TRACKED_CODE_PAGES)
        self._tracked_saved = bytearray(MAX_TRACKED_CODE_PAGES * 0x1000)
        self._tracked_saved_c = core_ffi.from_buffer("uint8_t[]", self._tracked_saved)
        self._running: int | None = None                    # thread id inside run() (holding _exclusive)
        # Held by the thread in run(), or by another thread changing the memory map or the code while
        # nobody runs: so a change and a run never overlap (Unicorn is not thread-safe).  Never waited
        # for by a changer (it queues the change instead), only by run().
        self._exclusive = threading.Lock()
        self._deferred: list[Callable[[], None]] = []
        self._deferred_lock = threading.Lock()              # the queue of changes (a leaf)
        self._segment = core_ffi.new("struct mshvstack_segment *")
        self._snapshot = core_ffi.new("uint64_t[]", len(_REGS))
        self._paging = core_ffi.new("uint64_t[3]")
        self._code_buffer = core_ffi.new("uint8_t[]", 4096)   # blocks are shorter than a page
        self._gpa = core_ffi.new("uint64_t *")
        self._segments: dict[int, tuple[int, int, int, int]] = {}
        self._time = EngineTime()
        self._plain = PlainRam()
        self._fault_ranges_stale = False
        uc = self._uc
        uc.ctl_set_tcg_buffer_size(TCG_BUFFER_SIZE)
        # Run until stopped, with no "until" address: Unicorn implements
        # "until" through CPU state that leaks into CR2 (seen with 2.1.4).
        uc.ctl_exits_enabled(True)
        uc.ctl_set_exits([])
        self._start_core()

    def _start_core(self) -> None:
        uc = self._uc
        for i, name in enumerate(_GPRS):
            uc.reg_write(getattr(ux, f"UC_X86_REG_{name}"), _PROBE[i])
        self._handle = core_ffi.new_handle(self)
        self._cpu = core_ffi.new("struct mshvstack_cpu *")
        probe = core_ffi.new("uint64_t[16]", _PROBE)
        status = core.mshvstack_cpu_init(self._cpu, self._handle, core_ffi.cast("void *", uc._uch.value),
                                         uclib._name.encode(), probe, ux.UC_X86_REG_EFLAGS, ux.UC_X86_REG_MSR,
                                         ux.UC_X86_REG_RAX)
        if status != 0:
            raise EngineUnavailable(f"unicorn {unicorn.__version__}: the engine core cannot attach to it "
                                    f"(status {status}); install the pinned version (pip install 'unicorn==2.1.4')")
        ids = core_ffi.new("int[]", list(_MIRRORED_REGISTERS.values()))
        mismatch = core.mshvstack_check_mirror(self._cpu, ids)
        if mismatch:
            field = (*_MIRRORED_REGISTERS, *_MIRRORED_OTHERS)[mismatch - 1]
            raise EngineUnavailable(f"unicorn {unicorn.__version__}: its CPU state does not hold {field} where the engine core "
                                    "reads it; install the pinned version (pip install 'unicorn==2.1.4')")
        if uc.context_save().size == _CONTEXT_SIZE:
            self._cpu.error_code_offset = _ERROR_CODE_OFFSET
        self._cpu.code_hosts = self._tracked_hosts
        self._cpu.code_saved = self._tracked_saved_c
        status = core.mshvstack_parallel_attach(self._cpu, self._group.world, _library())
        if status != 0:
            raise EngineUnavailable(f"unicorn {unicorn.__version__}: the engine core does not recognise its CPU state "
                                    f"or hooks (status {status}); install the pinned version (pip install 'unicorn==2.1.4')")
        core.mshvstack_translating_for(self._cpu)
        try:
            self._run_first_block()
        finally:
            core.mshvstack_translating_for(core_ffi.NULL)
        if not core.mshvstack_parallel_ready(self._cpu):
            raise EngineUnavailable(f"unicorn {unicorn.__version__}: the engine core cannot find the translator's context; "
                                    "install the pinned version (pip install 'unicorn==2.1.4')")
        status = core.mshvstack_quiet_exit_checks(self._cpu, TCG_BUFFER_SIZE)
        if status != 0:
            raise EngineUnavailable(f"unicorn {unicorn.__version__}: the engine core cannot find its exit-check flag ({status}); "
                                    "install the pinned version (pip install 'unicorn==2.1.4')")
        status = core.mshvstack_cpu_hooks(self._cpu, unicorn.UC_HOOK_EDGE_GENERATED, unicorn.UC_HOOK_INTR,
                                          unicorn.UC_HOOK_INSN_INVALID, unicorn.UC_HOOK_INSN, ux.UC_X86_INS_SYSCALL,
                                          unicorn.UC_HOOK_CODE, unicorn.UC_HOOK_MEM_UNMAPPED | unicorn.UC_HOOK_MEM_PROT)
        if status != 0:
            raise EngineUnavailable(f"unicorn refused the engine's hooks (status {status})")
        for name in _GPRS:
            uc.reg_write(getattr(ux, f"UC_X86_REG_{name}"), 0)

    def _run_first_block(self) -> None:
        """Unicorn reports a new block (the core's edge hook) as an edge from the last
        block run, so only once one has run: run one, on a scratch page, before any
        guest code (nop; jmp to the next instruction; hlt), then forget it."""
        uc = self._uc
        uc.mem_map(0, 0x1000)
        uc.mem_write(0, bytes.fromhex("90eb00f4"))
        uc.emu_start(0, 0)
        uc.mem_unmap(0, 0x1000)
        uc.ctl_flush_tb()
        uc.reg_write(ux.UC_X86_REG_RIP, 0)

    # ---- cross-thread requests: Unicorn is not thread-safe, so changes asked
    # for while the VP runs are applied by the VP's thread at its next stop.
    def _change(self, operation: Callable[[], None]) -> None:
        """Apply a change now: from a hook of this engine's own run, or while nobody runs
        it (holding _exclusive, so no run starts meanwhile, after the changes queued
        before it); else queue it for the running thread, which applies it before it
        runs again, and stop the run."""
        if self._running == threading.get_ident():
            operation()
            return
        if self._exclusive.acquire(blocking=False):
            try:
                if self._deferred:
                    self._apply_deferred()
                operation()
            finally:
                self._exclusive.release()
            return
        with self._deferred_lock:
            self._deferred.append(operation)
        self.cancel()

    def _apply_deferred(self) -> None:
        with self._deferred_lock:
            operations, self._deferred = self._deferred, []
        for operation in operations:
            operation()

    # ---- memory ----
    def map(self, gpa: int, size: int, host_address: int, writable: bool, executable: bool) -> None:
        self._change(lambda: self._map(gpa, size, host_address, writable, executable))

    def _map(self, gpa: int, size: int, host_address: int, writable: bool, executable: bool) -> None:
        perms = unicorn.UC_PROT_READ | (unicorn.UC_PROT_WRITE if writable else 0) | (unicorn.UC_PROT_EXEC if executable else 0)
        self._uc.mem_map_ptr(gpa, size, perms, host_address)
        if core.mshvstack_ram_map(self._cpu, gpa, size, host_address) != 0:   # where code pages live (x86core.c)
            raise MemoryError("the engine core cannot record the mapping")
        self._plain.map(gpa, size, writable and executable)
        self._fault_ranges_stale = True
        self._write_protect(host_address, size, not writable)

    def unmap(self, gpa: int, size: int) -> None:
        self._change(lambda: self._unmap(gpa, size))

    def _unmap(self, gpa: int, size: int) -> None:
        host = self._code.host_address(gpa)
        if host is not None:
            self._write_protect(host, size, False)
        self._uc.mem_unmap(gpa, size)
        core.mshvstack_ram_unmap(self._cpu, gpa, size)
        self._plain.unmap(gpa, size)
        self._fault_ranges_stale = True
        self._flush_code(gpa, size)

    def protect(self, gpa: int, size: int, writable: bool, executable: bool) -> None:
        self._change(lambda: self._protect(gpa, size, writable, executable))

    def _protect(self, gpa: int, size: int, writable: bool, executable: bool) -> None:
        perms = unicorn.UC_PROT_READ | (unicorn.UC_PROT_WRITE if writable else 0) | (unicorn.UC_PROT_EXEC if executable else 0)
        self._uc.mem_protect(gpa, size, perms)
        self._plain.protect(gpa, size, writable and executable)
        self._fault_ranges_stale = True
        host = self._code.host_address(gpa)
        if host is not None:
            self._write_protect(host, size, not writable)

    def _write_protect(self, host: int, size: int, protect: bool) -> None:
        """Tell the core which pages a host atomic must not write unchecked (x86parallel.c)."""
        if core.mshvstack_write_protect(self._cpu, host, size, int(protect)) != 0:
            raise MemoryError("the engine core cannot record write-protected pages")

    def _hook_memory_faults(self) -> None:
        """Hook memory faults where they can happen: everywhere but plain RAM (plainram.py)."""
        ranges = self._plain.fault_ranges()
        if len(ranges) > core.MAX_FAULT_RANGES:   # fragmented (page-by-page protection): hook everything
            ranges = [(0, (1 << 64) - 1)]
        bounds = core_ffi.new("uint64_t[]", [bound for pair in ranges for bound in pair])
        if core.mshvstack_memory_fault_ranges(self._cpu, bounds, len(ranges)) != 0:
            raise RuntimeError("unicorn refused the engine's memory-fault hooks")
        self._fault_ranges_stale = False

    def map_mmio(self, gpa: int, size: int, read: MmioRead, write: MmioWrite) -> None:
        """Emulate [gpa, gpa+size) with callbacks, inside the engine (no exit).

        A callback that makes something deliverable may only cancel(): the
        engine then stops at the next block boundary, after the access."""
        self._uc.mmio_map(gpa, size, lambda uc, off, sz, _d: read(off, sz), None,
                          lambda uc, off, sz, value, _d: write(off, sz, value), None)

    def flush_code(self, gpa: int, size: int) -> None:
        """Drop translations of guest code in [gpa, gpa+size), wherever it is mapped:
        the linear pages recorded when each block was translated from it."""
        self._change(lambda: self._flush_code(gpa, size))

    def _flush_code(self, gpa: int, size: int) -> None:
        for linear in {linear for linear, page in self._code_pages if gpa <= page < gpa + size}:
            self._forget_linear_page(linear)

    def _forget_linear_page(self, linear: int) -> None:
        """Drop the translations of the guest pages whose code was translated at a
        linear page, and scan every block on it again when next translated.

        Unicorn drops translations by the guest page a linear address maps to
        now (and asking for one the page tables do not map raises a page fault
        inside the guest).  Where the page no longer maps the one guest page
        its code came from (the guest remapped or unmapped it) that would drop
        the wrong page and keep the stale one, found again when the page maps
        it back: drop every translation then (rare)."""
        gpas = {gpa for page, gpa in self._code_pages if page == linear}
        if gpas and gpas == {self._physical_page(linear)}:
            self._uc.ctl_remove_cache(linear, linear + 0x1000)
        elif gpas:
            self._uc.ctl_flush_tb()
        # A block starting on the page before can run into this one.
        core.mshvstack_filter_forget(self._cpu, max(linear - 0x1000, 0), linear + 0x1000)
        forgotten = [k for k in self._code_pages if k[0] == linear]
        for key in forgotten:
            del self._code_pages[key]
        core.mshvstack_code_pages_forget(self._cpu, linear)
        if forgotten:
            self._tracked_keys = []
            for key, data in self._code_pages.items():
                if len(self._tracked_keys) >= MAX_TRACKED_CODE_PAGES:
                    break
                self._track(key, data)
            self._sync_code_check()

    # The host can rewrite guest code through its own mapping at any time (the
    # real hypervisor sees such writes at once); Unicorn would keep running the
    # stale translation.  So the core compares each translated page with its
    # bytes at translation before each run (one memcmp per page) and runs
    # nothing when one changed (RUN_CODE_CHANGED): the page is dropped, and
    # tracked again when translated again.  Bounded: beyond
    # MAX_TRACKED_CODE_PAGES the check is skipped.
    def _track(self, key: tuple[int, int], data: bytes) -> None:
        """Add a translated page to the arrays the C check reads (the first MAX_TRACKED_CODE_PAGES)."""
        index = len(self._tracked_keys)
        if index >= MAX_TRACKED_CODE_PAGES:
            return
        host = self._code.host_address(key[1])
        if host is None:
            return
        self._tracked_keys.append(key)
        self._tracked_hosts[index] = host
        self._tracked_saved[index * 0x1000 : (index + 1) * 0x1000] = data

    def _sync_code_check(self) -> None:
        """How many tracked pages the core compares before a run (none past the bound)."""
        self._cpu.code_pages = len(self._tracked_keys) if len(self._code_pages) <= MAX_TRACKED_CODE_PAGES else 0

    # ---- registers ----
    def holds(self, name: int) -> bool:
        return (name in _REGS or name in _MSRS or name in _VECTORS or name in _FP_STACK
                or name in (_EFER, _TSC, _FP_CONTROL, _XMM_CONTROL))

    def reg(self, name: int) -> int:
        if name in _REGS:   # (through the core: Unicorn's Python binding costs microseconds a register)
            return int(core.mshvstack_read_register(self._cpu, _REGS[name]))
        if name == _EFER:
            return int(core.mshvstack_get_efer(self._cpu))
        if name == _TSC:
            return int(core.mshvstack_tsc(self._cpu))
        if name in _VECTORS:
            return int(self._uc.reg_read(_VECTORS[name])) & ((1 << 128) - 1)
        if name in _MSRS:
            return int(self._uc.msr_read(_MSRS[name]))
        if name in _FP_STACK:
            mantissa, sign_exponent = self._uc.reg_read(self._fp_physical(_FP_STACK[name]))
            return int(mantissa) | int(sign_exponent) << 64
        if name == _FP_CONTROL:
            return self._fp_control_status()
        if name == _XMM_CONTROL:
            uc = self._uc
            return int(uc.reg_read(ux.UC_X86_REG_FDP)) | int(uc.reg_read(ux.UC_X86_REG_MXCSR)) << 64 | _MXCSR_MASK << 96
        if name in _SEGMENT_INDEX:
            raise KeyError(f"segment register {name:#x}: use segment()")
        raise KeyError(f"register {name:#x} is not held by the engine")

    def set_reg(self, name: int, value: int) -> None:
        if name in _REGS:
            efer = core.mshvstack_get_efer(self._cpu)
            core.mshvstack_write_register(self._cpu, _REGS[name], value & U64)
            if name in _MODE_REGISTERS:
                # The VMM sets state, not transitions: keep its EFER (QEMU
                # adjusts LMA on CR0.PG changes) and recompute the mode.
                core.mshvstack_set_efer(self._cpu, efer)
            elif name == _RIP:
                core.mshvstack_end_interrupt_shadow(self._cpu)
        elif name == _EFER:
            core.mshvstack_set_efer(self._cpu, value)
        elif name == _TSC:
            pass  # the TSC follows the host's counter; it cannot be moved
        elif name in _VECTORS:
            self._uc.reg_write(_VECTORS[name], value & ((1 << 128) - 1))
        elif name in _MSRS:
            self._uc.msr_write(_MSRS[name], value)
        elif name in _FP_STACK:
            self._uc.reg_write(self._fp_physical(_FP_STACK[name]), (value & U64, (value >> 64) & 0xFFFF))
        elif name == _FP_CONTROL:
            self._set_fp_control_status(value)
        elif name == _XMM_CONTROL:
            self._uc.reg_write(ux.UC_X86_REG_FDP, value & U64)
            self._uc.reg_write(ux.UC_X86_REG_MXCSR, (value >> 64) & 0xFFFFFFFF)
        else:
            raise KeyError(f"register {name:#x} is not held by the engine")

    def _fp_physical(self, stack_index: int) -> int:
        top = (int(self._uc.reg_read(ux.UC_X86_REG_FPSW)) >> 11) & 7
        return int(ux.UC_X86_REG_FP0) + (top + stack_index) % 8

    def _fp_control_status(self) -> int:
        """hv_x64_fp_control_status_register: FCW, FSW, the abridged tag (a bit per
        physical register: not empty), the last opcode and instruction pointer."""
        uc = self._uc
        tags = int(uc.reg_read(ux.UC_X86_REG_FPTAG))
        abridged = sum(1 << i for i in range(8) if (tags >> (2 * i)) & 3 != _FP_TAG_EMPTY)
        return (int(uc.reg_read(ux.UC_X86_REG_FPCW)) | int(uc.reg_read(ux.UC_X86_REG_FPSW)) << 16 | abridged << 32
                | int(uc.reg_read(ux.UC_X86_REG_FOP)) << 48 | int(uc.reg_read(ux.UC_X86_REG_FIP)) << 64)

    def _set_fp_control_status(self, value: int) -> None:
        uc = self._uc
        uc.reg_write(ux.UC_X86_REG_FPCW, value & 0xFFFF)
        uc.reg_write(ux.UC_X86_REG_FPSW, (value >> 16) & 0xFFFF)
        abridged = (value >> 32) & 0xFF
        uc.reg_write(ux.UC_X86_REG_FPTAG, sum(_FP_TAG_EMPTY << (2 * i) for i in range(8) if not abridged >> i & 1))
        uc.reg_write(ux.UC_X86_REG_FOP, (value >> 48) & 0x7FF)
        uc.reg_write(ux.UC_X86_REG_FIP, (value >> 64) & U64)

    def segment(self, name: int) -> tuple[int, int, int, int]:
        """(base, limit, selector, hv attributes) from the CPU's segment cache (kept
        until the CPU runs again: a stop's encoding reads the same segments often)."""
        running = self._running is not None   # inside the run (a hook): the CPU may still change them
        cached = None if running else self._segments.get(name)
        if cached is not None:
            return cached
        s = self._segment
        core.mshvstack_get_segment(self._cpu, _SEGMENT_INDEX[name], s)
        value = int(s.base), int(s.limit), int(s.selector), hv_attributes(int(s.flags))
        if not running:
            self._segments[name] = value
        return value

    def set_segment(self, name: int, base: int, limit: int, selector: int, attributes: int) -> None:
        self._segments.clear()
        s = self._segment
        s.base, s.limit, s.selector, s.flags = base, limit, selector, qemu_flags(attributes)
        core.mshvstack_set_segment(self._cpu, _SEGMENT_INDEX[name], s)

    def code_bits(self) -> int:
        """The width of the code being executed (16, 32 or 64)."""
        hflags = int(core.mshvstack_hflags(self._cpu))
        return 64 if hflags & _HF_CS64 else 32 if hflags & _HF_CS32 else 16

    def paging(self) -> tuple[int, int, int, int]:
        """(CR0, CR3, CR4, EFER) now, in one call into the C core (page walks need them often)."""
        core.mshvstack_read_registers(self._cpu, _PAGING_IDS, self._paging, 3)
        return int(self._paging[0]), int(self._paging[1]), int(self._paging[2]), int(core.mshvstack_get_efer(self._cpu))

    def snapshot(self) -> dict[int, int]:
        """All plain registers in one call into the C core (a few microseconds)."""
        core.mshvstack_read_registers(self._cpu, _SNAPSHOT_IDS, self._snapshot, len(_REGS))
        return dict(zip(_REGS, core_ffi.unpack(self._snapshot, len(_REGS))))

    # ---- events ----
    def offer_interrupt(self, vector: int) -> None:
        """The interrupt to deliver as soon as the guest can take it (-1: none)."""
        self._cpu.pending_vector = vector

    def inject_nmi(self) -> None:
        self._cpu.pending_nmi = 1

    def inject_exception(self, vector: int, error_code: int | None) -> None:
        self._cpu.pending_exception = vector
        self._cpu.pending_error_code = error_code or 0

    def run_msrs_natively(self, msrs: Iterable[int], first: int, last: int) -> None:
        """RDMSR/WRMSR of these MSRs (and of first..last) run in the engine without a stop:
        the MSRs the CPU implements that no intercept asks for."""
        listed = sorted(msrs)
        if core.mshvstack_set_native_msrs(self._cpu, core_ffi.new("uint32_t[]", listed), len(listed), first, last) != 0:
            raise ValueError(f"{len(listed)} native MSRs: more than the engine core holds")

    def intercept_hypercalls(self, on: bool) -> None:
        """Whether the partition intercepts HvPostMessage and HvSignalEvent: the core then
        writes a 64-bit caller's intercept itself (the rest still asks the VP)."""
        core.mshvstack_intercept_hypercalls(self._cpu, int(on))

    def intercept_exceptions(self, vectors: int) -> None:
        """Bitmap of exception vectors reported as a stop instead of delivered."""
        self._cpu.intercepted_exceptions = vectors & 0xFFFFFFFF

    def interrupt_shadow(self) -> bool:
        return bool(core.mshvstack_interrupt_shadow(self._cpu))

    def nmi_blocked(self) -> bool:
        return bool(core.mshvstack_nmi_blocked(self._cpu))

    def set_interrupt_state(self, shadow: bool, nmi_blocked: bool) -> None:
        if not shadow:
            core.mshvstack_end_interrupt_shadow(self._cpu)
        core.mshvstack_set_nmi_blocked(self._cpu, int(nmi_blocked))

    @property
    def blocks_filtered(self) -> int:
        """New blocks the core found plain (no special instruction, pages known): never scanned in Python."""
        return int(self._cpu.blocks_filtered)

    @property
    def blocks_redone(self) -> tuple[int, int]:
        """New blocks dropped and translated again before they ran (x86parallel.c's world_block_trusted):
        all of them, and those translated again with the other VPs parked."""
        return int(self._cpu.blocks_redone), int(self._cpu.blocks_redone_alone)

    @property
    def pages_retired(self) -> int:
        """Code pages that became data and were unguarded (x86parallel.c's retire_code_page)."""
        return int(self._cpu.pages_retired)

    @property
    def injected(self) -> int:
        """Interrupts and NMIs delivered so far."""
        return int(self._cpu.injected)

    # ---- execution ----
    @property
    def time(self) -> EngineTime:
        self._time.running = self._cpu.running_ns / 1e9   # (the core times its runs)
        return self._time

    def set_deadline(self, deadline_ns: int) -> None:
        """Move the running engine's deadline (a timer was armed by the guest).  Called after
        every MSR or xAPIC write; most leave it where it was, and a call into the core lets
        other threads take the GIL, so an unchanged deadline is seen here (only this VP's
        thread moves it)."""
        if self._cpu.deadline_ns != deadline_ns:
            core.mshvstack_set_deadline(self._cpu, deadline_ns)

    def cancel(self) -> None:
        """Stop at the next block boundary (any thread: a flag, and the CPU kicked)."""
        core.mshvstack_cancel(self._cpu)

    def offer_soon(self) -> None:
        """An interrupt arrived (any thread): at the next block boundary the engine asks its
        ``offer`` callback what to deliver, and goes on running."""
        core.mshvstack_offer_soon(self._cpu)

    def run(self, deadline_ns: int = 0) -> EngineStop:
        # (one function, not two: it runs on every exit)
        with self._exclusive:   # waits for a change another thread is making (never for long)
            cpu = self._cpu
            if self._deferred:
                self._apply_deferred()
            if self._fault_ranges_stale:
                self._hook_memory_faults()
            self._stop = None
            self._segments.clear()
            uc = self._uc
            uc._hook_exception = None   # a Python MMIO callback that raised (Unicorn's binding keeps it here)
            self._running = threading.get_ident()
            try:
                while (status := core.mshvstack_run(cpu, deadline_ns)) == core.RUN_CODE_CHANGED:
                    self._forget_linear_page(self._tracked_keys[cpu.changed_page][0])
            finally:
                self._running = None
            if uc._hook_exception is not None:
                raise uc._hook_exception
            if cpu.reason == core.REASON_IO or cpu.reason == core.REASON_HYPERCALL:
                return _WRITTEN
            return self._stopped(cpu, status)

    def _stopped(self, cpu: Any, status: int) -> EngineStop:
        """Why a run ended, other than an IO intercept the core wrote."""
        reason = cpu.reason
        if self._stop is not None:
            return self._stop
        if status != unicorn.UC_ERR_OK:
            raise RuntimeError(f"unicorn stopped without a reason the engine knows: {unicorn.UcError(status)}")
        if reason == core.REASON_ENGINE:   # a hook stopped without saying why: it raised
            raise RuntimeError("an engine hook failed (its traceback is above)")
        if reason == core.REASON_CANCELLED:
            return _CANCELLED
        if reason == core.REASON_DEADLINE:
            return _DEADLINE
        if reason == core.REASON_EXCEPTION:
            vector = int(cpu.vector)
            address = self.reg(lib.HV_X64_REGISTER_CR2) if vector == 14 else 0
            return EngineStop(StopKind.EXCEPTION, self._current(), address, vector=vector, error_code=int(cpu.error_code))
        return EngineStop(StopKind.SHUTDOWN)  # QEMU gave up delivering: triple fault

    # ---- the VP's pages, written by the core
    def attach_vp(self, vp_index: int, register_page: int, message_page: int) -> None:
        """Let the core write the register page at every stop and the IO intercept
        message itself (the addresses stay valid until close())."""
        core.mshvstack_attach_vp(self._cpu, vp_index, core_ffi.cast("void *", register_page),
                                 core_ffi.cast("void *", message_page), _PAGE_REGISTER_IDS)

    def publish_registers(self) -> None:
        core.mshvstack_publish_registers(self._cpu)

    def consume_registers(self) -> bool:
        """Apply the register page's dirty GPRs, RIP and RFLAGS; True when its
        segments are dirty too (left for the caller, page still marked)."""
        self._segments.clear()
        return bool(core.mshvstack_consume_registers(self._cpu))

    def close(self) -> None:
        core.mshvstack_cpu_free(self._cpu)   # first: its timer thread kicks the CPU
        del self._uc  # the Uc finalizer closes the engine and its hooks

    # ---- hooks ----
    def _cs_base(self) -> int:
        return self.segment(lib.HV_X64_REGISTER_CS)[0]

    def _read_linear(self, address: int, size: int) -> bytes | None:
        """Guest code bytes at a linear address (the guest's page tables decide; one C call)."""
        buffer = self._code_buffer if size <= len(self._code_buffer) else core_ffi.new("uint8_t[]", size)
        done = core.mshvstack_read_code(self._cpu, address, buffer, size)
        return bytes(core_ffi.buffer(buffer, done)) if done else None

    def _physical_page(self, linear: int) -> int | None:
        gpa = self._gpa
        return int(gpa[0]) & ~0xFFF if core.mshvstack_translate(self._cpu, linear, gpa) else None

    def _scan_block(self, address: int, size: int) -> bool:
        started = time.perf_counter()
        try:
            return self._scan_new_block(address, size)
        finally:
            self._time.scanning += time.perf_counter() - started
            self._time.blocks += 1

    def _scan_new_block(self, address: int, size: int) -> bool:
        """Hook the special instructions of the code at [address, address + size);
        True when it must be translated again (the core then leaves the block
        before it runs, or the instruction it stopped at).

        The core calls this for every block whose code it has not scanned as
        it is now (x86core.c's block filter: a new start, or changed code), and
        for one instruction whose code changed under its hook.  What was
        decoded before anywhere in the range is forgotten first: it described
        code that is no longer there.  An address with a hook gets the
        instruction found there now (special or not, with its bytes, which the
        core checks before acting on it); a hooked address inside one of the
        new instructions stays unknown, decoded again if a block runs it."""
        uc = self._uc
        code = self._read_linear(address, size)
        if code is None:
            return False
        hooked = self._hooked
        for stale in range(address, address + len(code)):
            if stale in hooked:
                self._specials.pop(stale, None)
                core.mshvstack_set_special(self._cpu, stale, core.SPECIAL_KIND_NONE, b"", 0)
        for page in range(address & ~0xFFF, address + size, 0x1000):
            gpa = self._physical_page(page)
            if gpa is not None and gpa not in self._guarded:
                # Stores to it must drop its translations, through any mapping (x86core.c).
                host = self._code.host_address(gpa)
                if host is not None:
                    if core.mshvstack_guard_code(self._cpu, gpa, host) != 0:
                        raise RuntimeError(f"the engine core cannot guard the code page at {gpa:#x}")
                    self._guarded.add(gpa)
            if gpa is not None and (page, gpa) not in self._code_pages:
                data = self._code.read_physical(gpa, 0x1000)
                if data is not None:
                    self._code_pages[(page, gpa)] = data
                    self._track((page, gpa), data)
                    self._sync_code_check()
                    if gpa in self._guarded and core.mshvstack_code_page_known(self._cpu, page, gpa) != 0:
                        raise MemoryError("the engine core cannot grow its table of code pages")
        found = decoded = False
        for insn in self._disassemblers[self.code_bits()].disasm(code, address):
            decoded = True
            kind = _SPECIAL_IDS.get(insn.id)
            if kind is None:
                if insn.address in hooked:   # it was special once: the hook lets this instruction run
                    raw = bytes(insn.bytes)
                    if core.mshvstack_set_special(self._cpu, insn.address, core.SPECIAL_KIND_NONE, raw, len(raw)) != 0:
                        raise MemoryError("the engine core cannot grow its table of special instructions")
                continue
            raw = bytes(insn.bytes)
            self._specials[insn.address] = Instruction(insn.address, 0, insn.size, raw, kind, insn.mnemonic, insn.op_str)
            core_kind = _CORE_KINDS.get(kind, core.SPECIAL_KIND_OTHER)
            if core.mshvstack_set_special(self._cpu, insn.address, core_kind, raw, len(raw)) != 0:
                raise MemoryError("the engine core cannot grow its table of special instructions")
            if insn.address not in hooked:
                hooked.add(insn.address)
                if core.mshvstack_hook_special(self._cpu, insn.address) != 0:
                    raise RuntimeError(f"unicorn refused a code hook at {insn.address:#x}")
                found = True
        if address in hooked and not decoded:
            # Nothing capstone decodes starts here: the CPU runs it (and faults if it must),
            # and the hook lets it pass while these bytes stay.
            core.mshvstack_set_special(self._cpu, address, core.SPECIAL_KIND_NONE, code[:1], 1)
        if found:
            # Re-translate this block so the new code hooks are compiled in.
            uc.ctl_remove_cache(address, address + size)
        return found

    def _on_special_code(self, address: int) -> int:
        template = self._specials.get(address)
        if template is None:
            return int(core.SPECIAL_CONTINUE)
        rip = address - self._cs_base()
        insn = Instruction(address, rip, template.length, template.raw, template.kind, template.mnemonic, template.op_str)
        resume_at = self._on_special(insn)
        if resume_at == CONTINUE:
            return int(core.SPECIAL_CONTINUE)
        if resume_at is None:
            self._stop = EngineStop(StopKind.SPECIAL, insn)
            return int(core.SPECIAL_STOP)
        if resume_at != rip:
            core.mshvstack_end_interrupt_shadow(self._cpu)  # the emulated instruction completed
        self._cpu.resume_rip = resume_at
        return int(core.SPECIAL_RESUME)

    def _on_memory_fault(self, access: int, address: int, size: int, value: int) -> None:
        write = access in (unicorn.UC_MEM_WRITE_UNMAPPED, unicorn.UC_MEM_WRITE_PROT)
        fetch = access in (unicorn.UC_MEM_FETCH_UNMAPPED, unicorn.UC_MEM_FETCH_PROT)
        kind = StopKind.PROTECTION if access in (unicorn.UC_MEM_WRITE_PROT, unicorn.UC_MEM_READ_PROT,
                                                 unicorn.UC_MEM_FETCH_PROT) else StopKind.UNMAPPED
        insn = self._current()
        linear = self._fetch_linear(address) if fetch else self._access_linear(insn)
        self._stop = EngineStop(kind, insn, address, write, fetch, size, value, linear=linear)

    def _fetch_linear(self, gpa: int) -> int:
        """The linear address whose fetch faulted at ``gpa``: the instruction's own
        (CS base + RIP), or, where the instruction runs on into the next page, that
        page's byte (paging keeps the offset within a page)."""
        bits = self.code_bits()
        start = (self._cs_base() + self.reg(_RIP)) & ((1 << (64 if bits == 64 else 32)) - 1)
        if start & 0xFFF == gpa & 0xFFF:
            return start
        return ((start & ~0xFFF) + 0x1000) | (gpa & 0xFFF)

    def _access_linear(self, insn: Instruction | None) -> int | None:
        """The linear address of the instruction's one memory operand (Unicorn's memory
        hooks give only the physical one); None where there is not exactly one.

        The effective address wraps at the instruction's address size (16-bit
        addressing wraps at 64 KiB: [0x9004] is 0x9004, not a sign-extended
        displacement) before the segment base is added."""
        if insn is None:
            return None
        bits = self.code_bits()
        decoder = self._operand_decoders.get(bits)
        if decoder is None:
            decoder = self._operand_decoders[bits] = capstone.Cs(capstone.CS_ARCH_X86, _CS_MODE[bits])
            decoder.detail = True
        for decoded in decoder.disasm(insn.raw, insn.address, count=1):
            memory = [op.mem for op in decoded.operands if op.type == cx.X86_OP_MEM]
            if len(memory) != 1:
                return None
            operand = memory[0]
            address = operand.disp
            if operand.base == cx.X86_REG_RIP:
                address += insn.rip + decoded.size
            elif operand.base:
                address += self._uc.reg_read(getattr(ux, f"UC_X86_REG_{decoded.reg_name(operand.base).upper()}"))
            if operand.index:
                address += operand.scale * self._uc.reg_read(getattr(ux, f"UC_X86_REG_{decoded.reg_name(operand.index).upper()}"))
            address &= (1 << (8 * decoded.addr_size)) - 1   # the effective address, at the address size
            segment = operand.segment or (cx.X86_REG_SS if operand.base in (cx.X86_REG_RSP, cx.X86_REG_RBP, cx.X86_REG_ESP,
                                                                            cx.X86_REG_EBP, cx.X86_REG_SP, cx.X86_REG_BP)
                                          else cx.X86_REG_DS)
            name = decoded.reg_name(segment).upper()
            if bits < 64 or name in ("FS", "GS"):
                address += self.segment(getattr(lib, f"HV_X64_REGISTER_{name}"))[0]
            return int(address) & ((1 << (64 if bits == 64 else 32)) - 1)
        return None

    def _current(self) -> Instruction | None:
        """Decode the instruction at PC (for messages that carry its bytes)."""
        base = self._cs_base()
        rip = self.reg(_RIP)
        address = base + rip
        code = self._read_linear(address, 16)
        if code is None:
            return None
        for insn in self._disassemblers[self.code_bits()].disasm(code, address, count=1):
            return Instruction(address, rip, insn.size, code, None, insn.mnemonic, insn.op_str)
        return Instruction(address, rip, 0, code, None, "", "")
