"""Challenges, from the measured curves: where accuracy collapses, where speedup stops tracking sparsity,
what caps the speedup (Amdahl's law) and what the sparse format costs per weight.

The thresholds below are the judgements' defaults (`report --collapse-percent`, `--efficiency-floor`).
"""
from __future__ import annotations

from dataclasses import dataclass

from harness.layout import BENCH_FILE, EVAL_FILE
from harness.recipes import variant_name, variant_params
from harness.report.accuracy import accuracy_points, benchmark_directions, dense_value, higher_is_better
from harness.report.format import number, percent
from harness.report.runs import ModelRuns, Run, fp32_recipe
from harness.report.size import size
from harness.report.speed import HEADLINE, PLOTTED_ENGINES, SPEED_ENGINES, benched, ideal_speedup, scenarios, speedup
from harness.rundir import level_name

COLLAPSE_PERCENT = 10.0  # accuracy: a metric worse than dense by more than this (relative) has collapsed
EFFICIENCY_FLOOR = 0.5  # speed: below this share of the FLOP-ideal, speedup no longer tracks sparsity
DENSE_KERNEL_ENGINES = ("onnxruntime", "pytorch")  # engines that multiply zeros like any value
QUANTIZED_HEAD = ("fp32_head", "none")  # the INT8 recipes' variant that quantizes the LM head too (recipes/*/int8.yaml)


@dataclass(frozen=True)
class Thresholds:
    collapse_percent: float = COLLAPSE_PERCENT
    efficiency_floor: float = EFFICIENCY_FLOOR


def relative_change(value: float, dense: float) -> float | None:
    return None if dense == 0 else 100 * (value - dense) / abs(dense)


def collapse(entries: list[tuple[Run, float]], dense: float, better: bool, threshold: float) -> str | None:
    """The first level whose value is more than `threshold` % worse than dense, and the last level that held;
    None without a pruned level (a recipe's level 0 is the dense model, or its domain-adaptation control, which
    the recovery section compares with dense)."""
    entries = [(run, value) for run, value in entries if run.level > 0]
    if not entries:
        return None
    held = None
    for run, value in sorted(entries, key=lambda e: e[0].level):
        change = relative_change(value, dense)
        if change is None:
            return "the dense baseline is 0, so a relative change is undefined; not judged."
        worse = -change if better else change
        if worse > threshold:
            kept = f"; holds up to {level_name(held.level)} %" if held else ""
            return (f"collapses at {level_name(run.level)} % ({number(value)} vs dense {number(dense)}, "
                    f"{change:+.1f} %){kept}.")
        held = run
    return f"within {number(threshold)} % of dense up to the highest level measured ({level_name(held.level)} %)."


def tracking(runs: list[Run], scenario: str, engine: str, floor: float) -> str:
    """An engine's best speedup, and the first level whose efficiency (measured / FLOP-ideal) falls below `floor`."""
    entries = [(run, run.bench.speedups[scenario]) for run in sorted(runs, key=lambda r: r.level)]
    measured = [(run, speedup(e, engine), e.efficiency.get(engine)) for run, e in entries]
    measured = [(run, s, eff) for run, s, eff in measured if s is not None and eff is not None]
    if not measured:
        return "not measured (engine unavailable)."
    best = max(measured, key=lambda m: m[1])
    summary = f"best {number(best[1])}× at {level_name(best[0].level)} %"
    below = next(((run, s, eff) for run, s, eff in measured if eff < floor), None)
    if below is None:
        return f"{summary}; efficiency stays at or above {number(floor)} up to {level_name(measured[-1][0].level)} %."
    run, speed, efficiency = below
    return (f"{summary}; stops tracking at {level_name(run.level)} % ({number(speed)}× of an ideal "
            f"{number(ideal_speedup(run, scenario))}×, efficiency {number(efficiency)}).")


def amdahl(run: Run, scenario: str) -> str | None:
    """Why the FLOP-ideal speedup has a ceiling: the share of the work pruning cannot shrink (None: no ceiling)."""
    ideal = run.bench.flop_ideal.get(scenario)
    if ideal is None or ideal.max_speedup is None:
        return None
    return (f"at {level_name(run.level)} % the pruned weights carry {percent(ideal.prunable_share)} % of the dense "
            f"multiply-accumulates; the rest (dense weights such as the LM head and unpruned layers: "
            f"{percent(ideal.other_linear_share)} %, attention matmuls: {percent(ideal.other_matmul_share)} %) does "
            f"not shrink, so even at 100 % sparsity the FLOP-ideal speedup is at most {number(ideal.max_speedup)}× "
            f"(here {number(ideal.speedup)}×).")


def accuracy_challenges(models: ModelRuns, threshold: float) -> list[str]:
    points = accuracy_points(models)
    directions = benchmark_directions()
    lines = []
    for benchmark, metrics in points.items():
        for metric, series in metrics.items():
            better = higher_is_better(directions, benchmark, metric)
            dense = dense_value(series)
            if better is None or dense is None:
                lines.append(f"- {benchmark} {metric}: no dense baseline or unknown direction; not judged.")
                continue
            for recipe, entries in series.items():
                values = [(run, entry.value) for run, entry in entries]
                judged = collapse(values, dense[1], better, threshold)
                if judged:
                    lines.append(f"- {benchmark} {metric}, `{recipe}`: {judged}")
                lines += quantization_cost(f"{benchmark} {metric}", recipe, values, series)
    if not lines:
        return [f"- Accuracy: not measured yet (no `{EVAL_FILE}`)."]
    return [f"**Where accuracy collapses**: the first level whose metric is more than {number(threshold)} % "
            f"worse than the dense baseline (relative).", "", *lines]


def quantization_cost(metric: str, recipe: str, values: list[tuple[Run, float]], series: dict) -> list[str]:
    """A composed INT8 recipe's metric against its FP32 pruning recipe's at the same level: what quantizing costs."""
    fp32 = fp32_recipe(recipe)
    fp32_values = {run.level: entry.value for run, entry in series.get(fp32, [])} if fp32 not in (recipe, None) else {}
    return [f"- {metric}, `{recipe}` at {level_name(run.level)} %: INT8 {number(value)} vs FP32 "
            f"{number(fp32_values[run.level])} (`{fp32}`), {relative_change(value, fp32_values[run.level]):+.1f} %."
            for run, value in sorted(values, key=lambda item: item[0].level)
            if run.level in fp32_values and fp32_values[run.level] != 0]


def speed_challenges(models: ModelRuns, floor: float) -> list[str]:
    runs = benched(models)
    if not runs:
        return [f"- Speed: not measured yet (no `{BENCH_FILE}`)."]
    lines = [f"**Where speedup stops tracking sparsity**: the first level where an engine's efficiency "
             f"(measured speedup / FLOP-ideal) falls below {number(floor)}.", ""]
    for scenario in scenarios(runs):
        for recipe in models.recipes:
            pruned = [r for r in runs if r.recipe == recipe and scenario in r.bench.speedups and r.level > 0]
            if not pruned:
                continue
            for engine in (*PLOTTED_ENGINES, "headline"):
                label = HEADLINE if engine == "headline" else SPEED_ENGINES[engine]
                lines.append(f"- {scenario}, `{recipe}`, {label}: {tracking(pruned, scenario, engine, floor)}")
            ceiling = amdahl(max(pruned, key=lambda r: r.level), scenario)
            if ceiling:
                lines.append(f"- {scenario}, `{recipe}`, Amdahl's law: {ceiling}")
        lines += quantized_head(runs, scenario)
    return lines


def quantized_head(runs: list[Run], scenario: str) -> list[str]:
    """What quantizing the LM head as well (`fp32_head=none`) changes in the headline speedup, against the same
    recipe with the head FP32 at the same level: how much of the cap the dense head puts on the speedup it lifts."""
    by_key = {(run.recipe, run.level): run for run in runs}
    lines = []
    for run in runs:
        base, params = variant_params(run.recipe)
        key, value = QUANTIZED_HEAD
        if params.pop(key, None) != value:
            continue
        other = by_key.get((variant_name(base, params), run.level))
        if other is None or scenario not in run.bench.speedups or scenario not in other.bench.speedups:
            continue
        quantized, kept = (speedup(r.bench.speedups[scenario], "headline") for r in (run, other))
        if quantized is None or kept is None:  # DeepSparse did not run one of them
            continue
        lines.append(f"- {scenario}, `{run.recipe}` at {level_name(run.level)} %: with the LM head in INT8 too, "
                     f"{HEADLINE} is {number(quantized)}× against {number(kept)}× with the head FP32 (`{other.recipe}`).")
    return lines


def dense_engine_range(models: ModelRuns) -> str:
    """`(here ONNX Runtime a-b×, ...)`: the spread of the dense-kernel engines' speedups over pruned levels."""
    spreads = []
    for engine in DENSE_KERNEL_ENGINES:
        values = [value for run in benched(models) if run.level > 0 for entry in run.bench.speedups.values()
                  if (value := speedup(entry, engine)) is not None]
        if values:
            spreads.append(f"{SPEED_ENGINES[engine]} {number(min(values))}–{number(max(values))}×")
    return f" (measured here over the pruned levels: {', '.join(spreads)})" if spreads else ""


def size_challenges(models: ModelRuns) -> list[str]:
    runs = models.with_output("bench")
    lines = []
    for recipe in models.recipes:
        recipe_runs = [r for r in runs if r.recipe == recipe]
        if not recipe_runs:
            continue
        top = max(recipe_runs, key=lambda r: r.level)
        lines.append(f"- Size, `{recipe}` at {level_name(top.level)} %: sparse-bitmask "
                     f"{number(size(top, 'sparse_bitmask').bits_per_weight)} bits per weight vs "
                     f"{number(size(top, 'checkpoint').bits_per_weight)} dense and "
                     f"{number(size(top, 'checkpoint_gzip').bits_per_weight)} gzip-compressed (the format stores "
                     f"32 bits per non-zero weight plus a one-bit mask per weight: about 1 + 32 × (1 − sparsity) "
                     f"bits).")
    return lines


def section_challenges(models: ModelRuns, thresholds: Thresholds) -> list[str]:
    lines = []
    if not models.shape_only:
        lines += [*accuracy_challenges(models, thresholds.collapse_percent), ""]
    lines += [*speed_challenges(models, thresholds.efficiency_floor), ""]
    if benched(models):
        lines += ["Why speedup lags sparsity: only the pruned matrix multiplications can shrink (Amdahl's law "
                  "above), and a sparse kernel does not reach the FLOP count either — it must decode which weights "
                  "are present, loses the regular memory access and vector width of dense kernels, and at small "
                  "batch is bound by memory traffic rather than arithmetic. ONNX Runtime and PyTorch multiply the "
                  f"zeros like any value, so their speedups are noise around 1×{dense_engine_range(models)}.", ""]
    size_lines = size_challenges(models)
    if size_lines:
        lines += [*size_lines, ""]
    return lines
