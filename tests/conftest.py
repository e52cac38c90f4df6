"""Shared fixtures: where the reference facts live, device availability."""

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


def shared_reference() -> Path:
    """../shared/reference beside the checkout (or $MSHVSTACK_SHARED/reference)."""
    base = Path(os.environ.get("MSHVSTACK_SHARED", REPO.parent / "shared"))
    return base / "reference"


@pytest.fixture(scope="session")
def abi_facts() -> dict[str, Any]:
    path = shared_reference() / "mshv_abi_facts.json"
    if not path.exists():
        pytest.skip(f"ABI facts not found at {path} (clone ../shared beside the checkout)")
    return json.loads(path.read_text())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.path.exists("/dev/mshv"):
        return
    skip = pytest.mark.skip(reason="needs /dev/mshv (a Linux root partition on Hyper-V)")
    for item in items:
        if "device" in item.keywords:
            item.add_marker(skip)
