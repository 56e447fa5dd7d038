"""Shared matplotlib styling for the harness's PNG plots (Agg backend: no display needed)."""
from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Iterator

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

STYLE = {
    "figure.dpi": 110,
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "legend.fontsize": 7,
    "legend.framealpha": 0.8,
}
LEGEND_MARGIN_IN = 0.8  # inches of title and axis labels beside a legend as tall as its row
MAX_COLUMNS = 3  # further panels wrap onto more rows: one panel per recipe stays a readable width


@contextlib.contextmanager
def figure(path: Path, panels: int = 1, panel_width: float = 6.0, height: float = 4.2) -> Iterator[tuple]:
    """Draw on the yielded (figure, list of `panels` axes) in the project style, at most MAX_COLUMNS panels per
    row; saved as PNG at `path` when the block ends."""
    columns = min(panels, MAX_COLUMNS)
    rows = -(-panels // columns)
    with plt.rc_context(STYLE):
        fig, grid = plt.subplots(rows, columns, figsize=(panel_width * columns, height * rows), squeeze=False,
                                 layout="constrained")
        axes = list(grid.flat)
        for unused in axes[panels:]:
            unused.remove()
        try:
            yield fig, axes[:panels]
            _fit_legends(fig, [list(row) for row in grid], height)
            _save_palette_png(fig, path)
        finally:
            plt.close(fig)


def _save_palette_png(fig, path: Path) -> None:
    """Save as a 256-colour palette PNG: a plot has few colours, so it looks the same at about a third of the
    bytes of matplotlib's RGBA file (the committed reports' PNGs stay small). Octree, not median cut: median cut
    gives the many shades of a large area the palette and merges thin lines' colours (it drew red and brown runs
    the same dark red), while octree keeps every colour within a few levels."""
    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    with Image.open(buffer) as image:
        image.convert("RGB").quantize(colors=256, method=Image.Quantize.FASTOCTREE).save(path, format="PNG",
                                                                                      optimize=True)


def _fit_legends(fig, rows: list[list], row_height: float) -> None:
    """Make each row of panels as tall as its tallest legend, at least `row_height` inches (legends sit beside
    their axes; many runs make them long)."""
    fig.canvas.draw()  # a legend knows its size once drawn
    heights = [max([row_height, *(legend.get_window_extent().height / fig.dpi + LEGEND_MARGIN_IN
                                  for ax in row if (legend := ax.get_legend()))]) for row in rows]
    if sum(heights) > row_height * len(rows):
        fig.set_size_inches(fig.get_size_inches()[0], sum(heights))
        rows[0][0].get_gridspec().set_height_ratios(heights)
