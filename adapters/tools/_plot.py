"""``bench``'s PNG: speedup against N with both fitted laws and the ideal line, latency against N."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ._analysis import amdahl, gustafson

__all__ = ["plot"]


def plot(path: Path, report: dict[str, Any]) -> None:
    """Draw ``report`` (``bench``'s JSON document) into the PNG at ``path`` (matplotlib, Agg)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            f"bench draws its plot with matplotlib ({e.name} is missing): "
            "install it with `pip install 'llm-batcher[server]'`"
        ) from e
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5.2))
    _speedup(left, report)
    _latency(right, report)
    m = report["machine"]
    fig.suptitle(
        f"llm-batcher bench: {report['model']} on {report['device']}"
        + (f" ({report['dtype']})" if report["dtype"] else "")
        + f", max_tokens {report['max_tokens']}; {m['cpus']} CPUs {m['cpu']}, load {_load(m)}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _load(machine: dict[str, Any]) -> str:
    start, end = machine.get("load_average_start"), machine.get("load_average_end")
    return "n/a" if not start or not end else f"{start[0]:.1f} -> {end[0]:.1f}"


def _speedup(ax: Any, report: dict[str, Any]) -> None:
    levels = report["levels"]
    ns = [lv["n"] for lv in levels]
    top = max(ns)
    grid = [1 + (top - 1) * i / 200 for i in range(201)]
    amd, gus = report["amdahl"], report["gustafson"]
    ax.plot(grid, grid, ":", color="grey", label="ideal: S(N) = N")
    ax.plot(
        grid,
        [amdahl(n, amd["p"]) for n in grid],
        "-",
        color="tab:blue",
        label=f"Amdahl fit: P = {amd['p']:.3f} (serial {amd['serial']:.3f}), ceiling {_ceiling(amd)}",
    )
    ax.plot(
        grid,
        [gustafson(n, gus["p"]) for n in grid],
        "--",
        color="tab:green",
        label=f"Gustafson fit: P = {gus['p']:.3f}",
    )
    speedups = [lv["speedup"] for lv in levels]
    ax.plot(ns, speedups, "o", color="black", label="measured S(N) = tok/s(N) / tok/s(1)")
    for lv in levels:
        ax.annotate(
            f"{lv['tokens_per_s']:.3g} tok/s",
            (lv["n"], lv["speedup"]),
            textcoords="offset points",
            xytext=(4, -11),
            fontsize=7,
        )
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_ylim(0, max(max(speedups) * 1.35, 2.0))
    ax.set_xlabel("concurrent requests N (closed loop)")
    ax.set_ylabel("speedup S(N)")
    ax.set_title("throughput speedup")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")


def _ceiling(amd: dict[str, Any]) -> str:
    ceiling = amd["max_speedup"]  # None in the JSON file when infinite
    return "none" if ceiling is None or not math.isfinite(ceiling) else f"{ceiling:.1f}x"


def _latency(ax: Any, report: dict[str, Any]) -> None:
    from matplotlib.ticker import FuncFormatter

    levels = report["levels"]
    ns = [lv["n"] for lv in levels]
    for key, color, name in (("ttft_s", "tab:red", "TTFT"), ("itl_s", "tab:purple", "inter-token")):
        for pct, style in (("p50", "-o"), ("p90", "--s"), ("p99", ":^")):
            ax.plot(
                ns, [lv[key][pct] * 1e3 for lv in levels], style, color=color, ms=4, label=f"{name} {pct}"
            )
    slo = report["slo"]
    for key, color, name in (("ttft_s", "tab:red", "TTFT"), ("itl_s", "tab:purple", "ITL")):
        if slo.get(key) is not None:
            ax.axhline(
                slo[key] * 1e3, color=color, lw=0.8, ls="-.", label=f"{name} SLO (p{slo['percentile']})"
            )
    advice = report.get("recommendation")
    if advice and advice["max_batch_size"]:
        ax.axvline(advice["max_batch_size"], color="black", lw=0.8, label="recommended max_batch_size")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda y, _: f"{y:g}" if f"{y:g}"[0] in "235" else ""))
    ax.set_xlabel("concurrent requests N (closed loop)")
    ax.set_ylabel("latency (ms)")
    ax.set_title("latency")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
