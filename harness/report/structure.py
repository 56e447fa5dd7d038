"""Sparsity structure: how much of each run is exactly or nearly zero, over all weights and per layer."""
from __future__ import annotations

import math
from pathlib import Path

from harness.layout import ANALYSIS_SUBDIR, STAGE_OUTPUTS, SUMMARY_MD
from harness.report.format import number, percent, relative_to_reports, run_link, shape_note, table
from harness.report.plotting import PlotSet, by_recipe, draw, legend, recipe_styles, sparsity_axis, wrapped
from harness.report.runs import ModelRuns, Run
from harness.rundir import level_name


def measures(runs: list[Run]) -> dict[str, str]:
    """Near-zero measure key -> label, in the order the analysis lists them (union over runs)."""
    found: dict[str, str] = {}
    for run in runs:
        found.update(run.structure.get("measures", {}))
    return found


def plot_structure(models: ModelRuns, runs: list[Run], path: Path) -> None:
    """Near-zero fractions of all weights vs sparsity, then per recipe the fractions by layer at each level."""
    from harness import plots

    styles = recipe_styles(models.recipes)
    labels = measures(runs)
    grouped = by_recipe(runs)
    with plots.figure(path, panels=1 + len(grouped), panel_width=6.0) as (fig, axes):
        overall_ax, layer_axes = axes[0], axes[1:]
        colors = {label: f"C{i}" for i, label in enumerate(labels.values())}
        for recipe, recipe_runs in grouped.items():
            for key, label in labels.items():
                draw(overall_ax, recipe_runs,
                     lambda r, key=key: 100 * r.structure["overall"]["all"]["fractions"].get(key, math.nan),
                     color=colors[label], **styles[recipe])
        overall_ax.set(title="all weights", ylabel="% of all weights", ylim=(0, 100))
        sparsity_axis(overall_ax)
        legend(overall_ax, colors, styles)
        for ax, (recipe, recipe_runs) in zip(layer_axes, grouped.items()):
            level_colors = {}
            for i, run in enumerate(recipe_runs):
                structure = run.structure
                layers = list(structure.get("by_layer", {}))
                level_colors[f"level {level_name(run.level)} %"] = f"C{i}"
                for key, linestyle in (("zero", "-"), (structure.get("heatmap_measure"), "--")):
                    if key in structure.get("measures", {}):
                        ax.plot(range(len(layers)), [100 * structure["by_layer"][layer]["fractions"][key]
                                                     for layer in layers],
                                color=f"C{i}", linestyle=linestyle, marker="o", markersize=3)
                ax.set_xticks(range(len(layers)), layers, rotation=90 if len(layers) > 12 else 0)
            near = recipe_runs[0].structure.get("heatmap_measure")
            ax.set(title=wrapped(f"by layer, {recipe}", 60), xlabel="layer (`other` = outside the blocks)",
                   ylabel="% of the layer's weights", ylim=(0, 100))
            legend(ax, level_colors, {labels.get("zero", "zero"): {"linestyle": "-"},
                                      labels.get(near, str(near)): {"linestyle": "--"}})
        fig.suptitle(f"{models.name}{shape_note(models)}: near-zero weights vs sparsity, overall and by layer")


def section_structure(models: ModelRuns, plots: PlotSet) -> list[str]:
    runs = [run for run in models.with_output("analyze") if run.structure.get("overall")]
    if not runs:
        return [f"Missing: no run has `{STAGE_OUTPUTS['analyze']}`; run `make sweep MODEL={models.name} "
                 f"STAGES=analyze` (or `make analyze MODEL=<run dir>`).", ""]
    path = plots.path("structure")
    plot_structure(models, runs, path)
    labels = measures(runs)
    lines = ["How much of each run is exactly zero or near zero (|w| under absolute thresholds, or under a "
             "multiple of each tensor's standard deviation), over all weights and per transformer block. "
             "Each run's own analysis (per module type, heatmap, histograms) is linked in the last column.", "",
             plots.image(path, "near-zero fractions"), ""]
    rows = []
    for run in runs:
        overall = run.structure["overall"]
        summary = relative_to_reports(run.path / ANALYSIS_SUBDIR / SUMMARY_MD)
        for group in ("all", "prunable"):
            if group in overall:
                fractions = overall[group]["fractions"]
                rows.append([run.recipe, level_name(run.level), group, number(overall[group].get("params")),
                             *(percent(fractions.get(key)) for key in labels), f"[summary]({summary})",
                             run_link(run)])
    lines += ["Overall (% of weights):", ""]
    lines += table(["recipe", "level %", "group", "weights", *labels.values(), "analysis", "run directory"], rows)
    rows = []
    for run in runs:
        for layer, entry in run.structure.get("by_layer", {}).items():
            prunable = entry.get("prunable", {}).get("fractions", {})
            rows.append([run.recipe, level_name(run.level), layer, number(entry.get("params")),
                         *(percent(entry["fractions"].get(key)) for key in labels), percent(prunable.get("zero")),
                         run_link(run)])
    lines += ["By layer (% of the layer's weights; last: exact zeros among its prunable weights):", ""]
    lines += table(["recipe", "level %", "layer", "weights", *labels.values(), "zero in prunable",
                    "run directory"], rows)
    return lines
