"""The binding against the compiled upstream facts (mshv_abi_facts.json).

cffi verifies plain fields against the compiler, but not bitfields, nested
named structs or union member sizes (cffi-notes.md), so every one of those is
checked here too.  Coverage is printed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from mshvstack.abi import ffi, lib

U64 = (1 << 64) - 1

# The upstream header disagrees with Microsoft's layout of the register page;
# we follow Microsoft's (see include/hyperv/registers.h) and check that one.
FACT_ALIASES = {"rustvmm/hv_vp_register_page": "hv_vp_register_page"}
DOCUMENTED_DIVERGENCE = {"hv_vp_register_page"}

# Everything the foundation issue lists for the hypervisor side.
REQUIRED_HYPERVISOR_TYPES = {
    "hv_register_value", "hv_register_assoc", "hv_x64_segment_register", "hv_x64_table_register",
    "hv_u128", "hv_x64_pending_interruption_register", "hv_x64_interrupt_state_register",
    "hv_message", "hv_message_header", "hv_message_flags", "hv_port_id", "hv_message_page",
    "hv_x64_intercept_message_header", "hv_x64_vp_execution_state",
    "hv_x64_io_port_intercept_message", "hv_x64_io_port_access_info",
    "hv_x64_memory_intercept_message", "hv_x64_memory_access_info",
    "hv_x64_cpuid_intercept_message", "hv_x64_msr_intercept_message",
    "hv_x64_exception_intercept_message", "hv_x64_exception_info", "hv_x64_halt_message",
    "hv_x64_hypercall_intercept_message", "hv_x64_apic_eoi_message",
    "hv_x64_unrecoverable_exception_message", "hv_x64_sint_deliverable_message",
    "hv_x64_invalid_vp_register_message", "hv_input_get_vp_registers", "hv_input_set_vp_registers",
    "hv_input_get_partition_property", "hv_output_get_partition_property",
    "hv_input_set_partition_property", "hv_input_get_partition_property_ex",
    "hv_input_install_intercept", "hv_intercept_parameters", "hv_input_assert_virtual_interrupt",
    "hv_interrupt_control", "hv_input_translate_virtual_address",
    "hv_output_translate_virtual_address", "hv_translate_gva_result",
    "hv_input_register_intercept_result", "hv_register_x64_cpuid_result_parameters",
    "hv_input_get_gpa_pages_access_state", "hv_gpa_page_access_state",
    "hv_gpa_page_access_state_flags", "hv_input_post_message_direct",
    "hv_input_signal_event_direct", "hv_output_signal_event_direct", "hv_input_read_gpa",
    "hv_output_read_gpa", "hv_input_write_gpa", "hv_output_write_gpa",
    "hv_input_get_vp_cpuid_values", "hv_output_get_vp_cpuid_values", "hv_cpuid_leaf_info",
    "hv_vp_register_page", "hv_synic_sint", "hv_synic_simp", "hv_synic_siefp",
}


def _ctype_name(fact: dict[str, Any]) -> str:
    return str(fact["c_type"])


def _defined(ctype: str) -> bool:
    try:
        ffi.typeof(ctype)
    except ffi.error:
        return False
    return True


def _members(
    ctype: Any, name_prefix: str = "", path_prefix: str = "", base: int = 0
) -> Iterator[tuple[str, str, int, Any]]:
    """Every member reachable from ctype as (facts name, real path, offset, field).

    Our headers put bitfields in a union arm named `bits` (cffi mislays
    anonymous ones); the facts name those members without that component,
    as the upstream headers' anonymous structs do.
    """
    for name, field in ctype.fields or ():
        path = f"{path_prefix}{name}"
        fact_name = name_prefix if name == "bits" else f"{name_prefix}{name}"
        offset = base + field.offset
        if name != "bits":
            yield fact_name, path, offset, field
        if field.type.kind in ("struct", "union"):
            inner = fact_name if name == "bits" else fact_name + "."
            yield from _members(field.type, inner, path + ".", offset)


def _member_map(ctype_name: str) -> dict[str, tuple[int, Any]]:
    found: dict[str, tuple[int, Any]] = {}
    for fact_name, _path, offset, field in _members(ffi.typeof(ctype_name)):
        found.setdefault(fact_name, (offset, field))
    return found


def _field_size(field: Any) -> int:
    if field.type.kind == "array" and field.type.length is None:
        return 0
    return int(ffi.sizeof(field.type))


def _struct_facts(abi_facts: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for name, fact in abi_facts["structs"].items():
        if name in DOCUMENTED_DIVERGENCE:
            continue
        yield FACT_ALIASES.get(name, name), fact


def test_structs_match_facts(abi_facts: dict[str, Any]) -> None:
    mismatches: list[str] = []
    for _name, fact in _struct_facts(abi_facts):
        ctype = _ctype_name(fact)
        if not _defined(ctype):
            continue
        if ffi.sizeof(ctype) != fact["size"]:
            mismatches.append(f"{ctype}: size {ffi.sizeof(ctype)} != {fact['size']}")
        members = _member_map(ctype)
        for field, offset in fact["fields"].items():
            if field not in members:
                mismatches.append(f"{ctype}.{field}: missing")
                continue
            got_offset, got = members[field]
            if got_offset != offset:
                mismatches.append(f"{ctype}.{field}: offset {got_offset} != {offset}")
            want_size = fact["field_sizes"].get(field)
            if want_size is not None and _field_size(got) != want_size:
                mismatches.append(f"{ctype}.{field}: size {_field_size(got)} != {want_size}")
    assert not mismatches, "\n".join(mismatches)


def _set_path(obj: Any, path: str, value: int) -> None:
    *parents, last = path.split(".")
    for part in parents:
        obj = getattr(obj, part)
    setattr(obj, last, value)


def _bitfield_path(ctype: str, name: str) -> str:
    """Where the facts' (flattened) bitfield name lives in our declaration."""
    for fact_name, path, _offset, field in _members(ffi.typeof(ctype)):
        if fact_name == name and field.bitsize >= 0:
            return path
    raise AssertionError(f"{ctype}: bitfield {name} not declared")


def test_bitfield_positions_match_facts(abi_facts: dict[str, Any]) -> None:
    """Set each bitfield to all ones and see which bits of the raw bytes moved."""
    mismatches: list[str] = []
    for name, fields in abi_facts["bitfields"].items():
        fact = abi_facts["structs"][name]
        ctype = _ctype_name(fact)
        if not _defined(ctype):
            continue
        for field, where in fields.items():
            obj = ffi.new(f"{ctype} *")
            _set_path(obj, _bitfield_path(ctype, field), (1 << where["width"]) - 1)
            raw = int.from_bytes(bytes(ffi.buffer(obj)), "little")
            want = ((1 << where["width"]) - 1) << where["bit"]
            if raw != want:
                mismatches.append(f"{ctype}.{field}: bits {raw:#x} != {want:#x}")
    assert not mismatches, "\n".join(mismatches)


def test_ioctl_numbers_match_facts(abi_facts: dict[str, Any]) -> None:
    for name, number in abi_facts["ioctls"].items():
        assert getattr(lib, name) == number, name


def test_constants_match_facts(abi_facts: dict[str, Any]) -> None:
    mismatches = []
    for key, value in abi_facts["consts"].items():
        name = key.removeprefix("rustvmm/")
        if key != name:
            continue  # rust-vmm lags upstream on this one; we carry upstream's value
        if hasattr(lib, name) and getattr(lib, name) & U64 != value & U64:
            mismatches.append(f"{name}: {getattr(lib, name):#x} != {value:#x}")
    assert not mismatches, "\n".join(mismatches)


def test_root_driver_coverage_is_complete(abi_facts: dict[str, Any]) -> None:
    root_ioctls = [n for n, d in abi_facts["notes"]["ioctl_driver"].items() if d == "mshv_root"]
    assert len(root_ioctls) == 12
    assert all(hasattr(lib, n) for n in root_ioctls)
    root_structs = [n for n in abi_facts["structs"] if n.startswith("mshv_")]
    assert all(_defined(abi_facts["structs"][n]["c_type"]) for n in root_structs)


def test_required_hypervisor_types_are_defined(abi_facts: dict[str, Any]) -> None:
    missing = sorted(n for n in REQUIRED_HYPERVISOR_TYPES if not _defined(abi_facts["structs"][n]["c_type"]))
    assert not missing


def test_print_coverage(abi_facts: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    structs = [n for n, _f in _struct_facts(abi_facts)]
    have_structs = [n for n, f in _struct_facts(abi_facts) if _defined(_ctype_name(f))]
    consts = [k for k in abi_facts["consts"] if "/" not in k]
    have_consts = [k for k in consts if hasattr(lib, k)]
    ioctls = list(abi_facts["ioctls"])
    have_ioctls = [k for k in ioctls if hasattr(lib, k)]
    with capsys.disabled():
        print(
            f"\nABI coverage: structs {len(have_structs)}/{len(structs)}, "
            f"ioctls {len(have_ioctls)}/{len(ioctls)}, constants {len(have_consts)}/{len(consts)}"
        )
        print("  structs not defined:", ", ".join(sorted(set(structs) - set(have_structs))) or "none")
    assert have_ioctls == ioctls


def test_facts_travel_with_the_repository(abi_facts: dict[str, Any]) -> None:
    """The facts are part of the checkout: no test depends on files beside it."""
    from pathlib import Path

    tests = Path(__file__).resolve().parent
    facts = tests / "data" / "mshv_abi_facts.json"
    assert facts.is_file()
    assert set(abi_facts) >= {"structs", "bitfields", "ioctls", "consts", "notes"}
    assert abi_facts["notes"]["target"] == "x86_64 LP64"
