"""Typed wrappers for every hypercall on the passthrough allowlist.

Each builds its input struct through the binding, issues it with
:func:`mshvstack.hvcall.call.hvcall` (or the rep form) and decodes the
output.  The partition id is filled in by the driver; VP indexes are not
(the driver never rewrites them), so calls that target a VP take one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from mshvstack.abi import ffi, lib
from mshvstack.hvcall.call import HvTarget, PreparedCall, hvcall, hvcall_rep, hvcall_rep_indexed

_ASSOC = "struct hv_register_assoc"
_VALUE = "union hv_register_value"
RegisterValue = Any  # a cdata 'union hv_register_value'


def _struct(ctype: str) -> Any:
    return ffi.new(f"{ctype} *")


def _bytes(obj: Any) -> bytes:
    return bytes(ffi.buffer(obj))


# ---- VP registers -------------------------------------------------------------------------

def get_vp_registers(target: HvTarget, vp_index: int, names: Iterable[int]) -> list[RegisterValue]:
    """HVCALL_GET_VP_REGISTERS for any number of registers (batched by page)."""
    header = _struct("struct hv_input_get_vp_registers")
    header.vp_index = vp_index
    elements = [int(n).to_bytes(4, "little") for n in names]
    raw = hvcall_rep(target, lib.HVCALL_GET_VP_REGISTERS, header, elements, ffi.sizeof(_VALUE))
    values = []
    for chunk in raw:
        value = ffi.new(f"{_VALUE} *")
        ffi.memmove(value, chunk, len(chunk))
        values.append(value[0])
    return values


def get_vp_registers64(target: HvTarget, vp_index: int, names: Iterable[int]) -> list[int]:
    return [int(v.reg64) for v in get_vp_registers(target, vp_index, names)]


def get_vp_registers128(target: HvTarget, vp_index: int, names: Iterable[int]) -> list[int]:
    """The registers' whole 128-bit values (XMM, x87, their control registers)."""
    return [int(v.reg128.low_part) | int(v.reg128.high_part) << 64 for v in get_vp_registers(target, vp_index, names)]


def set_vp_registers(target: HvTarget, vp_index: int, values: Mapping[int, int | RegisterValue]) -> None:
    """HVCALL_SET_VP_REGISTERS: ints are written as reg128 (a 64-bit register takes the
    low half), cdata values whole."""
    header = _struct("struct hv_input_set_vp_registers")
    header.vp_index = vp_index
    elements = []
    for name, value in values.items():
        assoc = _struct(_ASSOC)
        assoc.name = int(name)
        if isinstance(value, int):
            value &= (1 << 128) - 1
            assoc.value.reg128.low_part, assoc.value.reg128.high_part = value & ((1 << 64) - 1), value >> 64
        else:
            ffi.memmove(ffi.addressof(assoc.value), ffi.addressof(value), ffi.sizeof(_VALUE))
        elements.append(_bytes(assoc))
    hvcall_rep(target, lib.HVCALL_SET_VP_REGISTERS, header, elements)


# ---- partition properties -----------------------------------------------------------------

def get_partition_property(target: HvTarget, code: int) -> int:
    inp = _struct("struct hv_input_get_partition_property")
    inp.property_code = code
    out = hvcall(target, lib.HVCALL_GET_PARTITION_PROPERTY, inp, ffi.sizeof("struct hv_output_get_partition_property"))
    return int.from_bytes(out[:8], "little")


def set_partition_property(target: HvTarget, code: int, value: int) -> None:
    inp = _struct("struct hv_input_set_partition_property")
    inp.property_code, inp.property_value = code, value
    hvcall(target, lib.HVCALL_SET_PARTITION_PROPERTY, inp)


def get_partition_property_ex(target: HvTarget, code: int, arg: int = 0) -> int:
    inp = _struct("struct hv_input_get_partition_property_ex")
    inp.property_code, inp.arg = code, arg
    out = hvcall(target, lib.HVCALL_GET_PARTITION_PROPERTY_EX, inp, 8)
    return int.from_bytes(out[:8], "little")


# ---- intercepts ---------------------------------------------------------------------------

def install_intercept(target: HvTarget, intercept_type: int, access: int = 0, parameter: int = 0) -> None:
    inp = _struct("struct hv_input_install_intercept")
    inp.intercept_type, inp.access_type = intercept_type, access
    inp.intercept_parameter.as_uint64 = parameter
    hvcall(target, lib.HVCALL_INSTALL_INTERCEPT, inp)


@dataclass(frozen=True)
class CpuidResult:
    """What a CPUID leaf returns; masks choose which bits override the default."""

    eax: int = 0
    ebx: int = 0
    ecx: int = 0
    edx: int = 0
    eax_mask: int = 0xFFFFFFFF
    ebx_mask: int = 0xFFFFFFFF
    ecx_mask: int = 0xFFFFFFFF
    edx_mask: int = 0xFFFFFFFF


def register_cpuid_result(target: HvTarget, vp_index: int, leaf: int, result: CpuidResult,
                          subleaf: int | None = None, always_override: bool = True) -> None:
    """HVCALL_REGISTER_INTERCEPT_RESULT for a CPUID leaf."""
    inp = _struct("struct hv_input_register_intercept_result")
    inp.vp_index, inp.intercept_type = vp_index, lib.HV_INTERCEPT_TYPE_X64_CPUID
    params = inp.parameters.cpuid
    params.input.eax = leaf
    params.input.ecx = subleaf or 0
    params.input.subleaf_specific = int(subleaf is not None)
    params.input.always_override = int(always_override)
    r = params.result
    r.eax, r.ebx, r.ecx, r.edx = result.eax, result.ebx, result.ecx, result.edx
    r.eax_mask, r.ebx_mask, r.ecx_mask, r.edx_mask = result.eax_mask, result.ebx_mask, result.ecx_mask, result.edx_mask
    hvcall(target, lib.HVCALL_REGISTER_INTERCEPT_RESULT, inp)


# ---- interrupts ---------------------------------------------------------------------------

def assert_virtual_interrupt(target: HvTarget, vector: int, destination: int, interrupt_type: int = 0,
                             level_triggered: bool = False, logical: bool = False, target_vtl: int = 0) -> None:
    inp = _struct("struct hv_input_assert_virtual_interrupt")
    inp.control.bits.interrupt_type = interrupt_type
    inp.control.bits.level_triggered = int(level_triggered)
    inp.control.bits.logical_dest_mode = int(logical)
    inp.dest_addr, inp.vector, inp.target_vtl = destination, vector, target_vtl
    hvcall(target, lib.HVCALL_ASSERT_VIRTUAL_INTERRUPT, inp)


def clear_virtual_interrupt(target: HvTarget) -> None:
    hvcall(target, lib.HVCALL_CLEAR_VIRTUAL_INTERRUPT, _struct("struct hv_input_clear_virtual_interrupt"))


# ---- address translation and GPA access ---------------------------------------------------

@dataclass(frozen=True)
class Translation:
    result: int          # HV_TRANSLATE_GVA_* result code
    gpa: int             # valid when result == HV_TRANSLATE_GVA_SUCCESS
    overlay_page: bool

    @property
    def ok(self) -> bool:
        return bool(self.result == lib.HV_TRANSLATE_GVA_SUCCESS)


def translate_virtual_address(target: HvTarget, vp_index: int, gva: int, flags: int) -> Translation:
    inp = _struct("struct hv_input_translate_virtual_address")
    inp.vp_index, inp.control_flags, inp.gva_page = vp_index, flags, gva >> 12
    raw = hvcall(target, lib.HVCALL_TRANSLATE_VIRTUAL_ADDRESS, inp, ffi.sizeof("struct hv_output_translate_virtual_address"))
    out = ffi.from_buffer("struct hv_output_translate_virtual_address *", raw)
    return Translation(int(out.translation_result.bits.result_code), (int(out.gpa_page) << 12) | (gva & 0xFFF),
                       bool(out.translation_result.bits.overlay_page))


@dataclass(frozen=True)
class PageAccess:
    accessed: bool
    dirty: bool


def get_gpa_pages_access_states(target: HvTarget, first_page: int, count: int, *, clear_accessed: bool = False,
                                clear_dirty: bool = False, set_accessed: bool = False, set_dirty: bool = False) -> list[PageAccess]:
    """HVCALL_GET_GPA_PAGES_ACCESS_STATES over ``count`` pages (rep call, one byte per page)."""
    header = _struct("struct hv_input_get_gpa_pages_access_state")
    flags = header.flags.bits
    flags.clear_accessed, flags.clear_dirty = int(clear_accessed), int(clear_dirty)
    flags.set_accessed, flags.set_dirty = int(set_accessed), int(set_dirty)

    def header_at(index: int) -> bytes:
        header.hv_gpa_page_number = first_page + index
        return _bytes(header)

    raw = hvcall_rep_indexed(target, lib.HVCALL_GET_GPA_PAGES_ACCESS_STATES, header_at, count, 1)
    return [PageAccess(bool(b[0] & 1), bool(b[0] & 2)) for b in raw]


def read_gpa(target: HvTarget, vp_index: int, gpa: int, size: int) -> bytes:
    """HVCALL_READ_GPA in 16-byte pieces (Azure-style kernels only)."""
    data = bytearray()
    while len(data) < size:
        n = min(16, size - len(data))
        inp = _struct("struct hv_input_read_gpa")
        inp.vp_index, inp.base_gpa, inp.byte_count = vp_index, gpa + len(data), n
        raw = hvcall(target, lib.HVCALL_READ_GPA, inp, ffi.sizeof("struct hv_output_read_gpa"))
        out = ffi.from_buffer("struct hv_output_read_gpa *", raw)
        if out.access_result.result_code != lib.HV_ACCESS_GPA_SUCCESS:
            raise ValueError(f"GPA {gpa + len(data):#x} not readable (access result {out.access_result.result_code})")
        data += bytes(out.data)[:n]
    return bytes(data)


def write_gpa(target: HvTarget, vp_index: int, gpa: int, data: bytes) -> None:
    for offset in range(0, len(data), 16):
        chunk = data[offset : offset + 16]
        inp = _struct("struct hv_input_write_gpa")
        inp.vp_index, inp.base_gpa, inp.byte_count = vp_index, gpa + offset, len(chunk)
        ffi.memmove(inp.data, chunk, len(chunk))
        raw = hvcall(target, lib.HVCALL_WRITE_GPA, inp, ffi.sizeof("struct hv_output_write_gpa"))
        if int.from_bytes(raw[:4], "little") != lib.HV_ACCESS_GPA_SUCCESS:
            raise ValueError(f"GPA {gpa + offset:#x} not writable")


# ---- SynIC delivery to the guest ----------------------------------------------------------

def post_message_direct(target: HvTarget, vp_index: int, sint: int, message_type: int, payload: bytes, vtl: int = 0) -> None:
    """Write a message into the guest's SIMP slot for ``sint`` (HvStatus.INSUFFICIENT_BUFFERS if busy)."""
    if len(payload) > lib.HV_MESSAGE_PAYLOAD_BYTE_COUNT:
        raise ValueError(f"message payload is {len(payload)} bytes; at most {lib.HV_MESSAGE_PAYLOAD_BYTE_COUNT}")
    inp = _struct("struct hv_input_post_message_direct")
    inp.vp_index, inp.vtl, inp.sint_index = vp_index, vtl, sint
    msg = ffi.cast("struct hv_message *", inp.message)
    msg.header.message_type, msg.header.payload_size = message_type, len(payload)
    ffi.memmove(msg.u.payload, payload, len(payload))
    hvcall(target, lib.HVCALL_POST_MESSAGE_DIRECT, inp)


def signal_event_direct(target: HvTarget, vp_index: int, sint: int, flag: int, vtl: int = 0) -> bool:
    """Set event flag ``flag`` of ``sint``; True if it was newly set (and an interrupt sent)."""
    return EventSignal(target, vp_index, sint, flag, vtl).signal()


class EventSignal:
    """One event flag of one VP's SINT, signalled with HvSignalEventDirect whenever asked:
    the hypercall built once (a VMBus channel signals its guest after every completion)."""

    def __init__(self, target: HvTarget, vp_index: int, sint: int, flag: int, vtl: int = 0) -> None:
        inp = _struct("struct hv_input_signal_event_direct")
        inp.target_vp, inp.target_vtl, inp.target_sint, inp.flag_number = vp_index, vtl, sint, flag
        self._call = PreparedCall(target, lib.HVCALL_SIGNAL_EVENT_DIRECT, inp,
                                  ffi.sizeof("struct hv_output_signal_event_direct"))

    def signal(self) -> bool:
        """True if the flag was newly set (and so an interrupt sent)."""
        self._call.issue()
        return bool(self._call.output[0])


# ---- CPUID as the VP sees it --------------------------------------------------------------

def get_vp_cpuid_values(target: HvTarget, vp_index: int, leaves: Iterable[tuple[int, int]]) -> list[tuple[int, int, int, int]]:
    header = _struct("struct hv_input_get_vp_cpuid_values")
    header.vp_index = vp_index
    elements = []
    for leaf, subleaf in leaves:
        info = _struct("struct hv_cpuid_leaf_info")
        info.eax, info.ecx = leaf, subleaf
        elements.append(_bytes(info))
    raw = hvcall_rep(target, lib.HVCALL_GET_VP_CPUID_VALUES, header, elements, 16)
    return [tuple(int.from_bytes(r[i : i + 4], "little") for i in range(0, 16, 4)) for r in raw]  # type: ignore[misc]
