"""The source distribution carries everything the build and the tests need.

Building the sdist is cheap (no compiler); `.ci/sdist` does the expensive
part (install the sdist and the wheel in fresh venvs outside the checkout and
run the demo there).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Everything tracked under these folders belongs in the sdist: the package
# (with the engine's C sources and the demo guests), the headers the binding
# is derived from, the guests' sources, the tests and their data, the docs.
SHIPPED = ("mshvstack", "include", "guests", "tests", "docs")


def _tracked() -> set[str]:
    out = subprocess.run(["git", "-C", str(REPO), "ls-files", "--", *SHIPPED],
                         check=True, capture_output=True, text=True).stdout
    return {line for line in out.splitlines() if line}


@pytest.fixture(scope="module")
def sdist_members(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs a git checkout")
    pytest.importorskip("build")
    out = tmp_path_factory.mktemp("sdist")
    subprocess.run([sys.executable, "-m", "build", "--sdist", "--outdir", str(out), str(REPO)],
                   check=True, capture_output=True)
    (archive,) = out.glob("mshvstack-*.tar.gz")
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    prefix = names[0].split("/", 1)[0] + "/"
    return {name.removeprefix(prefix) for name in names}


def test_sdist_has_every_tracked_source_file(sdist_members: set[str]) -> None:
    missing = sorted(_tracked() - sdist_members)
    assert not missing, f"not in the sdist: {missing}"


def test_sdist_has_what_the_cffi_builders_read(sdist_members: set[str]) -> None:
    from mshvstack.backend.sim.engines import _build_fastpath

    engines = "mshvstack/backend/sim/engines/"
    sources = {engines + name for name in _build_fastpath.C_SOURCES}
    assert sources <= sdist_members
    headers = {str(p.relative_to(REPO)) for p in (REPO / "include").rglob("*.h")}
    assert headers and headers <= sdist_members
