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


def _fit_legends(fig) -> None:
    """Make the figure as tall as its tallest legend (legends sit beside their axes; many runs make them long)."""
    fig.canvas.draw()  # a legend knows its size once drawn
    tallest = max((legend.get_window_extent().height for ax in fig.axes if (legend := ax.get_legend())), default=0.0)
    width, height = fig.get_size_inches()
    needed = tallest / fig.dpi + LEGEND_MARGIN_IN
    if needed > height:
        fig.set_size_inches(width, needed)
