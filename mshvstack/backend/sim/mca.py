"""Machine-check architecture as the hypervisor presents it to a guest.

CPUID advertises MCE and MCA, so MCG_CAP and the bank MSRs must agree with
each other: a few banks that never report an error.  The guest may write
each bank's control and clear its status; reads of status, address and
misc are zero (no error logged).  A bank MSR beyond the advertised count
is a #GP, as on hardware.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MSR_MCG_CAP = 0x179
MSR_MCG_STATUS = 0x17A
MSR_MC0_CTL = 0x400
BANK_COUNT = 4
_BANK_REGISTERS = 4   # CTL, STATUS, ADDR, MISC
_CTL, _STATUS = 0, 1


@dataclass
class MachineCheck:
    bank_control: list[int] = field(default_factory=lambda: [0] * BANK_COUNT)
    status: int = 0

    @staticmethod
    def handles(index: int) -> bool:
        return index in (MSR_MCG_CAP, MSR_MCG_STATUS) or MSR_MC0_CTL <= index < MSR_MC0_CTL + BANK_COUNT * _BANK_REGISTERS

    def read(self, index: int) -> int:
        if index == MSR_MCG_CAP:
            return BANK_COUNT   # no MCG_CTL, CMCI, SER or LMCE
        if index == MSR_MCG_STATUS:
            return self.status
        bank, register = divmod(index - MSR_MC0_CTL, _BANK_REGISTERS)
        return self.bank_control[bank] if register == _CTL else 0

    def write(self, index: int, value: int) -> bool:
        """False: the write faults (#GP)."""
        if index == MSR_MCG_CAP:
            return False   # read-only
        if index == MSR_MCG_STATUS:
            self.status = value & 0b111
            return True
        bank, register = divmod(index - MSR_MC0_CTL, _BANK_REGISTERS)
        if register == _CTL:
            self.bank_control[bank] = value
            return True
        return value == 0   # status/addr/misc: only clearing is allowed
