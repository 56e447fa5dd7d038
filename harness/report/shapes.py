"""`reports/shapes.md`: the shape-only models (random weights at real models' shapes) side by side."""
from __future__ import annotations

from pathlib import Path

from harness.layout import BENCH_FILE
from harness.report.coverage import gap_lines
from harness.report.format import run_link, table
from harness.report.plotting import DENSE_LINE, MARKERS, PlotSet, by_recipe, draw, legend, sparsity_axis
from harness.report.resources import RESOURCE_COLUMNS, RESOURCE_NOTE, resource_cells
from harness.report.runs import ModelRuns, Run
from harness.report.speed import (HEADLINE, SPEED_COLUMNS, benched, ideal_speedup, scenarios, sorted_scenarios,
                                  speed_cells)
from harness.rundir import level_name, safe_name

SHAPES_REPORT = "shapes"


def render_shapes(all_models: list[ModelRuns], plots: PlotSet) -> str:
    """`reports/shapes.md`: speed and memory of shape-only models side by side."""
    lines = ["# Full-size shapes: speed and memory (shape-only, random weights)", "",
             "Random weights at the published models' shapes: speed, size and memory are real, accuracy is not "
             "measured. Per-model details: " + ", ".join(f"[{m.name}]({safe_name(m.model)}.md)" for m in all_models)
             + ".", ""]
    measured = [(models, benched(models)) for models in all_models]
    rows = [[models.name, run.recipe, level_name(run.level), *cells, run_link(run)]
            for models, runs in measured for run in runs for scenario in scenarios(runs)
            if (cells := speed_cells(run, scenario))]
    lines += ["## Speedup and efficiency vs the FLOP-ideal", ""]
    if rows:
        path = plots.path("speedup")
        plot_shapes(measured, path)
        lines += [f"Each engine against its own dense run (level 0); headline = {HEADLINE}; efficiency = "
                  "measured / FLOP-ideal.", "", plots.image(path, "speedup of each shape model"), ""]
        lines += table(["model", "recipe", "level %", *SPEED_COLUMNS, "run directory"], rows)
    else:
        lines += [f"Missing: no shape model has `{BENCH_FILE}` yet; run `make bench-shapes`.", ""]
    lines += ["## Peak memory per stage", "", RESOURCE_NOTE, ""]
    rows = [[models.name, run.recipe, level_name(run.level), *resource_cells(run), run_link(run)]
            for models in all_models for run in models.runs if run.manifest]
    lines += table(["model", "recipe", "level %", *RESOURCE_COLUMNS, "run directory"], rows)
    found = [line for models in all_models for line in gap_lines(models, prefix=f"{models.name} ")]
    if found:
        lines += ["## Gaps", "", *found, ""]
    return "\n".join(lines).rstrip() + "\n"


def plot_shapes(measured: list[tuple[ModelRuns, list[Run]]], path: Path) -> None:
    """Headline speedup (solid) and FLOP-ideal (dotted) of every shape model and recipe, one panel per scenario."""
    from harness import plots

    names = sorted_scenarios({s for _, runs in measured for s in scenarios(runs)})
    recipes = sorted({run.recipe for _, runs in measured for run in runs})
    markers = {recipe: {"marker": MARKERS[i % len(MARKERS)], "linestyle": "none"} for i, recipe in enumerate(recipes)}
    colors = {models.name: f"C{i}" for i, (models, _) in enumerate(measured)}
    with plots.figure(path, panels=len(names), panel_width=7.0) as (fig, axes):
        for ax, scenario in zip(axes, names):
            for models, runs in measured:
                points = [r for r in runs if scenario in r.bench.speedups]
                for recipe, recipe_runs in by_recipe(points).items():
                    style = {"color": colors[models.name], "marker": markers[recipe]["marker"]}
                    draw(ax, recipe_runs, lambda r: r.bench.speedups[scenario].headline, **style)
                    draw(ax, recipe_runs, lambda r: ideal_speedup(r, scenario), linestyle=":", **style)
            ax.axhline(1, **DENSE_LINE)
            ax.set_ylim(bottom=0)
            ax.set(title=f"{scenario}: {HEADLINE}", ylabel="speedup (× vs dense, median latency)")
            sparsity_axis(ax)
            legend(ax, colors, markers, {"measured": {"color": "black"},
                                         "FLOP-ideal": {"color": "black", "linestyle": ":"},
                                         "dense baseline (1×)": DENSE_LINE})
        fig.suptitle("shape-only models (random weights): speedup vs sparsity")
