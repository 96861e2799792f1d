"""``--report DIR``: a Markdown summary and PNG plots of an HTTP scenario's run.

``DIR/<scenario>.md`` holds the result's figures as tables (per operation:
count, p50, p90, p99, max, outcomes; then every other figure), and links the
plots beside it: ``<scenario>-latency.png`` (each operation's latency
distribution, as the share of requests answered within a time) and
``<scenario>-throughput.png`` (answers per second over the run, by operation).
matplotlib draws them (headless, Agg); it is an optional extra (``bench``),
and without it the summary is written alone, saying how to get the plots.

It must never need matplotlib for the summary.
"""

import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from bench._http import Latencies

PLOTS_NEED_MATPLOTLIB = "No plots: they need matplotlib (`pip install -e '.[bench]'`)."


def add_report_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--report", type=Path, help="write a Markdown summary and PNG plots here")


def _save(plt: Any, figure: Any, path: Path, written: list[Path]) -> str:
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    written.append(path)
    return path.name


def _pyplot() -> Any:
    """matplotlib's pyplot on the headless backend, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot
    except ImportError:
        return None
    return matplotlib.pyplot


def write_report(
    directory: Path, scenario: str, result: dict[str, Any], latencies: Latencies | None
) -> list[Path]:
    """Writes the report; returns the files written."""
    plt = _pyplot()
    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    plots: list[str] = []
    if plt is not None and latencies is not None and latencies.samples:
        figure, axes = plt.subplots(figsize=(8, 4.5))
        for operation, samples in sorted(latencies.samples.items()):
            ordered = sorted(samples)
            shares = [(index + 1) / len(ordered) for index in range(len(ordered))]
            axes.plot([ns / 1e6 for ns in ordered], shares, label=f"{operation} ({len(ordered)})")
        axes.set_xscale("log")
        axes.set_xlabel("latency (ms, log scale)")
        axes.set_ylabel("share of requests answered within")
        axes.set_title(f"{scenario}: latency by operation")
        axes.grid(True, which="both", alpha=0.3)
        axes.legend()
        plots.append(_save(plt, figure, directory / f"{scenario}-latency.png", written))

        per_second: dict[str, Counter[int]] = defaultdict(Counter)
        for at_s, operation in latencies.timeline:
            per_second[operation][int(at_s)] += 1
        last = max(int(at_s) for at_s, _ in latencies.timeline) + 1
        figure, axes = plt.subplots(figsize=(8, 4.5))
        seconds = list(range(last))
        bottom = [0] * last
        for operation, counts in sorted(per_second.items()):
            values = [counts.get(second, 0) for second in seconds]
            axes.bar(seconds, values, bottom=bottom, label=operation, width=1.0)
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        axes.set_xlabel("second of the run")
        axes.set_ylabel("answers per second")
        axes.set_title(f"{scenario}: throughput over time")
        axes.legend()
        plots.append(_save(plt, figure, directory / f"{scenario}-throughput.png", written))

    lines = [f"# Bench: {scenario}", ""]
    operations = result.get("operations")
    if isinstance(operations, dict) and operations:
        lines += [
            "| operation | count | p50 ms | p90 ms | p99 ms | max ms | outcomes |",
            "|---|---|---|---|---|---|---|",
        ]
        for operation, figures in operations.items():
            outcomes = ", ".join(f"{k}: {v}" for k, v in figures["outcomes"].items())
            lines.append(
                f"| {operation} | {figures['count']} | {figures['p50_ms']} | "
                f"{figures['p90_ms']} | {figures['p99_ms']} | {figures['max_ms']} | {outcomes} |"
            )
        lines.append("")
    lines += ["| figure | value |", "|---|---|"]
    for key, value in sorted(result.items()):
        if key == "operations":
            continue
        shown = json.dumps(value) if isinstance(value, dict | list) else str(value)
        lines.append(f"| {key} | {shown.replace('|', '/')} |")
    lines.append("")
    lines += [f"![{name}]({name})" for name in plots]
    if plt is None:
        lines.append(PLOTS_NEED_MATPLOTLIB)
    path = directory / f"{scenario}.md"
    path.write_text("\n".join(lines) + "\n")
    written.append(path)
    return written
