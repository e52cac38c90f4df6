"""Build the test guests in guests/ (binutils) or skip with a reason."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

GUESTS = Path(__file__).resolve().parents[1] / "guests"


def build_guest(name: str, out_dir: Path) -> tuple[bytes, dict[str, int]]:
    """Assemble guests/<name>.S; returns (flat image linked at 0x2000, symbols)."""
    for tool in ("as", "ld", "objcopy", "nm"):
        if shutil.which(tool) is None:
            pytest.skip(f"binutils '{tool}' not found: cannot build the test guest {name}")
    subprocess.run([str(GUESTS / "build.sh"), str(out_dir)], check=True, capture_output=True)
    symbols = {}
    for line in (out_dir / f"{name}.sym").read_text().splitlines():
        address, _kind, symbol = line.split()
        symbols[symbol] = int(address, 16)
    return (out_dir / f"{name}.bin").read_bytes(), symbols
