"""MSHV_GET_VP_STATE / MSHV_SET_VP_STATE carry a VP's LAPIC, x87/SSE state and
synthetic timers for real: what is set is what the VP then has (and gives
back), and a VP moved through them into another partition goes on exactly."""

from __future__ import annotations

import struct
import time
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mshvstack.abi import ffi, lib
from mshvstack.backend.sim.hv1 import SyntheticTimer
from mshvstack.backend.sim.lapic import LVT_ORDER, LapicState
from mshvstack.backend.sim.vpstate import decode_lapic, decode_timers, encode_lapic, encode_timers
from mshvstack.hvcall import calls
from mshvstack.partition import IoPortIntercept, Mshv, Partition, Segment, Vp, VpStateKind

U32 = st.integers(0, 2**32 - 1)
U64 = st.integers(0, 2**64 - 1)
R = lib


@pytest.fixture(scope="module")
def vp() -> Iterator[Vp]:
    """One VP for every example: each sets the whole state it then reads back."""
    with Mshv.open("sim") as mshv, mshv.create_partition() as part:
        part.initialize()
        part.map_memory(0, 0x10000)
        yield part.create_vp(0)


lapic_states = st.builds(
    LapicState, irr=st.integers(0, 2**256 - 1), isr=st.integers(0, 2**256 - 1), svr=U32, ldr=U32, dfr=U32, esr=U32,
    icr=U64, lvt=st.tuples(*[U32] * len(LVT_ORDER)), timer_initial=U32, timer_divide=U32, timer_current=U32)


@given(lapic_states)
def test_the_lapic_blob_carries_every_register_it_has(state: LapicState) -> None:
    blob = encode_lapic(3, state)
    assert ffi.cast("struct hv_local_interrupt_controller_state *", ffi.from_buffer(blob)).apic_id == 3
    assert decode_lapic(blob, LapicState()) == state


timers = st.lists(st.builds(SyntheticTimer, config=U64, count=U64, expiry=st.none() | st.integers(1, 2**64 - 1),
                            undelivered=st.booleans()), min_size=4, max_size=4)


@given(timers)
def test_the_timer_blob_carries_each_timer_and_its_next_expiry(state: list[SyntheticTimer]) -> None:
    assert decode_timers(encode_timers(state)) == state


@settings(max_examples=40, deadline=None)
@given(timers=timers)
def test_synthetic_timers_set_are_the_vps_timers(vp: Vp, timers: list[SyntheticTimer]) -> None:
    blob = encode_timers(timers)
    vp.set_state(VpStateKind.SYNTHETIC_TIMERS, blob)
    assert vp.get_state(VpStateKind.SYNTHETIC_TIMERS) == blob


@settings(max_examples=40, deadline=None)
@given(state=lapic_states)
def test_a_lapic_set_is_the_vps_lapic(vp: Vp, state: LapicState) -> None:
    state = LapicState(**{**state.__dict__, "timer_current": 0})   # a stopped timer: nothing counts down meanwhile
    blob = encode_lapic(0, state)
    vp.set_state(VpStateKind.LAPIC, blob)
    assert vp.get_state(VpStateKind.LAPIC)[:1024] == blob[:1024]


def test_a_running_lapic_timer_goes_on_counting_from_where_it_was(vp: Vp) -> None:
    state = LapicState(lvt=(0x20030,) + (1 << 16,) * 5, timer_initial=10**9, timer_current=6 * 10**8, timer_divide=0b1011)
    vp.set_state(VpStateKind.LAPIC, encode_lapic(0, state))
    now = decode_lapic(vp.get_state(VpStateKind.LAPIC), LapicState())
    assert now.timer_initial == 10**9 and 5 * 10**8 < now.timer_current <= 6 * 10**8


fp_controls = st.builds(lambda fcw, fsw, ftw, fop, fip: fcw | fsw << 16 | ftw << 32 | fop << 48 | fip << 64,
                        st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.integers(0, 0xFF), st.integers(0, 0x7FF), U64)
fp_values = st.integers(0, 2**80 - 1)
xmm_values = st.integers(0, 2**128 - 1)


@settings(max_examples=60, deadline=None)
@given(control=fp_controls, stack=st.lists(fp_values, min_size=8, max_size=8), xmm=st.lists(xmm_values, min_size=16, max_size=16),
       mxcsr=st.integers(0, 0xFFFF), fdp=U64)
def test_an_xsave_area_set_is_the_vps_x87_and_sse_state(vp: Vp, control: int, stack: list[int], xmm: list[int],
                                                       mxcsr: int, fdp: int) -> None:
    area = ffi.new("struct x86_xsave_area *")
    fx = area.legacy
    fx.fcw, fx.fsw, fx.ftw, fx.fop, fx.fip = control & 0xFFFF, (control >> 16) & 0xFFFF, (control >> 32) & 0xFF, \
        (control >> 48) & 0x7FF, control >> 64
    fx.fdp, fx.mxcsr, fx.mxcsr_mask = fdp, mxcsr, lib.X86_MXCSR_MASK
    for i, value in enumerate(stack):
        fx.st[i].mantissa, fx.st[i].sign_exponent = value & (2**64 - 1), value >> 64
    for i, value in enumerate(xmm):
        ffi.memmove(fx.xmm[i], value.to_bytes(16, "little"), 16)
    area.header.xstate_bv = lib.X86_XSTATE_X87 | lib.X86_XSTATE_SSE
    area.header.xcomp_bv = lib.X86_XCOMP_BV_COMPACTED | lib.X86_XSTATE_X87 | lib.X86_XSTATE_SSE
    blob = bytes(ffi.buffer(area)).ljust(4096, b"\0")
    vp.set_state(VpStateKind.XSAVE, blob)
    assert vp.get_state(VpStateKind.XSAVE) == blob
    # The same state as registers: ST(i) by stack position, XMMs, MXCSR.
    names = [R.HV_X64_REGISTER_FP_MMX0 + i for i in range(8)] + [R.HV_X64_REGISTER_XMM0 + i for i in range(16)]
    assert calls.get_vp_registers128(vp.partition.hv, vp.index, names) == stack + xmm


def _real_mode_partition(mshv: Mshv) -> tuple[Partition, Vp]:
    part = mshv.create_partition()
    part.initialize()
    part.map_memory(0, 0x10000)
    vp = part.create_vp(0)
    sregs = vp.sregs
    sregs.cs = Segment(base=0, limit=0xFFFF, selector=0, attributes=0x9B)
    sregs.cr4 |= 1 << 9   # OSFXSR: SSE allowed
    vp.sregs = sregs
    return part, vp


def test_a_new_vp_has_the_power_up_x87_and_sse_state() -> None:
    with Mshv.open("sim") as mshv:
        part, vp = _real_mode_partition(mshv)
        for _ in range(2):   # before the engine starts, then held by it
            blob = vp.get_state(VpStateKind.XSAVE)   # kept: the cast points into it
            area = ffi.cast("struct x86_xsave_area *", ffi.from_buffer(blob))
            assert (area.legacy.fcw, area.legacy.ftw, area.legacy.mxcsr) == (lib.X86_FCW_RESET, 0, lib.X86_MXCSR_RESET)
            vp.run()
        part.close()


# Real mode at 0x1000: x87 and SSE state carried across an OUT, then used.
#   fninit (double extended precision: power-up has single); fld1; fldpi; faddp (ST0 = pi + 1);
#   out 0x10 (the VMM moves the VP here);
#   fld1; faddp (pi + 2); fstp qword [0x3000]; addps xmm0, xmm1; movups [0x3010], xmm0; out 0x11
_FPU_GUEST = bytes.fromhex("dbe3" "d9e8" "d9eb" "dec1" "e610" "d9e8" "dec1" "dd1e0030" "0f58c1" "0f11061030" "e611")


def test_a_vp_moved_mid_computation_through_the_api_goes_on_exactly() -> None:
    with Mshv.open("sim") as mshv:
        source, vp = _real_mode_partition(mshv)
        source.memory.write(0x1000, _FPU_GUEST)
        regs = vp.regs
        regs.rip, regs.rflags = 0x1000, 2
        vp.regs = regs
        vp.set_registers({R.HV_X64_REGISTER_XMM0: 0x3F800000_3F800000_3F800000_3F800000,     # 1.0 x 4
                          R.HV_X64_REGISTER_XMM1: 0x40000000_40000000_40000000_40000000})    # 2.0 x 4
        exit_ = vp.run()
        assert isinstance(exit_, IoPortIntercept) and exit_.port_number == 0x10
        saved = {kind: vp.get_state(kind) for kind in (VpStateKind.LAPIC, VpStateKind.XSAVE, VpStateKind.SYNTHETIC_TIMERS)}
        regs, sregs = vp.regs, vp.sregs
        memory = source.memory.read(0, 0x10000)
        source.close()

        target, moved = _real_mode_partition(mshv)
        target.memory.write(0, memory)
        moved.sregs = sregs
        regs.rip += 2   # past the OUT the VMM handled
        moved.regs = regs
        for kind, blob in saved.items():
            moved.set_state(kind, blob)
        exit_ = moved.run()
        assert isinstance(exit_, IoPortIntercept) and exit_.port_number == 0x11
        value = struct.unpack("<d", target.memory.read(0x3000, 8))[0]
        assert abs(value - (3.141592653589793 + 2)) < 1e-12
        assert struct.unpack("<4f", target.memory.read(0x3010, 16)) == (3.0, 3.0, 3.0, 3.0)
        target.close()


def test_reference_time_set_is_the_partitions_clock_and_its_tsc_page() -> None:
    """A restored partition goes on from its saved time: REFERENCE_TIME sets the clock
    (frozen, it thaws from there), and the guest's TSC page agrees with it (it kept the
    old offset, so a pause made the guest's clocksource jump by the pause)."""
    from mshvstack.backend.sim.engines.unicorn import read_tsc

    with Mshv.open("sim") as mshv:
        part, vp = _real_mode_partition(mshv)
        vp.set_registers({R.HV_REGISTER_REFERENCE_TSC: 0x8000 | 1})   # the guest's TSC page at GPA 0x8000
        part.set_property(R.HV_PARTITION_PROPERTY_TIME_FREEZE, 1)
        part.set_property(R.HV_PARTITION_PROPERTY_REFERENCE_TIME, 10**12)
        assert part.get_property(R.HV_PARTITION_PROPERTY_REFERENCE_TIME) == 10**12
        time.sleep(0.05)
        part.set_property(R.HV_PARTITION_PROPERTY_TIME_FREEZE, 0)
        time.sleep(0.02)
        now = part.get_property(R.HV_PARTITION_PROPERTY_REFERENCE_TIME)
        assert 10**12 + 150_000 <= now < 10**12 + 10**7   # 15 ms to 1 s in 100 ns units
        sequence, _, scale, offset = struct.unpack("<IIQq", part.memory.read(0x8000, 24))
        page_time = ((read_tsc() * scale) >> 64) + offset
        assert sequence != 0 and abs(page_time - part.get_property(R.HV_PARTITION_PROPERTY_REFERENCE_TIME)) < 10_000
        part.close()


GPRS = [int(getattr(lib, f"HV_X64_REGISTER_{n}")) for n in
        ("RAX", "RCX", "RDX", "RBX", "RSP", "RBP", "RSI", "RDI", *(f"R{i}" for i in range(8, 16)))]
SINTS = [int(lib.HV_REGISTER_SINT0) + i for i in range(16)]
sint_values = st.one_of(st.just(1 << 16), st.builds(lambda vector, masked, auto_eoi: vector | masked << 16 | auto_eoi << 17,
                                                    st.integers(16, 255), st.integers(0, 1), st.integers(0, 1)))
synic_pages = st.integers(1, 15).map(lambda page: page << 12 | 1)   # enabled, inside the partition's RAM


@settings(max_examples=40, deadline=None)
@given(gprs=st.lists(U64, min_size=16, max_size=16), rip=st.integers(0, 0xFFF0), sints=st.lists(sint_values, min_size=16, max_size=16),
       scontrol=st.integers(0, 1), simp=synic_pages, siefp=synic_pages, timers=timers)
def test_a_vp_saved_restored_and_saved_again_gives_the_same_record(gprs: list[int], rip: int, sints: list[int], scontrol: int,
                                                                   simp: int, siefp: int, timers: list[SyntheticTimer]) -> None:
    """save_vp -> restore_vp into a new partition's VP -> save_vp: the same registers
    (the TSC aside: it runs) and the same state blobs, SynIC pages and timers included."""
    from mshvstack.snapshot.vp import restore_vp, save_vp

    with Mshv.open("sim") as mshv:
        records = []
        for step in range(2):
            with mshv.create_partition() as part:
                part.initialize()
                part.map_memory(0, 0x10000)
                vp = part.create_vp(0)
                if step == 0:
                    vp.set_registers({**dict(zip(GPRS, gprs)), R.HV_X64_REGISTER_RIP: rip, **dict(zip(SINTS, sints)),
                                      R.HV_REGISTER_SCONTROL: scontrol, R.HV_REGISTER_SIMP: simp, R.HV_REGISTER_SIEFP: siefp})
                    vp.set_state(VpStateKind.SYNTHETIC_TIMERS, encode_timers(timers))
                else:
                    restore_vp(vp, records[0])
                records.append(save_vp(vp))
        first, second = ({k: v for k, v in r.registers.items() if k != R.HV_X64_REGISTER_TSC} for r in records)
        assert first == second
        assert records[0].blobs == records[1].blobs
        assert all(first[name] == value for name, value in zip(GPRS, gprs)) and first[R.HV_REGISTER_SIMP] == simp
