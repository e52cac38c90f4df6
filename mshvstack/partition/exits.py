"""VP exits: one frozen dataclass per hv_message type, decoded from the
256-byte message MSHV_RUN_VP returns (and encodable, for tests and tools).

Each class names its payload struct and, where a field's C path differs
from its name, the path; the codec does the rest through the binding.
"""

from __future__ import annotations

import dataclasses
import operator
import struct
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, cast

from mshvstack.abi import ffi, lib
from mshvstack.partition import fastdecode

MESSAGE_SIZE = int(lib.HV_MESSAGE_SIZE)


@dataclass(frozen=True)
class Segment:
    base: int = 0
    limit: int = 0
    selector: int = 0
    attributes: int = 0

    @classmethod
    def from_c(cls, seg: Any) -> Segment:
        return _segment(_SEGMENT_FIELDS(seg))

    def to_c(self, seg: Any) -> None:
        seg.base, seg.limit, seg.selector, seg.attributes = self.base, self.limit, self.selector, self.attributes

    @property
    def long_mode(self) -> bool:
        return bool(self.attributes & lib.HV_X64_SEGMENT_ATTR_LONG)


@dataclass(frozen=True)
class InterceptHeader:
    """The common x64 intercept header: where the VP stopped and in what mode."""

    vp_index: int = 0
    instruction_length: int = 0
    access: int = 0          # HV_INTERCEPT_ACCESS_READ/WRITE/EXECUTE
    cr8: int = 0
    cpl: int = 0
    cr0_pe: bool = False
    efer_lma: bool = False
    interrupt_shadow: bool = False
    cs: Segment = Segment()
    rip: int = 0
    rflags: int = 0

    @classmethod
    def from_c(cls, h: Any) -> InterceptHeader:
        (vp_index, length, access, cr8, cpl, pe, lma, shadow, base, limit, selector, attributes, rip,
         rflags) = _HEADER_FIELDS(h)
        cs = _segment((base, limit, selector, attributes))
        return _built(cls, {"vp_index": vp_index, "instruction_length": length, "access": access, "cr8": cr8,
                            "cpl": cpl, "cr0_pe": bool(pe), "efer_lma": bool(lma), "interrupt_shadow": bool(shadow),
                            "cs": cs, "rip": rip, "rflags": rflags})

    def to_c(self, h: Any) -> None:
        h.vp_index, h.instruction_length, h.intercept_access_type, h.cr8 = self.vp_index, self.instruction_length, self.access, self.cr8
        state = h.execution_state.bits
        state.cpl, state.cr0_pe, state.efer_lma, state.interrupt_shadow = self.cpl, self.cr0_pe, self.efer_lma, self.interrupt_shadow
        self.cs.to_c(h.cs_segment)
        h.rip, h.rflags = self.rip, self.rflags

    @property
    def next_rip(self) -> int:
        """RIP after the intercepted instruction (what an emulating VMM sets)."""
        return self.rip + self.instruction_length


_T = typing.TypeVar("_T")


def _built(cls: type[_T], values: dict[str, Any]) -> _T:
    """A frozen dataclass from all its field values, without its per-field __init__
    (decode runs on every exit; these classes have no __post_init__ or slots)."""
    obj: _T = object.__new__(cls)
    obj.__dict__.update(values)
    return obj


_SEGMENTS: dict[tuple[int, int, int, int], Segment] = {}


def _segment(fields: tuple[int, int, int, int]) -> Segment:
    """Segments repeat from exit to exit and are immutable: one instance per value."""
    segment = _SEGMENTS.get(fields)
    if segment is None:
        if len(_SEGMENTS) >= 4096:
            _SEGMENTS.clear()
        base, limit, selector, attributes = fields
        segment = _SEGMENTS[fields] = _built(Segment, {"base": base, "limit": limit, "selector": selector,
                                                       "attributes": attributes})
    return segment


# Field readers built once (C-level attribute chains: decode runs on every exit).
_SEGMENT_FIELDS = operator.attrgetter("base", "limit", "selector", "attributes")
_HEADER_FIELDS = operator.attrgetter(
    "vp_index", "instruction_length", "intercept_access_type", "cr8", "execution_state.bits.cpl",
    "execution_state.bits.cr0_pe", "execution_state.bits.efer_lma", "execution_state.bits.interrupt_shadow",
    "cs_segment.base", "cs_segment.limit", "cs_segment.selector", "cs_segment.attributes", "rip", "rflags")


class VpExit:
    """Base of every exit; subclasses are frozen dataclasses."""

    message_type: ClassVar[int]
    payload_ctype: ClassVar[str]
    paths: ClassVar[dict[str, str]] = {}


_REGISTRY: dict[int, type[VpExit]] = {}


def _exit(message_type: int, ctype: str, **paths: str):  # type: ignore[no-untyped-def]
    def register(cls: type) -> type:
        cls = dataclass(frozen=True)(cls)
        cls.message_type, cls.payload_ctype, cls.paths = int(message_type), ctype, paths  # type: ignore[attr-defined]
        _REGISTRY[int(message_type)] = cls
        return cls
    return register


@_exit(lib.HVMSG_X64_IO_PORT_INTERCEPT, "struct hv_x64_io_port_intercept_message",
       access_size="access_info.bits.access_size", string_op="access_info.bits.string_op",
       rep_prefix="access_info.bits.rep_prefix", ds="ds_segment", es="es_segment")
class IoPortIntercept(VpExit):
    header: InterceptHeader
    port_number: int
    access_size: int
    string_op: bool
    rep_prefix: bool
    rax: int
    rcx: int
    rsi: int
    rdi: int
    instruction_bytes: bytes
    ds: Segment
    es: Segment

    @property
    def is_write(self) -> bool:
        return bool(self.header.access == lib.HV_INTERCEPT_ACCESS_WRITE)

    @property
    def data(self) -> int:
        """The value an OUT writes (the low access_size bytes of RAX)."""
        return self.rax & ((1 << (8 * self.access_size)) - 1)


@_exit(lib.HVMSG_GPA_INTERCEPT, "struct hv_x64_memory_intercept_message",
       gva="guest_virtual_address", gpa="guest_physical_address",
       gva_valid="memory_access_info.bits.gva_valid")
class MemoryIntercept(VpExit):
    header: InterceptHeader
    gva: int
    gpa: int
    gva_valid: bool
    cache_type: int
    instruction_bytes: bytes

    @property
    def is_write(self) -> bool:
        return bool(self.header.access == lib.HV_INTERCEPT_ACCESS_WRITE)


@_exit(lib.HVMSG_UNMAPPED_GPA, "struct hv_x64_memory_intercept_message",
       gva="guest_virtual_address", gpa="guest_physical_address",
       gva_valid="memory_access_info.bits.gva_valid")
class UnmappedGpa(MemoryIntercept):
    """An access to a GPA with no memory behind it (MMIO)."""


@_exit(lib.HVMSG_X64_CPUID_INTERCEPT, "struct hv_x64_cpuid_intercept_message")
class CpuidIntercept(VpExit):
    header: InterceptHeader
    rax: int
    rcx: int
    rdx: int
    rbx: int
    default_result_rax: int
    default_result_rcx: int
    default_result_rdx: int
    default_result_rbx: int


@_exit(lib.HVMSG_X64_MSR_INTERCEPT, "struct hv_x64_msr_intercept_message")
class MsrIntercept(VpExit):
    header: InterceptHeader
    msr_number: int
    rax: int
    rdx: int

    @property
    def is_write(self) -> bool:
        return bool(self.header.access == lib.HV_INTERCEPT_ACCESS_WRITE)

    @property
    def value(self) -> int:
        return (self.rdx & 0xFFFFFFFF) << 32 | (self.rax & 0xFFFFFFFF)


@_exit(lib.HVMSG_X64_EXCEPTION_INTERCEPT, "struct hv_x64_exception_intercept_message",
       error_code_valid="exception_info.bits.error_code_valid",
       software_exception="exception_info.bits.software_exception", ds="ds_segment", ss="ss_segment")
class ExceptionIntercept(VpExit):
    header: InterceptHeader
    exception_vector: int
    error_code_valid: bool
    software_exception: bool
    error_code: int
    exception_parameter: int
    instruction_bytes: bytes
    ds: Segment
    ss: Segment
    rax: int
    rcx: int
    rdx: int
    rbx: int
    rsp: int
    rbp: int
    rsi: int
    rdi: int


@_exit(lib.HVMSG_X64_HALT, "struct hv_x64_halt_message")
class Halt(VpExit):
    header: InterceptHeader


@_exit(lib.HVMSG_UNRECOVERABLE_EXCEPTION, "struct hv_x64_unrecoverable_exception_message")
class UnrecoverableException(VpExit):
    """The guest triple-faulted (or hit an unrecoverable state)."""

    header: InterceptHeader


@_exit(lib.HVMSG_HYPERCALL_INTERCEPT, "struct hv_x64_hypercall_intercept_message")
class HypercallIntercept(VpExit):
    header: InterceptHeader
    rax: int
    rbx: int
    rcx: int
    rdx: int
    r8: int
    rsi: int
    rdi: int

    # The TLFS calling conventions: a 64-bit caller passes the control word in RCX,
    # the input in RDX and the output in R8, and gets the result in RAX; a 32-bit
    # caller uses EDX:EAX, EBX:ECX and EDI:ESI, and gets the result in EDX:EAX.
    @property
    def long_mode(self) -> bool:
        return bool(self.header.efer_lma and self.header.cs.long_mode)

    @property
    def control(self) -> int:
        return self.rcx if self.long_mode else _pair(self.rdx, self.rax)

    @property
    def input_value(self) -> int:
        """The input GPA (or, for a fast call, the first input value)."""
        return self.rdx if self.long_mode else _pair(self.rbx, self.rcx)

    @property
    def output_value(self) -> int:
        return self.r8 if self.long_mode else _pair(self.rdi, self.rsi)

    @property
    def call_code(self) -> int:
        return self.control & 0xFFFF

    @property
    def fast(self) -> bool:
        return bool(self.control & lib.HV_HYPERCALL_FAST_BIT)

    def result_registers(self, status: int) -> dict[int, int]:
        """The registers that carry the hypercall's result back to this caller."""
        if self.long_mode:
            return {int(lib.HV_X64_REGISTER_RAX): status}
        return {int(lib.HV_X64_REGISTER_RAX): status & 0xFFFFFFFF, int(lib.HV_X64_REGISTER_RDX): status >> 32}


def _pair(high: int, low: int) -> int:
    return (high & 0xFFFFFFFF) << 32 | (low & 0xFFFFFFFF)


@_exit(lib.HVMSG_X64_APIC_EOI, "struct hv_x64_apic_eoi_message")
class ApicEoi(VpExit):
    vp_index: int
    interrupt_vector: int


@_exit(lib.HVMSG_SYNIC_SINT_DELIVERABLE, "struct hv_x64_sint_deliverable_message")
class SintDeliverable(VpExit):
    header: InterceptHeader
    deliverable_sints: int


@_exit(lib.HVMSG_X64_INTERRUPTION_DELIVERABLE, "struct hv_x64_interruption_deliverable_message")
class InterruptionDeliverable(VpExit):
    header: InterceptHeader
    deliverable_type: int


@_exit(lib.HVMSG_X64_SIPI_INTERCEPT, "struct hv_x64_sipi_intercept_message")
class SipiIntercept(VpExit):
    header: InterceptHeader
    target_vp_index: int
    interrupt_vector: int


@_exit(lib.HVMSG_INVALID_VP_REGISTER_VALUE, "struct hv_x64_invalid_vp_register_message")
class InvalidVpRegisterValue(VpExit):
    vp_index: int


@_exit(lib.HVMSG_UNSUPPORTED_FEATURE, "struct hv_x64_unsupported_feature_message")
class UnsupportedFeature(VpExit):
    vp_index: int
    feature_code: int
    feature_parameter: int


@_exit(lib.HVMSG_TIMER_EXPIRED, "struct hv_timer_message_payload")
class TimerExpired(VpExit):
    timer_index: int
    expiration_time: int
    delivery_time: int


@dataclass(frozen=True)
class UnknownExit(VpExit):
    """A message type this library does not decode; the raw 256 bytes."""

    message_type_raw: int
    raw: bytes


@dataclass(frozen=True)
class Interrupted(VpExit):
    """run() returned because of kick() before any intercept."""


# Every exit run() returns: a closed union, so a dispatcher can be proven exhaustive
# (``match``/``isinstance`` ending in ``assert_never``).
AnyExit = (IoPortIntercept | MemoryIntercept | CpuidIntercept | MsrIntercept | ExceptionIntercept | Halt
           | UnrecoverableException | HypercallIntercept | ApicEoi | SintDeliverable | InterruptionDeliverable
           | SipiIntercept | InvalidVpRegisterValue | UnsupportedFeature | TimerExpired | UnknownExit | Interrupted)


def _resolve(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _assign(obj: Any, path: str, value: Any) -> None:
    *parents, last = path.split(".")
    for part in parents:
        obj = getattr(obj, part)
    setattr(obj, last, value)


_PLANS: dict[type, tuple[tuple[str, tuple[str, ...], Any], ...]] = {}
_READERS: dict[type, tuple[tuple[str, ...], Any, Any, tuple[tuple[int, Any], ...]]] = {}


def _plan(cls: type[VpExit]) -> tuple[tuple[str, tuple[str, ...], Any], ...]:
    """(field, C path, field type) for each field, computed once per class."""
    plan = _PLANS.get(cls)
    if plan is None:
        hints = typing.get_type_hints(cls)
        plan = tuple((f.name, tuple(cls.paths.get(f.name, f.name).split(".")), hints[f.name])
                     for f in dataclasses.fields(cls))  # type: ignore[arg-type]
        _PLANS[cls] = plan
    return plan


def _instruction_bytes(source: Any, payload: Any) -> bytes:
    return bytes(source)[: int(payload.instruction_byte_count) or 16]


_CONVERTERS: dict[Any, Any] = {
    InterceptHeader: lambda source, payload: InterceptHeader.from_c(source),
    Segment: lambda source, payload: Segment.from_c(source),
    bytes: _instruction_bytes,
    bool: lambda source, payload: bool(source),
}


def _reader(cls: type[VpExit]) -> tuple[tuple[str, ...], Any, Any, tuple[tuple[int, Any], ...]]:
    """Built once per class: the field names, the payload pointer type, one getter for
    every field's C value (integers come out as they are) and the fields to convert."""
    reader = _READERS.get(cls)
    if reader is None:
        plan = _plan(cls)
        names = tuple(name for name, _path, _type in plan)
        paths = [".".join(path) for _name, path, _type in plan]
        getter = operator.attrgetter(*paths) if len(paths) > 1 else (
            (lambda payload, get=operator.attrgetter(paths[0]): (get(payload),)) if paths else (lambda payload: ()))
        converts = tuple((i, _CONVERTERS[t]) for i, (_n, _p, t) in enumerate(plan) if t in _CONVERTERS)
        reader = _READERS[cls] = names, ffi.typeof(f"{cls.payload_ctype} *"), getter, converts
    return reader


_PAYLOAD_OFFSET = ffi.offsetof("struct hv_message", "u")


_HEADER_CTYPE = ffi.typeof("struct hv_x64_intercept_message_header")
_HEADER_SIZE = ffi.sizeof(_HEADER_CTYPE)
_FAST_KINDS = {
    "header": InterceptHeader,
    "header_ctype": _HEADER_CTYPE,
    "segment": Segment,
    "segment_fields": ("base", "limit", "selector", "attributes"),
}
# InterceptHeader's fields as a plan over its C struct (C path, and bool where the field is one).
_HEADER_PLAN = (("vp_index", ("vp_index",), int), ("instruction_length", ("instruction_length",), int),
                ("access", ("intercept_access_type",), int), ("cr8", ("cr8",), int),
                ("cpl", ("execution_state", "bits", "cpl"), int),
                ("cr0_pe", ("execution_state", "bits", "cr0_pe"), bool),
                ("efer_lma", ("execution_state", "bits", "efer_lma"), bool),
                ("interrupt_shadow", ("execution_state", "bits", "interrupt_shadow"), bool),
                ("cs", ("cs_segment",), Segment), ("rip", ("rip",), int), ("rflags", ("rflags",), int))
_HEADERS: dict[bytes, InterceptHeader] = {}
_FAST: dict[type, Any] = {}
_DECODERS: dict[int, Any] = {}   # message type -> its class's compiled decoder, or None (the reference path)
_MESSAGE_TYPE = struct.Struct("<I")
_SLICED_AS_BYTES = (bytes, type(ffi.buffer(ffi.new("char[1]"))))   # buffers whose slices are bytes
_MESSAGE_TYPE_OFFSET = ffi.offsetof("struct hv_message", "header") + ffi.offsetof("struct hv_message_header", "message_type")


def _header(buffer: Any, offset: int) -> InterceptHeader:
    """The header at ``offset``: one instance per distinct header, since a VMM sees the same
    instruction exit again and again (the header says where the VP stopped; it is immutable)."""
    raw = buffer[offset : offset + _HEADER_SIZE]   # bytes (decode_message sees to it)
    header = _HEADERS.get(raw)
    if header is None:
        if len(_HEADERS) >= 4096:
            _HEADERS.clear()
        header = _HEADERS[raw] = _HEADER_DECODER(raw, 0)
    return header


def fast_decoder(cls: type[VpExit]) -> Any:
    """The class's compiled decoder (fastdecode.py), or None where its layout needs the attribute path."""
    if cls not in _FAST:
        _FAST[cls] = fastdecode.build(_plan(cls), ffi.typeof(cls.payload_ctype), cls, _FAST_KINDS, _DECODER_HELPERS)
    return _FAST[cls]


_DECODER_HELPERS = {"header_memo": _HEADERS, "header_miss": _header, "segment_memo": _SEGMENTS, "segment_miss": _segment}
_header_decoder = fastdecode.build(_HEADER_PLAN, _HEADER_CTYPE, InterceptHeader, _FAST_KINDS, _DECODER_HELPERS)
if _header_decoder is None:
    raise ImportError("the binding's intercept header is not a straight layout")
_HEADER_DECODER: Callable[[Any, int], InterceptHeader] = _header_decoder


def decode(raw: bytes | bytearray | memoryview) -> AnyExit:
    """The typed exit for one hv_message."""
    if len(raw) < MESSAGE_SIZE:
        raise ValueError(f"hv_message is {MESSAGE_SIZE} bytes, got {len(raw)}")
    raw = bytes(raw[:MESSAGE_SIZE])
    return decode_message(ffi.from_buffer("struct hv_message *", raw), buffer=raw)


def decode_message(msg: Any, buffer: Any = None) -> AnyExit:
    """The typed exit for a ``struct hv_message *`` (its values are copied out).
    ``buffer``: the message's bytes as a buffer, which the compiled decoders read;
    without it, cffi's attribute access reads every field (the reference path)."""
    if buffer is not None:
        if type(buffer) not in _SLICED_AS_BYTES:
            buffer = bytes(buffer)   # the compiled decoders' slices must be bytes (hashable, immutable)
        kind = _MESSAGE_TYPE.unpack_from(buffer, _MESSAGE_TYPE_OFFSET)[0]
        decoder = _DECODERS.get(kind)
        if decoder is not None:
            return decoder(buffer, _PAYLOAD_OFFSET)   # type: ignore[no-any-return]
        if kind not in _DECODERS and kind in _REGISTRY:
            decoder = _DECODERS[kind] = fast_decoder(_REGISTRY[kind])
            if decoder is not None:
                return decoder(buffer, _PAYLOAD_OFFSET)   # type: ignore[no-any-return]
    else:
        kind = msg.header.message_type
    cls = _REGISTRY.get(kind)
    if cls is None:
        return UnknownExit(int(kind), bytes(ffi.buffer(msg, MESSAGE_SIZE)))
    names, ctype, getter, converts = _reader(cls)
    payload = ffi.cast(ctype, ffi.cast("char *", msg) + _PAYLOAD_OFFSET)
    values = list(getter(payload))
    for index, convert in converts:
        values[index] = convert(values[index], payload)
    return cast(AnyExit, _built(cls, dict(zip(names, values))))


def encode(exit_: VpExit) -> bytes:
    """The hv_message for an exit (the inverse of decode)."""
    if isinstance(exit_, UnknownExit):
        return exit_.raw
    cls = type(exit_)
    msg = ffi.new("struct hv_message *")
    msg.header.message_type = cls.message_type
    msg.header.payload_size = min(ffi.sizeof(cls.payload_ctype), int(lib.HV_MESSAGE_PAYLOAD_BYTE_COUNT))
    payload = ffi.cast(f"{cls.payload_ctype} *", ffi.addressof(msg.u))
    for field in dataclasses.fields(exit_):  # type: ignore[arg-type]
        value = getattr(exit_, field.name)
        path = cls.paths.get(field.name, field.name)
        if isinstance(value, (InterceptHeader, Segment)):
            value.to_c(_resolve(payload, path))
        elif isinstance(value, bytes):
            target = _resolve(payload, path)
            ffi.memmove(target, value[:16], len(value[:16]))
            if hasattr(payload, "instruction_byte_count"):
                payload.instruction_byte_count = len(value[:16])
        else:
            _assign(payload, path, int(value))
    return bytes(ffi.buffer(msg))


EXIT_TYPES: tuple[type[VpExit], ...] = tuple(_REGISTRY.values())
