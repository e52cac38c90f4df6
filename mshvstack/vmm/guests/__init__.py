"""Built-in demo guests, prebuilt from guests/*.S (see guests/build.sh).

Shipped as package data so `mshvstack run --demo` needs no compiler;
tests/test_vmm_guests.py rebuilds them and checks these files match.
"""

from __future__ import annotations

from importlib import resources


def demo_image(name: str) -> bytes:
    return (resources.files(__package__) / f"{name}.elf").read_bytes()
