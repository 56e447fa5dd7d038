"""Runs and gaps: which stage outputs each run holds, and the command that fills each one missing, failed or
outdated (pruned with other inputs than its model and recipe give now)."""
from __future__ import annotations

from harness.layout import STAGE_OUTPUTS
from harness.report.format import make_target, run_link, table
from harness.report.runs import REDONE_BY_PRUNE, ModelRuns, Run
from harness.rundir import level_name


def gaps(models: ModelRuns) -> list[tuple[Run, str, str, str]]:
    """(run, stage, kind, what is wrong) for every expected stage output that is missing or failed, and every
    run that is outdated (kind: missing, failed or outdated)."""
    found = []
    for run in models.runs:
        outdated = run.outdated
        if outdated:
            again = f": run `{make_target('prune', models.name, run)}` again" if outdated in REDONE_BY_PRUNE else ""
            found.append((run, "prune", "outdated", f"outdated, {outdated}{again}"))
        for stage in [stage for stage in models.expected_stages() if models.expects(run, stage)]:
            record = run.ledger.get(stage, {})
            status = record.get("status")
            if status == "failed":
                found.append((run, stage, "failed", f"failed in the sweep: {record.get('error', 'no error recorded')}"))
            elif not run.has(stage):
                reason = f"skipped in the sweep ({record['reason']}); " if status == "skipped" else ""
                found.append((run, stage, "missing", f"{reason}missing `{STAGE_OUTPUTS[stage]}`: run "
                                                 f"`{make_target(stage, models.name, run)}`"))
    return found


def gap_lines(models: ModelRuns, prefix: str = "") -> list[str]:
    """Markdown bullets for the gaps; a stage missing at every level of a recipe is one line with its sweep."""
    lines = []
    found = gaps(models)
    for recipe in models.recipes:
        levels = [run for run in models.runs if run.recipe == recipe]
        for stage in models.expected_stages():
            entries = [g for g in found if g[0].recipe == recipe and g[1] == stage]
            missing_everywhere = len(levels) > 1 and len(entries) == len(levels) and all(
                kind == "missing" for _, _, kind, _ in entries)
            if missing_everywhere:
                level_list = " ".join(level_name(run.level) for run in levels)
                lines.append(f"- {prefix}`{recipe}`, {stage}: missing `{STAGE_OUTPUTS[stage]}` at every level "
                             f"({level_list}): run `make sweep MODEL={models.name} RECIPE={recipe} "
                             f"LEVELS=\"{level_list}\" STAGES={stage}`")
            else:
                lines += [f"- {prefix}`{recipe}` level {level_name(run.level)} %, {stage}: {what}"
                          for run, _, _, what in entries]
    return lines


def section_coverage(models: ModelRuns) -> list[str]:
    stages = models.expected_stages()
    lines = ["Which stage outputs each run directory holds (`done`), what is missing or failed, and which stages "
             "its sweep was not asked to run (`not asked`).", ""]
    rows = []
    for run in models.runs:
        cells = []
        for stage in stages:
            status = run.ledger.get(stage, {}).get("status")
            cells.append("FAILED" if status == "failed" else "outdated" if stage == "prune" and run.outdated
                         else "done" if run.has(stage) else "missing" if models.expects(run, stage) else "not asked")
        rows.append([run.recipe, level_name(run.level), *cells, run_link(run)])
    lines += table(["recipe", "level %", *stages, "run directory"], rows)
    found = gap_lines(models)
    if found:
        lines += ["**Gaps**: these numbers are absent from the sections below.", "", *found]
    else:
        lines.append("No gaps: every run has the output of every stage expected of it.")
    return lines + [""]
