"""Pre-copy without a dirty bitmap: what changed since it was sent is found exactly,
whatever wrote it, and a destination fed those pages ends equal to the source."""

from __future__ import annotations

import mmap

from hypothesis import given, settings
from hypothesis import strategies as st

from mshvstack.partition.memory import GuestMemory, MemoryRegion
from mshvstack.snapshot.pages import PAGE, SPAN
from mshvstack.vmm.sentcopy import SentCopy

PAGES = SPAN // PAGE + 8   # a span and a part of one


def _memory() -> GuestMemory:
    """One region, added as the partition adds its mappings."""
    memory = GuestMemory()
    memory._add(MemoryRegion(0, PAGES * PAGE, True, True, mmap.mmap(-1, PAGES * PAGE)))
    return memory


WRITES = st.lists(st.tuples(st.integers(0, PAGES * PAGE - 8), st.binary(min_size=1, max_size=8)), max_size=20)


@settings(max_examples=60, deadline=None)
@given(passes=st.lists(WRITES, min_size=1, max_size=4))
def test_a_destination_fed_the_changed_pages_equals_the_source(passes: list[list[tuple[int, bytes]]]) -> None:
    memory = _memory()
    copy = SentCopy(memory)
    destination = bytearray(PAGES * PAGE)   # zero, as a fresh machine's RAM
    for writes in passes:
        for gpa, data in writes:
            memory.write(gpa, data)
        for gpa in copy.changed():
            page = memory.read(gpa, PAGE)
            destination[gpa : gpa + PAGE] = page
            copy.record(gpa, page)
        assert bytes(destination) == memory.read(0, PAGES * PAGE)
        assert copy.changed() == set()


def test_a_page_changed_back_needs_nothing_and_one_zeroed_goes_again() -> None:
    memory = _memory()
    copy = SentCopy(memory)
    memory.write(3 * PAGE, b"A")
    copy.record(3 * PAGE, memory.read(3 * PAGE, PAGE))
    memory.write(3 * PAGE, b"B")
    assert copy.changed() == {3 * PAGE}
    memory.write(3 * PAGE, b"A")
    assert copy.changed() == set()
    memory.write(3 * PAGE, b"\0")
    assert copy.changed() == {3 * PAGE}
