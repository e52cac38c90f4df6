"""Addresses inside libunicorn that its public API does not export.

Parallel execution and the new-block filter wrap three hooks of QEMU's x86 translator and one
Unicorn hook, and fast stores patch one test in the softmmu's notdirty_write (x86parallel.c).  They are local symbols, so they come from
the library's own symbol table (.symtab, kept in the PyPI wheels), placed
at the load address the dynamic linker chose (an exported function's
runtime address minus its symbol value).  The C core then checks that each
pointer slot it patches holds exactly the function named here.
"""

from __future__ import annotations

import ctypes
import functools
import struct
from typing import Any

from elftools.elf.elffile import ELFFile
from unicorn.unicorn_py3.unicorn import uclib

# symbol -> the mshvstack_library field it fills
_WANTED = {
    "i386_tr_ops": "tr_ops",
    "i386_tr_init_disas_context": "init_disas_context",
    "i386_tr_tb_stop": "tb_stop",
    "i386_tr_translate_insn": "translate_insn",
    "notdirty_write.isra.0": "notdirty_write",
    "x86_stop_interrupt": "stop_interrupt",
}
_ANCHOR = "uc_emu_start"
# Static functions every target's copy of a QEMU file defines: the x86_64 one lies between
# two functions of the same file that its x86_64 build exports.
_BETWEEN = {"notdirty_write.isra.0": ("tlb_set_dirty_x86_64", "probe_access_x86_64")}
# Exported helpers, by width (b, w, l, q): XCHG and the compare-and-exchange it is redone with.
_WIDTHS = ("b", "w_le", "l_le", "q_le")
EXPORTED = {
    "xchg": [f"helper_atomic_xchg{w}_x86_64" for w in _WIDTHS],
    "cmpxchg_mmu": [f"helper_atomic_cmpxchg{w}_mmu_x86_64" for w in _WIDTHS],
    # Translated code by RAM address, in x86parallel.c's enum code_function order.
    "code": ["tb_invalidate_phys_page_fast_x86_64", "tb_invalidate_phys_range_x86_64", "qemu_map_ram_ptr_x86_64",
             "qemu_ram_addr_from_host_x86_64", "tb_flush_x86_64", "cpu_loop_exit_atomic_x86_64"],
}


class SymbolsMissing(RuntimeError):
    """libunicorn lacks a symbol the engine core needs (stripped, or another build)."""


@functools.cache
def library_addresses() -> dict[str, int]:
    """Field name of struct mshvstack_library -> runtime address."""
    path = uclib._name
    with open(path, "rb") as handle:
        elf = ELFFile(handle)
        table, names = elf.get_section_by_name(".symtab"), elf.get_section_by_name(".strtab")
        if table is None or names is None:
            raise SymbolsMissing(f"{path} has no symbol table")
        bounds = {name for pair in _BETWEEN.values() for name in pair}
        values = _find_symbols(table.data(), names.data(), set(_WANTED) | {_ANCHOR} | bounds, frozenset(_BETWEEN))
    for name, (low, high) in _BETWEEN.items():
        inside = [v for v in values.pop(name, ()) if low in values and high in values and values[low] < v < values[high]]
        if len(inside) == 1:
            values[name] = inside[0]
    missing = sorted((set(_WANTED) | {_ANCHOR}) - set(values))
    if missing:
        raise SymbolsMissing(f"{path} lacks {', '.join(missing)}")
    anchor = ctypes.cast(getattr(uclib, _ANCHOR), ctypes.c_void_p).value
    if anchor is None:
        raise SymbolsMissing(f"{_ANCHOR} has no address")
    base = anchor - values[_ANCHOR]
    return {field: base + values[name] for name, field in _WANTED.items()}


def exported_addresses() -> dict[str, list[int]]:
    """Field name of struct mshvstack_library -> the exported functions' addresses."""
    found: dict[str, list[int]] = {}
    for field, names in EXPORTED.items():
        try:
            found[field] = [int(ctypes.cast(getattr(uclib, name), ctypes.c_void_p).value or 0) for name in names]
        except AttributeError as exc:
            raise SymbolsMissing(f"{uclib._name} does not export {exc}") from None
    return found


def _find_symbols(symbols: bytes, strings: bytes, wanted: set[str], several: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Symbol values by name from raw Elf64_Sym entries (pyelftools' per-symbol
    objects take seconds over libunicorn's 300k symbols; this takes milliseconds);
    names in ``several`` get the list of every value they have."""
    offsets: dict[int, str] = {}
    for name in wanted:
        encoded = name.encode() + b"\0"   # also as the tail of a longer string (shared suffixes)
        start = strings.find(encoded)
        while start >= 0:
            offsets[start] = name
            start = strings.find(encoded, start + 1)
    found: dict[str, set[int]] = {}
    for st_name, _info, _other, _shndx, st_value, _size in _SYMBOL.iter_unpack(symbols):
        symbol = offsets.get(st_name)
        if symbol is not None and st_value:
            found.setdefault(symbol, set()).add(st_value)
    ambiguous = sorted(name for name, values in found.items() if len(values) > 1 and name not in several)
    if ambiguous:
        raise SymbolsMissing(f"libunicorn defines {', '.join(ambiguous)} more than once")
    return {name: sorted(values) if name in several else values.pop() for name, values in found.items()}


_SYMBOL = struct.Struct("<IBBHQQ")   # Elf64_Sym
