"""The object model: Mshv → Partition → Vp, GuestMemory, typed exits, register sets."""

from mshvstack.partition.exits import (
                                       AnyExit,
                                       ApicEoi,
                                       CpuidIntercept,
                                       ExceptionIntercept,
                                       Halt,
                                       HypercallIntercept,
                                       InterceptHeader,
                                       Interrupted,
                                       InterruptionDeliverable,
                                       InvalidVpRegisterValue,
                                       IoPortIntercept,
                                       MemoryIntercept,
                                       MsrIntercept,
                                       Segment,
                                       SintDeliverable,
                                       SipiIntercept,
                                       TimerExpired,
                                       UnknownExit,
                                       UnmappedGpa,
                                       UnrecoverableException,
                                       UnsupportedFeature,
                                       VpExit,
                                       decode,
                                       encode,
)
from mshvstack.partition.memory import GuestMemory, GuestMemoryError, MemoryRegion
from mshvstack.partition.mshv import Mshv
from mshvstack.partition.partition import MsiRoute, Partition, PartitionConfig
from mshvstack.partition.registers import FpuRegisters, SpecialRegisters, StandardRegisters, TableRegister
from mshvstack.partition.vp import ExceptionVector, Vp, VpStateKind

__all__ = [
    "AnyExit", "ApicEoi", "CpuidIntercept", "ExceptionIntercept", "Halt", "HypercallIntercept", "InterceptHeader", "Interrupted",
    "InterruptionDeliverable", "InvalidVpRegisterValue", "IoPortIntercept", "MemoryIntercept", "MsrIntercept", "Segment",
    "SintDeliverable", "SipiIntercept", "TimerExpired", "UnknownExit", "UnmappedGpa", "UnrecoverableException",
    "UnsupportedFeature", "VpExit", "decode", "encode", "GuestMemory", "GuestMemoryError", "MemoryRegion", "Mshv",
    "MsiRoute", "Partition", "PartitionConfig", "FpuRegisters", "SpecialRegisters", "StandardRegisters", "TableRegister", "Vp",
    "VpStateKind", "ExceptionVector",
]
