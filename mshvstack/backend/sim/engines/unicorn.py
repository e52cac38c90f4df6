"""The Unicorn engine: portable, deterministic software execution of guest code.

How exits become exact (engines.md): Unicorn's IN/OUT hooks only stop at the
end of a translation block, but a code hook that rewrites PC and stops does
stop *before* its instruction.  So a block hook decodes each new block once
(capstone), puts a code hook on exactly the instructions the hypervisor must
see (IN/OUT/INS/OUTS, RDMSR/WRMSR, CPUID, HLT, VMCALL/VMMCALL), flushes the
block and restarts it.  Unicorn has no MSR hook and no HLT hook, so this is
also how synthetic MSRs and halts are trapped.  Steady-state code runs at
Unicorn speed with one cheap block callback.
"""

from __future__ import annotations

import functools
import threading
import time
import zlib
from typing import Any

import ctypes

import capstone
import capstone.x86 as cx
import unicorn
import unicorn.x86_const as ux
from unicorn.unicorn_py3.unicorn import uclib

from mshvstack.abi import lib
from mshvstack.backend.sim.engines._fastpath import ffi as fast_ffi, lib as fast_lib
from mshvstack.backend.sim.engines.base import CONTINUE, CodeReader, EngineStop, Instruction, MmioRead, MmioWrite, Special, SpecialHandler, StopKind

_SPECIAL_IDS: dict[int, Special] = {
    cx.X86_INS_IN: Special.IO, cx.X86_INS_OUT: Special.IO,
    cx.X86_INS_INSB: Special.IO, cx.X86_INS_INSW: Special.IO, cx.X86_INS_INSD: Special.IO,
    cx.X86_INS_OUTSB: Special.IO, cx.X86_INS_OUTSW: Special.IO, cx.X86_INS_OUTSD: Special.IO,
    cx.X86_INS_RDMSR: Special.RDMSR, cx.X86_INS_WRMSR: Special.WRMSR,
    cx.X86_INS_CPUID: Special.CPUID, cx.X86_INS_HLT: Special.HLT,
    cx.X86_INS_VMCALL: Special.VMCALL, cx.X86_INS_VMMCALL: Special.VMCALL,
}

VECTOR_PF = 14
MAX_TRACKED_CODE_PAGES = 512

# Unicorn never runs QEMU's interrupt delivery (we deliver exceptions ourselves),
# so env->old_exception stays set after a hooked exception and Unicorn promotes
# the next one to #DF.  There is no API for it: reset the field in the saved
# context.  Offset and size are those of unicorn 2.1.4's x86 context (pinned in
# setup.py); the engine checks them and disables the fix-up if they differ.
_OLD_EXCEPTION_OFFSET = 5536
_CONTEXT_SIZE = 5608

# How long after a device store a pending stop request is forced (see _mmio_write).
DEFERRED_STOP_S = 0.001

_UC_MODE = {16: unicorn.UC_MODE_16, 32: unicorn.UC_MODE_32, 64: unicorn.UC_MODE_64}
_CS_MODE = {16: capstone.CS_MODE_16, 32: capstone.CS_MODE_32, 64: capstone.CS_MODE_64}

_GPRS = ("RAX", "RCX", "RDX", "RBX", "RSP", "RBP", "RSI", "RDI")
_NARROW = {"RAX": "EAX", "RCX": "ECX", "RDX": "EDX", "RBX": "EBX", "RSP": "ESP", "RBP": "EBP", "RSI": "ESI", "RDI": "EDI", "RIP": "EIP", "RFLAGS": "EFLAGS"}

_SEGMENTS = {
    lib.HV_X64_REGISTER_ES: ux.UC_X86_REG_ES, lib.HV_X64_REGISTER_CS: ux.UC_X86_REG_CS,
    lib.HV_X64_REGISTER_SS: ux.UC_X86_REG_SS, lib.HV_X64_REGISTER_DS: ux.UC_X86_REG_DS,
    lib.HV_X64_REGISTER_FS: ux.UC_X86_REG_FS, lib.HV_X64_REGISTER_GS: ux.UC_X86_REG_GS,
}
_TABLES = {
    lib.HV_X64_REGISTER_GDTR: ux.UC_X86_REG_GDTR, lib.HV_X64_REGISTER_IDTR: ux.UC_X86_REG_IDTR,
    lib.HV_X64_REGISTER_LDTR: ux.UC_X86_REG_LDTR, lib.HV_X64_REGISTER_TR: ux.UC_X86_REG_TR,
}
# Registers backed by an MSR inside Unicorn.
_MSRS = {
    lib.HV_X64_REGISTER_EFER: 0xC0000080, lib.HV_X64_REGISTER_KERNEL_GS_BASE: 0xC0000102,
    lib.HV_X64_REGISTER_STAR: 0xC0000081, lib.HV_X64_REGISTER_LSTAR: 0xC0000082,
    lib.HV_X64_REGISTER_CSTAR: 0xC0000083, lib.HV_X64_REGISTER_SFMASK: 0xC0000084,
    lib.HV_X64_REGISTER_SYSENTER_CS: 0x174, lib.HV_X64_REGISTER_SYSENTER_ESP: 0x175,
    lib.HV_X64_REGISTER_SYSENTER_EIP: 0x176, lib.HV_X64_REGISTER_PAT: 0x277,
    lib.HV_X64_REGISTER_TSC: 0x10, lib.HV_X64_REGISTER_TSC_AUX: 0xC0000103,
}


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


def _plain_registers(bits: int) -> dict[int, int]:
    """hv_register_name → Unicorn register id, for this engine width."""
    names = {f"HV_X64_REGISTER_{n}": n for n in _GPRS + ("RIP", "RFLAGS")}
    table: dict[int, int] = {}
    for hv_name, reg in names.items():
        uc_name = reg if bits == 64 else _NARROW[reg]
        table[int(getattr(lib, hv_name))] = getattr(ux, f"UC_X86_REG_{uc_name}")
    if bits == 64:
        for i in range(8, 16):
            table[int(getattr(lib, f"HV_X64_REGISTER_R{i}"))] = getattr(ux, f"UC_X86_REG_R{i}")
    control = ("CR0", "CR2", "CR3", "CR4", "DR0", "DR1", "DR2", "DR3", "DR6", "DR7") + (("CR8",) if bits == 64 else ())
    for n in control:
        table[int(getattr(lib, f"HV_X64_REGISTER_{n}"))] = getattr(ux, f"UC_X86_REG_{n}")
    return table


def _vector_registers(bits: int) -> dict[int, int]:
    """The 128-bit SSE registers this engine width exposes."""
    return {int(getattr(lib, f"HV_X64_REGISTER_XMM{i}")): getattr(ux, f"UC_X86_REG_XMM{i}")
            for i in range(16 if bits == 64 else 8)}


@fast_ffi.def_extern()  # type: ignore[untyped-decorator]
def mshvstack_on_new_block(owner: object, address: int, size: int) -> None:
    """Called from the C block filter the first time a block runs."""
    engine = fast_ffi.from_handle(owner)
    engine._scan_block(address, size)


class UnicornEngine:
    """One VP's CPU on Unicorn, created for a fixed width (16, 32 or 64 bits)."""

    def __init__(self, bits: int, on_special: SpecialHandler, code: CodeReader) -> None:
        self.bits = bits
        self._uc = unicorn.Uc(unicorn.UC_ARCH_X86, _UC_MODE[bits])
        self._md = capstone.Cs(capstone.CS_ARCH_X86, _CS_MODE[bits])
        self._regs = _plain_registers(bits)
        self._vectors = _vector_registers(bits)
        self._mask = (1 << bits) - 1 if bits < 64 else (1 << 64) - 1
        self._on_special = on_special
        self._code = code
        self._hooked: set[int] = set()
        self._specials: dict[int, Instruction] = {}
        self._stop: EngineStop | None = None
        self._code_pages: dict[tuple[int, int], int] = {}  # (linear page, guest page) -> crc32 at translation
        self._cancel = threading.Event()
        self._in_mmio_write = 0  # thread id while a device store callback runs
        # Hidden parts of segment registers, which Unicorn's API does not expose.
        self._shadow: dict[int, tuple[int, int, int]] = {}
        uc = self._uc
        # Run until stopped, with no "until" address: Unicorn implements
        # "until" through CPU state that leaks into CR2 (seen with 2.1.4).
        uc.ctl_exits_enabled(True)
        uc.ctl_set_exits([])
        self._install_block_filter()
        self._prepare_batch()
        self._can_reset_exception = self._old_exception() == -1
        self._exception_pending = False
        uc.hook_add(unicorn.UC_HOOK_MEM_UNMAPPED, self._on_unmapped)
        uc.hook_add(unicorn.UC_HOOK_MEM_PROT, self._on_protection)
        uc.hook_add(unicorn.UC_HOOK_INTR, self._on_interrupt)
        uc.hook_add(unicorn.UC_HOOK_INSN_INVALID, self._on_invalid)

    def _install_block_filter(self) -> None:
        """A C block hook that calls _scan_block once per new block address."""
        self._handle = fast_ffi.new_handle(self)
        self._filter = fast_ffi.new("struct mshvstack_block_filter *")
        if fast_lib.mshvstack_filter_init(self._filter, self._handle) != 0:
            raise MemoryError("block filter")
        hook = unicorn.unicorn_py3.unicorn.uc_hook_h()
        function = int(fast_ffi.cast("uintptr_t", fast_ffi.addressof(fast_lib, "mshvstack_block_hook")))
        status = uclib.uc_hook_add(self._uc._uch, ctypes.byref(hook), unicorn.UC_HOOK_BLOCK, ctypes.c_void_p(function),
                                   ctypes.c_void_p(int(fast_ffi.cast("uintptr_t", self._filter))), ctypes.c_uint64(1), ctypes.c_uint64(0))
        if status != unicorn.UC_ERR_OK:
            raise unicorn.UcError(status)

    def _old_exception(self) -> int | None:
        context = self._uc.context_save()
        if context.size != _CONTEXT_SIZE:
            return None
        return int(ctypes.c_int32.from_address(context.context.value + _OLD_EXCEPTION_OFFSET).value)

    def _reset_old_exception(self) -> None:
        context = self._uc.context_save()
        ctypes.c_int32.from_address(context.context.value + _OLD_EXCEPTION_OFFSET).value = -1
        self._uc.context_restore(context)

    def _prepare_batch(self) -> None:
        """ctypes arrays for one-call register snapshots (~1 us for all GPRs)."""
        names = list(self._regs) + list(_SEGMENTS)
        ids = [self._regs[n] for n in self._regs] + [_SEGMENTS[n] for n in _SEGMENTS]
        count = len(ids)
        self._batch_names = names
        self._batch_ids = (ctypes.c_int * count)(*ids)
        self._batch_values = (ctypes.c_uint64 * count)()
        base = ctypes.addressof(self._batch_values)
        self._batch_ptrs = (ctypes.c_void_p * count)(*[base + 8 * i for i in range(count)])
        self._selectors: dict[int, int] | None = None

    def snapshot(self) -> dict[int, int]:
        """All plain registers in one call; segment selectors cached until the next run."""
        count = len(self._batch_names)
        status = uclib.uc_reg_read_batch(self._uc._uch, self._batch_ids, self._batch_ptrs, count)
        if status != unicorn.UC_ERR_OK:
            raise unicorn.UcError(status)
        values = dict(zip(self._batch_names, self._batch_values))
        self._selectors = {n: values.pop(n) & 0xFFFF for n in _SEGMENTS}
        return values

    # ---- memory ----
    def map(self, gpa: int, size: int, host_address: int, writable: bool, executable: bool) -> None:
        perms = unicorn.UC_PROT_READ | (unicorn.UC_PROT_WRITE if writable else 0) | (unicorn.UC_PROT_EXEC if executable else 0)
        self._uc.mem_map_ptr(gpa, size, perms, host_address)

    def unmap(self, gpa: int, size: int) -> None:
        self._uc.mem_unmap(gpa, size)
        self.flush_code(gpa, size)

    def protect(self, gpa: int, size: int, writable: bool, executable: bool) -> None:
        perms = unicorn.UC_PROT_READ | (unicorn.UC_PROT_WRITE if writable else 0) | (unicorn.UC_PROT_EXEC if executable else 0)
        self._uc.mem_protect(gpa, size, perms)

    def flush_code(self, gpa: int, size: int) -> None:
        """Drop translations of guest code in [gpa, gpa+size), wherever it is mapped.

        Unicorn's cache is indexed by linear address, and asking it to drop
        an address the guest's page tables do not map makes it raise a page
        fault inside the guest; so flush the linear pages recorded when each
        block was translated, and only those still mapped.
        """
        for linear in {linear for linear, page in self._code_pages if gpa <= page < gpa + size}:
            self._forget_linear_page(linear)

    def _forget_linear_page(self, linear: int) -> None:
        if self._code.translate(linear) is not None:
            self._uc.ctl_remove_cache(linear, linear + 0x1000)
        fast_lib.mshvstack_filter_forget(self._filter, linear, linear + 0x1000)
        for key in [k for k in self._code_pages if k[0] == linear]:
            del self._code_pages[key]

    def _check_code_pages(self) -> None:
        """Retranslate pages whose bytes changed since translation.

        The host can rewrite guest code through its own mapping at any time
        (the real hypervisor sees such writes at once); Unicorn would keep
        running the stale translation, so compare checksums before each run.
        Bounded: beyond MAX_TRACKED_CODE_PAGES the check is skipped.
        """
        if len(self._code_pages) > MAX_TRACKED_CODE_PAGES:
            return
        for (linear, gpa), crc in list(self._code_pages.items()):
            data = self._code.read_physical(gpa, 0x1000)
            if data is not None and zlib.crc32(data) != crc:
                self._forget_linear_page(linear)

    # ---- registers ----
    def reg(self, name: int) -> int:
        if name in self._vectors:
            return int(self._uc.reg_read(self._vectors[name])) & ((1 << 128) - 1)
        if name in self._regs:
            return int(self._uc.reg_read(self._regs[name]))
        if name in _MSRS:
            return int(self._uc.msr_read(_MSRS[name]))
        if name in _SEGMENTS or name in _TABLES:
            raise KeyError(f"segment register {name:#x}: use segment()")
        raise KeyError(f"register {name:#x} is not held by the engine")

    def holds(self, name: int) -> bool:
        return name in self._regs or name in _MSRS or name in self._vectors

    def set_reg(self, name: int, value: int) -> None:
        if name in self._vectors:
            self._uc.reg_write(self._vectors[name], value & ((1 << 128) - 1))
        elif name in self._regs:
            self._uc.reg_write(self._regs[name], value & self._mask if name != lib.HV_X64_REGISTER_CR0 else value & 0xFFFFFFFF)
        elif name in _MSRS:
            self._uc.msr_write(_MSRS[name], value)
        else:
            raise KeyError(f"register {name:#x} is not held by the engine")

    def segment(self, name: int) -> tuple[int, int, int, int]:
        if name in _TABLES:
            selector, base, limit, flags = self._uc.reg_read(_TABLES[name])
            attributes = self._shadow.get(name, (0, 0, 0))[2]
            return int(base), int(limit), int(selector), attributes
        cached = self._selectors
        selector = cached[name] if cached is not None else int(self._uc.reg_read(_SEGMENTS[name]))
        if self.bits == 16:
            return selector << 4, 0xFFFF, selector, self._shadow.get(name, (0, 0, 0x93))[2]
        base, limit, attributes = self._shadow.get(name, (0, 0xFFFFFFFF, 0))
        if name == lib.HV_X64_REGISTER_FS and self.bits == 64:
            base = int(self._uc.reg_read(ux.UC_X86_REG_FS_BASE))
        if name == lib.HV_X64_REGISTER_GS and self.bits == 64:
            base = int(self._uc.reg_read(ux.UC_X86_REG_GS_BASE))
        return base, limit, selector, attributes

    def set_segment(self, name: int, base: int, limit: int, selector: int, attributes: int) -> None:
        self._shadow[name] = (base, limit, attributes)
        self._selectors = None
        if name in _TABLES:
            self._uc.reg_write(_TABLES[name], (selector, base, limit, attributes))
            return
        if self.bits == 16:
            # Real mode: the base is the selector shifted; keep them consistent.
            selector = (base >> 4) & 0xFFFF if base == (base & 0xFFFF0) else selector
        if self.bits == 64 and name in (lib.HV_X64_REGISTER_FS, lib.HV_X64_REGISTER_GS):
            self._uc.reg_write(ux.UC_X86_REG_FS_BASE if name == lib.HV_X64_REGISTER_FS else ux.UC_X86_REG_GS_BASE, base)
        try:
            self._uc.reg_write(_SEGMENTS[name], selector)
        except unicorn.UcError:
            pass  # a selector Unicorn cannot load from its view of the GDT; keep the shadow

    # ---- execution ----
    def cancel(self) -> None:
        """Make a running run() return CANCELLED at the next block boundary."""
        self._cancel.set()
        if self._in_mmio_write == threading.get_ident():
            return  # stopping inside the store would replay it: _mmio_write stops after it
        self._uc.emu_stop()

    def map_mmio(self, gpa: int, size: int, read: MmioRead, write: MmioWrite) -> None:
        """Emulate [gpa, gpa+size) with callbacks, inside the engine (no exit)."""
        self._uc.mmio_map(gpa, size, lambda uc, off, sz, _d: read(off, sz), None,
                          lambda uc, off, sz, value, _d: self._mmio_write(uc, write, off, sz, value), None)

    def _mmio_write(self, uc: Any, write: MmioWrite, offset: int, size: int, value: int) -> None:
        """A device store.  If it makes something deliverable (a self-IPI, an armed
        timer) the engine must not stop here: a stop requested inside a store is
        taken at that instruction with its side effect already done, and the store
        runs again.  Stop shortly afterwards from another thread instead, unless an
        intercepted instruction honours the request first (exact PC either way)."""
        self._in_mmio_write = threading.get_ident()
        try:
            write(offset, size, value)
        finally:
            self._in_mmio_write = 0
        if self._cancel.is_set():
            timer = threading.Timer(DEFERRED_STOP_S, self._stop_if_still_pending)
            timer.daemon = True
            timer.start()

    def _stop_if_still_pending(self) -> None:
        if self._cancel.is_set():
            self._uc.emu_stop()

    def run(self, timeout_us: int = 0) -> EngineStop:
        self._stop = None
        self._selectors = None
        if self._cancel.is_set():
            self._cancel.clear()
            return EngineStop(StopKind.CANCELLED)
        self._check_code_pages()
        if self._exception_pending and self._can_reset_exception:
            self._reset_old_exception()
        self._exception_pending = False
        rip = self.reg(lib.HV_X64_REGISTER_RIP)
        begin = rip if self.bits != 16 else rip & 0xFFFF
        try:
            self._uc.emu_start(begin, 0, timeout=timeout_us)
        except unicorn.UcError as exc:
            if self._stop is None:
                self._stop = EngineStop(StopKind.EXCEPTION, vector=6 if exc.errno == unicorn.UC_ERR_INSN_INVALID else 13)
        self._cancel.clear()
        return self._stop or EngineStop(StopKind.CANCELLED)

    def close(self) -> None:
        self._uc.emu_stop()
        del self._uc  # the Uc finalizer closes the engine and its hooks
        fast_lib.mshvstack_filter_free(self._filter)

    # ---- hooks ----
    def _linear_pc(self, uc: Any) -> int:
        pc = int(uc.reg_read(self._regs[lib.HV_X64_REGISTER_RIP]))
        if self.bits == 16:
            return (int(uc.reg_read(ux.UC_X86_REG_CS)) << 4) + (pc & 0xFFFF)
        return pc

    def _read_linear(self, address: int, size: int) -> bytes | None:
        """Guest code bytes at a linear address (the guest's page tables decide)."""
        data = bytearray()
        while len(data) < size:
            at = address + len(data)
            gpa = self._code.translate(at)
            if gpa is None:
                return bytes(data) if data else None
            chunk = self._code.read_physical(gpa, min(size - len(data), 0x1000 - at % 0x1000))
            if chunk is None:
                return bytes(data) if data else None
            data += chunk
        return bytes(data)

    def _scan_block(self, address: int, size: int) -> None:
        uc = self._uc
        code = self._read_linear(address, size)
        if code is None:
            return
        for page in range(address & ~0xFFF, address + size, 0x1000):
            gpa = self._code.translate(page)
            if gpa is not None and (page, gpa) not in self._code_pages:
                data = self._code.read_physical(gpa, 0x1000)
                if data is not None:
                    self._code_pages[(page, gpa)] = zlib.crc32(data)
        found = False
        for insn in self._md.disasm(code, address):
            kind = _SPECIAL_IDS.get(insn.id)
            if kind is None and insn.id == cx.X86_INS_LJMP and self.bits != 64:
                kind = Special.FARJUMP
            if kind is None:
                continue
            self._specials[insn.address] = Instruction(insn.address, 0, insn.size, bytes(insn.bytes), kind, insn.mnemonic, insn.op_str)
            if insn.address not in self._hooked:
                self._hooked.add(insn.address)
                uc.hook_add(unicorn.UC_HOOK_CODE, self._on_special_code, None, insn.address, insn.address)
                found = True
        if found:
            # Re-translate this block so the new code hooks are compiled in.
            uc.ctl_remove_cache(address, address + size)
            uc.reg_write(self._regs[lib.HV_X64_REGISTER_RIP], self._rip_of(uc, address))

    def _rip_of(self, uc: Any, linear: int) -> int:
        if self.bits == 16:
            return (linear - (int(uc.reg_read(ux.UC_X86_REG_CS)) << 4)) & 0xFFFF
        return linear

    def _on_special_code(self, uc: Any, address: int, size: int, _data: Any) -> None:
        template = self._specials.get(address)
        if template is None:
            return
        rip = self._rip_of(uc, address)
        insn = Instruction(address, rip, template.length, template.raw, template.kind, template.mnemonic, template.op_str)
        resume_at = self._on_special(insn)
        if resume_at == CONTINUE:
            return
        if resume_at is None:
            self._stop = EngineStop(StopKind.SPECIAL, insn)
            uc.reg_write(self._regs[lib.HV_X64_REGISTER_RIP], rip)
            uc.emu_stop()
        else:
            uc.reg_write(self._regs[lib.HV_X64_REGISTER_RIP], resume_at)
            if self._cancel.is_set():
                uc.emu_stop()

    def _on_unmapped(self, uc: Any, access: int, address: int, size: int, value: int, _data: Any) -> bool:
        write = access in (unicorn.UC_MEM_WRITE_UNMAPPED, unicorn.UC_MEM_WRITE)
        fetch = access == unicorn.UC_MEM_FETCH_UNMAPPED
        self._stop = EngineStop(StopKind.UNMAPPED, self._current(uc), address, write, fetch, size, value)
        return False

    def _on_protection(self, uc: Any, access: int, address: int, size: int, value: int, _data: Any) -> bool:
        write = access == unicorn.UC_MEM_WRITE_PROT
        fetch = access == unicorn.UC_MEM_FETCH_PROT
        self._stop = EngineStop(StopKind.PROTECTION, self._current(uc), address, write, fetch, size, value)
        return False

    def _on_interrupt(self, uc: Any, vector: int, _data: Any) -> None:
        insn = self._current(uc)
        write = fetch = False
        address = 0
        if vector == VECTOR_PF:
            address = int(uc.reg_read(ux.UC_X86_REG_CR2))
            write = insn is not None and self._writes_memory(insn)
            fetch = insn is not None and insn.address <= address < insn.address + max(insn.length, 1)
        self._stop = EngineStop(StopKind.EXCEPTION, insn, address, write, fetch, vector=vector)
        self._exception_pending = True
        uc.emu_stop()

    def _writes_memory(self, insn: Instruction) -> bool:
        """Whether the instruction writes a memory operand (for #PF's W bit)."""
        self._md.detail = True
        try:
            for decoded in self._md.disasm(insn.raw, insn.address, count=1):
                return any(op.type == cx.X86_OP_MEM and op.access & capstone.CS_AC_WRITE for op in decoded.operands)
        finally:
            self._md.detail = False
        return False

    def _on_invalid(self, uc: Any, _data: Any) -> bool:
        self._stop = EngineStop(StopKind.EXCEPTION, self._current(uc), vector=6)
        self._exception_pending = True
        return False

    def _current(self, uc: Any) -> Instruction | None:
        """Decode the instruction at PC (for messages that carry its bytes)."""
        address = self._linear_pc(uc)
        code = self._read_linear(address, 16)
        if code is None:
            return None
        for insn in self._md.disasm(code, address, count=1):
            return Instruction(address, self._rip_of(uc, address), insn.size, code, None, insn.mnemonic, insn.op_str)
        return Instruction(address, self._rip_of(uc, address), 0, code, None, "", "")
