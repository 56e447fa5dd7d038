"""Speed vs sparsity: each engine's speedup against its own dense run, the FLOP-ideal, the fastest dense engine
at each precision, the latencies, and speed against accuracy."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

from harness.engines import ENGINES
from harness.layout import BENCH_FILE, FastestDense, Speedup
from harness.report.accuracy import LOG_SCALE_METRICS
from harness.report.format import number, run_link, shape_note, table
from harness.report.plotting import DENSE_LINE, PlotSet, by_recipe, draw, legend, recipe_styles, sparsity_axis
from harness.report.runs import ModelRuns, Run
from harness.rundir import level_name
from harness.timing import vector_features

SPEED_ENGINES = {name: engine.label for name, engine in ENGINES.items()}
PLOTTED_ENGINES = ("deepsparse", "onnxruntime")  # the question: DeepSparse vs ONNX Runtime
HEADLINE = "DeepSparse sparse vs ONNX Runtime dense"
PRECISIONS = {"fp32": "FP32", "int8": "INT8"}
SPEED_COLUMNS = ["achieved %", "scenario", "DeepSparse", "ONNX Runtime", "PyTorch", "headline", "FLOP-ideal",
                 "eff. DeepSparse", "eff. ONNX Runtime", "eff. headline",
                 *(f"{column} {label}" for label in PRECISIONS.values()
                   for column in ("fastest dense", "DeepSparse sparse vs fastest"))]
PRECISION_MARKERS = {"fp32": "o", "int8": "^"}


def benched(models: ModelRuns) -> list[Run]:
    """The runs whose bench measured speedups."""
    return [run for run in models.with_output("bench") if run.bench.speedups]


def scenarios(runs: list[Run]) -> list[str]:
    """Bench scenarios (`b<batch>_s<seq>`) across runs, by batch size then sequence length."""
    return sorted_scenarios({s for run in runs for s in run.bench.speedups})


def sorted_scenarios(names: set[str]) -> list[str]:
    """Scenario names by batch size, then sequence length."""
    return sorted(names, key=lambda s: tuple(int(n) for n in re.findall(r"\d+", s)))


def speedup(entry: Speedup, engine: str) -> float | None:
    """One engine's speedup in a scenario, or the headline's (`engine` = "headline")."""
    return entry.headline if engine == "headline" else entry.engines.get(engine)


def ideal_speedup(run: Run, scenario: str) -> float | None:
    ideal = run.bench.flop_ideal.get(scenario)
    return ideal.speedup if ideal else None


def plot_speed(models: ModelRuns, runs: list[Run], scenario_names: list[str], path: Path) -> None:
    from harness import plots

    styles = recipe_styles(models.recipes)
    lines = {"deepsparse": ("DeepSparse vs its own dense", "tab:blue"),
             "onnxruntime": ("ONNX Runtime vs its own dense", "tab:orange"),
             "headline": (HEADLINE, "tab:green"), "ideal": ("FLOP-ideal", "black")}
    with plots.figure(path, panels=len(scenario_names), panel_width=7.5) as (fig, axes):
        for ax, scenario in zip(axes, scenario_names):
            measured = [r for r in runs if scenario in r.bench.speedups]
            for recipe, recipe_runs in by_recipe(measured).items():
                for key, (_, color) in lines.items():
                    value = ((lambda r: ideal_speedup(r, scenario)) if key == "ideal"
                             else (lambda r, key=key: speedup(r.bench.speedups[scenario], key)))
                    draw(ax, recipe_runs, value, color=color, **styles[recipe])
            ax.axhline(1, **DENSE_LINE)
            batch, seq = (re.findall(r"\d+", scenario) + ["?", "?"])[:2]
            ax.set(title=f"batch {batch}, sequence {seq}", ylabel="speedup (× vs dense, median latency)")
            ax.set_ylim(bottom=0)
            sparsity_axis(ax)
            legend(ax, dict(lines.values()), styles, {"dense baseline (1×)": DENSE_LINE})
        fig.suptitle(f"{models.name}{shape_note(models)}: speedup vs sparsity")


def speed_cells(run: Run, scenario: str) -> list[str] | None:
    """The SPEED_COLUMNS of one run and scenario, as its bench recorded them (None without that scenario)."""
    entry = run.bench.speedups.get(scenario)
    if entry is None:
        return None
    fastest = run.bench.fastest_dense.get(scenario, {})  # empty in bench.json files written before it existed
    return [number(run.bench.achieved_percent), scenario,
            *(number(speedup(entry, engine)) for engine in ("deepsparse", "onnxruntime", "pytorch", "headline")),
            number(ideal_speedup(run, scenario)),
            *(number(entry.efficiency.get(engine)) for engine in ("deepsparse", "onnxruntime", "headline")),
            *(cell for precision in PRECISIONS for cell in fastest_cells(fastest.get(precision)))]


def fastest_cells(best: FastestDense | None) -> tuple[str, str]:
    """The fastest dense engine of one precision with its median latency, and DeepSparse sparse vs it."""
    if best is None:
        return "–", "–"
    return f"{SPEED_ENGINES.get(best.engine, best.engine)} ({number(best.median_ms)} ms)", number(best.speedup)


def precision(run: Run, engine: str) -> str:
    """An engine's precision as the run's bench recorded it (older files: FP32, all they timed)."""
    status = run.bench.engines.get(engine)
    return status.precision if status and status.precision else "fp32"


def accuracy_metric(runs: list[Run]) -> tuple[str, str] | None:
    """(benchmark, metric): the first metric of the first finished benchmark in the runs' eval.json."""
    for run in runs:
        for benchmark, result in (run.evaluation.benchmarks if run.evaluation else {}).items():
            if result.status == "done" and result.metrics:
                return benchmark, next(iter(result.metrics))
    return None


def speed_axis(scenario: str) -> tuple[str, Callable]:
    """What a speed-vs-accuracy panel puts on x: latency at batch 1, sequences per second at larger batches."""
    batch, seq = (re.findall(r"\d+", scenario) + ["?", "?"])[:2]
    if batch == "1":
        return f"median latency, batch 1, sequence {seq} (ms; left is faster)", lambda timing: timing.median_ms
    return f"sequences/s, batch {batch}, sequence {seq} (right is faster)", lambda timing: timing.items_per_s


def plot_speed_vs_accuracy(models: ModelRuns, runs: list[Run], scenario_names: list[str], metric: tuple[str, str],
                           path: Path) -> None:
    """One point per run and engine (colour: engine, marker: precision, hollow: the dense run); a thin line
    joins one engine's points of a recipe in level order."""
    from harness import plots

    benchmark, name = metric
    engines = [e for e in ENGINES if any(e in r.bench.results for r in runs)]
    engines += sorted({e for r in runs for e in r.bench.results} - set(engines))
    colors = {engine: f"C{i}" for i, engine in enumerate(engines)}
    styles = recipe_styles(models.recipes)
    shown = list(dict.fromkeys([scenario_names[0], scenario_names[-1]]))
    with plots.figure(path, panels=len(shown), panel_width=6.5) as (fig, axes):
        for ax, scenario in zip(axes, shown):
            label, speed = speed_axis(scenario)
            for recipe, recipe_runs in by_recipe(runs).items():
                for engine in engines:
                    points = [(run, speed(timing), run.evaluation.benchmarks[benchmark].metrics[name].value)
                              for run in recipe_runs if (timing := run.bench.results.get(engine, {}).get(scenario))]
                    if not points:
                        continue
                    ax.plot([x for _, x, _ in points], [y for _, _, y in points], color=colors[engine], linewidth=0.6,
                            linestyle=styles[recipe]["linestyle"])
                    for run, x, y in points:
                        ax.plot([x], [y], linestyle="none", marker=PRECISION_MARKERS.get(precision(run, engine), "o"),
                                color=colors[engine], markerfacecolor="none" if run.level == 0 else colors[engine])
                        ax.annotate(level_name(run.level), (x, y), textcoords="offset points", xytext=(3, 3),
                                    fontsize=6)
            if any(word in name for word in LOG_SCALE_METRICS):
                ax.set_yscale("log")
            ax.set(xlabel=label, ylabel=f"{benchmark}: {name}")
            legend(ax, {SPEED_ENGINES.get(e, e): colors[e] for e in engines},
                   {f"`{recipe}`": {"linestyle": style["linestyle"]} for recipe, style in styles.items()},
                   {**{PRECISIONS[p]: {"marker": m, "linestyle": "none", "color": "grey"}
                       for p, m in PRECISION_MARKERS.items()},
                    "dense run (level 0)": {"marker": "o", "linestyle": "none", "color": "grey",
                                            "markerfacecolor": "none"}})
        fig.suptitle(f"{models.name}{shape_note(models)}: speed vs accuracy (labels: level %)")


def speed_vs_accuracy(models: ModelRuns, runs: list[Run], scenario_names: list[str], plots: PlotSet) -> list[str]:
    """The speed-vs-accuracy plot and its caption (nothing without an evaluated, benched run)."""
    evaluated = [run for run in runs if run.evaluation]
    metric = accuracy_metric(evaluated)
    if metric is None:
        return []
    benchmark, name = metric
    measured = [run for run in evaluated if (result := run.evaluation.benchmarks.get(benchmark))
                and result.status == "done" and name in (result.metrics or {})]
    path = plots.path("speed-vs-accuracy")
    plot_speed_vs_accuracy(models, measured, scenario_names, metric, path)
    return [f"Speed against accuracy, the choice a user makes: one point per run and engine, accuracy = the run's "
            f"{benchmark} {name} as the eval stage measured it. OpenVINO INT8 quantizes the run's FP32 export "
            "itself, so its points show INT8 speed at the FP32 model's accuracy (its own accuracy is not measured "
            "here).", "", plots.image(path, "speed vs accuracy"), ""]


def section_speed(models: ModelRuns, plots: PlotSet) -> list[str]:
    runs = benched(models)
    if not runs:
        return [f"Missing: no run has `{BENCH_FILE}`; run `make sweep MODEL={models.name} STAGES=bench` "
                 f"(or `make bench ...` per run).", ""]
    scenario_names = scenarios(runs)
    path = plots.path("speedup")
    plot_speed(models, runs, scenario_names, path)
    settings, cpu = runs[0].bench.settings, runs[0].bench.cpu
    lines = [f"Median latency of one forward pass (encoder-decoders: encoder + one decoder step) on "
             f"{cpu.get('model', 'this CPU')} ({vector_features(cpu)}) with {number(settings.get('threads'))} threads; "
             "each engine's "
             f"speedup is against its own dense run (level 0), the headline is {HEADLINE}. The FLOP-ideal "
             "counts multiply-accumulates: pruned weights scale with their density, everything else stays dense; "
             "efficiency = measured / ideal.", "", plots.image(path, "speedup vs sparsity"), ""]
    rows = [[run.recipe, level_name(run.level), *cells, run_link(run)]
            for run in runs for scenario in scenario_names if (cells := speed_cells(run, scenario))]
    lines += ["Speedups (× vs dense; the fastest dense engine of each precision is the fastest engine on the "
              "dense run, with its median latency):", ""]
    lines += table(["recipe", "level %", *SPEED_COLUMNS, "run directory"], rows)
    lines += speed_vs_accuracy(models, runs, scenario_names, plots)
    rows = []
    for run in runs:
        for engine, by_scenario in run.bench.results.items():
            for scenario in scenario_names:
                timing = by_scenario.get(scenario)
                if timing:
                    rows.append([run.recipe, level_name(run.level), SPEED_ENGINES.get(engine, engine), scenario,
                                 number(timing.median_ms), number(timing.p90_ms), number(timing.items_per_s),
                                 number(timing.iterations), number(timing.threads), run_link(run)])
    lines += ["Latencies:", ""]
    lines += table(["recipe", "level %", "engine", "scenario", "median ms", "p90 ms", "sequences/s", "iterations",
                    "threads", "run directory"], rows)
    unavailable = sorted({f"{SPEED_ENGINES.get(engine, engine)}: {'?' if status.reason is None else status.reason}"
                          for run in runs for engine, status in run.bench.engines.items() if status.status != "ok"})
    warnings = sorted({w for run in runs for w in run.bench.warnings})
    if unavailable or warnings:
        lines += ["Bench warnings:", "", *(f"- {w}" for w in [*unavailable, *warnings]), ""]
    return lines
