"""The analysis files besides structure.json: one CSV row per tensor, a markdown summary the report
links to, and three plots (log10|w| histograms, near-zero share by layer, layer x module-type heatmap)."""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np

from harness import plots
from harness.layout import BY_LAYER_PNG, HEATMAP_PNG, HISTOGRAM_PNG, STRUCTURE_CSV, STRUCTURE_JSON, SUMMARY_MD
from harness.rundir import write_atomic, write_json
from harness.structure import MODULE_TYPES, OUTSIDE_BLOCKS, ZERO


def write_outputs(structure: dict, out_dir: Path) -> None:
    write_json(out_dir / STRUCTURE_JSON, structure)
    write_atomic(out_dir / STRUCTURE_CSV, tensors_csv(structure))
    write_atomic(out_dir / SUMMARY_MD, summary_markdown(structure))
    plot_histograms(structure, out_dir / HISTOGRAM_PNG)
    plot_by_layer(structure, out_dir / BY_LAYER_PNG)
    plot_heatmap(structure, out_dir / HEATMAP_PNG)


def tensors_csv(structure: dict) -> str:
    """One row per tensor: where it sits, its size, every near-zero fraction and |w| statistics."""
    rows = []
    for tensor in structure["tensors"]:
        rows.append({
            **{key: tensor[key] for key in ("name", "layer", "section", "module_type", "prunable", "dtype")},
            "shape": "x".join(map(str, tensor["shape"])), "params": tensor["params"], "zeros": tensor["counts"][ZERO],
            **{f"frac_{key}": value for key, value in tensor["fractions"].items()},
            "mean_abs": tensor["mean_abs"], "std": tensor["std"], "max_abs": tensor["max_abs"],
            **{f"abs_{name}": value for name, value in tensor["percentiles_abs"].items()},
        })
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _percent(fraction: float) -> str:
    return f"{100 * fraction:.3g}%"


def _markdown_table(groups: dict, measures: dict, extra: dict | None = None, first: str = "group") -> list[str]:
    """Rows of `groups` (name -> summary): weights, every measure in percent, |w| statistics, `extra` columns."""
    extra = extra or {}
    header = [first, "weights", *measures.values(), "mean |w|", "median |w|", *extra]
    lines = ["| " + " | ".join(cell.replace("|", "\\|") for cell in header) + " |", "|" + "---|" * len(header)]
    for name, group in groups.items():
        median = group.get("percentiles_abs", {}).get("p50")
        cells = [name, f"{group['params']:,}", *(_percent(group["fractions"][key]) for key in measures),
                 f"{group['mean_abs']:.3g}", "" if median is None else f"{median:.3g}",
                 *(compute(group) for compute in extra.values())]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def summary_markdown(structure: dict) -> str:
    """Short markdown: overall near-zero fractions, then by section, module type and layer, and the plots."""
    measures, overall, run = structure["measures"], structure["overall"], structure["run"]
    prunable = overall.get("prunable")
    lines = [f"### Sparsity structure of {structure['model']}", ""]
    lines.append(
        f"{overall['all']['params']:,} weights in {overall['all']['tensors']} tensors"
        + (f", {prunable['params']:,} of them prunable ({prunable['tensors']} tensors)" if prunable else "")
        + f"; read from `{structure['weights']}` in {structure['wall_time_s']} s, peak memory "
        f"{structure['peak_rss_mb']:.0f} MB." + (f" Not counted: {', '.join(structure['skipped_tensors'])}."
                                                 if structure["skipped_tensors"] else ""))
    if run:
        achieved = run["achieved_fraction"]
        lines.append(f"Run `{run['recipe']}` at level {run['level']:g}%: target {_percent(run['target_fraction'])} "
                     f"of prunable weights, achieved {_percent(achieved) if achieved is not None else 'n/a'}.")
    lines += ["", *_markdown_table(overall, measures, first="set"), ""]
    if structure["by_section"]:
        lines += ["By section:", "", *_markdown_table(structure["by_section"], measures, first="section"), ""]
    lines += ["By module type:", "", *_markdown_table(structure["by_module_type"], measures, first="module type"), ""]
    extra = {"std": lambda group: f"{group['std']:.3g}",
             "p99 |w|": lambda group: f"{group['percentiles_abs']['p99']:.3g}"}
    if run:
        extra[f"zeros in prunable (target {_percent(run['target_fraction'])})"] = (
            lambda group: _percent(group["prunable"]["fractions"][ZERO]) if "prunable" in group else "")
    lines += ["By layer (`other` = outside the numbered blocks):", "",
              *_markdown_table(structure["by_layer"], measures, extra, first="layer"), ""]
    lines += [f"![log10 |w| histogram]({HISTOGRAM_PNG})", f"![near-zero fraction by layer]({BY_LAYER_PNG})",
              f"![layer x module type]({HEATMAP_PNG})", ""]
    return "\n".join(lines)


def _coarse_edges(structure: dict) -> np.ndarray:
    spec = structure["histogram"]
    bins = len(structure["overall"]["all"]["log10_abs_counts"])
    return spec["log10_abs_start"] + spec["bin_width"] * np.arange(bins + 1)


def plot_histograms(structure: dict, path: Path) -> None:
    """log10|w| histograms: all and prunable weights (counts), and each module type (share of its weights)."""
    edges = _coarse_edges(structure)
    overall, by_type = structure["overall"], structure["by_module_type"]
    occupied = np.flatnonzero(np.asarray(overall["all"]["log10_abs_counts"]))
    low, high = (edges[occupied[0]], edges[occupied[-1] + 1]) if occupied.size else (edges[0], edges[-1])
    with plots.figure(path, panels=2) as (fig, (counts_ax, types_ax)):
        for name, group in overall.items():
            label = f"{name} weights ({_percent(group['fractions'][ZERO])} exact zeros, not shown)"
            counts_ax.stairs(group["log10_abs_counts"], edges, label=label, fill=name == "all",
                             alpha=0.5 if name == "all" else 1.0, linewidth=1.5)
        for threshold in structure["thresholds"]["absolute"]:
            counts_ax.axvline(math.log10(threshold), color="grey", linestyle=":", linewidth=1)
        counts_ax.set_yscale("log")
        counts_ax.set(title=f"{structure['model']}: magnitude of every weight (dotted: thresholds)",
                      xlabel="log10 |w|", ylabel=f"weights per {structure['histogram']['bin_width']:g}-decade bin",
                      xlim=(low, high))
        counts_ax.legend(loc="upper left")
        for name, group in by_type.items():
            shares = 100 * np.asarray(group["log10_abs_counts"]) / group["params"]
            types_ax.stairs(shares, edges, label=f"{name} ({group['params']:,})")
        types_ax.set(title="by module type (share of the type's weights)", xlabel="log10 |w|",
                     ylabel="% of the type's weights per bin", xlim=(low, high))
        types_ax.legend(loc="upper left", ncol=2)


def plot_by_layer(structure: dict, path: Path) -> None:
    """Near-zero fraction of each layer, one line per threshold; for a run also achieved vs target."""
    layers = [layer for layer in structure["by_layer"] if layer != OUTSIDE_BLOCKS]
    if not layers:  # no numbered blocks: plot the single group
        layers = list(structure["by_layer"])
    positions = np.arange(len(layers))
    run = structure["run"]
    with plots.figure(path, panel_width=max(8.0, 0.3 * len(layers) + 5), height=4.8) as (fig, (ax,)):
        for key, label in structure["measures"].items():
            values = [100 * structure["by_layer"][layer]["fractions"][key] for layer in layers]
            ax.plot(positions, values, marker="o", markersize=3, label=label,
                    linestyle="--" if key.startswith("rel") else "-")
        if run:
            achieved = [100 * structure["by_layer"][layer]["prunable"]["fractions"][ZERO]
                        if "prunable" in structure["by_layer"][layer] else np.nan for layer in layers]
            ax.plot(positions, achieved, color="black", marker="s", linewidth=2,
                    label="achieved: exact zeros in prunable weights")
            ax.axhline(100 * run["target_fraction"], color="red", linestyle=":",
                       label=f"target {_percent(run['target_fraction'])}")
        ax.set_xticks(positions, layers, rotation=45, ha="right")
        ax.set(title=f"{structure['model']}: near-zero weights by layer", xlabel="layer (transformer block)",
               ylabel="% of the layer's weights", ylim=(0, 100))
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5))


def plot_heatmap(structure: dict, path: Path) -> None:
    """Layer x module type: exact-zero share and near-zero share at the heatmap threshold.

    The longer of the two lists runs down the vertical axis, so the two panels stay side by side and readable.
    """
    cells = structure["by_layer_and_type"]
    layers = list(cells)
    type_rank = {label: rank for rank, (_, label) in enumerate(MODULE_TYPES)}
    columns = sorted({column for row in cells.values() for column in row},
                     key=lambda c: (type_rank[c.removesuffix(" (cross)")], c))
    layers_down = len(layers) >= len(columns)
    rows, cols = (layers, columns) if layers_down else (columns, layers)
    labels = ("layer (`other` = outside blocks)", "module type")
    row_label, col_label = labels if layers_down else labels[::-1]
    annotate = len(rows) * len(cols) <= 250
    with plots.figure(path, panels=2, panel_width=0.5 * len(cols) + 3.5, height=0.3 * len(rows) + 2.5) as (fig, axes):
        for ax, key in zip(axes, [ZERO, structure["heatmap_measure"]]):
            grid = np.full((len(rows), len(cols)), np.nan)
            for i, row in enumerate(rows):
                for j, col in enumerate(cols):
                    layer, column = (row, col) if layers_down else (col, row)
                    if column in cells[layer]:
                        grid[i, j] = 100 * cells[layer][column]["fractions"][key]
            image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap="viridis", vmin=0, vmax=100)
            if annotate:
                for (i, j), value in np.ndenumerate(grid):
                    if not np.isnan(value):
                        ax.text(j, i, f"{value:.0f}" if value >= 10 or value == 0 else f"{value:.1f}",
                                ha="center", va="center", fontsize=6, color="white" if value < 60 else "black")
            ax.set_xticks(range(len(cols)), cols, rotation=60, ha="right")
            ax.set_yticks(range(len(rows)), rows)
            ax.grid(False)
            ax.set(title=f"{structure['measures'][key]} (% of the cell's weights)", xlabel=col_label, ylabel=row_label)
            fig.colorbar(image, ax=ax, label="% of weights")
        fig.suptitle(f"{structure['model']}: layer x module type (blank: no such weights)")
