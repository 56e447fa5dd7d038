"""Which run directory a stage works on.

One resolver from the CLI's `--model/--level/--recipe` to a `RunDir`, shared by analyze, export,
bench and eval: MODEL is either a run directory (its manifest names model, recipe and level) or a
model (alias, Hub id, checkpoint) with LEVEL and RECIPE. And the dense baseline, level 0 of the
same model and recipe, that bench and eval compare with: pruned (saved unchanged) on first use.
"""
from __future__ import annotations

from pathlib import Path

from harness.errors import HarnessError
from harness.layout import MANIFEST
from harness.paths import runs_dir
from harness.recipes import DEFAULT_RECIPE, canonical_name, unquantized
from harness.rundir import RunDir, parse_level, read_json, safe_name


def add_run_arguments(parser, level_default: str | None = "0") -> None:
    """--model/--level/--recipe: the run directory a stage works on."""
    parser.add_argument("--model", required=True, help="registry alias (with --level/--recipe) or a run directory")
    parser.add_argument("--level", default=level_default, help="sparsity level of the run, in percent (0 = dense)")
    parser.add_argument("--recipe", default=None, help=f"recipe of the run (default {DEFAULT_RECIPE})")


def run_directory(path: str | Path) -> RunDir | None:
    """The run whose directory `path` is, or None if `path` is not a run directory."""
    path = Path(path).expanduser()
    if not (path / MANIFEST).is_file():
        return None
    manifest = read_json(path / MANIFEST)
    run = RunDir(manifest["model"], manifest["recipe"], parse_level(manifest["level"]))
    if run.path.resolve() != path.resolve():
        raise HarnessError(f"run directory {path} is not under the runs root {runs_dir()}: "
                           f"set HARNESS_RUNS to the directory holding {safe_name(run.model)}/")
    return run


def resolve_run(model: str, recipe: str | None, level) -> RunDir:
    """A run directory path, or a model with a level (and a recipe, default DEFAULT_RECIPE)."""
    from harness.load import resolve_spec  # transformers: imported only when a model must be resolved

    return run_directory(model) or RunDir(resolve_spec(model).name, canonical_name(recipe or DEFAULT_RECIPE),
                                          parse_level(level))


def run_from_args(args) -> RunDir:
    return resolve_run(args.model, args.recipe, args.level)


def dense_baseline(run: RunDir, stage: str, fp32: bool = False) -> RunDir:
    """Level 0 of the run's model and recipe, pruned first if it does not exist yet; with `fp32`, of its
    pruning recipe without quantization (the dense FP32 model a quantized run is compared with)."""
    recipe = unquantized(run.recipe) if fp32 else run.recipe
    baseline = RunDir(run.model, recipe, 0.0)
    if not baseline.exists():
        from harness.prune import prune  # torch and the backends: only when a baseline must be made

        print(f"{stage}: no dense baseline for {run.model} {recipe}; pruning level 0 first")
        prune(run.model, 0, recipe)
    return baseline
