"""Sweep: every stage for every model x recipe x level, resuming finished work.

Each stage is run through its own CLI entry point, in this process; each stage skips itself when its
outputs exist and its inputs are unchanged, so rerunning a sweep does no work. A failing level is
recorded with its error in `runs/<model>/sweep.json` and the sweep goes on with the next one.
With `isolate`, each stage runs in its own Python process instead: its memory is returned when it
ends and each manifest's peak RSS is that stage's own, for a few seconds' start-up per stage.
With `discard_artifacts`, a run whose stages all finished loses its checkpoint weights, ONNX export
and compressed copy (its results stay): full-size models need ~6 GB per copy, so a sweep of many
levels fits on disk only this way. Level 0 goes last, as the other levels may compare against it.
"""
from __future__ import annotations

import shlex
import subprocess
import sys
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from typing import Iterator

from tqdm import tqdm

from harness import cli
from harness.errors import HarnessError
from harness.evaluate import parse_limit
from harness.load import ModelSpec, resolve_spec
from harness.paths import runs_dir
from harness.recipes import DEFAULT_RECIPE, canonical_name, load_recipe
from harness.layout import SWEEP_FILE
from harness.rundir import RunDir, level_name, parse_level, read_json, safe_name, write_json

STAGE_ORDER = ("prune", "analyze", "export", "bench", "eval")
DEFAULT_LEVELS = (0, 10, 50, 90, 95, 99)
EXECUTORS = ("local", "ray")


def stage_argv(stage: str, model: str, recipe: str, level: float, limit: str | int | None, force: bool,
               stage_args: dict[str, list[str]] | None = None) -> list[str]:
    """The CLI arguments that run one stage on one run directory (plus that stage's extra options)."""
    argv = [stage, "--model", model, "--level", level_name(level), "--recipe", recipe]
    if stage == "eval" and limit:
        argv += ["--limit", str(limit)]
    if force and stage == "prune":
        argv.append("--force")
    return argv + list((stage_args or {}).get(stage, []))


def parse_stage_args(values: list[str]) -> dict[str, list[str]]:
    """`["bench:--iterations 5 --batch-sizes 1"]` -> `{"bench": ["--iterations", "5", "--batch-sizes", "1"]}`."""
    parsed: dict[str, list[str]] = {}
    for value in values or []:
        stage, sep, rest = value.partition(":")
        if not sep or stage not in STAGE_ORDER:
            raise HarnessError(f"--stage-args expects STAGE:ARGS with STAGE one of {', '.join(STAGE_ORDER)}, got {value!r}")
        parsed.setdefault(stage, []).extend(shlex.split(rest))
    return parsed


def run_stage(argv: list[str], isolate: bool = False) -> None:
    """Run one stage through the CLI parser, in this process or in a child one (raises what the stage raises)."""
    if isolate:
        return run_stage_process(argv)
    args = cli.build_parser(argv[0]).parse_args(argv)
    args.run(args)


def run_stage_process(argv: list[str]) -> None:
    """Run one stage as `python -m harness ...`, passing its output through; a failure raises with its last error line."""
    child = subprocess.Popen([sys.executable, "-m", "harness", *argv], stderr=subprocess.PIPE)
    tail = b""
    try:
        for chunk in iter(lambda: child.stderr.read1(1 << 16), b""):
            sys.stderr.buffer.write(chunk)
            sys.stderr.flush()
            tail = (tail + chunk)[-8192:]
        code = child.wait()
    except BaseException:  # an interrupted or killed sweep stops its stage too, which then cleans up
        child.terminate()
        child.wait()
        raise
    if code == 0:
        return
    lines = [line.strip() for line in tail.decode(errors="replace").replace("\r", "\n").splitlines() if line.strip()]
    message = next((line for line in reversed(lines) if line.startswith("error: ")), lines[-1] if lines else "")
    if code == 2:
        raise HarnessError(message.removeprefix("error: "))
    died = "was killed (out of memory?)" if code == -9 else f"exited with code {code}"
    raise RuntimeError(f"the {argv[0]} stage process {died}: {message[:300]}")


def parse_levels(values: list) -> list[float]:
    """Levels in percent, each value a number or several separated by commas (`--levels 50,90` as `50 90`)."""
    return [parse_level(level) for value in values for level in str(value).replace(",", " ").split()]


def parse_stages(text: str) -> list[str]:
    stages = [s.strip() for s in text.replace(" ", ",").split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGE_ORDER]
    if unknown:
        raise HarnessError(f"unknown stage {unknown[0]!r} (stages: {', '.join(STAGE_ORDER)})")
    return [s for s in STAGE_ORDER if s in stages]


@dataclass(frozen=True)
class GridRun:
    """One cell of the grid: a model's spec, a recipe and a level."""

    spec: ModelSpec
    recipe: str
    level: float

    @property
    def key(self) -> str:
        return f"{self.recipe}/{level_name(self.level)}"

    @property
    def run(self) -> RunDir:
        return RunDir(self.spec.name, self.recipe, self.level)


@dataclass(frozen=True)
class LevelOptions:
    """How each level's stages run (the same on every executor)."""

    limit: str | int | None = None
    force: bool = False
    stage_args: dict[str, list[str]] | None = None
    isolate: bool = False
    discard_artifacts: bool = False


def run_level(cell: GridRun, stages: list[str], options: LevelOptions, earlier: dict | None = None,
              progress: tqdm | None = None) -> dict:
    """Run `stages` of one run in order, after the `earlier` statuses of its other stages; returns {stage: status}.

    A stage after a failed one is skipped; a sparse level whose stages all finished loses its artifacts
    with `discard_artifacts` (level 0 is discarded by the sweep, once the levels compared with it are done).
    """
    statuses: dict[str, dict] = {}
    for stage in stages:
        if progress is not None:
            progress.set_description(f"{cell.spec.name} {cell.key} {stage}")
        if stage == "eval" and cell.spec.shape_only:
            statuses[stage] = {"status": "skipped", "reason": "shape-only model: random weights"}
        elif _failed({**(earlier or {}), **statuses}):
            statuses[stage] = {"status": "skipped", "reason": "an earlier stage failed"}
        else:
            argv = stage_argv(stage, cell.spec.name, cell.recipe, cell.level, options.limit, options.force,
                              options.stage_args)
            statuses[stage] = _attempt(argv, options.isolate)
        if progress is not None:
            progress.update(1)
    if options.discard_artifacts and cell.level != 0 and not _failed({**(earlier or {}), **statuses}):
        _discard(cell.run)
    return statuses


def _failed(statuses: dict) -> bool:
    return any(s["status"] == "failed" for s in statuses.values())


def sweep(models: list[str], recipes: list[str], levels: list, stages: list[str],
          limit: str | int | None = None, force: bool = False, stage_args: dict[str, list[str]] | None = None,
          discard_artifacts: bool = False, isolate: bool = False, executor: str = "local",
          control: bool = False) -> dict:
    """Run `stages` over the grid; returns {model: {"<recipe>/<level>": {stage: status}}}.

    With `control`, each recipe with recovery also runs at level 0 as its variant `@control=true`: the
    same training on the dense model, so a recovered model is compared with the dense model trained alike.

    `executor` "local" runs the grid here, run after run; "ray" runs it as Ray tasks (harness.ray_executor).
    """
    levels = parse_levels(levels)
    specs = [resolve_spec(model) for model in models]
    recipes = [_canonical(recipe) for recipe in recipes]  # the ledger names runs as their directories do
    options = LevelOptions(limit, force, stage_args, isolate, discard_artifacts)
    grid = [GridRun(spec, recipe, level) for spec in specs for recipe in recipes for level in levels]
    if control:
        grid += [GridRun(spec, name, 0.0) for spec in specs for name in controls(recipes)]
    summary = {spec.name: {} for spec in specs}  # this sweep's grid only (the ledger keeps earlier sweeps' runs)
    ledgers = {spec.name: _read_ledger(spec.name) for spec in specs}
    levels_left = Counter((cell.spec.name, cell.recipe) for cell in grid)
    baselines = []  # level 0: discarded last, the other levels may compare against it
    if executor == "ray":
        from harness import ray_executor  # ray: imported only when asked for

        finished = ray_executor.run_grid(grid, stages, options)
    elif executor == "local":
        finished = _run_here(grid, stages, options)
    else:
        raise HarnessError(f"unknown executor {executor!r} (executors: {', '.join(EXECUTORS)})")
    for cell, statuses in finished:
        ledger = ledgers[cell.spec.name]
        ledger["runs"][cell.key] = summary[cell.spec.name][cell.key] = {**ledger["runs"].get(cell.key, {}), **statuses}
        write_json(runs_dir() / safe_name(cell.spec.name) / SWEEP_FILE, ledger)
        if discard_artifacts and cell.level == 0 and not _failed(statuses):
            baselines.append(cell)
        levels_left[cell.spec.name, cell.recipe] -= 1
        for baseline in [b for b in baselines if not levels_left[b.spec.name, b.recipe]]:
            baselines.remove(baseline)
            _discard(baseline.run)
    _print_summary(summary, stages)
    return summary


def _canonical(recipe: str) -> str:
    """A recipe name as prune names its run (a variant's parameters sorted); a name that does not load is
    left as given, for its prune stage to fail and the ledger to record."""
    try:
        return canonical_name(recipe)
    except HarnessError:
        return recipe


def controls(recipes: list[str]) -> list[str]:
    """The control variants (`@control=true`) of the recipes that train with some language-modelling loss:
    pure distillation (kl_weight 1) cannot adapt a model to the training text, so it needs no control."""
    trained = [recipe for recipe in map(load_recipe, recipes) if recipe.recovery]
    for recipe in trained:
        if recipe.recovery.kl_weight == 1:
            tqdm.write(f"sweep: no control for {recipe.name}: with kl_weight 1 it only distils the dense model, "
                       f"so its training cannot adapt it to the training text (set kl_weight below 1 for a control)")
    return [recipe.with_params({"control": True}).name for recipe in trained if recipe.recovery.kl_weight < 1]


def _read_ledger(model: str) -> dict:
    path = runs_dir() / safe_name(model) / SWEEP_FILE
    return read_json(path) if path.exists() else {"runs": {}}


def _run_here(grid: list[GridRun], stages: list[str], options: LevelOptions) -> Iterator[tuple[GridRun, dict]]:
    """The grid in this process (each stage in a child process with `isolate`), in grid order."""
    with tqdm(total=len(grid) * len(stages), unit="stage", desc="sweep") as progress:
        for cell in grid:
            yield cell, run_level(cell, stages, options, progress=progress)


def _discard(run: RunDir) -> None:
    freed = run.discard_artifacts()
    if freed:
        tqdm.write(f"sweep: discarded {freed / 1e9:.1f} GB of weights and exports in {run.path}")


def _attempt(argv: list[str], isolate: bool) -> dict:
    start = time.time()
    try:
        run_stage(argv, isolate)
    except HarnessError as exc:
        tqdm.write(f"error: {' '.join(argv[:7])}: {exc}")
        return {"status": "failed", "error": str(exc), "seconds": round(time.time() - start, 1)}
    except Exception as exc:  # a library failure in one level must not stop the others
        tqdm.write(f"error: {' '.join(argv[:7])}: {type(exc).__name__}: {exc}")
        return {"status": "failed", "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(limit=8), "seconds": round(time.time() - start, 1)}
    return {"status": "done", "seconds": round(time.time() - start, 1)}


def _print_summary(summary: dict, stages: list[str]) -> None:
    print(f"\n{'model':<16} {'recipe/level':<36} " + " ".join(f"{s:<8}" for s in stages))
    for model, runs in summary.items():
        for key, statuses in runs.items():
            cells = " ".join(f"{statuses.get(s, {}).get('status', '-'):<8}" for s in stages)
            print(f"{model:<16} {key:<36} {cells}")


def add_arguments(parser) -> None:
    parser.add_argument("--model", nargs="+", required=True, help="one or more models")
    parser.add_argument("--recipe", action="append", default=None,
                        help=f"recipe (repeatable; default {DEFAULT_RECIPE})")
    parser.add_argument("--levels", nargs="+", default=list(DEFAULT_LEVELS),
                        help="sparsity levels in percent, space- or comma-separated")
    parser.add_argument("--stages", default=",".join(STAGE_ORDER), help="comma-separated subset of "
                        + ",".join(STAGE_ORDER))
    parser.add_argument("--limit", default=None, help="examples per benchmark for eval (N, or NAME=N entries)")
    parser.add_argument("--force", action="store_true", help="redo prune (and so every later stage)")
    parser.add_argument("--isolate", action="store_true",
                        help="run each stage in its own process: memory is freed between stages and each peak RSS "
                             "is the stage's own (a few seconds more per stage; for full-size models)")
    parser.add_argument("--discard-artifacts", action="store_true",
                        help="delete each finished run's weights, ONNX and compressed copy (results stay): "
                             "for full-size models that would not fit on disk")
    parser.add_argument("--executor", choices=EXECUTORS, default="local",
                        help="local: run the grid in this process (default); ray: as Ray tasks on a local Ray "
                             "instance, or on the cluster at RAY_ADDRESS (each stage in its own process)")
    parser.add_argument("--control", action="store_true",
                        help="also run each recipe with recovery at level 0 with the same training (the "
                             "domain-adaptation control: its variant <recipe>@control=true); only for recipes "
                             "that mix in the language-modelling loss (kl_weight below 1)")
    parser.add_argument("--stage-args", action="append", default=[], metavar="STAGE:ARGS",
                        help="extra options for one stage, e.g. 'bench:--iterations 5 --batch-sizes 1'")


def main(args) -> None:
    parse_limit(args.limit)  # a bad LIMIT fails before any work
    summary = sweep(args.model, args.recipe or [DEFAULT_RECIPE], args.levels, parse_stages(args.stages),
                    args.limit, args.force, parse_stage_args(args.stage_args), args.discard_artifacts, args.isolate,
                    args.executor, args.control)
    failed = [(m, k) for m, runs in summary.items() for k, st in runs.items()
              if any(s.get("status") == "failed" for s in st.values())]
    if failed:
        raise HarnessError(f"{len(failed)} run(s) failed, e.g. {failed[0][0]} {failed[0][1]}; "
                           f"see runs/<model>/{SWEEP_FILE}; the others are complete")
