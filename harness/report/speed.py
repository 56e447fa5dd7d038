"""Speed vs sparsity: each engine's speedup against its own dense run, the FLOP-ideal, and the latencies."""
from __future__ import annotations

import re
from pathlib import Path

from harness.layout import BENCH_FILE, Speedup
from harness.report.format import number, run_link, shape_note, table
from harness.report.plotting import DENSE_LINE, PlotSet, by_recipe, draw, legend, recipe_styles, sparsity_axis
from harness.report.runs import ModelRuns, Run
from harness.rundir import level_name

SPEED_ENGINES = {"deepsparse": "DeepSparse", "onnxruntime": "ONNX Runtime", "pytorch": "PyTorch"}
PLOTTED_ENGINES = ("deepsparse", "onnxruntime")  # the question: DeepSparse vs ONNX Runtime
HEADLINE = "DeepSparse sparse vs ONNX Runtime dense"
SPEED_COLUMNS = ["achieved %", "scenario", "DeepSparse", "ONNX Runtime", "PyTorch", "headline", "FLOP-ideal",
                 "eff. DeepSparse", "eff. ONNX Runtime", "eff. headline"]


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
    return [number(run.bench.achieved_percent), scenario,
            *(number(speedup(entry, engine)) for engine in ("deepsparse", "onnxruntime", "pytorch", "headline")),
            number(ideal_speedup(run, scenario)),
            *(number(entry.efficiency.get(engine)) for engine in ("deepsparse", "onnxruntime", "headline"))]


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
             f"{cpu.get('model', 'this CPU')} with {number(settings.get('threads'))} threads; each engine's "
             f"speedup is against its own dense run (level 0), the headline is {HEADLINE}. The FLOP-ideal "
             "counts multiply-accumulates: pruned weights scale with their density, everything else stays dense; "
             "efficiency = measured / ideal.", "", plots.image(path, "speedup vs sparsity"), ""]
    rows = [[run.recipe, level_name(run.level), *cells, run_link(run)]
            for run in runs for scenario in scenario_names if (cells := speed_cells(run, scenario))]
    lines += ["Speedups (× vs dense):", ""]
    lines += table(["recipe", "level %", *SPEED_COLUMNS, "run directory"], rows)
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
