"""hvcall/: enums, errors, allowlist, rep batching and continuation."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mshvstack.abi import lib
from mshvstack.hvcall import HvCall, HvCallNotAllowed, HvError, HvRegister, HvStatus, calls
from mshvstack.partition import Mshv, PartitionConfig

GPRS = [HvRegister[n] for n in ("RAX", "RBX", "RCX", "RDX", "RSI", "RDI", "R8", "R15", "RIP", "RFLAGS")]


def test_enums_come_from_the_binding() -> None:
    assert HvCall.GET_VP_REGISTERS == lib.HVCALL_GET_VP_REGISTERS
    assert HvStatus.INSUFFICIENT_BUFFERS == lib.HV_STATUS_INSUFFICIENT_BUFFERS
    assert HvRegister.RAX == lib.HV_X64_REGISTER_RAX
    assert HvRegister.SINT15 == lib.HV_REGISTER_SINT15
    assert {m.value for m in HvCall} == {getattr(lib, n) for n in dir(lib) if n.startswith("HVCALL_")}


def test_hv_error_names_call_status_and_hint() -> None:
    err = HvError(lib.HVCALL_POST_MESSAGE_DIRECT, lib.HV_STATUS_INSUFFICIENT_BUFFERS)
    assert "HVCALL_POST_MESSAGE_DIRECT" in str(err) and "HV_STATUS_INSUFFICIENT_BUFFERS" in str(err)
    assert "busy" in err.hint


@pytest.fixture
def vm():  # type: ignore[no-untyped-def]
    mshv = Mshv.open("sim")
    part = mshv.create_partition(PartitionConfig())
    part.initialize()
    vp = part.create_vp(0)
    yield mshv, part, vp
    part.close()
    mshv.close()


def test_allowlist_refusal_names_the_kernel() -> None:
    with Mshv.open("sim", profile="6.15") as mshv:
        part = mshv.create_partition()
        with pytest.raises(HvCallNotAllowed) as info:
            calls.get_partition_property_ex(part.hv, lib.HV_PARTITION_PROPERTY_PRIVILEGE_FLAGS)
        assert "6.15" in str(info.value) and "'newest'" in str(info.value)
        with pytest.raises(HvCallNotAllowed):
            mshv.root_property(lib.HV_PARTITION_PROPERTY_VMM_CAPABILITIES)
        with pytest.raises(HvCallNotAllowed) as info:
            calls.read_gpa(part.hv, 0, 0, 8)
        assert "azure" in str(info.value)
        part.close()


def test_root_partition_property_on_newest() -> None:
    with Mshv.open("sim") as mshv:
        assert mshv.root_property(lib.HV_PARTITION_PROPERTY_PROCESSOR_CLOCK_FREQUENCY) > 0


@settings(max_examples=25, deadline=None)
@given(picks=st.lists(st.sampled_from(GPRS), min_size=1, max_size=700), seed=st.integers(0, 2**32))
def test_register_batching_round_trip(picks: list[int], seed: int) -> None:
    with Mshv.open("sim") as mshv:
        part = mshv.create_partition()
        part.initialize()
        part.create_vp(0)
        expected = {int(name): (seed * (i + 7)) & ((1 << 64) - 1) for i, name in enumerate(GPRS)}
        calls.set_vp_registers(part.hv, 0, expected)
        values = calls.get_vp_registers64(part.hv, 0, picks)  # up to 700 reps: several batches
        assert values == [expected[int(n)] for n in picks]
        part.close()


def test_rep_continuation_after_partial_progress(vm) -> None:  # type: ignore[no-untyped-def]
    mshv, part, vp = vm
    calls.set_vp_registers(part.hv, 0, {HvRegister.RAX: 1, HvRegister.RBX: 2, HvRegister.RCX: 3})
    mshv.backend.faults.partial_reps(lib.HVCALL_GET_VP_REGISTERS, completed=1, times=2)
    assert calls.get_vp_registers64(part.hv, 0, [HvRegister.RAX, HvRegister.RBX, HvRegister.RCX]) == [1, 2, 3]


def test_status_failures_become_hv_errors(vm) -> None:  # type: ignore[no-untyped-def]
    mshv, part, vp = vm
    mshv.backend.faults.fail_hvcall(lib.HVCALL_GET_VP_REGISTERS, lib.HV_STATUS_ACCESS_DENIED, times=1)
    with pytest.raises(HvError) as info:
        vp.get_registers([HvRegister.CR0])
    assert info.value.status == lib.HV_STATUS_ACCESS_DENIED
    with pytest.raises(HvError) as info:
        calls.get_partition_property(part.hv, 0x7FFF0000)
    assert info.value.status == lib.HV_STATUS_UNKNOWN_PROPERTY


def test_typed_wrappers(vm) -> None:  # type: ignore[no-untyped-def]
    mshv, part, _vp = vm
    part.map_memory(0, 0x10000)
    calls.set_partition_property(part.hv, lib.HV_PARTITION_PROPERTY_UNIMPLEMENTED_MSR_ACTION, 1)
    assert calls.get_partition_property(part.hv, lib.HV_PARTITION_PROPERTY_UNIMPLEMENTED_MSR_ACTION) == 1
    t = calls.translate_virtual_address(part.hv, 0, 0x1234, lib.HV_TRANSLATE_GVA_VALIDATE_READ)
    assert t.ok and t.gpa == 0x1234  # paging off: identity
    (leaf,) = calls.get_vp_cpuid_values(part.hv, 0, [(0x40000001, 0)])
    assert leaf[0] == int.from_bytes(b"Hv#1", "little")
    calls.register_cpuid_result(part.hv, 0, 0x40000001, calls.CpuidResult(eax=5))
    assert calls.get_vp_cpuid_values(part.hv, 0, [(0x40000001, 0)])[0][0] == 5
    states = calls.get_gpa_pages_access_states(part.hv, 0, 16, clear_dirty=True)
    assert len(states) == 16
    with pytest.raises(HvError) as info:  # SynIC not enabled by the guest yet
        calls.post_message_direct(part.hv, 0, 2, 1, b"x")
    assert info.value.status == lib.HV_STATUS_INVALID_VP_STATE
    with pytest.raises(ValueError):
        calls.post_message_direct(part.hv, 0, 2, 1, b"x" * 241)
    calls.clear_virtual_interrupt(part.hv)
    calls.install_intercept(part.hv, lib.HV_INTERCEPT_TYPE_X64_CPUID, 0, 0x1234)


def test_an_event_signal_says_whether_it_newly_set_the_flag(vm) -> None:  # type: ignore[no-untyped-def]
    """HvSignalEventDirect through the prepared call a VMBus channel keeps: set once, then
    already set until the guest clears it; the flag is the guest's bit in the SIEF page."""
    from mshvstack.hvcall import HvRegister

    _mshv, part, vp = vm
    part.map_memory(0, 0x100000)
    vp.set_registers({HvRegister.SCONTROL: 1, HvRegister.SIMP: 0x10000 | 1, HvRegister.SIEFP: 0x11000 | 1,
                      HvRegister.SINT0 + 2: 0x20051})
    signal = calls.EventSignal(part.hv, 0, 2, 13)
    flags = 0x11000 + 2 * lib.HV_EVENT_FLAGS_COUNT // 8   # SINT 2's flags in the SIEF page
    assert signal.signal() is True and signal.signal() is False
    assert part.memory.read(flags + 1, 1) == bytes([1 << 5])   # flag 13: byte 1, bit 5
    part.memory.write(flags + 1, b"\0")   # the guest took it
    assert calls.signal_event_direct(part.hv, 0, 2, 13) is True


def test_synic_pages_outside_ram_give_a_status_not_an_exception(vm) -> None:  # type: ignore[no-untyped-def]
    """A guest may point SIMP/SIEFP anywhere; delivery there is a typed HV status."""
    from mshvstack.hvcall import HvRegister

    _mshv, part, vp = vm
    part.map_memory(0, 0x10000)
    outside = 0x7FFF_0000
    vp.set_registers({HvRegister.SCONTROL: 1, HvRegister.SIMP: outside | 1, HvRegister.SIEFP: outside | 1,
                      HvRegister.SINT0 + 2: 0x50})
    with pytest.raises(HvError) as info:
        calls.post_message_direct(part.hv, 0, 2, 1, b"x")
    assert info.value.status == lib.HV_STATUS_INVALID_VP_STATE
    with pytest.raises(HvError) as info:
        calls.signal_event_direct(part.hv, 0, 2, 5)
    assert info.value.status == lib.HV_STATUS_INVALID_VP_STATE
