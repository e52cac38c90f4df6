"""The engine hooks memory faults everywhere but plain RAM (plainram.py): a range
wrongly taken for plain RAM would let an access the VMM must see go unreported."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from mshvstack.backend.sim.engines.plainram import ADDRESS_END, PlainRam

SPACE = 64   # addresses 0..63 stand for pages; the rest of the 64-bit space is never mapped

operations = st.lists(st.tuples(st.sampled_from(["map", "unmap", "protect"]), st.integers(0, SPACE - 1),
                                st.integers(1, 16), st.booleans()), max_size=30)


@given(operations)
def test_fault_ranges_cover_exactly_what_is_not_plain_ram(ops: list[tuple[str, int, int, bool]]) -> None:
    ram = PlainRam()
    model: dict[int, bool] = {}   # address -> plain (mapped addresses only)
    for op, start, size, plain in ops:
        addresses = range(start, min(start + size, SPACE))
        size = len(addresses)
        if op == "map":
            ram.map(start, size, plain)
            model.update(dict.fromkeys(addresses, plain))
        elif op == "unmap":
            ram.unmap(start, size)
            for address in addresses:
                model.pop(address, None)
        else:
            ram.protect(start, size, plain)
            model.update({a: plain for a in addresses if a in model})
    ranges = ram.fault_ranges()
    assert all(begin <= end for begin, end in ranges)
    assert all(a[1] + 1 < b[0] for a, b in zip(ranges, ranges[1:])), "sorted, disjoint and merged"
    covered = {a for begin, end in ranges for a in range(begin, min(end, SPACE - 1) + 1)}
    assert covered == {a for a in range(SPACE) if not model.get(a, False)}
    assert ranges[-1][1] == ADDRESS_END - 1 and ranges[-1][0] <= SPACE
