"""The Grafana dashboard reads only the metrics the job exports (`cluster/metric_names.py`), each the way its kind
allows: counters through rate/increase/max_over_time, gauges directly."""

import json
import re

from cluster.metric_names import COUNTERS, GAUGES
from tests.conftest import ROOT

DASHBOARD = json.loads((ROOT / "cluster/grafana/forecast-grpo.json").read_text())
GAUGE_NAMES = {name for name, _ in GAUGES}
COUNTER_NAMES = {name for name, _ in COUNTERS}
PANELS = [p for p in DASHBOARD["panels"] if p["type"] != "row"]


def _expressions():
    yield from (t["expr"] for p in PANELS for t in p["targets"])
    yield from (v["query"]["query"] for v in DASHBOARD["templating"]["list"] if v["type"] == "query")


def test_expressions_use_only_the_exported_metrics():
    used = set()
    for expr in _expressions():
        selected = set(re.findall(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*\{", expr))  # every metric given a selector
        named = set(re.findall(r"\bray_[A-Za-z0-9_:]+", expr))
        assert selected | named <= GAUGE_NAMES | COUNTER_NAMES, expr
        for name in named:
            before = expr[:expr.index(name)]
            if name in COUNTER_NAMES:
                assert re.search(r"(rate|increase|max_over_time)\($", before), f"counter used raw: {expr}"
            else:
                assert not re.search(r"(rate|increase)\($", before), f"rate of a gauge: {expr}"
        used |= named
    assert used == GAUGE_NAMES | COUNTER_NAMES  # and every metric has a panel


def test_panels_are_grouped_and_read_the_chosen_datasource_and_run():
    assert [p["title"] for p in DASHBOARD["panels"] if p["type"] == "row"] == [
        "Progress", "Learning", "Speed", "Tools & leak audit"]
    variables = {v["name"]: v for v in DASHBOARD["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["run"]["datasource"]["uid"] == "${datasource}"
    for p in PANELS:
        assert p["datasource"]["uid"] == "${datasource}" and p["targets"], p["title"]
        assert all('run=~"$run"' in t["expr"] for t in p["targets"]), p["title"]


def test_leak_violations_are_a_stat_that_turns_red_above_zero():
    leak = [p for p in PANELS if any("leak_violations" in t["expr"] for t in p["targets"])]
    assert [p["type"] for p in leak] == ["stat"]
    steps = leak[0]["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert steps == [{"color": "green", "value": None}, {"color": "red", "value": 1}]
    assert leak[0]["options"]["colorMode"] == "background"
