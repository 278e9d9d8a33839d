"""`make setup` recovers from a virtualenv made with the wrong Python (scripts/ensure-venv.sh):
it says so and rebuilds it, instead of failing until an undocumented `make clean`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.build

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "ensure-venv.sh"


def test_a_venv_of_the_wrong_python_is_rebuilt(tmp_path: Path) -> None:
    venv = tmp_path / ".venv"
    (venv / "bin").mkdir(parents=True)
    wrong = venv / "bin" / "python"
    wrong.write_text("#!/bin/sh\necho 'Python 3.9.2'\nexit 1\n")  # what a 3.9 venv answers
    wrong.chmod(0o755)
    result = subprocess.run([str(SCRIPT), str(venv), sys.executable], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "made with Python 3.9.2" in result.stderr and "rebuilding" in result.stderr
    version = subprocess.run([str(venv / "bin" / "python"), "-c",
                              "import sys; print(sys.version_info[:2])"],
                             capture_output=True, text=True, check=True).stdout
    assert version.strip() == "(3, 11)"
    # A good venv is left alone.
    again = subprocess.run([str(SCRIPT), str(venv), sys.executable], capture_output=True,
                           text=True, timeout=60)
    assert (again.returncode, again.stdout, again.stderr) == (0, "", "")


def test_no_python_311_is_a_clear_error(tmp_path: Path) -> None:
    old = tmp_path / "python3.9"
    old.write_text("#!/bin/sh\nexit 1\n")
    old.chmod(0o755)
    result = subprocess.run([str(SCRIPT), str(tmp_path / ".venv"), str(old)],
                            capture_output=True, text=True, timeout=60,
                            env={"PATH": str(tmp_path)})
    assert result.returncode == 1
    assert "Python 3.11 is needed" in result.stderr
