"""INIT and SIPI for one VP: they arrive from other VPs' threads and are taken on
the VP's own (its engine is not thread-safe), before it runs again.

``pending`` and the SIPI vector are guarded by the VP's wake condition, which
the VP also waits on when halted; the wait for a SIPI ends on a kick too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mshvstack.abi import lib

if TYPE_CHECKING:
    from mshvstack.backend.sim.vp import SimVp

R = lib
STARTUP_SUSPEND = 1   # HV_REGISTER_INTERNAL_ACTIVITY_STATE bit: the VP waits for a SIPI
IDLE_WAIT_S = 0.05


class Startup:
    def __init__(self, vp: SimVp) -> None:
        self.vp = vp
        self.pending = False                  # an INIT to take ...
        self._sipi_vector: int | None = None  # ... and a SIPI

    def suspended(self) -> bool:
        """An INIT waits to be taken or the VP waits for a SIPI."""
        return self.pending or bool(self.vp.regs.state.get(R.HV_REGISTER_INTERNAL_ACTIVITY_STATE, 0) & STARTUP_SUSPEND)

    def queue_init(self) -> None:
        """INIT from another VP (any thread): taken by this VP's thread before it runs again."""
        with self.vp.wake:
            self.pending = True
            self._sipi_vector = None    # a SIPI that came before this INIT is void
        self.vp.notify()

    def queue_startup(self, vector: int) -> None:
        """SIPI (any thread): starts a VP that waits for one; ignored otherwise, so
        only the first of the usual two SIPIs starts it."""
        with self.vp.wake:
            if not self.suspended() or self._sipi_vector is not None:
                return
            self._sipi_vector = vector & 0xFF
        self.vp.notify()

    def take(self) -> bool:
        """Take a pending INIT, then wait in wait-for-SIPI; True once the VP may run."""
        vp = self.vp
        with vp.wake:
            init, self.pending = self.pending, False
        if init:
            self._init()
        with vp.wake:
            while (self._sipi_vector is None and not vp.kicked and not self.pending
                   and vp.regs.state.get(R.HV_REGISTER_INTERNAL_ACTIVITY_STATE, 0) & STARTUP_SUSPEND):
                vp.wake.wait(IDLE_WAIT_S)
            if self.pending:
                return False   # a new INIT first (a SIPI sent after it stays queued)
            vector, self._sipi_vector = self._sipi_vector, None
        if vector is not None:
            self._start_at(vector)
            return True
        return False   # kicked, or the VMM ended the wait: the run loop decides

    def _reset(self) -> None:
        vp = self.vp
        vp.regs.apply_reset(vp.partition.cpuid(vp.index, 1, 0)[0])

    def _init(self) -> None:
        """INIT: the reset state but for the APIC base and the MSRs, a reset
        LAPIC, and the VP waits for a SIPI."""
        self._reset()
        self.vp.lapic.reset()
        self.vp.halted = False
        self.vp.regs.state[R.HV_REGISTER_INTERNAL_ACTIVITY_STATE] = STARTUP_SUSPEND

    def _start_at(self, vector: int) -> None:
        """SIPI: the AP starts in real mode at vector << 12 (CS = vector << 8, IP 0)."""
        self._reset()
        vp = self.vp
        vp.set_segment(R.HV_X64_REGISTER_CS, vector << 12, 0xFFFF, vector << 8, 0x9B)
        vp.set_reg(R.HV_X64_REGISTER_RIP, 0)
        vp.regs.state[R.HV_REGISTER_INTERNAL_ACTIVITY_STATE] = 0
        vp.halted = False
