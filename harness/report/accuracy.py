"""Accuracy vs sparsity: each benchmark's metrics per recipe and level, as a plot and a table."""
from __future__ import annotations

from pathlib import Path

from harness.errors import HarnessError
from harness.layout import EVAL_FILE, BenchmarkResult, Metric
from harness.report.format import number, run_link, table
from harness.report.plotting import DENSE_LINE, PlotSet, draw, legend, recipe_styles, sparsity_axis
from harness.report.runs import ModelRuns, Run
from harness.rundir import level_name

LOG_SCALE_METRICS = ("perplexity",)  # metrics that explode when a model collapses

Series = dict[str, list[tuple[Run, Metric]]]  # recipe -> (run, its value of one metric), in level order


def benchmark_directions() -> dict[str, set]:
    """benchmark -> metric names where higher is better (from evals/benchmarks.yaml)."""
    from harness.evaluate import benchmark_registry

    try:
        return {name: set(entry.get("higher_is_better", [])) for name, entry in benchmark_registry().items()}
    except HarnessError:
        return {}


def higher_is_better(directions: dict, benchmark: str, metric: str) -> bool | None:
    """None when the benchmark is unknown; `en-fr/bleu` counts as `bleu`."""
    if benchmark not in directions:
        return None
    return metric.rpartition("/")[2] in directions[benchmark]


def accuracy_points(models: ModelRuns) -> dict[str, dict[str, Series]]:
    """{benchmark: {metric: {recipe: [(run, metric)]}}} over the finished benchmarks."""
    points: dict = {}
    for run in models.with_output("eval"):
        for benchmark, result in sorted(run.evaluation.benchmarks.items()):
            if result.status != "done":
                continue
            for metric, entry in (result.metrics or {}).items():
                points.setdefault(benchmark, {}).setdefault(metric, {}).setdefault(run.recipe, []).append((run, entry))
    return points


def dense_value(series: Series) -> tuple[Run, float] | None:
    """The level-0 (dense baseline) value, from the first recipe that has one; an untrained one first (a
    recipe's level 0 with `control` was trained like its pruned levels)."""
    dense = sorted(((run.recovery is not None, recipe) for recipe in series for run, _ in series[recipe] if run.level == 0))
    for _, recipe in dense:
        for run, entry in series[recipe]:
            if run.level == 0:
                return run, entry.value
    return None


def plot_accuracy(models: ModelRuns, benchmark: str, metrics: dict[str, Series], directions: dict, path: Path) -> None:
    """One panel per metric of a benchmark: a line per recipe, the dense baseline dashed and starred."""
    from harness import plots

    styles = {recipe: {**style, "color": f"C{i}"}
              for i, (recipe, style) in enumerate(recipe_styles(models.recipes).items())}
    with plots.figure(path, panels=len(metrics), panel_width=6.0) as (fig, axes):
        for ax, (metric, series) in zip(axes, metrics.items()):
            for recipe, points in series.items():
                values = {id(run): entry.value for run, entry in points}
                draw(ax, [run for run, _ in points], lambda r: values[id(r)], **styles[recipe])
            dense = dense_value(series)
            if dense:
                ax.axhline(dense[1], **DENSE_LINE)
                ax.plot([dense[0].x], [dense[1]], marker="*", markersize=12, color="black", linestyle="none")
            better = higher_is_better(directions, benchmark, metric)
            direction = "" if better is None else " (higher is better)" if better else " (lower is better)"
            if any(word in metric for word in LOG_SCALE_METRICS):
                ax.set_yscale("log")
            ax.set(title=f"{benchmark}: {metric}", ylabel=f"{metric}{direction}")
            sparsity_axis(ax)
            legend(ax, {}, styles, {"dense baseline (level 0)": {**DENSE_LINE, "marker": "*", "color": "black"}})
        fig.suptitle(f"{models.name}: accuracy vs sparsity (PyTorch)")


def engine_check(result: BenchmarkResult, metric: str) -> str:
    """What the deployed-engine check of a benchmark says about one metric, as stored in the eval record."""
    engine = result.deepsparse
    if engine is None:
        return "–"
    if engine.difference is not None:
        return f"{engine.runtime} − PyTorch {number(engine.difference.get(metric))}"
    if engine.agreement is not None:
        return f"{engine.runtime} agreement {number(engine.agreement)} on {number(engine.sample)}"
    if engine.mean_cosine_vs_pytorch is not None:
        return f"{engine.runtime} cosine {number(engine.mean_cosine_vs_pytorch)} on {number(engine.sample)}"
    return "–"


def section_accuracy(models: ModelRuns, plots: PlotSet) -> list[str]:
    if models.shape_only:
        return ["Not measured: this is a shape-only model with random weights, so accuracy means nothing.", ""]
    points = accuracy_points(models)
    if not points:
        return [f"Missing: no run has a finished `{EVAL_FILE}`; run `make sweep MODEL={models.name} "
                 f"STAGES=eval` (or `make eval ...` per run).", ""]
    directions = benchmark_directions()
    lines = ["PyTorch metrics on each model's paper benchmarks; the dashed line and star mark the dense "
             f"baseline (level 0). Δ is the difference to level 0 as recorded in `{EVAL_FILE}`; the engine "
             "column is the check of the exported model on the deployed runtime.", ""]
    for benchmark, metrics in points.items():
        path = plots.path(f"accuracy-{benchmark}")
        plot_accuracy(models, benchmark, metrics, directions, path)
        lines += [f"### {benchmark}", "", plots.image(path, f"{benchmark} vs sparsity"), ""]
        rows = []
        for metric, series in metrics.items():
            for recipe, entries in series.items():
                for run, entry in entries:
                    result = run.evaluation.benchmarks[benchmark]
                    rows.append([run.recipe, level_name(run.level), number(run.x), metric, number(entry.value),
                                 number(entry.stderr), number((result.delta_vs_level0 or {}).get(metric)),
                                 number(result.examples), number(result.limit),
                                 engine_check(result, metric), run_link(run)])
        lines += table(["recipe", "level %", "achieved %", "metric", "value", "stderr", "Δ vs level 0",
                        "examples", "limit", "deployed engine", "run directory"], rows)
    skipped = sorted({(name, result.reason or "") for run in models.with_output("eval")
                      for name, result in run.evaluation.benchmarks.items() if result.status != "done"})
    if skipped:
        lines += ["Benchmarks skipped by the eval stage:", "", *(f"- {name}: {reason}" for name, reason in skipped), ""]
    return lines
