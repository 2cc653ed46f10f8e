"""PNG plots for docs/BENCHMARKS.md, drawn with matplotlib (the optional ``bench`` extra).

The suite hands over the raw samples the benchmarks collected; nothing is measured here.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt  # after choosing the backend
from matplotlib.axes import Axes
from matplotlib.ticker import PercentFormatter

from bench.common import percentile

COLOURS = {"raw": "#4c72b0", "secured": "#dd8452", "secured, token per step": "#55a868"}
METADATA = {"Software": None}  # no version string: the file changes only with the figures


def latency(samples: dict[str, list[float]], path: Path) -> None:
    """Secured vs raw request/reply: the latency distribution of every request, one panel
    per concurrency level; ``samples`` keys are ``"<in flight>|<mode>"`` in milliseconds."""
    levels = sorted({int(key.split("|")[0]) for key in samples})
    fig, axes = plt.subplots(len(levels), 1, figsize=(8, 3.2 * len(levels)), squeeze=False)
    for ax, level in zip(axes[:, 0], levels, strict=True):
        series = {key.split("|", 1)[1]: sorted(values) for key, values in samples.items()
                  if int(key.split("|")[0]) == level and values}
        low = min(v[0] for v in series.values())
        high = max(percentile(v, 0.999) for v in series.values())
        bins = [low * (high / low) ** (i / 80) for i in range(81)]
        for mode, values in series.items():
            colour = COLOURS.get(mode)
            # share of requests per bin (bins are equal on the log axis)
            ax.hist(values, bins=bins, histtype="step", linewidth=1.6,
                    weights=[1 / len(values)] * len(values), color=colour,
                    label=f"{mode} (n={len(values):,})")
            p50, p99 = percentile(values, 0.5), percentile(values, 0.99)
            ax.axvline(p50, color=colour, linestyle="--", linewidth=1)
            ax.axvline(p99, color=colour, linestyle=":", linewidth=1)
        ax.set_xscale("log")
        ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
        ax.set_ylabel("share of requests")
        ax.set_xlabel("latency per request, ms (log scale), all rounds pooled; "
                      "dashed p50, dotted p99")
        ax.set_title(f"request/reply over nats-server, {level} in flight")
        ax.legend(fontsize="small", frameon=False)
        _decades(ax, low, high)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata=METADATA)
    plt.close(fig)


def _decades(ax: Axes, low: float, high: float) -> None:
    """Readable tick labels on a log axis that may span less than a decade."""
    ticks = [m * 10 ** e for e in range(math.floor(math.log10(low)), math.ceil(math.log10(high)))
             for m in (1, 2, 5) if low <= m * 10 ** e <= high]
    if ticks:
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])


def memory(samples: dict[str, list[float]], path: Path) -> None:
    """Idle RSS per process (MiB), median with min-max whiskers."""
    names = list(samples)
    medians = [sorted(v)[len(v) // 2] for v in samples.values()]
    errors = [[m - min(v) for m, v in zip(medians, samples.values(), strict=True)],
              [max(v) - m for m, v in zip(medians, samples.values(), strict=True)]]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(names) + 1.2))
    colours = ["#8c8c8c" if i < 2 else "#4c72b0" for i in range(len(names))]
    ax.barh(names, medians, xerr=errors, color=colours)
    for y, value in enumerate(medians):
        ax.text(value, y, f" {value:.1f}", va="center", fontsize="small")
    ax.invert_yaxis()
    ax.set_xlim(0, max(v + e for v, e in zip(medians, errors[1], strict=True)) * 1.15)
    ax.set_xlabel("idle RSS, MiB (median; grey: references)")
    ax.set_title("idle memory per process")
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata=METADATA)
    plt.close(fig)
