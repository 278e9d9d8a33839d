"""deploy/grafana/tollgate.json imports into Grafana as shipped: every query names a metric
Tollgate exports (with its real suffixes) and groups or filters only by labels that metric has,
so no panel is silently empty because a name drifted."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.metrics import MetricWrapperBase

from extproc.server import metrics

pytestmark = pytest.mark.unit

DASHBOARD = Path(__file__).parents[2] / "deploy" / "grafana" / "tollgate.json"
# PromQL words and Grafana variables that look like identifiers inside `by (...)` / `{...}`.
_BUILTIN_LABELS = {"le"}


def exported() -> dict[str, set[str]]:
    """Every series name the exporter writes -> the labels it carries."""
    names: dict[str, set[str]] = {}
    for obj in vars(metrics).values():
        if not isinstance(obj, MetricWrapperBase):
            continue
        labels = set(obj._labelnames)
        for family in obj.describe():
            if family.type == "counter":
                suffixes = ["_total"]
            elif family.type == "histogram":
                suffixes = ["_bucket", "_sum", "_count"]
            else:
                suffixes = [""]
            for suffix in suffixes:
                names[family.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return names


def expressions(dashboard: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return exprs


def test_every_expression_names_an_exported_metric_and_its_labels() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    names = exported()
    assert "tollgate_spend_nanos_total" in names  # the exporter was read, not an empty set
    exprs = expressions(dashboard)
    assert len(exprs) >= 10
    used: set[str] = set()
    for expr in exprs:
        metrics_here = re.findall(r"\btollgate_[a-z_]+", expr)
        assert metrics_here, f"no Tollgate metric in {expr!r}"
        for name in metrics_here:
            assert name in names, f"{name} (in {expr!r}) is not exported"
        used.update(metrics_here)
        labels = set().union(*(names[n] for n in metrics_here))
        grouped = {w.strip() for g in re.findall(r"\bby \(([^)]*)\)", expr) for w in g.split(",")}
        filtered = set(re.findall(r"([a-z_]+)=~?\"", expr))
        variable = set(re.findall(r"label_values\([a-z_]+, ([a-z_]+)\)", expr))
        for label in grouped | filtered | variable:
            assert label in labels | _BUILTIN_LABELS, f"label {label!r} not on {metrics_here}"
    # The spend metrics the dashboard exists for are all shown.
    assert {"tollgate_spend_nanos_total", "tollgate_spend_tokens_total",
            "tollgate_requests_total", "tollgate_policy_actions_total",
            "tollgate_limit_denials_total"} <= used


def test_panels_have_unique_ids_a_datasource_and_fit_the_grid() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}"
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24
        for target in panel["targets"]:
            for var in re.findall(r"\$([a-z_]+)", target["expr"]):
                assert var in variables | {"__range", "__interval", "__rate_interval"}, var
