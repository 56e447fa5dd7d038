"""Layer sensitivity: the damage of pruning one layer (or transformer block) at a time, read from the
results of `make sensitivity` under `runs/<model>/sensitivity/<recipe>/<granularity>/`."""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from harness.layout import MANIFEST, SENSITIVITY_CSV, SENSITIVITY_FILE, SENSITIVITY_SUBDIR, Sensitivity, read_record
from harness.report.format import number, relative_to_reports, shown_path
from harness.report.plotting import PlotSet
from harness.report.runs import ModelRuns
from harness.rundir import level_name, read_json
from harness.sparsity import BLOCK_INDEX, layer_of

FRAGILE_FACTOR = 2.0  # a unit is fragile when its damage exceeds this multiple of the median unit's
NAMED = 3  # units named in the sentence


@dataclass
class Result:
    directory: Path
    record: Sensitivity
    manifest: dict

    @property
    def title(self) -> str:
        return f"{self.record.recipe}, {self.record.granularity}"


def read_results(models: ModelRuns) -> list[Result]:
    root = models.directory / SENSITIVITY_SUBDIR
    found = []
    for path in sorted(root.rglob(SENSITIVITY_FILE)) if root.is_dir() else []:
        record = read_record(path, Sensitivity)
        if record and record.units and not any(part.startswith(".") for part in path.relative_to(root).parts):
            manifest = read_json(path.parent / MANIFEST) if (path.parent / MANIFEST).exists() else {}
            found.append(Result(path.parent, record, manifest))
    return found


def block_and_kind(unit: str) -> tuple[str, str]:
    """`model.layers.3.self_attn.q_proj.weight` -> (`3`, `self_attn.q_proj`); a block `model.layers.3` -> (`3`, `block`)."""
    match = BLOCK_INDEX.search(f"{unit}.")
    kind = f"{unit}."[match.end():].removesuffix(".").removesuffix(".weight") if match else unit
    return layer_of(f"{unit}."), kind or "block"


def label(unit: str) -> str:
    block, kind = block_and_kind(unit)
    return block if kind == "block" else f"{block} {kind}"


def plot_heatmap(result: Result, path: Path) -> None:
    """One panel per level: blocks (rows) x kinds of layer (columns), coloured by damage."""
    from harness import plots

    record = result.record
    cells = {block_and_kind(unit.unit): unit for unit in record.units}
    blocks = list(dict.fromkeys(block for block, _ in cells))
    kinds = list(dict.fromkeys(kind for _, kind in cells))
    height = max(3.0, 0.16 * len(blocks) + 1.8)
    with plots.figure(path, panels=len(record.levels), panel_width=max(3.5, 0.55 * len(kinds) + 2.2),
                      height=height) as (fig, axes):
        for i, (ax, level) in enumerate(zip(axes, record.levels)):
            grid = [[cells[(block, kind)].damage[i] if (block, kind) in cells else math.nan for kind in kinds]
                    for block in blocks]
            image = ax.imshow(grid, aspect="auto", cmap="magma_r", interpolation="nearest")
            ax.set_xticks(range(len(kinds)), kinds, rotation=60, ha="right", fontsize=6)
            ax.set_yticks(range(len(blocks)), blocks, fontsize=6)
            ax.grid(False)
            ax.set(title=f"pruned to {level_name(level)} %", ylabel="block")
            fig.colorbar(image, ax=ax, label="damage", shrink=0.8)
        fig.suptitle(f"{record.model}: damage of pruning one {record.granularity} alone ({result.title})\n"
                     f"damage: {record.measure}")


def plot_bars(result: Result, path: Path) -> None:
    """The damage of each unit at the highest level, in forward order, coloured by kind."""
    from harness import plots

    record = result.record
    kinds = list(dict.fromkeys(block_and_kind(unit.unit)[1] for unit in record.units))
    colors = {kind: f"C{i % 10}" for i, kind in enumerate(kinds)}
    with plots.figure(path, panel_width=max(6.0, 0.07 * len(record.units) + 2.5)) as (fig, (ax,)):
        ax.bar(range(len(record.units)), [unit.damage[-1] for unit in record.units],
               color=[colors[block_and_kind(unit.unit)[1]] for unit in record.units])
        positions: dict[str, list[int]] = {}
        for i, unit in enumerate(record.units):
            positions.setdefault(block_and_kind(unit.unit)[0], []).append(i)
        ax.set_xticks([statistics.fmean(places) for places in positions.values()], list(positions), rotation=90,
                      fontsize=6 if len(positions) > 12 else 8)
        ax.set(xlabel="block", ylabel=f"damage: {record.measure}")
        ax.set_title(f"{record.model}: each {record.granularity} pruned alone to {level_name(record.levels[-1])} %\n"
                     f"({result.title})")
        if len(kinds) > 1:
            from matplotlib.patches import Patch

            ax.legend(handles=[Patch(color=color, label=kind) for kind, color in colors.items()],
                      loc="upper left", bbox_to_anchor=(1.01, 1.0))


def _mean_by(record: Sensitivity, key) -> dict[str, float]:
    groups: dict[str, list[float]] = {}
    for unit in record.units:
        groups.setdefault(key(unit.unit), []).append(unit.damage[-1])
    return {name: statistics.fmean(values) for name, values in groups.items()}


def fragile_sentence(record: Sensitivity) -> str:
    """Which units are fragile at the highest level, by name, by kind and by depth, from the numbers."""
    level = level_name(record.levels[-1])
    ranked = sorted(record.units, key=lambda unit: unit.damage[-1], reverse=True)
    median = statistics.median(unit.damage[-1] for unit in ranked)
    fragile = [unit for unit in ranked if unit.damage[-1] > FRAGILE_FACTOR * max(median, 0.0)]
    named = ", ".join(f"{label(unit.unit)} ({number(unit.damage[-1])})" for unit in ranked[:NAMED])
    sentence = (f"At {level} %, the most fragile {record.granularity}s are {named}; {len(fragile)} of "
                f"{len(ranked)} cause more than {FRAGILE_FACTOR:g} times the median damage ({number(median)}).")
    by_block = _mean_by(record, lambda unit: block_and_kind(unit)[0])
    if len(by_block) > 1:
        most, least = max(by_block, key=by_block.get), min(by_block, key=by_block.get)
        sentence += (f" By depth, block {most} is the most fragile (mean {number(by_block[most])}) and block "
                     f"{least} the least ({number(by_block[least])}).")
    by_kind = _mean_by(record, lambda unit: block_and_kind(unit)[1])
    if len(by_kind) > 1:
        most, least = max(by_kind, key=by_kind.get), min(by_kind, key=by_kind.get)
        sentence += (f" By kind, `{most}` layers are the most fragile (mean {number(by_kind[most])}) and "
                     f"`{least}` the least ({number(by_kind[least])}).")
    return sentence


def cost_sentence(result: Result) -> str:
    record, stage = result.record, result.manifest.get("stages", {}).get("sensitivity", {})
    heldout = record.heldout
    return (f"Cost: {len(record.units)} units x {len(record.levels)} levels took {number(record.seconds)} s to prune "
            f"and measure ({number(record.seconds / len(record.units))} s a unit, summed over resumed invocations); "
            f"the last invocation {number(stage.get('wall_time_s'))} s wall time at "
            f"{number(stage.get('peak_rss_mb'))} MB peak resident memory. Measured on {number(heldout.get('sequences'))} "
            f"held-out sequences x {number(heldout.get('seq_len'))} tokens of `{heldout.get('corpus')}`.")


def section_sensitivity(models: ModelRuns, plots: PlotSet) -> list[str]:
    results = read_results(models)
    if not results:
        return [f"Missing: no sensitivity results under `{shown_path(models.directory / SENSITIVITY_SUBDIR)}/`; run "
                f"`make sensitivity MODEL={models.name}` (`ARGS=\"--granularity block\"` for whole blocks).", ""]
    lines = ["Each unit (one target weight, or one transformer block's targets) pruned alone with the recipe's "
             "method while the rest of the model stays dense, and the damage measured on held-out training text: "
             "the increase of the mean language-modelling loss (nats per token) for models with a loss, "
             "1 - mean cosine of the pooled embeddings to the dense model's for headless encoders. "
             "The `sensitivity` allocation reads these results.", ""]
    for result in results:
        record = result.record
        heatmap, bars = plots.path(f"sensitivity-{result.title}-heatmap"), plots.path(f"sensitivity-{result.title}-bars")
        plot_heatmap(result, heatmap)
        plot_bars(result, bars)
        dense = f" (dense loss {number(record.dense_loss)})" if record.dense_loss is not None else ""
        lines += [f"### {result.title}", "",
                  f"Damage: {record.measure}{dense}; data: [{SENSITIVITY_CSV}]"
                  f"({relative_to_reports(result.directory / SENSITIVITY_CSV)}).", "",
                  plots.image(heatmap, "damage by layer and level"), "", plots.image(bars, "damage by layer"), "",
                  fragile_sentence(record), "", cost_sentence(result), ""]
    return lines
