"""Command line: `python -m harness <stage> ...`. Each stage module provides `add_arguments` and `main`."""
from __future__ import annotations

import argparse
import importlib
import signal
import sys

from harness import environment
from harness.errors import HarnessError

# subcommand -> (module, one-line help)
STAGES = {
    "models": ("harness.cli", "list the model registry"),
    "recipes": ("harness.cli", "list the pruning recipes"),
    "prune": ("harness.prune", "prune a model with a recipe at a sparsity level"),
    "analyze": ("harness.analyze", "measure how much of a model is (near) zero, overall and by layer"),
    "export": ("harness.export", "export a run to ONNX and check it against PyTorch"),
    "bench": ("harness.bench", "time DeepSparse, ONNX Runtime, OpenVINO and PyTorch on a run; sizes on disk"),
    "eval": ("harness.evaluate", "accuracy on the model's paper benchmarks"),
    "sweep": ("harness.sweep", "run stages over levels and recipes, resuming finished work"),
    "sensitivity": ("harness.sensitivity", "damage of pruning one layer (or block) at a time, on held-out text"),
    "report": ("harness.report", "generate reports/<model>.md from run directories"),
}


def _list_models(args) -> None:
    from harness.load import describe_models

    print(describe_models())


def _list_recipes(args) -> None:
    from harness.recipes import available, load_recipe

    for name in available():
        print(f"{name:<32} {load_recipe(name).description}")


LISTINGS = {"models": _list_models, "recipes": _list_recipes}


def build_parser(stage: str | None = None) -> argparse.ArgumentParser:
    """The parser; only `stage`'s module is imported (SparseML and INC take seconds to import)."""
    parser = argparse.ArgumentParser(
        prog="python -m harness",
        description="LLM sparsification harness: how far can a model be pruned, with which method, "
                    "at what cost in accuracy, and how much faster and smaller does it get on a CPU?",
    )
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name, (module_name, help_text) in STAGES.items():
        stage_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name in LISTINGS:
            stage_parser.set_defaults(run=LISTINGS[name])
        elif name == stage:
            module = importlib.import_module(module_name)
            module.add_arguments(stage_parser)
            stage_parser.set_defaults(run=module.main)
    return parser


def interrupt_on_sigterm() -> None:
    """Let SIGTERM (kill, timeouts, cancelled jobs) clean up like Ctrl-C: staging directories removed."""
    signal.signal(signal.SIGTERM, _raise_interrupt)


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    environment.configure()  # before build_parser imports a stage module (and so SparseML, DeepSparse)
    argv = sys.argv[1:] if argv is None else argv
    stage = next((a for a in argv if not a.startswith("-")), None)
    try:
        args = build_parser(stage).parse_args(argv)
        args.run(args)
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished work is kept, unfinished work was discarded", file=sys.stderr)
        return 130
    return 0
