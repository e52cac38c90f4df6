"""A VP's register file: held here until the VP has its CPU engine, in the engine
afterwards (the guest runs on it), with the shared register page the VMM reads
and writes without a hypercall (HV_VP_REGISTER_PAGE).

Registers the engine does not hold (MSR-backed, pending events, the activity
state) stay here.  After the engine stops, the registers an exit handler reads
are fetched from it in one batch at the first read and kept until it runs again.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Callable
from typing import Any

from mshvstack.abi import ffi, lib
from mshvstack.backend.sim import x86
from mshvstack.backend.sim.engines.base import Engine
from mshvstack.backend.sim.lapic import XAPIC_BASE

R = lib  # register names read better as R.HV_X64_REGISTER_*
PAGE = 4096
U64 = (1 << 64) - 1
U128 = (1 << 128) - 1
VECTOR_REGISTERS = frozenset(int(getattr(lib, f"HV_X64_REGISTER_{n}")) for n in
                             [f"XMM{i}" for i in range(16)] + [f"FP_MMX{i}" for i in range(8)]
                             + ["FP_CONTROL_STATUS", "XMM_CONTROL_STATUS"])

SEGMENT_NAMES = (R.HV_X64_REGISTER_ES, R.HV_X64_REGISTER_CS, R.HV_X64_REGISTER_SS,
                 R.HV_X64_REGISTER_DS, R.HV_X64_REGISTER_FS, R.HV_X64_REGISTER_GS,
                 R.HV_X64_REGISTER_LDTR, R.HV_X64_REGISTER_TR)
TABLE_NAMES = (R.HV_X64_REGISTER_GDTR, R.HV_X64_REGISTER_IDTR)
GPR_NAMES = tuple(int(getattr(lib, f"HV_X64_REGISTER_{n}")) for n in
                  ("RAX", "RCX", "RDX", "RBX", "RSP", "RBP", "RSI", "RDI",
                   "R8", "R9", "R10", "R11", "R12", "R13", "R14", "R15"))
_PAGE_SEGMENTS = ("es", "cs", "ss", "ds", "fs", "gs")
_PAGE_GPR_OFFSET = ffi.offsetof("struct hv_vp_register_page", "gp_registers")
_PAGE_SEGMENT_OFFSETS = tuple(ffi.offsetof("struct hv_vp_register_page", s) for s in _PAGE_SEGMENTS)
_PAGE_CR0_OFFSET = ffi.offsetof("struct hv_vp_register_page", "cr0")
_PAGE_GPR_ORDER = (*GPR_NAMES, R.HV_X64_REGISTER_RIP, R.HV_X64_REGISTER_RFLAGS)
_PAGE_CONTROL_ORDER = (R.HV_X64_REGISTER_CR0, R.HV_X64_REGISTER_CR3, R.HV_X64_REGISTER_CR4, R.HV_X64_REGISTER_CR8,
                       R.HV_X64_REGISTER_EFER, R.HV_X64_REGISTER_DR7)
_PACK_GPRS = struct.Struct(f"<{len(_PAGE_GPR_ORDER)}Q").pack_into
_UNPACK_GPRS = struct.Struct(f"<{len(GPR_NAMES)}Q").unpack_from
_PACK_SEGMENT = struct.Struct("<QIHH").pack_into
_PACK_CONTROL = struct.Struct(f"<{len(_PAGE_CONTROL_ORDER)}Q").pack_into
_PAGE_VERSION = int(lib.HV_VP_REGISTER_PAGE_VERSION_1)

APIC_BASE_BSP = 1 << 8
APIC_BASE_ENABLE = 1 << 11
APIC_BASE_X2APIC = 1 << 10
# HV_REGISTER_INTERRUPT_STATE bits.
INTERRUPT_SHADOW, NMI_MASKED = 1, 2
# Architectural state after INIT/reset (SDM vol. 3A, 9.1.1).
_RESET_CS = (0xFFFF0000, 0xFFFF, 0xF000, 0x9B)
_RESET_DATA_SEGMENT = (0, 0xFFFF, 0, 0x93)


def reset_state(index: int) -> dict[int, int]:
    """Registers of a new VP (SDM vol. 3A, 9.1.1, but for EDX, which stays 0 for the
    VMM to set up); VP 0 is the bootstrap processor (APIC_BASE.BSP)."""
    state = {n: 0 for n in GPR_NAMES}
    apic_base = XAPIC_BASE | APIC_BASE_ENABLE | (APIC_BASE_BSP if index == 0 else 0)
    state.update({R.HV_X64_REGISTER_RIP: 0xFFF0, R.HV_X64_REGISTER_RFLAGS: 2,
                  R.HV_X64_REGISTER_CR0: 0x60000010, R.HV_X64_REGISTER_CR2: 0, R.HV_X64_REGISTER_CR3: 0,
                  R.HV_X64_REGISTER_CR4: 0, R.HV_X64_REGISTER_CR8: 0, R.HV_X64_REGISTER_EFER: 0,
                  R.HV_X64_REGISTER_APIC_BASE: apic_base, R.HV_X64_REGISTER_PAT: 0x0007040600070406,
                  R.HV_X64_REGISTER_XFEM: 3, R.HV_X64_REGISTER_DR6: 0xFFFF0FF0, R.HV_X64_REGISTER_DR7: 0x400,
                  # x87 control word and MXCSR at power-up, every x87 register empty (SDM vol. 3A, table 9-1)
                  R.HV_X64_REGISTER_FP_CONTROL_STATUS: lib.X86_FCW_RESET,
                  R.HV_X64_REGISTER_XMM_CONTROL_STATUS: lib.X86_MXCSR_RESET << 64 | lib.X86_MXCSR_MASK << 96})
    return state


def reset_segments() -> dict[int, tuple[int, int, int, int]]:
    segments = {n: _RESET_DATA_SEGMENT for n in SEGMENT_NAMES}
    segments[R.HV_X64_REGISTER_CS] = _RESET_CS
    segments[R.HV_X64_REGISTER_LDTR] = (0, 0xFFFF, 0, 0x82)
    segments[R.HV_X64_REGISTER_TR] = (0, 0xFFFF, 0, 0x8B)
    segments.update({n: (0, 0xFFFF, 0, 0) for n in TABLE_NAMES})
    return segments


class RegisterFile:
    """``apic_base_set``: told of every APIC_BASE write (the LAPIC follows its x2APIC bit)."""

    def __init__(self, index: int, apic_base_set: Callable[[int], None]) -> None:
        self.index = index
        self.engine: Engine | None = None
        self.state = reset_state(index)
        self.segments = reset_segments()
        self._apic_base_set = apic_base_set
        self.page = mmap.mmap(-1, PAGE)
        self._page_cdata: Any = None
        # Registers read in one batch after the engine stops (at the first read); valid until it runs again.
        self._snap: dict[int, int] | None = None
        self._snap_due = False
        self.publish_page()

    # ---- registers
    def reg(self, name: int) -> int:
        snap = self._snap
        if snap is None and self._snap_due and self.engine is not None:
            snap = self._snap = self.engine.snapshot()
            self._snap_due = False
        if snap is not None and name in snap:
            return snap[name]
        if self.engine is not None and self.engine.holds(name):
            return self.engine.reg(name)
        if name == R.HV_REGISTER_INTERRUPT_STATE and self.engine is not None:
            return (INTERRUPT_SHADOW if self.engine.interrupt_shadow() else 0) | (NMI_MASKED if self.engine.nmi_blocked() else 0)
        return self.state.get(name, 0)

    def set_reg(self, name: int, value: int) -> None:
        value &= U128 if name in VECTOR_REGISTERS else U64
        self.state[name] = value
        if name == R.HV_X64_REGISTER_APIC_BASE:
            self._apic_base_set(value)
        snap = self._snap
        if snap is not None and name in snap:
            snap[name] = value
        engine = self.engine
        if engine is None:
            return
        if engine.holds(name):
            engine.set_reg(name, value)
        elif name == R.HV_REGISTER_INTERRUPT_STATE:
            engine.set_interrupt_state(bool(value & INTERRUPT_SHADOW), bool(value & NMI_MASKED))

    def segment(self, name: int) -> tuple[int, int, int, int]:
        if self.engine is not None:
            return self.engine.segment(name)
        return self.segments[name]

    def set_segment(self, name: int, base: int, limit: int, selector: int, attributes: int) -> None:
        self.segments[name] = (base, limit, selector, attributes)
        if self.engine is not None:
            self.engine.set_segment(name, base, limit, selector, attributes)

    def code_bits(self) -> int:
        if self.engine is not None:
            return self.engine.code_bits()
        cs_attributes = self.segments[R.HV_X64_REGISTER_CS][3]
        if not self.state[R.HV_X64_REGISTER_CR0] & x86.CR0_PE:
            return 16
        if self.state[R.HV_X64_REGISTER_EFER] & x86.EFER_LMA and cs_attributes & 0x2000:
            return 64
        return 32 if cs_attributes & 0x4000 else 16

    def running(self) -> None:
        """The engine runs: what was read from it is stale from now on."""
        self._snap = None
        self._snap_due = False

    def stopped(self) -> None:
        """The engine stopped: the next read takes a fresh batch."""
        self._snap_due = True

    def load_into(self, engine: Engine) -> None:
        """Give a new engine every register it holds, and hold them there from now on."""
        # The mode follows from EFER, the control registers and CS: set them first.
        for name in (R.HV_X64_REGISTER_EFER, R.HV_X64_REGISTER_CR3, R.HV_X64_REGISTER_CR4, R.HV_X64_REGISTER_CR0):
            engine.set_reg(name, self.state.get(name, 0))
        for name in TABLE_NAMES + SEGMENT_NAMES:
            engine.set_segment(name, *self.segments[name])
        for name, value in self.state.items():
            if engine.holds(name):
                engine.set_reg(name, value)
        interrupt_state = self.state.get(R.HV_REGISTER_INTERRUPT_STATE, 0)
        engine.set_interrupt_state(bool(interrupt_state & INTERRUPT_SHADOW), bool(interrupt_state & NMI_MASKED))
        self.engine = engine

    def apply_reset(self, processor_signature: int) -> None:
        """The state INIT leaves (SDM vol. 3A, 9.1.1): EDX holds the processor signature."""
        state = reset_state(self.index)
        state[R.HV_X64_REGISTER_RDX] = processor_signature
        for kept in (R.HV_X64_REGISTER_APIC_BASE, R.HV_X64_REGISTER_PAT):   # MSRs: INIT leaves them
            del state[kept]
        # Leave paging and long mode first: the mode follows from CR0, CR4 and EFER.
        for name in (R.HV_X64_REGISTER_CR0, R.HV_X64_REGISTER_CR4, R.HV_X64_REGISTER_EFER, R.HV_X64_REGISTER_CR3):
            self.set_reg(name, state.pop(name))
        for name, value in state.items():
            self.set_reg(name, value)
        for name, segment in reset_segments().items():
            self.set_segment(name, *segment)
        self.set_reg(R.HV_REGISTER_INTERRUPT_STATE, 0)   # no STI shadow, NMIs unblocked

    # ---- the register page
    def page_cdata(self) -> Any:
        if self._page_cdata is None:
            self._page_cdata = ffi.from_buffer("struct hv_vp_register_page *", self.page)
        return self._page_cdata

    def publish_page(self) -> None:
        """Refresh the shared register page, as the hypervisor does on an intercept
        (the engine's core writes it from the CPU once there is one)."""
        if self.engine is not None:
            self.engine.publish_registers()
        else:
            self.write_page()

    def write_page(self) -> None:
        """The register page from this register file (the reference for the core's)."""
        page = self.page_cdata()
        reg = self.reg
        # GPRs, RIP, RFLAGS are contiguous from gp_registers: one pack.
        _PACK_GPRS(self.page, _PAGE_GPR_OFFSET, *[reg(n) for n in _PAGE_GPR_ORDER])
        for offset, name in zip(_PAGE_SEGMENT_OFFSETS, SEGMENT_NAMES):
            _PACK_SEGMENT(self.page, offset, *self.segment(name))
        _PACK_CONTROL(self.page, _PAGE_CR0_OFFSET, *[reg(n) for n in _PAGE_CONTROL_ORDER])
        page.version = _PAGE_VERSION
        page.dirty = 0
        page.isvalid = 1

    def consume_page(self) -> None:
        """Apply what the VMM wrote through the page (dirty classes only)."""
        engine = self.engine
        if engine is not None:
            self._snap = None   # the engine's registers change under it
            if engine.consume_registers():
                self._consume_page_segments()
            return
        page = self.page_cdata()
        dirty = page.dirty
        if not page.isvalid or not dirty:
            return
        if dirty & (1 << lib.HV_X64_REGISTER_CLASS_GENERAL):
            # The VMM usually changed one or two: only those reach the engine.
            reg = self.reg
            for name, value in zip(GPR_NAMES, _UNPACK_GPRS(self.page, _PAGE_GPR_OFFSET)):
                if value != reg(name):
                    self.set_reg(name, value)
        if dirty & (1 << lib.HV_X64_REGISTER_CLASS_IP):
            self.set_reg(R.HV_X64_REGISTER_RIP, page.rip)
        if dirty & (1 << lib.HV_X64_REGISTER_CLASS_FLAGS):
            self.set_reg(R.HV_X64_REGISTER_RFLAGS, page.rflags)
        if dirty & (1 << lib.HV_X64_REGISTER_CLASS_SEGMENT):
            self._consume_page_segments()
        page.dirty = 0

    def _consume_page_segments(self) -> None:
        page = self.page_cdata()
        for attr, name in zip(_PAGE_SEGMENTS, SEGMENT_NAMES):
            seg = getattr(page, attr)
            self.set_segment(name, seg.base, seg.limit, seg.selector, seg.attributes)
        page.dirty = 0
