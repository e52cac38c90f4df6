"""MSHV_GET_VP_STATE / MSHV_SET_VP_STATE: the blobs a VMM saves a VP with.

Each blob is the hypervisor's wire form of one part of the VP, built from
that part's own state and applied back to it, so a VP saved through the
public API and restored into another partition (or another process) goes on
exactly: the LAPIC's registers and timer, the x87/SSE state as a compacted
XSAVE area, the synthetic timers with their next expiry, and the SynIC
message and event-flag pages.
"""

from __future__ import annotations

import enum
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from mshvstack.abi import ffi, lib
from mshvstack.backend.sim.hv1 import SyntheticTimer
from mshvstack.backend.sim.lapic import LVT_MASKED, VERSION_VALUE, LapicState
from mshvstack.backend.sim.memory import GpaUnmapped

if TYPE_CHECKING:
    from mshvstack.backend.sim.vp import SimVp

PAGE = 4096
U32 = 0xFFFFFFFF
U64 = (1 << 64) - 1
XSAVE_COMPONENTS = int(lib.X86_XSTATE_X87 | lib.X86_XSTATE_SSE)
_LAPIC = "struct hv_local_interrupt_controller_state *"
_TIMERS = "struct hv_synthetic_timers_state"
_LVT_FIELDS = ("apic_lvt_timer", "apic_lvt_thermal", "apic_lvt_perfmon", "apic_lvt_lint0", "apic_lvt_lint1",
               "apic_lvt_error")   # LVT_ORDER


class StateBlob(enum.IntEnum):
    LAPIC = lib.MSHV_VP_STATE_LAPIC
    XSAVE = lib.MSHV_VP_STATE_XSAVE
    SIMP = lib.MSHV_VP_STATE_SIMP
    SIEFP = lib.MSHV_VP_STATE_SIEFP
    SYNTHETIC_TIMERS = lib.MSHV_VP_STATE_SYNTHETIC_TIMERS


class VpStateError(Exception):
    """The hypervisor cannot do it (the driver's EIO): e.g. a SynIC page outside RAM."""


def _words(value: int, count: int) -> list[int]:
    return [(value >> (32 * i)) & U32 for i in range(count)]


def _join(words: Any) -> int:
    """A cffi array of 32-bit words, least significant first, as one integer."""
    return sum(int(word) << (32 * i) for i, word in enumerate(words))


# ---- LAPIC
def encode_lapic(apic_id: int, state: LapicState) -> bytes:
    buf = ffi.new("char[]", PAGE)
    s = ffi.cast(_LAPIC, buf)
    s.apic_id, s.apic_version, s.apic_ldr, s.apic_dfr, s.apic_spurious = apic_id, VERSION_VALUE, state.ldr, state.dfr, state.svr
    s.apic_isr, s.apic_irr, s.apic_tmr = _words(state.isr, 8), _words(state.irr, 8), [0] * 8
    s.apic_esr = s.apic_error_status = state.esr
    s.apic_icr_high, s.apic_icr_low = state.icr >> 32, state.icr & U32
    for name, value in zip(_LVT_FIELDS, state.lvt):
        setattr(s, name, value)
    s.apic_lvt_cmci = LVT_MASKED
    s.apic_initial_count, s.apic_counter_value = state.timer_initial, state.timer_current
    s.apic_divide_configuration = state.timer_divide
    return bytes(ffi.buffer(buf, PAGE))


def decode_lapic(blob: bytes, current: LapicState) -> LapicState:
    """The registers the blob carries; TPR (CR8) and a pending NMI travel elsewhere."""
    s = ffi.cast(_LAPIC, ffi.from_buffer(blob))
    return replace(current, irr=_join(s.apic_irr), isr=_join(s.apic_isr), svr=int(s.apic_spurious), ldr=int(s.apic_ldr),
                   dfr=int(s.apic_dfr), esr=int(s.apic_esr), icr=int(s.apic_icr_high) << 32 | int(s.apic_icr_low),
                   lvt=tuple(int(getattr(s, name)) for name in _LVT_FIELDS), timer_initial=int(s.apic_initial_count),
                   timer_current=int(s.apic_counter_value), timer_divide=int(s.apic_divide_configuration))


# ---- XSAVE (compacted: the legacy region and the header, x87 and SSE)
_FP_STACK = tuple(int(getattr(lib, f"HV_X64_REGISTER_FP_MMX{i}")) for i in range(8))
_XMM = tuple(int(getattr(lib, f"HV_X64_REGISTER_XMM{i}")) for i in range(16))
_FP_CONTROL = int(lib.HV_X64_REGISTER_FP_CONTROL_STATUS)
_XMM_CONTROL = int(lib.HV_X64_REGISTER_XMM_CONTROL_STATUS)
XSAVE_REGISTERS = (_FP_CONTROL, _XMM_CONTROL, *_FP_STACK, *_XMM)   # control first: ST(i) depends on TOP


def encode_xsave(registers: dict[int, int], size: int) -> bytes:
    buf = ffi.new("char[]", size)
    area = ffi.cast("struct x86_xsave_area *", buf)
    fx = area.legacy
    fp_control = ffi.new("union hv_x64_fp_control_status_register *")
    fp_control.as_uint128.low_part, fp_control.as_uint128.high_part = registers[_FP_CONTROL] & U64, registers[_FP_CONTROL] >> 64
    xmm_control = ffi.new("union hv_x64_xmm_control_status_register *")
    xmm_control.as_uint128.low_part, xmm_control.as_uint128.high_part = registers[_XMM_CONTROL] & U64, registers[_XMM_CONTROL] >> 64
    fx.fcw, fx.fsw, fx.ftw, fx.fop = fp_control.fp_control, fp_control.fp_status, fp_control.fp_tag, fp_control.last_fp_op
    fx.fip, fx.fdp = fp_control.last_fp_rip, xmm_control.last_fp_rdp
    fx.mxcsr, fx.mxcsr_mask = xmm_control.xmm_status_control, xmm_control.xmm_status_control_mask
    for i, name in enumerate(_FP_STACK):
        fx.st[i].mantissa, fx.st[i].sign_exponent = registers[name] & U64, (registers[name] >> 64) & 0xFFFF
    for i, name in enumerate(_XMM):
        ffi.memmove(fx.xmm[i], registers[name].to_bytes(16, "little"), 16)
    area.header.xstate_bv = XSAVE_COMPONENTS
    area.header.xcomp_bv = lib.X86_XCOMP_BV_COMPACTED | XSAVE_COMPONENTS
    return bytes(ffi.buffer(buf, size))


def decode_xsave(blob: bytes) -> dict[int, int]:
    """The registers a compacted XSAVE area holds; a component the area marks as in
    its initial state (XSTATE_BV clear) is given its initial values."""
    if len(blob) < ffi.sizeof("struct x86_xsave_area"):
        raise VpStateError("XSAVE area shorter than its legacy region and header")
    area = ffi.cast("struct x86_xsave_area *", ffi.from_buffer(blob))
    fx, present = area.legacy, int(area.header.xstate_bv)
    if not int(area.header.xcomp_bv) & lib.X86_XCOMP_BV_COMPACTED or present & ~XSAVE_COMPONENTS:
        raise VpStateError(f"XSAVE area not compacted or with components {present:#x} beyond x87 and SSE")
    registers: dict[int, int] = {}
    if present & lib.X86_XSTATE_X87:
        registers[_FP_CONTROL] = (int(fx.fcw) | int(fx.fsw) << 16 | int(fx.ftw) << 32 | int(fx.fop) << 48
                                  | int(fx.fip) << 64)
        for i, name in enumerate(_FP_STACK):
            registers[name] = int(fx.st[i].mantissa) | int(fx.st[i].sign_exponent) << 64
    else:
        registers[_FP_CONTROL] = int(lib.X86_FCW_RESET)
        registers.update(dict.fromkeys(_FP_STACK, 0))
    mxcsr = int(fx.mxcsr)   # MXCSR is saved with either component
    registers[_XMM_CONTROL] = int(fx.fdp) | mxcsr << 64 | int(lib.X86_MXCSR_MASK) << 96
    for i, name in enumerate(_XMM):
        registers[name] = int.from_bytes(bytes(fx.xmm[i]), "little") if present & lib.X86_XSTATE_SSE else 0
    return registers


# ---- synthetic timers
def encode_timers(timers: list[SyntheticTimer]) -> bytes:
    """Per timer: config, count, the next expiry as ``adjustment`` (reference time;
    0: not armed), and an expiry whose message is still waiting for its slot."""
    state = ffi.new(f"{_TIMERS} *")
    for slot, timer in zip(state.timers, timers):
        slot.config, slot.count = timer.config, timer.count
        slot.adjustment = timer.expiry or 0
        slot.flags.undelivered_msg_pending = int(timer.undelivered)
        slot.undelivered_exp_time = (timer.expiry or 0) if timer.undelivered else 0
    return bytes(ffi.buffer(state))


def decode_timers(blob: bytes) -> list[SyntheticTimer]:
    state = ffi.cast(f"{_TIMERS} *", ffi.from_buffer(blob))
    timers = []
    for slot in state.timers:
        undelivered = bool(slot.flags.undelivered_msg_pending)
        expiry = int(slot.undelivered_exp_time if undelivered else slot.adjustment) or None
        timers.append(SyntheticTimer(config=int(slot.config), count=int(slot.count), expiry=expiry, undelivered=undelivered))
    return timers


# ---- the VP
def required_size(vp: SimVp, kind: StateBlob) -> int:
    if kind is StateBlob.XSAVE:
        return int(vp.partition.properties[lib.HV_PARTITION_PROPERTY_MAX_XSAVE_DATA_SIZE])
    if kind is StateBlob.SYNTHETIC_TIMERS:
        return int(ffi.sizeof(_TIMERS))
    return PAGE


def _synic_page(vp: SimVp, kind: StateBlob) -> int:
    """The SynIC pages live in guest RAM at the GPAs the guest chose."""
    page = vp.synic.message_slot(0) if kind is StateBlob.SIMP else vp.synic.flags_base(0)
    if page is None:
        raise VpStateError(f"{kind.name} is not enabled")
    return page


def get_state(vp: SimVp, kind: StateBlob) -> bytes:
    if kind is StateBlob.LAPIC:
        return encode_lapic(vp.index, vp.lapic.save())
    if kind is StateBlob.XSAVE:
        return encode_xsave({name: vp.reg(name) for name in XSAVE_REGISTERS}, required_size(vp, kind))
    if kind is StateBlob.SYNTHETIC_TIMERS:
        return encode_timers(vp.hv.timers)
    try:
        return vp.partition.memory.read(_synic_page(vp, kind), PAGE)
    except GpaUnmapped:
        raise VpStateError(f"{kind.name} is outside RAM") from None


def set_state(vp: SimVp, kind: StateBlob, blob: bytes) -> None:
    if kind is StateBlob.LAPIC:
        vp.lapic.restore(decode_lapic(blob, vp.lapic.save()))
    elif kind is StateBlob.XSAVE:
        for name, value in decode_xsave(blob).items():   # the x87 control first: ST(i) follows its TOP
            vp.set_reg(name, value)
    elif kind is StateBlob.SYNTHETIC_TIMERS:
        vp.hv.restore_timers(decode_timers(blob))
    else:
        try:
            vp.partition.memory.write(_synic_page(vp, kind), blob[:PAGE])
        except GpaUnmapped:
            raise VpStateError(f"{kind.name} is outside RAM") from None
