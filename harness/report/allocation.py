"""Per-layer allocation: method x allocation x level against the model's first metric (one grid, then one
row per run), and the per-layer levels each non-uniform run reached (from its `sparsity.json`)."""
from __future__ import annotations

from harness import allocation
from harness.layout import SPARSITY_FILE
from harness.recipes import VARIANT_MARK, variant_name, variant_params
from harness.report.accuracy import benchmark_directions, higher_is_better
from harness.report.format import number, run_link, table
from harness.report.runs import ModelRuns, Run
from harness.rundir import level_name


def _allocation(run: Run) -> str | None:
    return (run.manifest.get("params") or {}).get("allocation")


def _first_metric(models: ModelRuns, run: Run) -> tuple[str, float, str] | None:
    """(benchmark and metric, its value, the examples limit) of the model's first benchmark, if evaluated."""
    benchmarks = models.spec.get("benchmarks") or []
    result = run.evaluation.benchmarks.get(benchmarks[0]) if run.evaluation and benchmarks else None
    if not result or result.status != "done" or not result.metrics:
        return None
    metric, entry = next(iter(result.metrics.items()))
    return f"{benchmarks[0]} {metric}", entry.value, number(result.limit) if result.limit else "all"


def split_recipe(recipe: str) -> tuple[str, str]:
    """(the method: the recipe with its parameters other than the allocation's, the allocation with its
    parameters): `a/b@allocation=owl,owl_lambda=0.02,samples=32` -> (`a/b@samples=32`, `owl (owl_lambda=0.02)`)."""
    base, params = variant_params(recipe)
    method = {key: value for key, value in params.items() if key not in allocation.PARAMS}
    chosen = {key: value for key, value in params.items() if key in allocation.PARAMS}
    name = chosen.pop("allocation", allocation.DEFAULT)
    details = f" ({', '.join(f'{key}={value}' for key, value in chosen.items())})" if chosen else ""
    return variant_name(base, method), name + details


def grid(models: ModelRuns, runs: list[Run]) -> list[str]:
    """One row per method, allocation and examples limit, one column per level, the best allocation of each
    method at each level in bold; then, per method and level, the best non-uniform allocation against uniform."""
    cells: dict[tuple[str, str, str], dict[float, float]] = {}  # (method, allocation, limit) -> level -> value
    dense: dict[str, float] = {}  # limit -> level-0 value
    metric = None
    for run in runs:
        found = _first_metric(models, run)
        if found:
            metric, value, limit = found
            if run.level == 0:
                dense.setdefault(limit, value)
            else:
                cells.setdefault((*split_recipe(run.recipe), limit), {})[run.level] = value
    if all(name == allocation.DEFAULT for _, name, _ in cells):
        return []  # nothing to compare: the accuracy section has these numbers
    better = higher_is_better(benchmark_directions(), *metric.split(" ", 1))
    pick = max if better else min

    def rivals(method: str, limit: str, level: float) -> dict[str, float]:
        return {name: values[level] for (m, name, lim), values in cells.items() if (m, lim) == (method, limit)
                and level in values}

    def cell(method: str, limit: str, level: float, value: float | None) -> str:
        if value is None:
            return number(None)
        others = rivals(method, limit, level)
        return f"**{number(value)}**" if len(others) > 1 and value == pick(others.values()) else number(value)

    order = sorted(cells, key=lambda key: (key[0], key[2], key[1] != allocation.DEFAULT, key[1]))
    levels = sorted({level for values in cells.values() for level in values})
    direction = "" if better is None else " (higher is better)" if better else " (lower is better)"
    lines = [f"{metric}{direction} by method, allocation and level; the best allocation of each method at each level "
             "in bold; dense: the level-0 value at the same examples limit.", ""]
    lines += table(["method", "allocation", "examples limit", "dense", *(f"{level_name(level)} %" for level in levels)],
                   [[method, name, limit, number(dense.get(limit)),
                     *(cell(method, limit, level, cells[method, name, limit].get(level)) for level in levels)]
                    for method, name, limit in order])
    for method, name, limit in order:
        if name != allocation.DEFAULT:
            continue
        for level, uniform in sorted(cells[method, name, limit].items()):
            others = {other: value for other, value in rivals(method, limit, level).items() if other != name}
            if others:
                winner = pick(others, key=others.get)
                change = f" ({100 * (others[winner] - uniform) / abs(uniform):+.1f} %)" if uniform else ""
                lines.append(f"- `{method}` at {level_name(level)} %: the best non-uniform allocation, {winner}, gives "
                             f"{number(others[winner])} against uniform's {number(uniform)}{change}.")
    return lines + [""]


def section_allocation(models: ModelRuns) -> list[str]:
    runs = [run for run in models.runs if run.manifest and (_allocation(run) or run.level == 0)]
    if not any(_allocation(run) for run in runs):
        return ["No run of a recipe with an `allocation` parameter (e.g. `sparseml/oneshot-wanda@allocation=owl`).", ""]
    rows = []
    for run in sorted(runs, key=lambda r: (r.level, r.recipe.partition(VARIANT_MARK)[0], r.recipe)):
        metric, value, limit = _first_metric(models, run) or (None, None, None)
        layers = run.sparsity.per_layer_percent if run.sparsity else {}
        method, name = split_recipe(run.recipe)
        rows.append([method, "dense" if run.level == 0 else name, level_name(run.level),
                     number(run.sparsity.achieved_percent) if run.sparsity else number(None),
                     f"{number(min(layers.values()))}–{number(max(layers.values()))}" if layers else number(None),
                     number(metric), number(value), number(limit), number(run.stage_record("prune").get("wall_time_s")),
                     run_link(run)])
    lines = ["Each method at each level with the per-layer levels chosen by its `allocation` (`harness.allocation`: "
             "uniform, OWL's outlier-weighted levels, or levels from `make sensitivity`), against the model's "
             f"first metric. Per-layer levels are measured from the saved weights (`{SPARSITY_FILE}`); compare "
             "metrics only between rows with the same examples limit.", ""]
    compared = grid(models, runs)
    lines += [*compared, "Each run:", ""] if compared else []
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
