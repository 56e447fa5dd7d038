"""How the report writes what it reads: numbers, tables, links to run directories and the commands that fill gaps."""
from __future__ import annotations

import math
import os
import re
from pathlib import Path

from harness.paths import PROJECT_ROOT, reports_dir
from harness.report.runs import ModelRuns, Run
from harness.rundir import level_name


def number(value) -> str:
    """How the report writes a number read from a file (tests format file values the same way)."""
    if value is None:
        return "–"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if math.isnan(value) or math.isinf(value):
        return str(value)
    if 1e4 <= abs(value) < 1e6:
        return f"{value:,.0f}"
    return f"{value:.4g}"


def percent(fraction) -> str:
    """A fraction read from a file, written in percent."""
    return number(None if fraction is None else 100 * fraction)


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    escape = lambda cell: str(cell).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    return ["| " + " | ".join(map(escape, header)) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(map(escape, row)) + " |" for row in rows), ""]


def anchor(title: str) -> str:
    """The link target of a `## title` heading."""
    return re.sub(r"[^a-z0-9 -]", "", title.lower()).replace(" ", "-")


def relative_to_reports(path: Path) -> str:
    return Path(os.path.relpath(path, reports_dir())).as_posix()


def shown_path(path: Path) -> str:
    """A path as a command line in the project root would name it."""
    return path.relative_to(PROJECT_ROOT).as_posix() if path.is_relative_to(PROJECT_ROOT) else path.as_posix()


def run_link(run: Run) -> str:
    """The run directory, as a link relative to the report (the row's provenance). Its text is short: the row
    names the recipe and level already, and a report of many runs repeats the link on hundreds of rows."""
    return f"[run]({relative_to_reports(run.path)})"


def make_target(stage: str, model: str, run: Run) -> str:
    """The command that produces `stage`'s output for this run."""
    if stage == "analyze":
        return f"make analyze MODEL={shown_path(run.path)}"
    return f"make {stage} MODEL={model} LEVEL={level_name(run.level)} RECIPE={run.recipe}"


def shape_note(models: ModelRuns) -> str:
    return " (shape-only: random weights)" if models.shape_only else ""
