"""Size vs sparsity: the same weights on disk as a dense checkpoint, gzip-compressed and in sparse-bitmask format."""
from __future__ import annotations

from pathlib import Path

from harness.layout import BENCH_FILE, SizeEntry
from harness.report.format import number, run_link, shape_note, table
from harness.report.plotting import PlotSet, by_recipe, draw, legend, recipe_styles, sparsity_axis
from harness.report.runs import ModelRuns, Run
from harness.rundir import level_name

# the bench record's `sizes` entry -> label; the first three are the plot's dense / compressed / sparse format
SIZE_FORMATS = {
    "checkpoint": "dense fp32 checkpoint (safetensors)",
    "checkpoint_gzip": "same, gzip-compressed",
    "sparse_bitmask": "sparse-bitmask format (compressed-tensors)",
    "onnx": "ONNX graph(s)",
    "onnx_gzip": "ONNX, gzip-compressed",
    "checkpoint_int8": "INT8 checkpoint (INT8 runs: quantized weights as int8 plus scales)",
    "sparse_bitmask_int8": "the INT8 checkpoint in sparse-bitmask format (INT8 runs: sparse + INT8)",
}
PLOTTED_SIZES = ("checkpoint", "checkpoint_gzip", "sparse_bitmask")


def size(run: Run, key: str) -> SizeEntry | None:
    """One of the run's sizes on disk (a SIZE_FORMATS key; None where the run has no such format)."""
    return getattr(run.bench.sizes, key)


def plot_sizes(models: ModelRuns, runs: list[Run], path: Path) -> None:
    from harness import plots

    styles = recipe_styles(models.recipes)
    colors = dict(zip(PLOTTED_SIZES, ("tab:red", "tab:purple", "tab:green")))
    with plots.figure(path, panels=2, panel_width=6.5) as (fig, (bytes_ax, bits_ax)):
        for recipe, recipe_runs in by_recipe(runs).items():
            for key, color in colors.items():
                draw(bytes_ax, recipe_runs, lambda r, key=key: size(r, key).bytes / 1e6, color=color, **styles[recipe])
                draw(bits_ax, recipe_runs, lambda r, key=key: size(r, key).bits_per_weight, color=color,
                     **styles[recipe])
        bytes_ax.set(title="size on disk", ylabel="MB (10^6 bytes)")
        bits_ax.set(title="bits per weight", ylabel="bits per weight (size / number of weights)")
        for ax in (bytes_ax, bits_ax):
            ax.set_ylim(bottom=0)
            sparsity_axis(ax)
        legend(bits_ax, {SIZE_FORMATS[key]: color for key, color in colors.items()}, styles)
        fig.suptitle(f"{models.name}{shape_note(models)}: size vs sparsity")


def section_size(models: ModelRuns, plots: PlotSet) -> list[str]:
    runs = models.with_output("bench")
    if not runs:
        return [f"Missing: sizes come from `{BENCH_FILE}`, which no run has yet (run the bench stage).", ""]
    path = plots.path("size")
    plot_sizes(models, runs, path)
    lines = ["Bytes on disk of the same weights stored three ways: the dense fp32 checkpoint, the same "
             "gzip-compressed, and the compressed-tensors sparse-bitmask format (non-zero values plus a "
             "one-bit-per-weight mask).", "", plots.image(path, "size vs sparsity"), ""]
    rows = []
    for run in runs:
        cells = []
        for key in SIZE_FORMATS:
            entry = size(run, key)
            cells += [number(entry.bytes), number(entry.bits_per_weight)] if entry else ["–", "–"]
        rows.append([run.recipe, level_name(run.level), number(run.bench.sizes.params), *cells, run_link(run)])
    header = [h for key in SIZE_FORMATS for h in (f"{key} bytes", f"{key} bits/weight")]
    lines += table(["recipe", "level %", "weights", *header, "run directory"], rows)
    lines += [", ".join(f"`{key}`: {label}" for key, label in SIZE_FORMATS.items()) + ".", ""]
    return lines
