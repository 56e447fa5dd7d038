"""Per-layer allocation: method x allocation x level against the model's first metric, and the per-layer
levels each non-uniform run reached (from its `sparsity.json`)."""
from __future__ import annotations

from harness.layout import SPARSITY_FILE
from harness.recipes import VARIANT_MARK
from harness.report.format import number, run_link, table
from harness.report.runs import ModelRuns, Run
from harness.rundir import level_name


def _allocation(run: Run) -> str | None:
    return (run.manifest.get("params") or {}).get("allocation")


def _first_metric(models: ModelRuns, run: Run) -> tuple[str, str, str]:
    """(metric, its value, the examples limit) of the model's first benchmark, or dashes."""
    benchmarks = models.spec.get("benchmarks") or []
    result = run.evaluation.benchmarks.get(benchmarks[0]) if run.evaluation and benchmarks else None
    if not result or result.status != "done" or not result.metrics:
        return (number(None),) * 3
    metric, entry = next(iter(result.metrics.items()))
    return f"{benchmarks[0]} {metric}", number(entry.value), number(result.limit) if result.limit else "all"


def section_allocation(models: ModelRuns) -> list[str]:
    runs = [run for run in models.runs if run.manifest and (_allocation(run) or run.level == 0)]
    if not any(_allocation(run) for run in runs):
        return ["No run of a recipe with an `allocation` parameter (e.g. `sparseml/oneshot-wanda@allocation=owl`).", ""]
    rows = []
    for run in sorted(runs, key=lambda r: (r.level, r.recipe.partition(VARIANT_MARK)[0], r.recipe)):
        metric, value, limit = _first_metric(models, run)
        layers = run.sparsity.per_layer_percent if run.sparsity else {}
        rows.append([run.recipe.partition(VARIANT_MARK)[0], _allocation(run) or "dense", level_name(run.level),
                     number(run.sparsity.achieved_percent) if run.sparsity else number(None),
                     f"{number(min(layers.values()))}–{number(max(layers.values()))}" if layers else number(None),
                     metric, value, limit, number(run.stage_record("prune").get("wall_time_s")), run_link(run)])
    lines = ["Each method at each level with the per-layer levels chosen by its `allocation` (`harness.allocation`: "
             "uniform, OWL's outlier-weighted levels, or levels from `make sensitivity`), against the model's "
             f"first metric. Per-layer levels are measured from the saved weights (`{SPARSITY_FILE}`); compare "
             "metrics only between rows with the same examples limit.", ""]
    lines += table(["method", "allocation", "level %", "achieved %", "per-layer range %", "metric", "value",
                    "examples limit", "prune s", "run directory"], rows)
    uneven = [run for run in runs if _allocation(run) not in (None, "uniform") and run.sparsity]
    if uneven:
        lines += ["Per-layer levels (percent of each transformer block's prunable weights):", ""]
        blocks = sorted({b for run in uneven for b in run.sparsity.per_layer_percent}, key=_block_order)
        lines += table(["recipe", "level %", *blocks],
                       [[run.recipe, level_name(run.level),
                         *(number(run.sparsity.per_layer_percent.get(b)) for b in blocks)] for run in uneven])
    return lines


def _block_order(block: str) -> tuple:
    stack, _, index = block.rpartition(".")
    return (stack, int(index)) if index.isdigit() else (stack, 0)
