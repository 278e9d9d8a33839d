"""The documentation a new user reads: self-contained, its examples valid, one name for the
compatibility it offers."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from extproc.core.request import Endpoint
from extproc.core.resources import Resource, validate_documents
from extproc.core.snapshot import build_snapshot

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("page", DOCS, ids=lambda p: p.name)
def test_every_relative_link_stays_in_the_repository(page: Path) -> None:
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text())
    for link in links:
        if re.match(r"[a-z]+://", link):
            continue
        target = (page.parent / link).resolve()
        assert target.is_relative_to(ROOT), f"{page.name} links outside the repo: {link}"
        assert target.exists(), f"{page.name} links to a missing file: {link}"


def test_readme_points_to_the_architecture_page() -> None:
    assert "(docs/architecture.md)" in README
    assert "../shared" not in README


def _yaml_examples() -> list[Resource]:
    blocks = re.findall(r"```yaml\n(.*?)```", README, re.S)
    resources: list[Resource] = []
    for i, block in enumerate(blocks):
        docs = [d for d in yaml.safe_load_all(block.replace("<sha256 hex of the key>", "a" * 64))
                if d]
        resources += validate_documents(docs, f"README yaml block {i + 1}")
    return resources


def test_readme_yaml_examples_are_valid_resources() -> None:
    kinds = {r.kind for r in _yaml_examples()}
    assert {"VirtualKey", "PriceTable", "Upstream", "Limit", "RateLimit"} <= kinds


def test_readme_alias_example_routes_the_alias() -> None:
    (azure,) = [r for r in _yaml_examples() if r.name == "azure-east"]
    aliases = azure.spec["aliases"]
    snapshot = build_snapshot(1, [], [azure], lambda _name: "secret")
    for alias in aliases:
        chosen = snapshot.choose_upstream(Endpoint.CHAT, alias, azure=False)
        assert chosen is not None and chosen.name == "azure-east", alias


def test_pay_i_is_named_once_as_the_compatibility() -> None:
    mentions = [line for line in README.splitlines() if "Pay-i" in line]
    assert all("Pay-i-compatible" in line or "Pay-i's proxy" in line for line in mentions)
    assert "### Pay-i-compatible headers" in README
    sources = [*ROOT.joinpath("extproc").rglob("*.py"), *DOCS]
    for path in sources:
        if "gen" in path.relative_to(ROOT).parts:
            continue
        text = path.read_text()
        assert "Pay-i seed" not in text and "the seed" not in text, path
