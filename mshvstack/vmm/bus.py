"""Port-I/O and MMIO buses: devices register address ranges; accesses dispatch."""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass
from typing import Protocol


class BusDevice(Protocol):
    """A device on a bus: offsets are relative to the range it registered."""

    def read(self, offset: int, size: int) -> int: ...
    def write(self, offset: int, size: int, value: int) -> None: ...


class BusConflict(ValueError):
    """Two devices claimed overlapping ranges."""


@dataclass(frozen=True)
class _Range:
    base: int
    length: int
    device: BusDevice
    name: str


class Bus:
    """A sorted set of non-overlapping ranges.  Unclaimed reads return all ones."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._ranges: list[_Range] = []
        self._bases: list[int] = []
        self._lock = threading.Lock()   # registrations (a leaf), all before the VPs run: lookups read the lists without it
        self.unclaimed = 0

    def register(self, base: int, length: int, device: BusDevice, name: str = "") -> None:
        with self._lock:
            for r in self._ranges:
                if base < r.base + r.length and r.base < base + length:
                    raise BusConflict(f"{self.name}: {name or device} at {base:#x}+{length:#x} overlaps {r.name} at {r.base:#x}+{r.length:#x}")
            index = bisect.bisect(self._bases, base)
            self._ranges.insert(index, _Range(base, length, device, name or type(device).__name__))
            self._bases.insert(index, base)

    def find(self, address: int) -> tuple[BusDevice, int] | None:
        index = bisect.bisect(self._bases, address) - 1
        if index >= 0:
            r = self._ranges[index]
            if address < r.base + r.length:
                return r.device, address - r.base
        return None

    def read(self, address: int, size: int) -> int:
        hit = self.find(address)
        if hit is None:
            self.unclaimed += 1
            return (1 << (8 * size)) - 1
        device, offset = hit
        return device.read(offset, size) & ((1 << (8 * size)) - 1)

    def write(self, address: int, size: int, value: int) -> None:
        hit = self.find(address)
        if hit is None:
            self.unclaimed += 1
            return
        device, offset = hit
        device.write(offset, size, value & ((1 << (8 * size)) - 1))

    def devices(self) -> list[tuple[int, int, str]]:
        return [(r.base, r.length, r.name) for r in self._ranges]
