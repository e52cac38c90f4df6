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


def assemble(source: str, out_dir: Path, origin: int = 0x2000, bits: int = 64) -> tuple[bytes, dict[str, int]]:
    """Assemble a snippet (GNU as syntax) into a flat image at ``origin``."""
    for tool in ("as", "ld", "objcopy", "nm"):
        if shutil.which(tool) is None:
            pytest.skip(f"binutils '{tool}' not found: cannot assemble the test guest")
    directive = {16: ".code16", 32: ".code32", 64: ".code64"}[bits]
    src = out_dir / "snippet.S"
    src.write_text(f"{directive}\n.globl _start\n_start:\n{source}\n")
    obj, elf, bin_ = out_dir / "snippet.o", out_dir / "snippet.elf", out_dir / "snippet.bin"
    subprocess.run(["as", "--64", "-o", str(obj), str(src)], check=True, capture_output=True)
    subprocess.run(["ld", "-m", "elf_x86_64", f"-Ttext={origin:#x}", "-e", "_start", "-o", str(elf), str(obj)],
                   check=True, capture_output=True)
    subprocess.run(["objcopy", "-O", "binary", str(elf), str(bin_)], check=True, capture_output=True)
    out = subprocess.run(["nm", str(elf)], check=True, capture_output=True, text=True).stdout
    symbols = {line.split()[2]: int(line.split()[0], 16) for line in out.splitlines()}
    return bin_.read_bytes(), symbols


def assemble_elf(source: str, out_dir: Path, link: int = 0x200000) -> Path:
    """Assemble a 64-bit snippet into an ELF kernel linked at ``link``."""
    for tool in ("as", "ld"):
        if shutil.which(tool) is None:
            pytest.skip(f"binutils '{tool}' not found: cannot assemble the test guest")
    src = out_dir / "kernel.S"
    src.write_text(f".code64\n.globl _start\n_start:\n{source}\n")
    obj, elf = out_dir / "kernel.o", out_dir / "kernel.elf"
    subprocess.run(["as", "--64", "-o", str(obj), str(src)], check=True, capture_output=True)
    subprocess.run(["ld", "-m", "elf_x86_64", f"-Ttext={link:#x}", "--build-id=none", "-e", "_start", "-o", str(elf), str(obj)],
                   check=True, capture_output=True)
    return elf
