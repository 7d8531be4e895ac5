"""Helpers of the monitoring tests: promtool, a loopback Prometheus, the example server.

Every process binds 127.0.0.1 on a free port, logs to a file under the test's temp dir (shown when
it fails to start), and is terminated, then killed, when its fixture ends.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "grafana"
SETUP_HINT = "run `make setup` (it installs Debian's prometheus package, which has both)"


def require_tool(name: str) -> str:
    """The path of ``name`` (promtool, prometheus), or fail (never skip) saying how to get it."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found on PATH: {SETUP_HINT}", pytrace=False)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.read()


def wait_until_ready(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    """Poll ``url`` until it answers 200 (an external process: there is no event to wait on)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args!r} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if http_get(url, timeout=1.0)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    pytest.fail(f"{url} not ready after {timeout} s:\n{log.read_text()[-3000:]}")


@contextmanager
def running(args: list[str], log: Path, ready_url: str, timeout: float = 30.0) -> Iterator[None]:
    """Run ``args`` until the block ends; wait for ``ready_url`` first."""
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            wait_until_ready(ready_url, proc, log, timeout)
            yield
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def server_command(port: int, *flags: str) -> list[str]:
    """``llm-batcher serve --model fake`` from this interpreter's environment (the .venv)."""
    exe = Path(sys.executable).parent / "llm-batcher"
    cli = [str(exe)] if exe.exists() else [sys.executable, "-m", "batcher.adapters._cli"]
    return [*cli, "serve", "--model", "fake", "--host", "127.0.0.1", "--port", str(port), *flags]


def prometheus_config(target: str, rules: Path) -> str:
    """A 1-second-scrape config for ``target`` that also evaluates ``rules`` every second."""
    return json.dumps(
        {  # JSON is YAML
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(rules)],
            "scrape_configs": [
                {
                    "job_name": "llm-batcher",
                    "metrics_path": "/metrics",
                    "static_configs": [{"targets": [target]}],
                }
            ],
        },
        indent=2,
    )


@contextmanager
def prometheus(target: str, workdir: Path) -> Iterator[str]:
    """A Prometheus on 127.0.0.1 scraping ``target`` each second; yields its base URL."""
    binary = require_tool("prometheus")
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "prometheus.yml"
    config.write_text(prometheus_config(target, GRAFANA / "alerts.yml"))
    port = free_port()
    args = [
        binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={workdir / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
    ]
    base = f"http://127.0.0.1:{port}"
    with running(args, workdir / "prometheus.log", f"{base}/-/ready"):
        wait_for_first_scrape(base)
        yield base


def wait_for_first_scrape(base: str, timeout: float = 20.0) -> None:
    """Prometheus starts scraping a few seconds after it is ready: wait for a successful scrape."""
    deadline = time.monotonic() + timeout
    while not any(r["value"][1] == "1" for r in prom_api(base, "query", query="up")["result"]):
        if time.monotonic() > deadline:
            pytest.fail(f"Prometheus at {base} scraped nothing in {timeout} s: is the target up?")
        time.sleep(0.25)


def prom_api(base: str, path: str, **params: Any) -> Any:
    """GET ``/api/v1/<path>``; return ``data`` (fails the test on an error status)."""
    status, body = http_get(f"{base}/api/v1/{path}?{urllib.parse.urlencode(params)}", timeout=30)
    reply = json.loads(body)
    assert status == 200 and reply["status"] == "success", (path, params, reply)
    return reply["data"]


# -- what the dashboard and the rules use --------------------------------------------------------
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((GRAFANA / "dashboard.json").read_text())
    return loaded


def query_panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for p in dash["panels"]:
        out.extend([p] if "targets" in p else p.get("panels", []))
    return out


def dashboard_exprs(dash: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, expr) for every query target of every panel."""
    return [(p["title"], t["expr"]) for p in query_panels(dash) for t in p["targets"]]


def expand(expr: str, rate_interval: str = "15s") -> str:
    """Template variables as Grafana fills them with "All" selected."""
    expr = expr.replace("${__rate_interval}", rate_interval).replace("$__rate_interval", rate_interval)
    return re.sub(r"\$\{?(model|engine|replica)\}?", ".*", expr)


def rule_exprs() -> list[tuple[str, str]]:
    import yaml

    rules = yaml.safe_load((GRAFANA / "alerts.yml").read_text())
    return [(r.get("alert") or r["record"], r["expr"]) for g in rules["groups"] for r in g["rules"]]


_METRIC = re.compile(r"(?<![\w:$])batcher_[a-z0-9_]+(?![\w:])")


def metric_names(exprs: list[str]) -> set[str]:
    """``batcher_*`` metric names in PromQL (recording rules, named ``level:metric:op``, excluded)."""
    return {m for e in exprs for m in _METRIC.findall(e)}
