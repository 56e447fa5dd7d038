"""Recovery: what distilling the dense model into a pruned one cost (tokens, time, memory), its loss curve,
and accuracy against training tokens (runs that differ only in their budget, `@tokens=...`, on one line)."""
from __future__ import annotations

from pathlib import Path

from harness.errors import HarnessError
from harness.recipes import earlier_steps, variant_name, variant_params
from harness.report.accuracy import LOG_SCALE_METRICS, accuracy_points, dense_value
from harness.report.format import number, run_link, table
from harness.report.plotting import DENSE_LINE, PlotSet, legend, line_styles, moving_average, wrapped
from harness.report.runs import ModelRuns, Run
from harness.rundir import level_name


SMOOTHING = 40  # a loss curve is drawn as the moving average over this fraction (1/40) of its run's steps


def plot_curves(models: ModelRuns, runs: list[Run], path: Path) -> None:
    """Training loss against tokens seen, one line per recovered run, smoothed: a micro-batch's loss varies more
    from batch to batch than over a whole run."""
    from harness import plots

    styles = line_styles([(run.recipe, run.level) for run in runs])
    with plots.figure(path, panel_width=7.5) as (fig, (ax,)):
        for run in runs:
            curve = run.recovery.curve
            window = max(1, len(curve) // SMOOTHING)
            ax.plot([point.tokens / 1e6 for point in curve[window - 1:]],
                    moving_average([point.loss for point in curve], window),
                    label=wrapped(f"{run.recipe} {level_name(run.level)} %"), **styles[run.recipe, run.level])
        ax.set(xlabel="training tokens (millions)", yscale="log",
               ylabel=f"distillation loss per optimizer step (mean over 1/{SMOOTHING} of the run)")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.suptitle(f"{models.name}: recovery loss curves")


OUTDATED_MARK = " (outdated)"


def budget_family(recipe: str) -> str:
    """The recipe's name without its `tokens` budget: runs of one family differ only in how long they trained."""
    base, params = variant_params(recipe)
    params.pop("tokens", None)
    return variant_name(base, params)


def one_shot_recipe(recipe: str) -> str | None:
    """The pruning recipe a recovery step composes after (`a/b+distil@x=1` -> `a/b@x=1`, if `x` is a's), or None."""
    try:
        steps = earlier_steps(recipe)
    except HarnessError:  # a run of a recipe since renamed or removed
        return None
    return steps[-1] if steps else None


def accuracy_vs_tokens(models: ModelRuns) -> dict[str, tuple[dict, tuple[Run, float] | None]]:
    """{"<benchmark>: <metric>": ({(recipe family, level): [(tokens, value)] in token order}, dense baseline)}: a line
    per family of recovered runs (`budget_family`) and level, starting at 0 tokens from the one-shot run it
    recovered when that run was evaluated. Outdated runs (an earlier version of the recipe, e.g. another default)
    make a line of their own, marked."""
    panels = {}
    for benchmark, metrics in accuracy_points(models).items():
        for metric, series in metrics.items():
            lines: dict = {}
            values = {(recipe, run.level): entry.value for recipe, entries in series.items() for run, entry in entries}
            for recipe, entries in series.items():
                for run, entry in entries:
                    if run.level > 0 and run.recovery:
                        family = budget_family(recipe) + (OUTDATED_MARK if run.outdated else "")
                        line = lines.setdefault((family, run.level), set())
                        line.add((run.recovery.tokens, entry.value))
                        start = (one_shot_recipe(recipe), run.level)  # where the training started
                        if start in values:
                            line.add((0, values[start]))
            if lines:
                panels[f"{benchmark}: {metric}"] = ({key: sorted(points) for key, points in lines.items()},
                                                    dense_value(series))
    return panels


def plot_accuracy_vs_tokens(models: ModelRuns, path: Path) -> bool:
    """`accuracy_vs_tokens`, one panel per benchmark metric (perplexities on a log scale), a style per line in every
    panel (`line_styles`), one legend beside the last, the dense baseline dashed. False (nothing drawn) when no
    recovered pruned run has been evaluated."""
    from harness import plots

    panels = accuracy_vs_tokens(models)
    if not panels:
        return False
    keys = sorted({key for lines, _ in panels.values() for key in lines})
    styles = line_styles(keys)
    with plots.figure(path, panels=len(panels), panel_width=4.5) as (fig, axes):
        for ax, (title, (lines, dense)) in zip(axes, panels.items()):
            for key, points in sorted(lines.items()):
                ax.plot([tokens / 1e6 for tokens, _ in points], [value for _, value in points], marker="o",
                        **styles[key])
            if dense:
                ax.axhline(dense[1], **DENSE_LINE)
            if any(word in title for word in LOG_SCALE_METRICS):
                ax.set_yscale("log")
            ax.set(title=title, xlabel="training tokens (millions)", xlim=(0, None))
        legend(axes[-1], {}, {f"{family} {level_name(level)} %": styles[family, level] for family, level in keys},
               {"dense (level 0)": DENSE_LINE})
        fig.suptitle(f"{models.name}: accuracy vs recovery tokens (PyTorch)")
    return True


def section_recovery(models: ModelRuns, plots: PlotSet) -> list[str]:
    runs = [run for run in models.runs if run.recovery]
    if not runs:
        return ["No run of this model has a recovery step (`<pruning>+distil`): one-shot results only.", ""]
    lines = ["Runs whose recipe distils the dense model into the pruned one afterwards, with the mask fixed "
             "(their accuracy is in the accuracy section, beside the one-shot recipes at the same levels). "
             "Loss: KL to the dense model's logits (or embedding cosine + MSE for headless encoders), "
             "mean of the last 10 % of steps. Training time is summed over a resumed run's invocations; prune time "
             "and peak memory are the last invocation's whole prune stage.", ""]
    rows = []
    for run in runs:
        recovery, record = run.recovery, run.stage_record("prune")
        tail = recovery.curve[-max(1, len(recovery.curve) // 10):]
        rows.append([run.recipe, level_name(run.level), number(recovery.plan.get("corpus")), recovery.precision,
                     number(recovery.tokens), number(recovery.steps), number(recovery.curve[0].loss),
                     number(sum(point.loss for point in tail) / len(tail)), number(recovery.wall_time_s),
                     number(record.get("wall_time_s")), number(record.get("peak_rss_mb")), run_link(run)])
    lines += table(["recipe", "level %", "corpus", "precision", "tokens", "steps", "first loss", "final loss",
                    "training s", "prune s", "peak MB", "run directory"], rows)
    path = plots.path("recovery")
    plot_curves(models, runs, path)
    lines += ["", plots.image(path, "recovery loss curves"), ""]
    path = plots.path("recovery-tokens")
    if plot_accuracy_vs_tokens(models, path):
        lines += ["Accuracy against training tokens: how far each budget got, and how far the dense line still is.",
                  "", plots.image(path, "accuracy vs recovery tokens"), ""]
    return lines + control_lines(models)


def control_lines(models: ModelRuns) -> list[str]:
    """The domain-adaptation controls (a recipe's level 0 trained like its pruned levels) beside the dense model."""
    rows = []
    for benchmark, metrics in accuracy_points(models).items():
        for metric, series in metrics.items():
            dense = dense_value(series)
            for recipe, entries in series.items():
                for run, entry in entries:
                    if run.level == 0 and run.recovery and dense and dense[0].recovery is None:
                        rows.append([recipe, benchmark, metric, number(dense[1]), number(entry.value),
                                     number(entry.value - dense[1]), run_link(run)])
    if not rows:
        return []
    return ["Domain-adaptation control: the dense model given the same training as the recovered runs "
            "(`make sweep ... ARGS=--control`), beside the untrained dense model. A recovered model that "
            "beats the dense model may owe it to the training text; compare it with the control too.", "",
            *table(["recipe", "benchmark", "metric", "dense", "dense + training", "Δ", "run directory"], rows), ""]
