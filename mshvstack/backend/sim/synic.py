"""The guest's synthetic interrupt controller as the hypervisor keeps it."""

from __future__ import annotations

from dataclasses import dataclass, field

from mshvstack.abi import lib

SINT_COUNT = int(lib.HV_SYNIC_SINT_COUNT)
SLOT = int(lib.HV_MESSAGE_SIZE)
FLAGS_BYTES = int(lib.HV_EVENT_FLAGS_BYTE_COUNT)
SIMP_ENABLE = int(lib.HV_SYNIC_SIMP_ENABLE)
SIEFP_ENABLE = int(lib.HV_SYNIC_SIEFP_ENABLE)
SINT_MASKED = int(lib.HV_SYNIC_SINT_MASKED)
VECTOR_MASK = int(lib.HV_SYNIC_SINT_VECTOR_MASK)
SINT_AUTO_EOI = int(lib.HV_SYNIC_SINT_AUTO_EOI)
PAGE_MASK = ~0xFFF & ((1 << 64) - 1)


@dataclass
class SynIc:
    scontrol: int = 0
    simp: int = 0
    siefp: int = 0
    sints: list[int] = field(default_factory=lambda: [SINT_MASKED] * SINT_COUNT)
    # SINTs whose slot the VMM wants to hear about once free (bit n = SINT n).
    deliverability: int = 0

    @property
    def enabled(self) -> bool:
        return bool(self.scontrol & int(lib.HV_SYNIC_CONTROL_ENABLE))

    def message_slot(self, sint: int) -> int | None:
        if not self.simp & SIMP_ENABLE:
            return None
        return (self.simp & PAGE_MASK) + sint * SLOT

    def flags_base(self, sint: int) -> int | None:
        if not self.siefp & SIEFP_ENABLE:
            return None
        return (self.siefp & PAGE_MASK) + sint * FLAGS_BYTES

    def vector(self, sint: int) -> int | None:
        value = self.sints[sint]
        if value & SINT_MASKED:
            return None
        return value & VECTOR_MASK

    def auto_eoi_vectors(self) -> int:
        """The vectors (a 256-bit set) that unmasked auto-EOI SINTs raise."""
        vectors = 0
        for value in self.sints:
            if not value & SINT_MASKED and value & SINT_AUTO_EOI:
                vectors |= 1 << (value & VECTOR_MASK)
        return vectors
