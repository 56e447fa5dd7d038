"""Time and memory per stage, from the run manifests."""
from __future__ import annotations

from harness.layout import STAGE_OUTPUTS
from harness.report.format import number, run_link, table
from harness.report.runs import ModelRuns, Run
from harness.rundir import level_name

RESOURCE_STAGES = tuple(STAGE_OUTPUTS)  # every stage records its peak memory and wall time in the manifest
RESOURCE_COLUMNS = [h for stage in RESOURCE_STAGES for h in (f"{stage} peak MB", f"{stage} s")]
RESOURCE_NOTE = ("Peak resident memory (MB) and wall time (s) of each stage, from the run manifests. "
                 "\"+ N children\" is the peak of the child processes the stage started, measured together (the "
                 "bench compiles and times DeepSparse in one); the stage never needed more than the two added.")


def peak_cell(record: dict) -> str:
    """A stage's own peak memory, and its children's when it started any."""
    children = record.get("children_peak_rss_mb")
    own = number(record.get("peak_rss_mb"))
    return f"{own} + {number(children)} children" if children else own


def resource_cells(run: Run) -> list[str]:
    """Peak memory and wall time of each stage, from the run's manifest."""
    cells = []
    for stage in RESOURCE_STAGES:
        record = run.stage_record(stage)
        cells += [peak_cell(record), number(record.get("wall_time_s"))]
    return cells


def section_resources(models: ModelRuns) -> list[str]:
    lines = [RESOURCE_NOTE, ""]
    rows = [[run.recipe, level_name(run.level), *resource_cells(run), run_link(run)]
            for run in models.runs if run.manifest]
    return lines + table(["recipe", "level %", *RESOURCE_COLUMNS, "run directory"], rows)
