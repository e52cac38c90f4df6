"""`mshvstack info`: human and JSON output."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from mshvstack.abi import ioctl_names
from mshvstack.cli import app

runner = CliRunner()


def test_info_json_is_valid_and_complete() -> None:
    result = runner.invoke(app, ["info", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["binding"]["ioctls"] == len(ioctl_names())
    assert set(data["backends"]) == {"host", "sim"}
    assert data["devices"]["/dev/mshv"]["exists"] == data["backends"]["host"]["usable"] or not data["backends"]["host"]["usable"]


def test_info_human_output_names_backends() -> None:
    result = runner.invoke(app, ["info"])
    assert result.exit_code == 0, result.output
    assert "backend host" in result.output and "backend sim" in result.output
