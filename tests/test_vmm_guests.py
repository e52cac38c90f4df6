"""The demo guests shipped as package data are what guests/*.S builds to."""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from mshvstack.vmm.guests import demo_image

GUESTS = Path(__file__).resolve().parents[1] / "guests"


def _loadable(image: bytes) -> tuple[int, list[tuple[int, bytes]]]:
    elf = ELFFile(io.BytesIO(image))
    return elf["e_entry"], [(s["p_paddr"], s.data()) for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]


@pytest.mark.parametrize("name", ["hello", "iotest", "pioloop"])
def test_shipped_demo_matches_its_source(name: str, tmp_path: Path) -> None:
    for tool in ("as", "ld", "strip", "objcopy", "nm"):
        if shutil.which(tool) is None:
            pytest.skip(f"binutils '{tool}' not found: cannot rebuild the demo guests")
    subprocess.run([str(GUESTS / "build.sh"), str(tmp_path)], check=True, capture_output=True)
    rebuilt = (tmp_path / f"{name}.stripped.elf").read_bytes()
    assert _loadable(rebuilt) == _loadable(demo_image(name)), f"run guests/build.sh and copy {name}.stripped.elf into mshvstack/vmm/guests/"
