"""Shared fixtures: the vendored ABI facts, device availability."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
# Test helper modules (simhelpers) live beside the tests.
sys.path.insert(0, str(Path(__file__).resolve().parent))


# The compiled upstream ABI facts, kept in the repository (see tests/data/README.md).
ABI_FACTS = Path(__file__).resolve().parent / "data" / "mshv_abi_facts.json"


@pytest.fixture(scope="session")
def abi_facts() -> dict[str, Any]:
    facts: dict[str, Any] = json.loads(ABI_FACTS.read_text())
    return facts


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.path.exists("/dev/mshv"):
        return
    skip = pytest.mark.skip(reason="needs /dev/mshv (a Linux root partition on Hyper-V)")
    for item in items:
        if "device" in item.keywords:
            item.add_marker(skip)
