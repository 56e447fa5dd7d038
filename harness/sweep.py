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

from tqdm import tqdm

from harness import cli
from harness.errors import HarnessError
from harness.evaluate import parse_limit
from harness.load import resolve_spec
from harness.paths import runs_dir
from harness.recipes import DEFAULT_RECIPE
from harness.layout import SWEEP_FILE
from harness.rundir import RunDir, level_name, parse_level, read_json, safe_name, write_json

STAGE_ORDER = ("prune", "analyze", "export", "bench", "eval")
DEFAULT_LEVELS = (0, 10, 50, 90, 95, 99)


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


def parse_stages(text: str) -> list[str]:
    stages = [s.strip() for s in text.replace(" ", ",").split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGE_ORDER]
    if unknown:
        raise HarnessError(f"unknown stage {unknown[0]!r} (stages: {', '.join(STAGE_ORDER)})")
    return [s for s in STAGE_ORDER if s in stages]


def sweep(models: list[str], recipes: list[str], levels: list, stages: list[str],
          limit: str | int | None = None, force: bool = False, stage_args: dict[str, list[str]] | None = None,
          discard_artifacts: bool = False, isolate: bool = False) -> dict:
    """Run `stages` over the grid; returns {model: {"<recipe>/<level>": {stage: status}}}."""
    levels = [parse_level(level) for level in levels]
    specs = [resolve_spec(model) for model in models]
    summary = {spec.name: {} for spec in specs}  # this sweep's grid only (the ledger keeps earlier sweeps' runs)
    grid = [(spec, recipe, level) for spec in specs for recipe in recipes for level in levels]
    progress = tqdm(total=len(grid) * len(stages), unit="stage", desc="sweep")
    for spec in specs:
        ledger_path = runs_dir() / safe_name(spec.name) / SWEEP_FILE
        ledger = read_json(ledger_path) if ledger_path.exists() else {"runs": {}}
        for recipe in recipes:
            baselines = []  # level 0: discarded last, the other levels may compare against it
            for level in levels:
                key = f"{recipe}/{level_name(level)}"
                statuses = {}
                for stage in stages:
                    progress.set_description(f"{spec.name} {key} {stage}")
                    if stage == "eval" and spec.shape_only:
                        statuses[stage] = {"status": "skipped", "reason": "shape-only model: random weights"}
                    elif any(s["status"] == "failed" for s in statuses.values()):
                        statuses[stage] = {"status": "skipped", "reason": "an earlier stage failed"}
                    else:
                        statuses[stage] = _attempt(stage_argv(stage, spec.name, recipe, level, limit, force, stage_args),
                                                   isolate)
                    progress.update(1)
                ledger["runs"][key] = summary[spec.name][key] = {**ledger["runs"].get(key, {}), **statuses}
                write_json(ledger_path, ledger)
                if discard_artifacts and all(s["status"] != "failed" for s in statuses.values()):
                    finished = RunDir(spec.name, recipe, level)
                    baselines.append(finished) if level == 0 else _discard(finished)
            for run in baselines:
                _discard(run)
    progress.close()
    _print_summary(summary, stages)
    return summary


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
    parser.add_argument("--levels", nargs="+", default=list(DEFAULT_LEVELS), help="sparsity levels in percent")
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
    parser.add_argument("--stage-args", action="append", default=[], metavar="STAGE:ARGS",
                        help="extra options for one stage, e.g. 'bench:--iterations 5 --batch-sizes 1'")


def main(args) -> None:
    parse_limit(args.limit)  # a bad LIMIT fails before any work
    summary = sweep(args.model, args.recipe or [DEFAULT_RECIPE], args.levels, parse_stages(args.stages),
                    args.limit, args.force, parse_stage_args(args.stage_args), args.discard_artifacts, args.isolate)
    failed = [(m, k) for m, runs in summary.items() for k, st in runs.items()
              if any(s.get("status") == "failed" for s in st.values())]
    if failed:
        raise HarnessError(f"{len(failed)} run(s) failed, e.g. {failed[0][0]} {failed[0][1]}; "
                           f"see runs/<model>/{SWEEP_FILE}; the others are complete")
