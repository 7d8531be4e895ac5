"""Static checks of grafana/: promtool on the config, the rules and their unit tests; the shape of
the dashboard, the provisioning files and docker-compose.yml."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import yaml

from ._harness import GRAFANA, dashboard, dashboard_exprs, query_panels, rule_exprs

ALERTS = {
    "BatcherQueueSaturated",
    "BatcherTTFTBudgetBurnFast",
    "BatcherTTFTBudgetBurnSlow",
    "BatcherHighErrorRate",
    "BatcherExecutorStalled",
    "BatcherScrapeDown",
}


def promtool_run(promtool: str, *args: str, cwd: Path = GRAFANA) -> str:
    done = subprocess.run([promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"promtool {' '.join(args)} failed:\n{output}"
    return output


def test_promtool_check_config(promtool: str) -> None:
    out = promtool_run(promtool, "check", "config", "prometheus.yml")
    assert "1 rule files found" in out  # alerts.yml is found beside it and checked too


def test_promtool_check_rules(promtool: str) -> None:
    promtool_run(promtool, "check", "rules", "alerts.yml")


def test_promtool_rule_unit_tests_pass(promtool: str) -> None:
    assert "SUCCESS" in promtool_run(promtool, "test", "rules", "alerts_test.yml")


def test_rule_unit_tests_catch_a_broken_rule(promtool: str, tmp_path: Path) -> None:
    """The unit tests are not vacuous: loosen one threshold and they fail."""
    shutil.copy(GRAFANA / "alerts_test.yml", tmp_path)
    rules = (GRAFANA / "alerts.yml").read_text()
    broken = rules.replace("batcher_max_queue) > 0.8", "batcher_max_queue) > 0.5")
    assert broken != rules
    (tmp_path / "alerts.yml").write_text(broken)
    done = subprocess.run(
        [promtool, "test", "rules", "alerts_test.yml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0 and "BatcherQueueSaturated" in done.stdout + done.stderr


def test_every_alert_has_a_firing_and_a_silent_case() -> None:
    tests = yaml.safe_load((GRAFANA / "alerts_test.yml").read_text())["tests"]
    fires: set[str] = set()
    silent: set[str] = set()
    for case in tests:
        for check in case.get("alert_rule_test", []):
            (fires if check["exp_alerts"] else silent).add(check["alertname"])
    defined = {name for name, _ in rule_exprs() if ":" not in name}
    assert defined == ALERTS
    assert fires == ALERTS and silent == ALERTS


def test_alert_rules_carry_severity_and_summary() -> None:
    rules = yaml.safe_load((GRAFANA / "alerts.yml").read_text())
    for rule in (r for g in rules["groups"] for r in g["rules"] if "alert" in r):
        assert rule["labels"]["severity"] in {"page", "ticket", "warning"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


# -- dashboard -----------------------------------------------------------------------------------
def test_dashboard_variables() -> None:
    dash = dashboard()
    assert 36 <= dash["schemaVersion"] <= 41 and dash["uid"] == "llm-batcher"
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("model", "engine"):
        v = variables[name]
        assert v["type"] == "query" and v["multi"] and v["includeAll"], name
        assert v["query"]["query"].startswith("label_values(batcher_queue_depth"), name
        assert v["datasource"]["uid"] == "${datasource}"


def test_every_panel_uses_the_datasource_variable_and_filters() -> None:
    dash = dashboard()
    panels = query_panels(dash)
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    for p in panels:
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}", p["title"]
            for selector in re.findall(r"batcher_\w+\{([^}]*)\}", t["expr"]):
                assert 'model=~"$model"' in selector and 'engine=~"$engine"' in selector, t["expr"]


def test_dashboard_shows_what_the_issue_asks_for() -> None:
    exprs = "\n".join(e for _, e in dashboard_exprs(dashboard()))
    wanted = [
        r"sum by \(outcome\) \(rate\(batcher_requests_total",
        r"batcher_queue_depth",
        r"batcher_running_requests",
        r"histogram_quantile\(0.5, sum by \(le, model\) \(rate\(batcher_batch_size_bucket",
        r"increase\(batcher_batch_size_bucket",
        r"rate\(batcher_generated_tokens_total",
        r"rate\(batcher_prompt_tokens_total",
        r"rate\(batcher_executor_busy_seconds_total",
        r"rate\(batcher_padding_tokens_total.*\n?.*/.*rate\(batcher_computed_tokens_total",
    ]
    for metric in ("time_to_first_token", "inter_token_latency", "request_duration", "queue_wait"):
        for q in ("0.5", "0.9", "0.99"):
            quantile = rf"histogram_quantile\({q}, sum by \(le, model\) \(rate\("
            wanted.append(rf"{quantile}batcher_{metric}_seconds_bucket")
    missing = [w for w in wanted if not re.search(w, exprs)]
    assert not missing, missing
    assert any(p["type"] == "heatmap" for p in query_panels(dashboard()))


def test_dashboard_panels_do_not_overlap() -> None:
    cells: dict[tuple[int, int], str] = {}
    for p in dashboard()["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = p["title"]


# -- provisioning, Prometheus config, compose ----------------------------------------------------
def test_provisioning_files() -> None:
    ds = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://127.0.0.1:9090"
    boards = yaml.safe_load((GRAFANA / "provisioning/dashboards/llm-batcher.yml").read_text())
    (provider,) = boards["providers"]
    assert provider["type"] == "file" and provider["options"]["path"]


def test_prometheus_scrapes_the_example_server() -> None:
    config = yaml.safe_load((GRAFANA / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "llm-batcher" and job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:8000"]
    assert config["rule_files"] == ["alerts.yml"]


def test_compose_runs_all_three_on_loopback() -> None:
    compose = yaml.safe_load((GRAFANA / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"server", "prometheus", "grafana"}
    assert services["server"]["build"]["context"] == ".."
    assert services["server"]["command"][:4] == ["llm-batcher", "serve", "--host", "0.0.0.0"]
    assert all(p.startswith("127.0.0.1:") for p in services["server"]["ports"])
    for name in ("prometheus", "grafana"):
        assert services[name]["network_mode"] == "service:server"
        for volume in services[name]["volumes"]:
            assert (GRAFANA / volume.split(":")[0]).exists(), volume
    dockerfile = GRAFANA / services["server"]["build"]["dockerfile"].removeprefix("grafana/")
    text = dockerfile.read_text()
    assert text.index("torch==2.13.0") < text.index('".[all]"')
