"""End to end: the example server (fake backend) under a bounded load, scraped each second by a
real Prometheus on 127.0.0.1; then every dashboard query and every alert rule is run through
Prometheus's HTTP API against what it scraped. About 40 s in all."""

from __future__ import annotations

import asyncio
import math
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ._harness import (
    ROOT,
    dashboard,
    dashboard_exprs,
    expand,
    free_port,
    http_get,
    metric_names,
    prom_api,
    prometheus,
    rule_exprs,
    running,
    server_command,
)
from ._load import Load

LOAD_S = 16.0
OUTCOMES_DRIVEN = ("finished", "cancelled", "deadline", "overloaded", "failed", "rejected")
pytestmark = [pytest.mark.timeout(120), pytest.mark.prometheus]


@dataclass(frozen=True)
class Stack:
    server: str
    prometheus: str
    start: float
    end: float
    statuses: Counter[str]
    exposition: str

    def range_query(self, expr: str) -> list[dict[str, Any]]:
        data = prom_api(self.prometheus, "query_range", query=expr, start=self.start, end=self.end, step=1)
        return list(data["result"])


def scraped_total(base: str) -> float:
    result = prom_api(base, "query", query="sum(batcher_requests_total)")["result"]
    return float(result[0]["value"][1]) if result else -1.0


def wait_for_scrape(stack_prom: str, expected: float, timeout: float = 15.0) -> None:
    """Poll Prometheus until it holds the server's final request count (it scrapes each second).
    At least: a dropped stream may be counted as cancelled one step after /metrics was read."""
    deadline = time.monotonic() + timeout
    while scraped_total(stack_prom) < expected:
        assert time.monotonic() < deadline, f"Prometheus never scraped {expected} requests"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("monitoring")
    port = free_port()
    server = f"http://127.0.0.1:{port}"
    flags = ["--max-queue", "8", "--max-batch-size", "8", "--default-deadline", "2", "--log-level", "warning"]
    with (
        running(server_command(port, *flags), tmp / "server.log", f"{server}/ready"),
        prometheus(f"127.0.0.1:{port}", tmp / "prometheus") as prom,
    ):
        start = time.time()
        statuses = asyncio.run(Load(server, LOAD_S).run())
        status, body = http_get(f"{server}/metrics")
        assert status == 200
        exposition = body.decode()
        total = sum(
            s.value
            for f in text_string_to_metric_families(exposition)
            if f.name == "batcher_requests"
            for s in f.samples
            if s.name == "batcher_requests_total"
        )
        wait_for_scrape(prom, total)
        yield Stack(server, prom, start - 2, time.time(), statuses, exposition)


def test_load_reached_every_outcome(stack: Stack) -> None:
    for code in ("stream 200", "left", "429", "500", "400", "504"):
        assert stack.statuses[code] > 0, (code, stack.statuses)
    assert 200 <= sum(stack.statuses.values()) <= 600, stack.statuses
    increase = stack.range_query(f"sum by (outcome) (increase(batcher_requests_total[{LOAD_S + 10:.0f}s]))")
    seen = {s["metric"]["outcome"]: max(float(v) for _, v in s["values"]) for s in increase}
    for outcome in OUTCOMES_DRIVEN:
        assert seen.get(outcome, 0) > 0, (outcome, seen)


def test_every_dashboard_query_returns_data(stack: Stack) -> None:
    empty = []
    exprs = dashboard_exprs(dashboard())
    for title, expr in exprs:
        series = stack.range_query(expand(expr))
        finite = [v for s in series for _, v in s["values"] if math.isfinite(float(v))]
        if not finite:
            empty.append(f"{title}: {expand(expr)}")
    assert not empty, "queries with no data:\n" + "\n".join(empty)
    assert len(exprs) >= 25


def test_template_variable_queries_find_the_server(stack: Stack) -> None:
    models = prom_api(stack.prometheus, "label/model/values", **{"match[]": "batcher_queue_depth"})
    engines = prom_api(stack.prometheus, "label/engine/values", **{"match[]": "batcher_queue_depth"})
    assert models == ["fake"] and engines


def test_every_metric_used_exists(stack: Stack) -> None:
    dash = dashboard()
    used = [e for _, e in dashboard_exprs(dash)] + [e for _, e in rule_exprs()]
    used += [v["query"]["query"] for v in dash["templating"]["list"] if v["type"] == "query"]
    exposed = {s.name for f in text_string_to_metric_families(stack.exposition) for s in f.samples}
    names = metric_names(used)
    assert len(names) >= 15
    assert not names - exposed, f"used but not in /metrics: {sorted(names - exposed)}"


def test_alert_rules_evaluate_cleanly_on_real_data(stack: Stack) -> None:
    groups = prom_api(stack.prometheus, "rules")["groups"]
    rules = {r["name"]: r for g in groups for r in g["rules"]}
    assert len(rules) == len(rule_exprs())
    bad = {name: r.get("lastError") for name, r in rules.items() if r["health"] != "ok"}
    assert not bad
    # The load is light and short: nothing may fire (the stalled-executor alert least of all).
    firing = [a for a in prom_api(stack.prometheus, "alerts")["alerts"] if a["state"] == "firing"]
    assert not firing
    ratio = prom_api(stack.prometheus, "query", query="model:batcher_ttft_slow:ratio_rate5m")
    assert ratio["result"] and ratio["result"][0]["metric"]["model"] == "fake"


def test_render_dashboard_draws_every_panel(stack: Stack, tmp_path: Path) -> None:
    out = tmp_path / "dashboard.png"
    minutes = (stack.end - stack.start) / 60
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "render_dashboard.py"),
            "--prometheus",
            stack.prometheus,
            "--out",
            str(out),
            "--end",
            str(stack.end),
            "--minutes",
            f"{minutes:.3f}",
            "--step",
            "1",
            "--rate-interval",
            "15s",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 300_000
