"""Building the package from a clean copy of the sources: the generated protobuf modules are
packaged, and setuptools has nothing to warn about (a first `make run` used to print ~80 lines of
"Package would be ignored")."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.build

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_builds_quietly_with_the_generated_modules(tmp_path: Path) -> None:
    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    assert not (src / "extproc" / "gen" / "tollgate").exists()  # a clean clone
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--no-index", "-w", str(tmp_path / "dist"), str(src)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    output = result.stdout + result.stderr
    assert "would be ignored" not in output
    assert "absent from the `packages` configuration" not in output
    (wheel,) = (tmp_path / "dist").glob("tollgate-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "extproc/gen/tollgate/v1/usage_pb2.py" in names
    assert "extproc/store/lua/reserve.lua" in names
