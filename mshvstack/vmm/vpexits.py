"""What the VMM does with each exit a VP's run returns.

The dispatch is closed: ``handle`` takes the union of every exit type and
ends in ``assert_never``, so a type checker proves each one is handled or
refused.  Exits the machine never asks for (EOI, SIPI and deliverability
intercepts it does not install, timer messages, which go to the guest) and
exits that say the hypervisor could not go on end the run with a reason
naming them, rather than being dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import assert_never

from mshvstack.abi import lib
from mshvstack.hvcall import HvRegister, calls
from mshvstack.partition import (
    AnyExit,
    ApicEoi,
    CpuidIntercept,
    ExceptionIntercept,
    ExceptionVector,
    Halt,
    HypercallIntercept,
    Interrupted,
    InterruptionDeliverable,
    InvalidVpRegisterValue,
    IoPortIntercept,
    MemoryIntercept,
    MsrIntercept,
    Partition,
    SintDeliverable,
    SipiIntercept,
    TimerExpired,
    UnknownExit,
    UnrecoverableException,
    UnsupportedFeature,
    Vp,
)
from mshvstack.vmbus.synic import SynicHost
from mshvstack.vmm.bus import Bus
from mshvstack.vmm.crash import MSR_CRASH_CTL
from mshvstack.vmm.mmio import MmioAccess, MmioEmulator, MmioError, MmioUnsupported
from mshvstack.vmm.runstate import StopKind, StopReason

log = logging.getLogger(__name__)
STRING_BATCH = 4096


class ExitHandler:
    """``stop`` ends the run; ``halt`` decides about a VP halted with interrupts off;
    ``crash_report`` takes the guest's CRASH_CTL write; ``synic`` is the VMBus host's
    SynIC side (None: no VMBus, hypercalls for it fail)."""

    def __init__(self, partition: Partition, pio: Bus, mmio: Bus, synic: SynicHost | None,
                 stop: Callable[[StopReason], None], halt: Callable[[Vp, Halt], None],
                 crash_report: Callable[[Vp, int], None]) -> None:
        self.partition = partition
        self.pio = pio
        self.synic = synic
        self._stop = stop
        self._halt = halt
        self._crash_report = crash_report
        memory = partition.memory
        self.mmio_emulator = MmioEmulator(mmio.read, mmio.write, None,
                                          lambda gpa, size: int.from_bytes(memory.read(gpa, size), "little"),
                                          lambda gpa, size, value: memory.write(gpa, value.to_bytes(size, "little")))

    def handle(self, vp: Vp, exit_: AnyExit) -> None:
        if isinstance(exit_, IoPortIntercept):
            self._port_io(vp, exit_)
        elif isinstance(exit_, MemoryIntercept):
            self._mmio(vp, exit_)
        elif isinstance(exit_, Halt):
            self._halt(vp, exit_)
        elif isinstance(exit_, CpuidIntercept):
            vp.set_registers({HvRegister.RAX: exit_.default_result_rax, HvRegister.RBX: exit_.default_result_rbx,
                              HvRegister.RCX: exit_.default_result_rcx, HvRegister.RDX: exit_.default_result_rdx,
                              HvRegister.RIP: exit_.header.next_rip})
        elif isinstance(exit_, MsrIntercept):
            self._msr(vp, exit_)
        elif isinstance(exit_, HypercallIntercept):
            if self.synic is not None:
                self.synic.handle_hypercall(vp, exit_)   # the port's owner takes its lock
            else:
                vp.set_registers({**exit_.result_registers(int(lib.HV_STATUS_INVALID_CONNECTION_ID)),
                                  HvRegister.RIP: exit_.header.next_rip})
        elif isinstance(exit_, SintDeliverable):
            if self.synic is not None:
                self.synic.on_sint_deliverable(vp, exit_)
        elif isinstance(exit_, Interrupted):
            pass   # a kick: the VP thread looks at the machine's state
        elif isinstance(exit_, UnrecoverableException):
            self._stop(StopReason(StopKind.TRIPLE_FAULT, 3, f"VP {vp.index} triple-faulted at RIP {exit_.header.rip:#x}"))
        elif isinstance(exit_, ExceptionIntercept):
            self._refuse(vp, f"an exception intercept (vector {exit_.exception_vector} at RIP {exit_.header.rip:#x})")
        elif isinstance(exit_, InvalidVpRegisterValue):
            self._refuse(vp, "a register value the hypervisor could not run with")
        elif isinstance(exit_, UnsupportedFeature):
            self._refuse(vp, f"an unsupported feature (code {exit_.feature_code}, parameter {exit_.feature_parameter:#x})")
        elif isinstance(exit_, (ApicEoi, SipiIntercept, InterruptionDeliverable, TimerExpired)):
            self._refuse(vp, f"a {type(exit_).__name__} message, which the machine never asks for")
        elif isinstance(exit_, UnknownExit):
            self._refuse(vp, f"message type {exit_.message_type_raw:#x}, which this library does not decode")
        else:
            assert_never(exit_)

    def _refuse(self, vp: Vp, what: str) -> None:
        self._stop(StopReason(StopKind.ERROR, 1, f"VP {vp.index}: {what}"))

    def _msr(self, vp: Vp, exit_: MsrIntercept) -> None:
        if exit_.msr_number == MSR_CRASH_CTL and exit_.is_write:
            self._crash_report(vp, exit_.value)
        values = {HvRegister.RIP: exit_.header.next_rip}
        if not exit_.is_write:
            values.update({HvRegister.RAX: 0, HvRegister.RDX: 0})
        vp.set_registers(values)

    def _mmio(self, vp: Vp, exit_: MemoryIntercept) -> None:
        header = exit_.header
        bits = 64 if header.efer_lma and header.cs.long_mode else 32 if header.cr0_pe else 16
        try:
            self.mmio_emulator.emulate(vp, MmioAccess(exit_.gpa, header.rip, exit_.instruction_bytes, bits),
                                       lambda gva, write: self.translate(vp.index, gva, write))
        except MmioUnsupported as exc:
            log.warning("VP %d: %s: the guest gets #UD", vp.index, exc)
            vp.inject_exception(ExceptionVector.UD)

    def translate(self, vp_index: int, gva: int, write: bool) -> int:
        """``gva`` through VP ``vp_index``'s own page tables (each VP may use its own)."""
        flags = lib.HV_TRANSLATE_GVA_VALIDATE_READ | (lib.HV_TRANSLATE_GVA_VALIDATE_WRITE if write else 0)
        result = calls.translate_virtual_address(self.partition.hv, vp_index, gva, flags)
        if not result.ok:
            raise MmioError(f"guest address {gva:#x} does not translate (result {result.result})")
        return result.gpa

    def _port_io(self, vp: Vp, io: IoPortIntercept) -> None:
        size = io.access_size
        if io.string_op:
            self._string_io(vp, io)
            return
        if io.is_write:
            self.pio.write(io.port_number, size, io.data)
            vp.set_registers({HvRegister.RIP: io.header.next_rip})
        else:
            value = self.pio.read(io.port_number, size)
            mask = (1 << (8 * size)) - 1
            rax = value if size == 4 else (io.rax & ~mask) | value  # 32-bit IN zero-extends
            vp.set_registers({HvRegister.RAX: rax, HvRegister.RIP: io.header.next_rip})

    def _string_io(self, vp: Vp, io: IoPortIntercept) -> None:
        """INS/OUTS (REP too): move data between guest memory and the port."""
        size = io.access_size
        count = io.rcx if io.rep_prefix else 1
        count = min(count, STRING_BATCH)  # bounded per exit; the instruction re-runs for the rest
        (rflags,) = vp.get_registers([HvRegister.RFLAGS])
        step = -size if rflags & (1 << 10) else size
        memory = self.partition.memory
        pointer = io.rsi if io.is_write else io.rdi
        for i in range(count):
            gpa = self.translate(vp.index, pointer + i * step, not io.is_write)
            if io.is_write:
                self.pio.write(io.port_number, size, int.from_bytes(memory.read(gpa, size), "little"))
            else:
                memory.write(gpa, self.pio.read(io.port_number, size).to_bytes(size, "little"))
        values = {HvRegister.RSI if io.is_write else HvRegister.RDI: (pointer + count * step) & ((1 << 64) - 1)}
        remaining = (io.rcx - count) if io.rep_prefix else 0
        if io.rep_prefix:
            values[HvRegister.RCX] = remaining
        if remaining == 0:
            values[HvRegister.RIP] = io.header.next_rip
        vp.set_registers(values)
