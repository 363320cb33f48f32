"""A fan-out drawn as a timeline: one lane per device, each task a bar from dispatch to result.

    from runtime.frontdoors.timeline import timeline
    results = client.map("minilm", batch)
    timeline(results, "fanout.png", fluid_s=...)

Failed attempts are red bars ending in a cross on the lane of the device that failed, with a
line to where the task went next; a task served after a failover is drawn in orange. A lane has
one row per slot the device used at once. The times are the scheduler's (``TaskResult.started_at``,
``finished_at``, ``Attempt.started_at``, ``ended_at``), shown from the first task's submission.
Needs matplotlib: ``pip install 'fanout-runtime[plot]'``.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError

SERVED, FAILED_OVER, FAILED = "#3b75af", "#ef8636", "#c53a32"


@dataclass(frozen=True)
class Bar:
    device: str
    start: float
    end: float
    kind: str  # "served" | "failed_over" (served after a failover) | "failed"


def bars(results: Sequence[Any]) -> list[Bar]:
    """Every attempt of every result (errors in ``results`` are skipped), as bars."""
    out = []
    for r in _timed(results):
        for a in r.attempts:
            if a.started_at:  # a device skipped without a try has no bar
                out.append(Bar(a.device, a.started_at, a.ended_at, "failed"))
        out.append(Bar(r.device, r.started_at, r.finished_at,
                       "failed_over" if r.attempts else "served"))
    return out


def _timed(results: Sequence[Any]) -> list[Any]:
    """The results that carry the scheduler's times (not errors, not from an older one)."""
    return [r for r in results if not isinstance(r, BaseException)
            and getattr(r, "started_at", 0.0) > 0]


def rows(lane: list[Bar], min_width: float = 0.0) -> list[int]:
    """A row for each bar of one device, so bars that overlap in time never share one (a
    failed attempt, often instant, counts as at least ``min_width`` wide, as drawn)."""
    ends: list[float] = []
    placed = [0] * len(lane)
    for i in sorted(range(len(lane)), key=lambda i: lane[i].start):
        row = next((k for k, end in enumerate(ends) if end <= lane[i].start), len(ends))
        if row == len(ends):
            ends.append(0.0)
        wide = min_width if lane[i].kind == "failed" else 0.0
        ends[row] = max(lane[i].end, lane[i].start + wide)
        placed[i] = row
    return placed


def timeline(results: Sequence[Any], path: str | os.PathLike | None = None, *,
             fluid_s: float | None = None, marks: Mapping[str, float] | None = None,
             devices: Sequence[str] | None = None, title: str | None = None) -> Any:
    """Draw ``results`` (of ``map``/``amap``, in any order); save to ``path`` if given.

    ``fluid_s``: the fluid bound (N over the sum of the devices' rates), drawn as a line, in
    seconds from the first submission; ``marks``: more lines, label -> seconds. ``devices``:
    the lanes, top first (default: in order of first use). Returns the matplotlib figure.
    """
    try:
        import matplotlib
        if path is not None:
            matplotlib.use("Agg")  # no display needed to write a file
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ConfigError(f"timeline() needs matplotlib ({exc}): "
                          f"pip install 'fanout-runtime[plot]'") from exc
    drawn = bars(results)
    done = _timed(results)
    t0 = min([r.submitted_at for r in done if r.submitted_at] or [b.start for b in drawn]
             or [0.0])
    lanes = list(devices or dict.fromkeys(b.device for b in drawn))
    by_lane = {d: [b for b in drawn if b.device == d] for d in lanes}
    # An instant failure still shows: each bar is drawn at least this wide.
    min_width = 0.006 * max([b.end - t0 for b in drawn] + [fluid_s or 0.0, 1e-3])
    lane_rows = {d: rows(by_lane[d], min_width) for d in lanes}
    heights = {d: max(lane_rows[d], default=0) + 1 for d in lanes}
    base, y = {}, 0.0
    for d in reversed(lanes):  # the first lane on top
        base[d] = y
        y += heights[d] + 0.6
    fig, ax = plt.subplots(figsize=(10, 2.0 + 0.22 * y))
    colors = {"served": SERVED, "failed_over": FAILED_OVER, "failed": FAILED}
    for d in lanes:
        for bar, row in zip(by_lane[d], lane_rows[d]):  # each bar on a row of its lane
            width = max(bar.end - bar.start, min_width)
            ax.broken_barh([(bar.start - t0, width)], (base[d] + row + 0.1, 0.8),
                           facecolors=colors[bar.kind], edgecolors="white", linewidth=0.8)
            if bar.kind == "failed":
                ax.plot(bar.start - t0 + width, base[d] + row + 0.5, "x", color="black",
                        markersize=4)
    _failover_lines(ax, results, base, by_lane, lane_rows, t0)
    for d in lanes[1:]:  # a rule between lanes
        ax.axhline(base[d] + heights[d] + 0.3, color="#dddddd", linewidth=0.8)
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    handles: list[Any] = [Patch(color=SERVED, label="served"),
                          Patch(color=FAILED_OVER, label="served after a failover"),
                          Patch(color=FAILED, label="failed attempt (x: its end)")]
    lines = ([("fluid bound", fluid_s)] if fluid_s else []) + list((marks or {}).items())
    styles: list[Any] = ["--", ":", "-.", (0, (5, 1, 1, 1))]
    for (label, at), style in zip(lines, styles):
        ax.axvline(at, color="#333333", linestyle=style, linewidth=1.2)
        handles.append(Line2D([], [], color="#333333", linestyle=style,
                              label=f"{label}: {at:.2f} s"))
    ax.set_yticks([base[d] + heights[d] / 2 for d in lanes], lanes)
    ax.set_ylim(-0.3, y - 0.3)
    ax.set_xlim(left=0)
    ax.set_xlabel("seconds since the fan-out was submitted")
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8, frameon=False)
    if title:
        ax.set_title(title, fontsize=10)
    legend_rows = math.ceil(len(handles) / 3)
    fig.tight_layout(rect=(0, 0.06 * legend_rows + 0.01, 1, 1))
    if path is not None:
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return fig


def _failover_lines(ax: Any, results: Sequence[Any], base: dict, by_lane: dict,
                    lane_rows: dict, t0: float) -> None:
    """A thin line from each failed attempt's end to the start of the task's next attempt."""
    def y_of(device: str, start: float) -> float | None:
        for bar, row in zip(by_lane.get(device, []), lane_rows.get(device, [])):
            if bar.start == start:
                return base[device] + row + 0.5
        return None

    for r in _timed(results):
        tries = [(a.device, a.started_at, a.ended_at) for a in r.attempts if a.started_at]
        tries.append((r.device, r.started_at, r.finished_at))
        for (d1, s1, e1), (d2, s2, _) in zip(tries, tries[1:]):
            y1, y2 = y_of(d1, s1), y_of(d2, s2)
            if y1 is not None and y2 is not None:
                ax.plot([e1 - t0, s2 - t0], [y1, y2], color=FAILED, linewidth=0.5, alpha=0.6)
