"""Shared inputs for the unit tests: the golden bodies and the shipped built-in resources.

The built-in YAML is parsed here directly rather than through `extproc.server.state`, which
imports redis; the unit suite stays on the pure core.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

import extproc
from extproc.core.resources import Resource, validate_documents

DATA = Path(__file__).resolve().parent.parent / "data"
BUILTIN_YAML = Path(extproc.__file__).resolve().parent / "data" / "builtin.yaml"


def _read_golden(name: str) -> bytes:
    return (DATA / name).read_bytes()


@pytest.fixture(scope="session")
def golden() -> Callable[[str], bytes]:
    """Reads one golden file from tests/data by name, as bytes."""
    return _read_golden


@pytest.fixture(scope="session")
def builtin_resources() -> list[Resource]:
    return validate_documents(yaml.safe_load_all(BUILTIN_YAML.read_text()), "builtin.yaml")
