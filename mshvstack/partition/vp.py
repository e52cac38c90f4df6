"""Vp: one virtual processor fd — registers, run, kick, VP state."""

from __future__ import annotations

import enum
import errno
import threading
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from mshvstack.abi import ffi, lib
from mshvstack.backend.handle import ClosedError, FdHandle, FdOwner
from mshvstack.errors import ErrnoError, MshvError
from mshvstack.hvcall import calls
from mshvstack.hvcall.call import HvTarget
from mshvstack.partition.exits import AnyExit, Interrupted, Segment, decode_message
from mshvstack.partition.registers import (
    CONTROL_NAMES,
    FP_CONTROL_STATUS,
    FPR_NAMES,
    GPR_NAMES,
    MSR_REGISTERS,
    SEGMENT_NAMES,
    XMM_CONTROL_STATUS,
    XMM_NAMES,
    FpuRegisters,
    SpecialRegisters,
    StandardRegisters,
    TableRegister,
    hv_name,
)

if TYPE_CHECKING:
    from mshvstack.partition.partition import Partition

PAGE = 4096
_RUN_VP = int(lib.MSHV_RUN_VP)
_PAGE_FAST = {hv_name(n): n for n in GPR_NAMES}  # registers the page holds
_GENERAL_BIT = 1 << lib.HV_X64_REGISTER_CLASS_GENERAL
_IP_BIT = 1 << lib.HV_X64_REGISTER_CLASS_IP
_FLAGS_BIT = 1 << lib.HV_X64_REGISTER_CLASS_FLAGS
_CONTROL_HV = {"cr0": "CR0", "cr2": "CR2", "cr3": "CR3", "cr4": "CR4", "cr8": "CR8", "efer": "EFER", "apic_base": "APIC_BASE"}


class ExceptionVector(enum.IntEnum):
    """x86 exception vectors (architectural, so not in the mshv headers)."""

    DE, DB, NMI, BP, OF, BR, UD, NM, DF = range(9)
    TS, NP, SS, GP, PF = range(10, 15)
    MF, AC, MC, XM = range(16, 20)


class VpStateKind:
    LAPIC = int(lib.MSHV_VP_STATE_LAPIC)
    XSAVE = int(lib.MSHV_VP_STATE_XSAVE)
    SIMP = int(lib.MSHV_VP_STATE_SIMP)
    SIEFP = int(lib.MSHV_VP_STATE_SIEFP)
    SYNTHETIC_TIMERS = int(lib.MSHV_VP_STATE_SYNTHETIC_TIMERS)


def _page_bit(register: str) -> int:
    return int(_IP_BIT if register == "rip" else _FLAGS_BIT if register == "rflags" else _GENERAL_BIT)


_PAGE_SLOTS = {name: (register, _page_bit(register)) for name, register in _PAGE_FAST.items()}   # name -> (field, dirty bit)
_U64 = (1 << 64) - 1


class Vp(FdOwner):
    """A VP of a partition (created by Partition.create_vp).

    Register reads and writes use the shared register page when the
    hypervisor marked it valid (after an intercept) and hypercalls otherwise.
    """

    def __init__(self, partition: Partition, index: int, fd: int) -> None:
        self.partition = partition
        self.index = index
        backend = partition.backend
        self._handle = FdHandle(backend, fd, f"VP {index}")
        self._target = HvTarget(self._handle, partition.profile)
        self._run_arg = ffi.new("struct mshv_run_vp *")
        self._run_message = ffi.cast("struct hv_message *", self._run_arg)
        self._run_buffer = ffi.buffer(self._run_arg)
        self._page_view: memoryview | None = None
        self._page: Any = None
        try:
            self._page_view = backend.mmap(fd, PAGE, lib.MSHV_VP_MMAP_OFFSET_REGISTERS * PAGE)
            self._page = ffi.from_buffer("struct hv_vp_register_page *", self._page_view)
        except ErrnoError:
            self._page = None  # no register page (e.g. SNP): hypercalls only
        # kick() (any thread) sets the event, then reads _run_thread; run() sets _run_thread, then
        # tests the event: one of the two sees the other, so no kick is lost.
        self._kick_requested = threading.Event()
        self._run_thread: int | None = None
        # Held by the thread in run(): close() waits for a run in another thread to end by taking it.
        # A plain lock, not an Event: run() takes and releases it on every exit (two C calls).
        self._running = threading.Lock()
        self._closing = False

    # ---- registers
    def _page_valid(self) -> bool:
        return self._page is not None and bool(self._page.isvalid)

    def get_registers(self, names: Iterable[int]) -> list[int]:
        """Values of hv_register_names (64-bit views), any number of them."""
        names = [int(n) for n in names]
        result: dict[int, int] = {}
        if self._page_valid():
            for name in names:
                if name in _PAGE_FAST:
                    result[name] = int(getattr(self._page, _PAGE_FAST[name]))
        rest = [n for n in names if n not in result]
        if rest:
            result.update(zip(rest, calls.get_vp_registers64(self._target, self.index, rest)))
        return [result[n] for n in names]

    def get_registers128(self, names: Iterable[int]) -> list[int]:
        """Whole values (segments, XMM, x87: 128 bits), GPRs/RIP/RFLAGS from the page when valid."""
        names = [int(n) for n in names]
        page = [n for n in names if n in _PAGE_FAST] if self._page_valid() else []
        result = dict(zip(page, self.get_registers(page)))
        rest = [n for n in names if n not in result]
        if rest:
            result.update(zip(rest, calls.get_vp_registers128(self._target, self.index, rest)))
        return [result[n] for n in names]

    def set_registers(self, values: Mapping[int, int]) -> None:
        """Write hv_register_names; GPRs/RIP/RFLAGS through the page when valid."""
        page = self._page
        if page is None or not page.isvalid:
            rest = {int(name): value for name, value in values.items()}
        else:
            rest = {}
            dirty = 0
            for name, value in values.items():
                slot = _PAGE_SLOTS.get(name)
                if slot is None:
                    rest[int(name)] = value
                else:
                    setattr(page, slot[0], value & _U64)
                    dirty |= slot[1]
            if dirty:
                page.dirty |= dirty
        if rest:
            calls.set_vp_registers(self._target, self.index, rest)

    @property
    def regs(self) -> StandardRegisters:
        values = self.get_registers(hv_name(n) for n in GPR_NAMES)
        return StandardRegisters(*values)

    @regs.setter
    def regs(self, regs: StandardRegisters) -> None:
        self.set_registers(regs.as_dict())

    @property
    def sregs(self) -> SpecialRegisters:
        segments = [hv_name(n) for n in SEGMENT_NAMES]
        tables = [int(lib.HV_X64_REGISTER_GDTR), int(lib.HV_X64_REGISTER_IDTR)]
        controls = [int(getattr(lib, f"HV_X64_REGISTER_{_CONTROL_HV[n]}")) for n in CONTROL_NAMES]
        values = calls.get_vp_registers(self._target, self.index, segments + tables + controls)
        sregs = SpecialRegisters()
        for name, value in zip(SEGMENT_NAMES, values):
            setattr(sregs, name, Segment.from_c(value.segment))
        sregs.gdt = TableRegister(int(values[len(segments)].table.base), int(values[len(segments)].table.limit))
        sregs.idt = TableRegister(int(values[len(segments) + 1].table.base), int(values[len(segments) + 1].table.limit))
        for name, value in zip(CONTROL_NAMES, values[len(segments) + 2 :]):
            setattr(sregs, name, int(value.reg64))
        return sregs

    @sregs.setter
    def sregs(self, sregs: SpecialRegisters) -> None:
        values: dict[int, Any] = {}
        for name in SEGMENT_NAMES:
            value = ffi.new("union hv_register_value *")
            getattr(sregs, name).to_c(value.segment)
            values[hv_name(name)] = value[0]
        for hv, table in ((lib.HV_X64_REGISTER_GDTR, sregs.gdt), (lib.HV_X64_REGISTER_IDTR, sregs.idt)):
            value = ffi.new("union hv_register_value *")
            value.table.base, value.table.limit = table.base, table.limit
            values[int(hv)] = value[0]
        # Paging registers before the mode bits that depend on them.
        for name in ("cr3", "cr4", "efer", "cr0", "cr2", "cr8", "apic_base"):
            values[int(getattr(lib, f"HV_X64_REGISTER_{_CONTROL_HV[name]}"))] = getattr(sregs, name)
        calls.set_vp_registers(self._target, self.index, values)

    @property
    def fpu(self) -> FpuRegisters:
        """XMM, x87/MMX and the FPU/SSE control and status registers."""
        names = list(XMM_NAMES + FPR_NAMES) + [FP_CONTROL_STATUS, XMM_CONTROL_STATUS]
        values = calls.get_vp_registers(self._target, self.index, names)
        wide = [int(v.reg128.low_part) | int(v.reg128.high_part) << 64 for v in values]
        fp, sse = values[-2].fp_control_status, values[-1].xmm_control_status
        return FpuRegisters(xmm=wide[:16], fpr=wide[16:24], fcw=int(fp.fp_control), fsw=int(fp.fp_status),
                            ftw=int(fp.fp_tag), last_opcode=int(fp.last_fp_op), last_ip=int(fp.last_fp_rip),
                            mxcsr=int(sse.xmm_status_control), mxcsr_mask=int(sse.xmm_status_control_mask))

    @fpu.setter
    def fpu(self, fpu: FpuRegisters) -> None:
        values: dict[int, Any] = {}
        for name, wide in zip(XMM_NAMES + FPR_NAMES, fpu.xmm[:16] + fpu.fpr[:8]):
            value = ffi.new("union hv_register_value *")
            value.reg128.low_part, value.reg128.high_part = wide & ((1 << 64) - 1), (wide >> 64) & ((1 << 64) - 1)
            values[name] = value[0]
        fp = ffi.new("union hv_register_value *")
        c = fp.fp_control_status
        c.fp_control, c.fp_status, c.fp_tag, c.last_fp_op, c.last_fp_rip = fpu.fcw, fpu.fsw, fpu.ftw, fpu.last_opcode, fpu.last_ip
        values[FP_CONTROL_STATUS] = fp[0]
        sse = ffi.new("union hv_register_value *")
        sse.xmm_control_status.xmm_status_control, sse.xmm_control_status.xmm_status_control_mask = fpu.mxcsr, fpu.mxcsr_mask
        values[XMM_CONTROL_STATUS] = sse[0]
        calls.set_vp_registers(self._target, self.index, values)

    def get_msrs(self, indices: Iterable[int]) -> dict[int, int]:
        """MSR values by index, for MSRs the hypervisor exposes as registers."""
        indices = list(indices)
        unknown = [hex(i) for i in indices if i not in MSR_REGISTERS]
        if unknown:
            raise MshvError(f"MSRs {', '.join(unknown)} are not available as VP registers")
        return dict(zip(indices, self.get_registers(MSR_REGISTERS[i] for i in indices)))

    def set_msrs(self, values: Mapping[int, int]) -> None:
        unknown = [hex(i) for i in values if i not in MSR_REGISTERS]
        if unknown:
            raise MshvError(f"MSRs {', '.join(unknown)} are not available as VP registers")
        self.set_registers({MSR_REGISTERS[i]: v for i, v in values.items()})

    # ---- execution
    def run(self) -> AnyExit:
        """Run until an intercept; returns the typed exit.

        A kick() makes it return Interrupted(); other EINTRs (stray signals)
        are retried transparently, as the driver expects.
        """
        running = self._running
        running.acquire()   # one run at a time, as the driver's VP mutex (a second caller waits here)
        self._run_thread = threading.get_ident()
        try:
            backend, fd, arg, kicked = self._handle.backend, self._handle.fd, self._run_arg, self._kick_requested
            while True:
                if self._closing:
                    raise ClosedError(f"VP {self.index} is closed")
                if kicked.is_set():
                    kicked.clear()
                    return Interrupted()
                try:
                    backend.ioctl(fd, _RUN_VP, arg)
                except ErrnoError as exc:
                    if exc.errno == errno.EINTR:
                        continue
                    raise
                return decode_message(self._run_message, self._run_buffer)
        finally:
            self._run_thread = None
            running.release()

    def kick(self) -> None:
        """Make a run() in another thread return Interrupted() soon."""
        self._kick_requested.set()
        thread = self._run_thread
        if thread is not None and not self.closed:
            self.partition.backend.kick(self.fd, thread)

    def inject_exception(self, vector: int, error_code: int | None = None) -> None:
        """Deliver an exception when the VP next runs (HV_REGISTER_PENDING_INTERRUPTION),
        e.g. #UD for an instruction the VMM cannot emulate."""
        pending = ffi.new("union hv_x64_pending_interruption_register *")
        pending.bits.interruption_pending = 1
        pending.bits.interruption_type = lib.HV_X64_PENDING_EXCEPTION
        pending.bits.interruption_vector = vector
        if error_code is not None:
            pending.bits.deliver_error_code = 1
            pending.bits.error_code = error_code
        self.set_registers({lib.HV_REGISTER_PENDING_INTERRUPTION: int(pending.as_uint64)})

    # ---- VP state
    def get_state(self, kind: int) -> bytes:
        """MSHV_GET_VP_STATE, negotiating the buffer size with the driver."""
        size = PAGE
        for _ in range(2):
            buf = _PageBuffer(size)
            req = ffi.new("struct mshv_get_set_vp_state *")
            req.type, req.buf_sz, req.buf_ptr = kind, size, buf.address
            try:
                self.partition.backend.ioctl(self.fd, lib.MSHV_GET_VP_STATE, req)
            except ErrnoError as exc:
                if exc.errno == errno.EINVAL and req.buf_sz > size:
                    size = (int(req.buf_sz) + PAGE - 1) // PAGE * PAGE
                    continue
                raise
            return buf.data(int(req.buf_sz))
        raise MshvError("MSHV_GET_VP_STATE kept asking for a bigger buffer")

    def set_state(self, kind: int, data: bytes) -> None:
        size = max(PAGE, (len(data) + PAGE - 1) // PAGE * PAGE)
        buf = _PageBuffer(size)
        buf.fill(data)
        req = ffi.new("struct mshv_get_set_vp_state *")
        req.type, req.buf_sz, req.buf_ptr = kind, size, buf.address
        self.partition.backend.ioctl(self.fd, lib.MSHV_SET_VP_STATE, req)

    def close(self) -> None:
        """Close the VP; a run in another thread is kicked and waited for first, so it
        never runs on (over the partition's memory) after the VP and partition are gone."""
        self._closing = True
        thread = self._run_thread
        if thread is not None and thread != threading.get_ident():
            while not self._running.acquire(timeout=0.1):
                self.kick()
            self._running.release()
        self._page = None
        self._page_view = None
        self._handle.close()

    def __enter__(self) -> Vp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _PageBuffer:
    """A page-aligned buffer (the driver requires it for VP state)."""

    def __init__(self, size: int) -> None:
        import mmap

        self._map = mmap.mmap(-1, size)
        self.address = int(ffi.cast("uintptr_t", ffi.from_buffer(self._map)))

    def fill(self, data: bytes) -> None:
        self._map[: len(data)] = data

    def data(self, size: int) -> bytes:
        return bytes(self._map[:size])
