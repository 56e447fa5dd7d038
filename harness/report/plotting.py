"""The report's PNGs: where each is written and linked, and the styling every section's plot shares."""
from __future__ import annotations

import math
import re
from pathlib import Path

from harness.paths import reports_dir
from harness.report.format import relative_to_reports
from harness.report.runs import Run

LINESTYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v", "P")
DENSE_LINE = {"color": "grey", "linestyle": "--", "linewidth": 1}


class PlotSet:
    """The PNGs of one report: `reports/<name>.<plot>.png`, linked relative to the markdown."""

    def __init__(self, name: str):
        self.prefix = name
        self.written: list[Path] = []

    def path(self, plot: str) -> Path:
        path = reports_dir() / f"{self.prefix}.{re.sub(r'[^A-Za-z0-9_-]+', '-', plot)}.png"
        self.written.append(path)
        return path

    def image(self, path: Path, alt: str) -> str:
        return f"![{alt}]({relative_to_reports(path)})"

    def remove_stale(self) -> None:
        """Delete this report's PNGs from earlier generations that this one did not write."""
        pattern = re.compile(re.escape(self.prefix) + r"\.[A-Za-z0-9_-]+\.png")
        for path in reports_dir().glob(f"{self.prefix}.*.png"):
            if pattern.fullmatch(path.name) and path not in self.written:
                path.unlink()


def recipe_styles(recipes: list[str]) -> dict[str, dict]:
    return {recipe: {"linestyle": LINESTYLES[i % len(LINESTYLES)], "marker": MARKERS[i % len(MARKERS)]}
            for i, recipe in enumerate(recipes)}


def line_styles(keys: list) -> dict:
    """A style per key that no other key shares: the ten default colours, then the same colours with the next
    line style (40 distinct lines), so a plot with many lines still tells them apart."""
    return {key: {"color": f"C{i % 10}", "linestyle": LINESTYLES[i // 10 % len(LINESTYLES)]}
            for i, key in enumerate(keys)}


def moving_average(values: list[float], window: int) -> list[float]:
    """The mean of each `window` consecutive values (len(values) - window + 1 of them; all values if fewer)."""
    window = max(1, min(window, len(values)))
    sums = [0.0]
    for value in values:
        sums.append(sums[-1] + value)
    return [(sums[i + window] - sums[i]) / window for i in range(len(values) - window + 1)]


def sparsity_axis(ax) -> None:
    ax.set_xlabel("sparsity of the prunable weights (%, measured)")
    ax.set_xlim(-2, 102)


def by_recipe(runs: list[Run]) -> dict[str, list[Run]]:
    grouped: dict[str, list[Run]] = {}
    for run in runs:
        grouped.setdefault(run.recipe, []).append(run)
    return grouped


def draw(ax, runs: list[Run], value, **style) -> None:
    """One line over runs (in level order): x = measured sparsity, y = value(run) (None: a gap in the line)."""
    ax.plot([run.x for run in runs], [_nan(value(run)) for run in runs], **style)


def _nan(value) -> float:
    return math.nan if value is None else value


def wrapped(label: str, width: int = 40) -> str:
    """A legend label on lines of at most `width` characters, broken after `@`, `,` or a space (long variant names)."""
    lines = [""]
    for piece in re.findall(r"[^@, ]+[@, ]?|[@, ]", label):
        if lines[-1] and len(lines[-1]) + len(piece) > width:
            lines.append("")
        lines[-1] += piece
    return "\n".join(line.rstrip() for line in lines)


def legend(ax, colors: dict[str, str], styles: dict[str, dict], extra: dict[str, dict] | None = None) -> None:
    """One legend outside the axes: a colour per quantity, a line style per recipe (or model), then extras."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=color, label=wrapped(label)) for label, color in colors.items()]
    handles += [Line2D([], [], label=wrapped(label), **{"color": "grey", **style}) for label, style in styles.items()]
    handles += [Line2D([], [], label=wrapped(label), **style) for label, style in (extra or {}).items()]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0))
