"""The engine core reads and writes QEMU's CPU state directly (x86core.c), at
places it knows for unicorn 2.1.4: an engine starts only once each of them
is proven through Unicorn's own register API, and refuses to start, naming
the field, when one is not where the core expects it."""

from __future__ import annotations

import pytest
import unicorn
import unicorn.x86_const as ux

from mshvstack.backend.sim.engines import unicorn as engine_module
from mshvstack.backend.sim.engines.unicorn import EngineUnavailable, UnicornEngine

EFER = 0xC0000080


def _start() -> UnicornEngine:
    return UnicornEngine(lambda insn: None, None, lambda vector: -1)   # type: ignore[arg-type]


def test_the_checks_leave_the_cpu_state_as_unicorn_made_it() -> None:
    """The pinned unicorn passes every check, and each probed field gets its value back."""
    fresh = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
    engine = _start()
    try:
        for name in ("CR0", "CR3", "CR4", "FS_BASE", "GS_BASE", "GDTR", "IDTR"):
            register = engine_module._MIRRORED_REGISTERS[name]
            assert engine._uc.reg_read(register) == fresh.reg_read(register), name
        assert engine._uc.msr_read(EFER) == fresh.msr_read(EFER)
    finally:
        engine.close()


@pytest.mark.parametrize("field", list(engine_module._MIRRORED_REGISTERS))
def test_a_field_not_where_the_core_reads_it_is_refused(monkeypatch: pytest.MonkeyPatch, field: str) -> None:
    """As if the library kept the field elsewhere: the register the check writes
    through the API (RDX here) is not the one the core's mirror shows."""
    monkeypatch.setitem(engine_module._MIRRORED_REGISTERS, field, ux.UC_X86_REG_RDX)
    with pytest.raises(EngineUnavailable, match=f"does not hold {field} where the engine core reads it"):
        _start()
