"""Render every panel of grafana/dashboard.json from a live Prometheus into one PNG.

    python examples/render_dashboard.py                                   # last 10 min, :9090
    python examples/render_dashboard.py --prometheus http://127.0.0.1:9091 --minutes 3 \\
        --rate-interval 15s --out grafana/dashboard.png

Grafana is not needed: each panel's PromQL is sent to Prometheus's range-query API with the
template variables filled in the way Grafana would with "All" selected ($model, $engine and $replica
match everything, $__rate_interval is --rate-interval), and drawn with matplotlib: time series as lines
(stacked where the panel stacks), the heatmap as a heatmap. It talks only to loopback addresses.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import math
import re
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
UNITS = {"reqps": "req/s", "percentunit": "ratio", "s": "seconds", "short": ""}


def expand(expr: str, rate_interval: str) -> str:
    """Fill in Grafana's template variables as "All" would: every model, engine and replica."""
    expr = expr.replace("$__rate_interval", rate_interval).replace("${__rate_interval}", rate_interval)
    return re.sub(r"\$\{?(model|engine|replica)\}?", ".*", expr)


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """The dashboard's panels with queries, in layout order (rows, and panels inside rows)."""
    found: list[dict[str, Any]] = []
    for p in dashboard["panels"]:
        found.extend([p] if p.get("targets") else p.get("panels", []))
    return sorted(found, key=lambda p: (p["gridPos"]["y"], p["gridPos"]["x"]))


def query_range(base: str, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
    """``/api/v1/query_range`` → the result's series (``metric`` labels and ``values``)."""
    params = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
    with urllib.request.urlopen(f"{base}/api/v1/query_range?{params}", timeout=30) as r:
        body = json.load(r)
    if body.get("status") != "success":
        raise RuntimeError(f"query failed: {expr}: {body}")
    return list(body["data"]["result"])


def legend(fmt: str, labels: dict[str, str]) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt) or str(labels)


def draw_timeseries(
    ax: Any, panel: dict[str, Any], series: list[tuple[str, list[Any]]], start: float
) -> None:
    stacked = panel["fieldConfig"]["defaults"].get("custom", {}).get("stacking", {}).get("mode")
    curves = [(name, [float(t) for t, _ in vals], [float(v) for _, v in vals]) for name, vals in series]
    if stacked == "normal" and curves:
        grid = sorted({t for _, ts, _ in curves for t in ts})
        ys = [[dict(zip(ts, vs, strict=True)).get(t, 0.0) for t in grid] for _, ts, vs in curves]
        ys = [[0.0 if math.isnan(v) else v for v in y] for y in ys]
        ax.stackplot([t - start for t in grid], ys, labels=[n for n, _, _ in curves], alpha=0.8)
    else:
        for name, ts, vs in curves:
            dashed = name.startswith(("max_queue", "max_batch_size"))
            ax.plot([t - start for t in ts], vs, label=name, linewidth=1.2, linestyle="--" if dashed else "-")
    defaults = panel["fieldConfig"]["defaults"]
    unit = defaults.get("unit", "")
    if defaults.get("min") == 0:
        top = max(ax.get_ylim()[1], 0.01)
        ax.set_ylim(bottom=-0.02 * top, top=top)  # a line at 0 stays visible
    ax.set_ylabel(UNITS.get(unit, unit), fontsize=7)
    if curves:
        ax.legend(fontsize=6, loc="upper left", ncol=2, framealpha=0.6)


def draw_heatmap(ax: Any, series: list[tuple[str, list[Any]]], start: float) -> None:
    """Bucket increments over time: one row per ``le`` bucket (cumulative counts differenced)."""
    import numpy as np

    bounds = sorted(series, key=lambda s: math.inf if s[0] == "+Inf" else float(s[0]))
    if not bounds:
        return
    times = sorted({float(t) for _, vals in bounds for t, _ in vals})
    cum = np.array(
        [[dict((float(t), float(v)) for t, v in vals).get(t, 0.0) for t in times] for _, vals in bounds]
    )
    cells = np.diff(np.vstack([np.zeros(len(times)), np.nan_to_num(cum)]), axis=0).clip(min=0)
    used = np.flatnonzero(cells.sum(axis=1))
    top = int(used[-1]) + 2 if used.size else len(bounds)  # drop the empty buckets above the data
    cells, bounds = cells[:top], bounds[:top]
    ax.imshow(
        cells,
        aspect="auto",
        origin="lower",
        cmap="Oranges",
        interpolation="nearest",
        extent=(times[0] - start, times[-1] - start, -0.5, len(bounds) - 0.5),
    )
    ax.set_yticks(range(len(bounds)), [f"≤{name}" for name, _ in bounds], fontsize=5)
    ax.set_ylabel("batch size bucket", fontsize=7)


def render(
    base: str,
    dashboard: dict[str, Any],
    out: Path,
    *,
    start: float,
    end: float,
    step: float,
    rate_interval: str,
) -> int:
    """Query and draw every panel where the dashboard's grid puts it; return the series drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    todo = panels(dashboard)
    height = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in dashboard["panels"])
    fig = plt.figure(figsize=(18, 0.42 * height + 0.8))
    grid = fig.add_gridspec(
        height,
        24,
        hspace=0.5,
        wspace=1.2,
        left=0.04,
        right=0.99,
        top=1 - 0.6 / (0.42 * height + 0.8),
        bottom=0.03,
    )
    for row in (p for p in dashboard["panels"] if p["type"] == "row"):
        ax = fig.add_subplot(grid[row["gridPos"]["y"], :])
        ax.axis("off")
        ax.text(0, 1.6, row["title"], fontsize=11, fontweight="bold", va="top")
    drawn = 0
    for panel in todo:
        g = panel["gridPos"]
        ax = fig.add_subplot(grid[g["y"] : g["y"] + g["h"] - 1, g["x"] : g["x"] + g["w"]])  # 1 row: labels
        drawn += draw_panel(ax, base, panel, start, end, step, rate_interval)
    fig.suptitle(
        f"{dashboard['title']}: {len(todo)} panels from Prometheus, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(end))}; x axes: seconds since "
        f"{time.strftime('%H:%M:%S', time.gmtime(start))}; $__rate_interval={rate_interval}",
        fontsize=12,
    )
    save_small_png(fig, out)
    plt.close(fig)
    return drawn


def save_small_png(fig: Any, out: Path) -> None:
    """A 256-colour PNG: a third of the size of matplotlib's RGBA one, for a picture in a repo."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=72)
    buf.seek(0)
    with Image.open(buf) as img:
        img.convert("RGB").quantize(colors=256).save(out, format="PNG", optimize=True)


def draw_panel(
    ax: Any, base: str, panel: dict[str, Any], start: float, end: float, step: float, rate_interval: str
) -> int:
    series: list[tuple[str, list[Any]]] = []
    for target in panel["targets"]:
        for s in query_range(base, expand(target["expr"], rate_interval), start, end, step):
            series.append((legend(target.get("legendFormat", ""), s["metric"]), s["values"]))
    if not series:
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", color="grey")
        print(f"warning: panel {panel['title']!r} has no data", file=sys.stderr)
    elif panel["type"] == "heatmap":
        draw_heatmap(ax, series, start)
    else:
        draw_timeseries(ax, panel, series, start)
    ax.set_xlim(0, end - start)
    ax.set_title(panel["title"], fontsize=9)
    ax.tick_params(labelsize=6)
    ax.grid(alpha=0.3)
    return len(series)


def _loopback(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname or ""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prometheus", default="http://127.0.0.1:9090", help="Prometheus base URL")
    ap.add_argument("--dashboard", type=Path, default=ROOT / "grafana" / "dashboard.json")
    ap.add_argument("--out", type=Path, default=ROOT / "grafana" / "dashboard.png")
    ap.add_argument("--minutes", type=float, default=10.0, help="time range ending now")
    ap.add_argument("--end", type=float, default=None, help="end of the range (unix seconds)")
    ap.add_argument("--step", type=float, default=None, help="seconds between points")
    ap.add_argument("--rate-interval", default="1m", help="$__rate_interval (>= 4 scrapes)")
    args = ap.parse_args(argv)
    if not _loopback(args.prometheus):
        ap.error(f"{args.prometheus}: only loopback Prometheus addresses are allowed")
    end = time.time() if args.end is None else args.end
    start = end - args.minutes * 60
    step = args.step or max(1.0, args.minutes * 60 / 300)
    dashboard = json.loads(args.dashboard.read_text())
    n = render(
        args.prometheus.rstrip("/"),
        dashboard,
        args.out,
        start=start,
        end=end,
        step=step,
        rate_interval=args.rate_interval,
    )
    print(f"{args.out}: {len(panels(dashboard))} panels, {n} series, {args.out.stat().st_size // 1024} KiB")
    return 0 if n else 1


if __name__ == "__main__":
    sys.exit(main())
