"""Shared matplotlib styling for the harness's PNG plots (Agg backend: no display needed)."""
from __future__ import annotations

import contextlib
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
LEGEND_MARGIN_IN = 0.8  # inches of title and axis labels beside a legend as tall as the figure


@contextlib.contextmanager
def figure(path: Path, panels: int = 1, panel_width: float = 6.0, height: float = 4.2) -> Iterator[tuple]:
    """Draw on the yielded (figure, axes list) in the project style; saved as PNG at `path` when the block ends."""
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, panels, figsize=(panel_width * panels, height), squeeze=False)
        try:
            yield fig, list(axes[0])
            _fit_legends(fig)
            fig.tight_layout()
            fig.savefig(path, format="png")
        finally:
            plt.close(fig)


def _fit_legends(fig) -> None:
    """Make the figure as tall as its tallest legend (legends sit beside their axes; many runs make them long)."""
    fig.canvas.draw()  # a legend knows its size once drawn
    tallest = max((legend.get_window_extent().height for ax in fig.axes if (legend := ax.get_legend())), default=0.0)
    width, height = fig.get_size_inches()
    needed = tallest / fig.dpi + LEGEND_MARGIN_IN
    if needed > height:
        fig.set_size_inches(width, needed)
