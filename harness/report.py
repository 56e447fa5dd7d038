"""Stage 7, report: `reports/<model>.md` and its PNG plots, generated from run directories only.

Every number comes from the files the stages left in `runs/<model>/<recipe>/<level>/`
(`manifest.json`, `sparsity.json`, `analysis/structure.json`, `bench.json`, `eval.json`) and from the
sweep ledger `runs/<model>/sweep.json`; every table row links the run directory it was read from. A
stage output that is missing, or a stage that failed in a sweep, is listed as a gap with the command
that fills it; the report never fails for it. Output is deterministic (sorted recipes and levels, no
timestamps), so a rerun over the same runs gives the same files.

Reports of several shape-only models (random weights at a real model's shapes) also produce
`reports/shapes.md`: DeepSparse vs ONNX Runtime speedup and efficiency against the FLOP-ideal per
model and level, and peak memory per stage.
"""
from __future__ import annotations

import ast
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from harness.errors import HarnessError
from harness.paths import PROJECT_ROOT, reports_dir, runs_dir
from harness.rundir import MANIFEST, level_name, read_json, safe_name, write_atomic

SWEEP_FILE = "sweep.json"
BACKENDS_DIR = Path(__file__).with_name("backends")
# stage -> (its output in the run directory, the make target that produces it)
STAGE_OUTPUTS = {
    "prune": ("sparsity.json", "prune"),
    "analyze": ("analysis/structure.json", "analyze"),
    "bench": ("bench.json", "bench"),
    "eval": ("eval.json", "eval"),
}
RESOURCE_STAGES = ("prune", "analyze", "export", "bench", "eval")
SPEED_ENGINES = {"deepsparse": "DeepSparse", "onnxruntime": "ONNX Runtime", "pytorch": "PyTorch"}
PLOTTED_ENGINES = ("deepsparse", "onnxruntime")  # the question: DeepSparse vs ONNX Runtime
HEADLINE = "DeepSparse sparse vs ONNX Runtime dense"
# bench.json `sizes` key -> label; the first three are the plot's dense / compressed / sparse format
SIZE_FORMATS = {
    "checkpoint": "dense fp32 checkpoint (safetensors)",
    "checkpoint_gzip": "same, gzip-compressed",
    "sparse_bitmask": "sparse-bitmask format (compressed-tensors)",
    "onnx": "ONNX graph(s)",
    "onnx_gzip": "ONNX, gzip-compressed",
}
PLOTTED_SIZES = ("checkpoint", "checkpoint_gzip", "sparse_bitmask")
LOG_SCALE_METRICS = ("perplexity",)  # metrics that explode when a model collapses
COLLAPSE_PERCENT = 10.0  # accuracy: a metric worse than dense by more than this (relative) has collapsed
EFFICIENCY_FLOOR = 0.5  # speed: below this share of the FLOP-ideal, speedup no longer tracks sparsity
SHAPES_REPORT = "shapes"
LINESTYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v", "P")

CONCEPTS = """\
- **Sparsification** is the umbrella term: make most of a model's arithmetic or storage involve zeros,
  so that a runtime able to skip zeros does less work and the file compresses. The zeros can be static
  (weights removed once) or dynamic (parts of the network skipped per input).
- **Pruning** is static weight sparsity: weights chosen by a criterion (magnitude, or a second-order
  or gradient-based score) are set to zero and stay zero. *Unstructured* pruning may remove any single
  weight (highest accuracy for a given sparsity, hardest to speed up); *semi-structured* (N:M, e.g. 2:4)
  and *structured* pruning (blocks, channels, heads) remove regular groups that kernels exploit more
  easily. *One-shot* pruning needs no training; *gradual* pruning removes weights over fine-tuning
  steps so the remaining ones compensate.
- **Quantization** keeps every weight but stores and computes it with fewer bits (e.g. INT8 instead of
  FP32): the model shrinks by the bit ratio and integer kernels run faster, whatever the values are.
  It is orthogonal to pruning and combines with it (sparse + INT8 is DeepSparse's fastest path).
- **Distillation** trains a student to reproduce a teacher's outputs (or hidden states). It changes the
  model's weights or architecture rather than zeroing entries, costs training compute, and is often
  used to recover the accuracy a pruned or smaller model lost.
- **MoEfication** splits each dense feed-forward layer into groups of neurons (experts) and adds a router
  that activates only a few of them per token: conditional computation. The parameter count stays; the
  work per token drops. It is dynamic activation sparsity, decided per input, not static weight sparsity.

How they differ: pruning lowers the number of non-zero weights, quantization the bits per weight,
distillation the model's size or its accuracy loss through training, and MoEfication the share of
weights each token uses. Only quantization pays off on any runtime; pruning needs sparse-aware kernels
(DeepSparse here; ONNX Runtime and PyTorch compute zeros like any other value), and MoEfication needs
routing support. This report measures pruning.
"""


# --- reading run directories ----------------------------------------------------------------------

@dataclass
class Run:
    """One run directory (or one the sweep ledger names but that was never created) and its outputs."""

    recipe: str
    level: float
    path: Path
    manifest: dict = field(default_factory=dict)
    outputs: dict = field(default_factory=dict)  # stage -> parsed output JSON, for the outputs on disk
    ledger: dict = field(default_factory=dict)  # stage -> its record in runs/<model>/sweep.json

    @property
    def sparsity(self) -> dict | None:
        return self.outputs.get("prune")

    @property
    def x(self) -> float:
        """Where the run sits on a sparsity axis: the achieved sparsity of its prunable weights, else its level."""
        return self.sparsity["achieved_percent"] if self.sparsity else self.level

    def stage_record(self, stage: str) -> dict:
        return self.manifest.get("stages", {}).get(stage) or {}


@dataclass
class ModelRuns:
    """All runs of one model, sorted by recipe then level."""

    model: str
    directory: Path
    runs: list[Run]

    @property
    def spec(self) -> dict:
        return next((run.manifest["spec"] for run in self.runs if run.manifest.get("spec")), {})

    @property
    def name(self) -> str:
        return next((run.manifest["model"] for run in self.runs if run.manifest.get("model")), self.model)

    @property
    def shape_only(self) -> bool:
        return bool(self.spec.get("shape_only"))

    @property
    def recipes(self) -> list[str]:
        return sorted({run.recipe for run in self.runs})

    def with_output(self, stage: str, key: str | None = None) -> list[Run]:
        """Runs that have `stage`'s output (holding a non-empty `key`, if given)."""
        return [run for run in self.runs if stage in run.outputs and (key is None or run.outputs[stage].get(key))]

    def expected_stages(self) -> list[str]:
        return [stage for stage in STAGE_OUTPUTS if not (stage == "eval" and self.shape_only)]

    def expects(self, run: Run, stage: str) -> bool:
        """Whether a missing output of an expected stage is a gap for `run`. A shape-only run that a sweep ran expects
        only the stages the sweep was asked for (`make bench-shapes` prunes and analyses INC's runs)."""
        return not (self.shape_only and run.ledger and stage not in run.ledger)


def read_output(run_path: Path, stage: str) -> dict | None:
    """A stage's JSON output in a run directory, or None when it is not there (or unreadable)."""
    path = run_path / STAGE_OUTPUTS[stage][0]
    try:
        return read_json(path)
    except (OSError, ValueError):
        return None


def read_ledger(model_dir: Path) -> dict:
    """`runs/<model>/sweep.json` as {(recipe, level): {stage: record}}; empty without a sweep."""
    try:
        entries = read_json(model_dir / SWEEP_FILE).get("runs", {})
    except (OSError, ValueError):
        return {}
    ledger = {}
    for key, stages in entries.items():
        recipe, _, level = key.rpartition("/")
        try:
            ledger[(recipe, float(level))] = stages
        except ValueError:
            continue
    return ledger


def collect(model: str) -> ModelRuns:
    """Every run directory of a model (found by its manifest) plus the runs its sweep ledger names."""
    model_dir = runs_dir() / safe_name(model)
    runs: dict[tuple[str, float], Run] = {}
    for manifest_path in sorted(model_dir.rglob(MANIFEST)):
        relative = manifest_path.relative_to(model_dir).parts
        if any(part.startswith(".") for part in relative):  # staging directories of unfinished stages
            continue
        try:
            manifest = read_json(manifest_path)
            key = (manifest["recipe"], float(manifest["level"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
        path = manifest_path.parent
        runs[key] = Run(key[0], key[1], path, manifest,
                        {stage: out for stage in STAGE_OUTPUTS if (out := read_output(path, stage)) is not None})
    for key, stages in read_ledger(model_dir).items():
        run = runs.setdefault(key, Run(key[0], key[1], model_dir / key[0] / level_name(key[1])))
        run.ledger = stages
    if not runs:
        raise HarnessError(f"no run directories for model '{model}' under {runs_dir()}: "
                           f"run `make sweep MODEL={model}` first")
    return ModelRuns(model, model_dir, sorted(runs.values(), key=lambda r: (r.recipe, r.level)))


def models_with_runs() -> list[str]:
    """Model directory names under the runs root that hold a run or a sweep ledger."""
    root = runs_dir()
    if not root.is_dir():
        return []
    return sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")
                  and ((d / SWEEP_FILE).exists() or any(d.rglob(MANIFEST))))


# --- formatting -----------------------------------------------------------------------------------

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


def relative_to_reports(path: Path) -> str:
    return Path(os.path.relpath(path, reports_dir())).as_posix()


def run_link(run: Run) -> str:
    """The run directory, as a link relative to the report (the row's provenance)."""
    target = relative_to_reports(run.path)
    shown = run.path.relative_to(runs_dir().parent).as_posix() if run.path.is_relative_to(runs_dir().parent) \
        else run.path.as_posix()
    return f"[{shown}]({target})"


def make_target(stage: str, model: str, run: Run) -> str:
    """The command that produces `stage`'s output for this run."""
    if stage == "analyze":
        return f"make analyze MODEL={_shown_path(run.path)}"
    return f"make {STAGE_OUTPUTS[stage][1]} MODEL={model} LEVEL={level_name(run.level)} RECIPE={run.recipe}"


def _shown_path(path: Path) -> str:
    return path.relative_to(PROJECT_ROOT).as_posix() if path.is_relative_to(PROJECT_ROOT) else path.as_posix()


# --- plots ----------------------------------------------------------------------------------------

class PlotSet:
    """The PNGs of one report: `reports/<name>.<plot>.png`, linked relative to the markdown."""

    def __init__(self, name: str):
        self.prefix = name
        self.written: list[Path] = []

    def path(self, plot: str) -> Path:
        path = reports_dir() / f"{self.prefix}.{re.sub(r'[^A-Za-z0-9_-]+', '-', plot)}.png"
        self.written.append(path)
        return path

    def image(self, path: Path, alt: str) -> str:
        return f"![{alt}]({relative_to_reports(path)})"

    def remove_stale(self) -> None:
        """Delete this report's PNGs from earlier generations that this one did not write."""
        pattern = re.compile(re.escape(self.prefix) + r"\.[A-Za-z0-9_-]+\.png")
        for path in reports_dir().glob(f"{self.prefix}.*.png"):
            if pattern.fullmatch(path.name) and path not in self.written:
                path.unlink()


def recipe_styles(recipes: list[str]) -> dict[str, dict]:
    return {recipe: {"linestyle": LINESTYLES[i % len(LINESTYLES)], "marker": MARKERS[i % len(MARKERS)]}
            for i, recipe in enumerate(recipes)}


def sparsity_axis(ax) -> None:
    ax.set_xlabel("sparsity of the prunable weights (%, measured)")
    ax.set_xlim(-2, 102)


def by_recipe(runs: list[Run]) -> dict[str, list[Run]]:
    grouped: dict[str, list[Run]] = {}
    for run in runs:
        grouped.setdefault(run.recipe, []).append(run)
    return grouped


def draw(ax, runs: list[Run], value, **style) -> None:
    """One line over runs (in level order): x = measured sparsity, y = value(run) (None: a gap in the line)."""
    ax.plot([run.x for run in runs], [_nan(value(run)) for run in runs], **style)


def _nan(value) -> float:
    return math.nan if value is None else value


def legend(ax, colors: dict[str, str], styles: dict[str, dict], extra: dict[str, dict] | None = None) -> None:
    """One legend outside the axes: a colour per quantity, a line style per recipe (or model), then extras."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=color, label=label) for label, color in colors.items()]
    handles += [Line2D([], [], label=label, **{"color": "grey", **style}) for label, style in styles.items()]
    handles += [Line2D([], [], label=label, **style) for label, style in (extra or {}).items()]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0))


DENSE_LINE = {"color": "grey", "linestyle": "--", "linewidth": 1}


def shape_note(models: ModelRuns) -> str:
    return " (shape-only: random weights)" if models.shape_only else ""


# --- sections -------------------------------------------------------------------------------------

def section_header(models: ModelRuns) -> list[str]:
    spec = models.spec
    lines = [f"# Sparsification report: {models.name}{shape_note(models)}", ""]
    if models.shape_only:
        lines += ["> **Shape-only model**: random weights (fixed seed) at the published model's shapes. "
                  "Speed, size and memory are real; accuracy would be meaningless and is not measured.", ""]
    if spec.get("description"):
        lines += [f"{spec['description'].rstrip('.')}. Architecture: {spec.get('architecture', '?')}, loaded as "
                  f"`{spec.get('model_class', '?')}`.", ""]
    lines += [f"Generated by `python -m harness report` from {sum(1 for r in models.runs if r.manifest)} run "
              f"directories under "
              f"`{_shown_path(models.directory)}/` ({', '.join(f'`{r}`' for r in models.recipes)}); "
              "every table row links the run directory its numbers come from.", ""]
    return lines


def section_contents(names: list[str]) -> list[str]:
    return ["## Contents", "", *(f"- [{name}](#{anchor(name)})" for name in names), ""]


def anchor(title: str) -> str:
    return re.sub(r"[^a-z0-9 -]", "", title.lower()).replace(" ", "-")


def gaps(models: ModelRuns) -> list[tuple[Run, str, bool, str]]:
    """(run, stage, failed?, what is wrong) for every expected stage output that is missing or failed."""
    found = []
    for run in models.runs:
        for stage in [stage for stage in models.expected_stages() if models.expects(run, stage)]:
            record = run.ledger.get(stage, {})
            status = record.get("status")
            if status == "failed":
                found.append((run, stage, True, f"failed in the sweep: {record.get('error', 'no error recorded')}"))
            elif stage not in run.outputs:
                reason = f"skipped in the sweep ({record['reason']}); " if status == "skipped" else ""
                found.append((run, stage, False, f"{reason}missing `{STAGE_OUTPUTS[stage][0]}`: run "
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
            missing_everywhere = len(levels) > 1 and len(entries) == len(levels) and not any(g[2] for g in entries)
            if missing_everywhere:
                level_list = " ".join(level_name(run.level) for run in levels)
                lines.append(f"- {prefix}`{recipe}`, {stage}: missing `{STAGE_OUTPUTS[stage][0]}` at every level "
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
            cells.append("FAILED" if status == "failed" else "done" if stage in run.outputs
                         else "missing" if models.expects(run, stage) else "not asked")
        rows.append([run.recipe, level_name(run.level), *cells, run_link(run)])
    lines += table(["recipe", "level %", *stages, "run directory"], rows)
    found = gap_lines(models)
    if found:
        lines += ["**Gaps**: these numbers are absent from the sections below.", "", *found]
    else:
        lines.append("No gaps: every run has the output of every stage expected of it.")
    return lines + [""]


def section_concepts() -> list[str]:
    return [CONCEPTS]


def recipe_header(run: Run) -> dict:
    """The harness header of the recipe file a run was made with (from its manifest)."""
    try:
        header = yaml.safe_load(run.manifest.get("recipe_text", "")) or {}
    except yaml.YAMLError:
        return {}
    return header if isinstance(header, dict) else {}


def backend_summary(backend: str) -> str:
    """The first paragraph of the backend module's docstring (read from source; nothing is imported)."""
    path = BACKENDS_DIR / f"{backend}.py"
    try:
        docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
    except (OSError, SyntaxError):
        return ""
    return " ".join(docstring.split("\n\n")[0].split())


def section_methods(models: ModelRuns) -> list[str]:
    lines = ["Each recipe as recorded in its runs' manifests (the recipe file's header and the backend's own "
             "recipe text).", ""]
    for recipe in models.recipes:
        runs = [run for run in models.runs if run.recipe == recipe and run.manifest]
        if not runs:
            lines += [f"### `{recipe}`", "", "No run directory exists for this recipe (see the gaps).", ""]
            continue
        header = recipe_header(runs[0])
        backend = header.get("backend", "?")
        lines += [f"### `{recipe}`", "", f"{header.get('description', '(no description)').rstrip('.')}.", "",
                  f"- backend `{backend}`: {backend_summary(backend) or '(no description)'}",
                  f"- prunes: {_targets(header.get('targets', 'default'))}",
                  f"- calibration sequences: {number((header.get('calibration') or {}).get('samples', 0))}",
                  f"- parameters: {_params(runs[0].manifest.get('params') or {})}",
                  f"- levels run: {', '.join(level_name(r.level) + ' %' for r in runs)}", ""]
        body = header.get("recipe")
        if isinstance(body, str) and body.strip():
            lines += ["<details><summary>backend recipe</summary>", "", "```yaml", body.rstrip(), "```", "",
                      "</details>", ""]
    return lines


def _targets(targets) -> str:
    if targets == "default":
        return ("the Linear/Conv1D weights inside the transformer blocks (embeddings, LM head, norms, biases "
                "stay dense)")
    return "parameters matching " + ", ".join(f"`{t}`" for t in targets)


def _params(params: dict) -> str:
    return ", ".join(f"`{k}={v}`" for k, v in params.items()) or "none"


def section_sparsity(models: ModelRuns) -> list[str]:
    runs = models.with_output("prune")
    if not runs:
        return ["Missing: no run has `sparsity.json` (run the prune stage).", ""]
    rows = [[run.recipe, level_name(run.level), number(run.sparsity.get("target_percent")),
             number(run.sparsity.get("achieved_percent")), number(run.sparsity.get("overall_percent")),
             number(run.sparsity.get("prunable_params")), number(run.sparsity.get("total_params")), run_link(run)]
            for run in runs]
    lines = ["Target and measured sparsity (percent of weights that are exactly zero in the saved checkpoint).", ""]
    lines += table(["recipe", "level %", "target %", "achieved % (prunable)", "overall % (all weights)",
                    "prunable weights", "all weights", "run directory"], rows)
    return lines


# accuracy --------------------------------------------------------------------------------------------

def benchmark_directions() -> dict[str, set]:
    """benchmark -> metric names where higher is better (from evals/benchmarks.yaml)."""
    from harness.evaluate import benchmark_registry

    try:
        return {name: set(entry.get("higher_is_better", [])) for name, entry in benchmark_registry().items()}
    except HarnessError:
        return {}


def higher_is_better(directions: dict, benchmark: str, metric: str) -> bool | None:
    """None when the benchmark is unknown; `en-fr/bleu` counts as `bleu`."""
    if benchmark not in directions:
        return None
    return metric.rpartition("/")[2] in directions[benchmark]


def accuracy_points(models: ModelRuns) -> dict[str, dict[str, dict[str, list[tuple[Run, dict]]]]]:
    """{benchmark: {metric: {recipe: [(run, metric entry)]}}} over the finished benchmarks."""
    points: dict = {}
    for run in models.with_output("eval"):
        for benchmark, result in sorted(run.outputs["eval"].get("benchmarks", {}).items()):
            if result.get("status") != "done":
                continue
            for metric, entry in result.get("metrics", {}).items():
                points.setdefault(benchmark, {}).setdefault(metric, {}).setdefault(run.recipe, []).append((run, entry))
    return points


def dense_value(series: dict[str, list[tuple[Run, dict]]]) -> tuple[Run, float] | None:
    """The level-0 (dense baseline) value, from the first recipe that has one."""
    for recipe in sorted(series):
        for run, entry in series[recipe]:
            if run.level == 0:
                return run, entry["value"]
    return None


def plot_accuracy(models: ModelRuns, benchmark: str, metrics: dict, directions: dict, path: Path) -> None:
    """One panel per metric of a benchmark: a line per recipe, the dense baseline dashed and starred."""
    from harness import plots

    styles = {recipe: {**style, "color": f"C{i}"}
              for i, (recipe, style) in enumerate(recipe_styles(models.recipes).items())}
    with plots.figure(path, panels=len(metrics), panel_width=6.0) as (fig, axes):
        for ax, (metric, series) in zip(axes, metrics.items()):
            for recipe, points in series.items():
                values = {id(run): entry["value"] for run, entry in points}
                draw(ax, [run for run, _ in points], lambda r: values[id(r)], **styles[recipe])
            dense = dense_value(series)
            if dense:
                ax.axhline(dense[1], **DENSE_LINE)
                ax.plot([dense[0].x], [dense[1]], marker="*", markersize=12, color="black", linestyle="none")
            better = higher_is_better(directions, benchmark, metric)
            direction = "" if better is None else " (higher is better)" if better else " (lower is better)"
            if any(word in metric for word in LOG_SCALE_METRICS):
                ax.set_yscale("log")
            ax.set(title=f"{benchmark}: {metric}", ylabel=f"{metric}{direction}")
            sparsity_axis(ax)
            legend(ax, {}, styles, {"dense baseline (level 0)": {**DENSE_LINE, "marker": "*", "color": "black"}})
        fig.suptitle(f"{models.name}: accuracy vs sparsity (PyTorch)")


def engine_check(result: dict, metric: str) -> str:
    """What the deployed-engine check of a benchmark says about one metric, as stored in eval.json."""
    engine = result.get("deepsparse") or {}
    if "difference" in engine:
        return f"{engine.get('runtime', '?')} − PyTorch {number(engine['difference'].get(metric))}"
    if "agreement" in engine:
        return f"{engine.get('runtime', '?')} agreement {number(engine['agreement'])} on {number(engine.get('sample'))}"
    if "mean_cosine_vs_pytorch" in engine:
        return (f"{engine.get('runtime', '?')} cosine {number(engine['mean_cosine_vs_pytorch'])} "
                f"on {number(engine.get('sample'))}")
    return "–"


def section_accuracy(models: ModelRuns, plots: PlotSet) -> list[str]:
    if models.shape_only:
        return ["Not measured: this is a shape-only model with random weights, so accuracy means nothing.", ""]
    points = accuracy_points(models)
    if not points:
        return [f"Missing: no run has a finished `eval.json`; run `make sweep MODEL={models.name} "
                 f"STAGES=eval` (or `make eval ...` per run).", ""]
    directions = benchmark_directions()
    lines = ["PyTorch metrics on each model's paper benchmarks; the dashed line and star mark the dense "
             "baseline (level 0). Δ is the difference to level 0 as recorded in `eval.json`; the engine "
             "column is the check of the exported model on the deployed runtime.", ""]
    for benchmark, metrics in points.items():
        path = plots.path(f"accuracy-{benchmark}")
        plot_accuracy(models, benchmark, metrics, directions, path)
        lines += [f"### {benchmark}", "", plots.image(path, f"{benchmark} vs sparsity"), ""]
        rows = []
        for metric, series in metrics.items():
            for recipe, entries in series.items():
                for run, entry in entries:
                    result = run.outputs["eval"]["benchmarks"][benchmark]
                    rows.append([run.recipe, level_name(run.level), number(run.x), metric, number(entry["value"]),
                                 number(entry.get("stderr")),
                                 number((result.get("delta_vs_level0") or {}).get(metric)),
                                 number(result.get("examples")), number(result.get("limit")),
                                 engine_check(result, metric), run_link(run)])
        lines += table(["recipe", "level %", "achieved %", "metric", "value", "stderr", "Δ vs level 0",
                        "examples", "limit", "deployed engine", "run directory"], rows)
    skipped = sorted({(name, result.get("reason", "")) for run in models.with_output("eval")
                      for name, result in run.outputs["eval"].get("benchmarks", {}).items()
                      if result.get("status") != "done"})
    if skipped:
        lines += ["Benchmarks skipped by the eval stage:", "", *(f"- {name}: {reason}" for name, reason in skipped), ""]
    return lines


# speed -----------------------------------------------------------------------------------------------

def scenarios(runs: list[Run]) -> list[str]:
    """Bench scenarios (`b<batch>_s<seq>`) across runs, by batch size then sequence length."""
    names = {s for run in runs for s in run.outputs["bench"].get("speedups", {})}
    return sorted(names, key=lambda s: tuple(int(n) for n in re.findall(r"\d+", s)))


def plot_speed(models: ModelRuns, runs: list[Run], scenario_names: list[str], path: Path) -> None:
    from harness import plots

    styles = recipe_styles(models.recipes)
    lines = {"deepsparse": ("DeepSparse vs its own dense", "tab:blue"),
             "onnxruntime": ("ONNX Runtime vs its own dense", "tab:orange"),
             "headline": (HEADLINE, "tab:green"), "ideal": ("FLOP-ideal", "black")}
    with plots.figure(path, panels=len(scenario_names), panel_width=7.5) as (fig, axes):
        for ax, scenario in zip(axes, scenario_names):
            measured = [r for r in runs if scenario in r.outputs["bench"]["speedups"]]
            for recipe, recipe_runs in by_recipe(measured).items():
                for key, (_, color) in lines.items():
                    value = ((lambda r: r.outputs["bench"]["flop_ideal"][scenario]["speedup"]) if key == "ideal"
                             else (lambda r, key=key: r.outputs["bench"]["speedups"][scenario].get(key)))
                    draw(ax, recipe_runs, value, color=color, **styles[recipe])
            ax.axhline(1, **DENSE_LINE)
            batch, seq = (re.findall(r"\d+", scenario) + ["?", "?"])[:2]
            ax.set(title=f"batch {batch}, sequence {seq}", ylabel="speedup (× vs dense, median latency)")
            ax.set_ylim(bottom=0)
            sparsity_axis(ax)
            legend(ax, dict(lines.values()), styles, {"dense baseline (1×)": DENSE_LINE})
        fig.suptitle(f"{models.name}{shape_note(models)}: speedup vs sparsity")


SPEED_COLUMNS = ["achieved %", "scenario", "DeepSparse", "ONNX Runtime", "PyTorch", "headline", "FLOP-ideal",
                 "eff. DeepSparse", "eff. ONNX Runtime", "eff. headline"]


def speed_cells(run: Run, scenario: str) -> list[str] | None:
    """The SPEED_COLUMNS of one run and scenario, as stored in its bench.json (None without that scenario)."""
    document = run.outputs["bench"]
    speed = document["speedups"].get(scenario)
    if not speed:
        return None
    efficiency = speed.get("efficiency") or {}
    return [number(document.get("achieved_percent")), scenario,
            *(number(speed.get(engine)) for engine in ("deepsparse", "onnxruntime", "pytorch", "headline")),
            number(document.get("flop_ideal", {}).get(scenario, {}).get("speedup")),
            *(number(efficiency.get(engine)) for engine in ("deepsparse", "onnxruntime", "headline"))]


def section_speed(models: ModelRuns, plots: PlotSet) -> list[str]:
    runs = models.with_output("bench", "speedups")
    if not runs:
        return [f"Missing: no run has `bench.json`; run `make sweep MODEL={models.name} STAGES=bench` "
                 f"(or `make bench ...` per run).", ""]
    scenario_names = scenarios(runs)
    path = plots.path("speedup")
    plot_speed(models, runs, scenario_names, path)
    first = runs[0].outputs["bench"]
    settings, cpu = first.get("settings", {}), first.get("cpu", {})
    lines = [f"Median latency of one forward pass (encoder-decoders: encoder + one decoder step) on "
             f"{cpu.get('model', 'this CPU')} with {number(settings.get('threads'))} threads; each engine's "
             f"speedup is against its own dense run (level 0), the headline is {HEADLINE}. The FLOP-ideal "
             "counts multiply-accumulates: pruned weights scale with their density, everything else stays dense; "
             "efficiency = measured / ideal.", "", plots.image(path, "speedup vs sparsity"), ""]
    rows = [[run.recipe, level_name(run.level), *cells, run_link(run)]
            for run in runs for scenario in scenario_names if (cells := speed_cells(run, scenario))]
    lines += ["Speedups (× vs dense):", ""]
    lines += table(["recipe", "level %", *SPEED_COLUMNS, "run directory"], rows)
    rows = []
    for run in runs:
        document = run.outputs["bench"]
        for engine, by_scenario in document.get("results", {}).items():
            for scenario in scenario_names:
                timing = by_scenario.get(scenario)
                if timing:
                    rows.append([run.recipe, level_name(run.level), SPEED_ENGINES.get(engine, engine), scenario,
                                 number(timing.get("median_ms")), number(timing.get("p90_ms")),
                                 number(timing.get("items_per_s")), number(timing.get("iterations")),
                                 number(timing.get("threads")), run_link(run)])
    lines += ["Latencies:", ""]
    lines += table(["recipe", "level %", "engine", "scenario", "median ms", "p90 ms", "sequences/s", "iterations",
                    "threads", "run directory"], rows)
    unavailable = sorted({f"{SPEED_ENGINES.get(engine, engine)}: {status.get('reason', '?')}"
                          for run in runs for engine, status in run.outputs["bench"].get("engines", {}).items()
                          if status.get("status") != "ok"})
    warnings = sorted({w for run in runs for w in run.outputs["bench"].get("warnings", [])})
    if unavailable or warnings:
        lines += ["Bench warnings:", "", *(f"- {w}" for w in [*unavailable, *warnings]), ""]
    return lines


# size ------------------------------------------------------------------------------------------------

def plot_sizes(models: ModelRuns, runs: list[Run], path: Path) -> None:
    from harness import plots

    styles = recipe_styles(models.recipes)
    colors = dict(zip(PLOTTED_SIZES, ("tab:red", "tab:purple", "tab:green")))
    with plots.figure(path, panels=2, panel_width=6.5) as (fig, (bytes_ax, bits_ax)):
        for recipe, recipe_runs in by_recipe(runs).items():
            for key, color in colors.items():
                entry = lambda r, key=key: r.outputs["bench"]["sizes"].get(key) or {}  # noqa: E731
                draw(bytes_ax, recipe_runs, lambda r: entry(r).get("bytes", math.nan) / 1e6, color=color,
                     **styles[recipe])
                draw(bits_ax, recipe_runs, lambda r: entry(r).get("bits_per_weight"), color=color, **styles[recipe])
        bytes_ax.set(title="size on disk", ylabel="MB (10^6 bytes)")
        bits_ax.set(title="bits per weight", ylabel="bits per weight (size / number of weights)")
        for ax in (bytes_ax, bits_ax):
            ax.set_ylim(bottom=0)
            sparsity_axis(ax)
        legend(bits_ax, {SIZE_FORMATS[key]: color for key, color in colors.items()}, styles)
        fig.suptitle(f"{models.name}{shape_note(models)}: size vs sparsity")


def section_size(models: ModelRuns, plots: PlotSet) -> list[str]:
    runs = models.with_output("bench", "sizes")
    if not runs:
        return ["Missing: sizes come from `bench.json`, which no run has yet (run the bench stage).", ""]
    path = plots.path("size")
    plot_sizes(models, runs, path)
    lines = ["Bytes on disk of the same weights stored three ways: the dense fp32 checkpoint, the same "
             "gzip-compressed, and the compressed-tensors sparse-bitmask format (non-zero values plus a "
             "one-bit-per-weight mask).", "", plots.image(path, "size vs sparsity"), ""]
    rows = []
    for run in runs:
        sizes = run.outputs["bench"]["sizes"]
        cells = []
        for key in SIZE_FORMATS:
            entry = sizes.get(key) or {}
            cells += [number(entry.get("bytes")), number(entry.get("bits_per_weight"))]
        rows.append([run.recipe, level_name(run.level), number(sizes.get("params")), *cells, run_link(run)])
    header = [h for key in SIZE_FORMATS for h in (f"{key} bytes", f"{key} bits/weight")]
    lines += table(["recipe", "level %", "weights", *header, "run directory"], rows)
    lines += [", ".join(f"`{key}`: {label}" for key, label in SIZE_FORMATS.items()) + ".", ""]
    return lines


# structure -------------------------------------------------------------------------------------------

def measures(runs: list[Run]) -> dict[str, str]:
    """Near-zero measure key -> label, in the order the analysis lists them (union over runs)."""
    found: dict[str, str] = {}
    for run in runs:
        found.update(run.outputs["analyze"].get("measures", {}))
    return found


def plot_structure(models: ModelRuns, runs: list[Run], path: Path) -> None:
    """Near-zero fractions of all weights vs sparsity, then per recipe the fractions by layer at each level."""
    from harness import plots

    styles = recipe_styles(models.recipes)
    labels = measures(runs)
    grouped = by_recipe(runs)
    with plots.figure(path, panels=1 + len(grouped), panel_width=6.0) as (fig, axes):
        overall_ax, layer_axes = axes[0], axes[1:]
        colors = {label: f"C{i}" for i, label in enumerate(labels.values())}
        for recipe, recipe_runs in grouped.items():
            for key, label in labels.items():
                draw(overall_ax, recipe_runs,
                     lambda r, key=key: 100 * r.outputs["analyze"]["overall"]["all"]["fractions"].get(key, math.nan),
                     color=colors[label], **styles[recipe])
        overall_ax.set(title="all weights", ylabel="% of all weights", ylim=(0, 100))
        sparsity_axis(overall_ax)
        legend(overall_ax, colors, styles)
        for ax, (recipe, recipe_runs) in zip(layer_axes, grouped.items()):
            level_colors = {}
            for i, run in enumerate(recipe_runs):
                structure = run.outputs["analyze"]
                layers = list(structure.get("by_layer", {}))
                level_colors[f"level {level_name(run.level)} %"] = f"C{i}"
                for key, linestyle in (("zero", "-"), (structure.get("heatmap_measure"), "--")):
                    if key in structure.get("measures", {}):
                        ax.plot(range(len(layers)), [100 * structure["by_layer"][layer]["fractions"][key]
                                                     for layer in layers],
                                color=f"C{i}", linestyle=linestyle, marker="o", markersize=3)
                ax.set_xticks(range(len(layers)), layers, rotation=90 if len(layers) > 12 else 0)
            near = recipe_runs[0].outputs["analyze"].get("heatmap_measure")
            ax.set(title=f"by layer, {recipe}", xlabel="layer (`other` = outside the blocks)",
                   ylabel="% of the layer's weights", ylim=(0, 100))
            legend(ax, level_colors, {labels.get("zero", "zero"): {"linestyle": "-"},
                                      labels.get(near, str(near)): {"linestyle": "--"}})
        fig.suptitle(f"{models.name}{shape_note(models)}: near-zero weights vs sparsity, overall and by layer")


def section_structure(models: ModelRuns, plots: PlotSet) -> list[str]:
    runs = models.with_output("analyze", "overall")
    if not runs:
        return [f"Missing: no run has `analysis/structure.json`; run `make sweep MODEL={models.name} "
                 f"STAGES=analyze` (or `make analyze MODEL=<run dir>`).", ""]
    path = plots.path("structure")
    plot_structure(models, runs, path)
    labels = measures(runs)
    lines = ["How much of each run is exactly zero or near zero (|w| under absolute thresholds, or under a "
             "multiple of each tensor's standard deviation), over all weights and per transformer block. "
             "Each run's own analysis (per module type, heatmap, histograms) is linked in the last column.", "",
             plots.image(path, "near-zero fractions"), ""]
    rows = []
    for run in runs:
        overall = run.outputs["analyze"]["overall"]
        for group in ("all", "prunable"):
            if group in overall:
                fractions = overall[group]["fractions"]
                rows.append([run.recipe, level_name(run.level), group, number(overall[group].get("params")),
                             *(percent(fractions.get(key)) for key in labels),
                             f"[summary]({relative_to_reports(run.path / 'analysis' / 'summary.md')})", run_link(run)])
    lines += ["Overall (% of weights):", ""]
    lines += table(["recipe", "level %", "group", "weights", *labels.values(), "analysis", "run directory"], rows)
    rows = []
    for run in runs:
        structure = run.outputs["analyze"]
        for layer, entry in structure.get("by_layer", {}).items():
            prunable = entry.get("prunable", {}).get("fractions", {})
            rows.append([run.recipe, level_name(run.level), layer, number(entry.get("params")),
                         *(percent(entry["fractions"].get(key)) for key in labels), percent(prunable.get("zero")),
                         run_link(run)])
    lines += ["By layer (% of the layer's weights; last: exact zeros among its prunable weights):", ""]
    lines += table(["recipe", "level %", "layer", "weights", *labels.values(), "zero in prunable",
                    "run directory"], rows)
    return lines


# challenges ------------------------------------------------------------------------------------------

def relative_change(value: float, dense: float) -> float | None:
    return None if dense == 0 else 100 * (value - dense) / abs(dense)


def accuracy_challenges(models: ModelRuns, threshold: float) -> list[str]:
    points = accuracy_points(models)
    directions = benchmark_directions()
    lines = []
    for benchmark, metrics in points.items():
        for metric, series in metrics.items():
            better = higher_is_better(directions, benchmark, metric)
            dense = dense_value(series)
            if better is None or dense is None:
                lines.append(f"- {benchmark} {metric}: no dense baseline or unknown direction; not judged.")
                continue
            for recipe, entries in series.items():
                lines.append(f"- {benchmark} {metric}, `{recipe}`: {_collapse(entries, dense[1], better, threshold)}")
    if not lines:
        return [f"- Accuracy: not measured yet (no `eval.json`)."]
    return [f"**Where accuracy collapses**: the first level whose metric is more than {number(threshold)} % "
            f"worse than the dense baseline (relative).", "", *lines]


def _collapse(entries: list[tuple[Run, dict]], dense: float, better: bool, threshold: float) -> str:
    held = None
    for run, entry in sorted(entries, key=lambda e: e[0].level):
        change = relative_change(entry["value"], dense)
        if change is None:
            return "the dense baseline is 0, so a relative change is undefined; not judged."
        worse = -change if better else change
        if worse > threshold:
            kept = f"; holds up to {level_name(held.level)} %" if held and held.level > 0 else ""
            return (f"collapses at {level_name(run.level)} % ({number(entry['value'])} vs dense {number(dense)}, "
                    f"{change:+.1f} %){kept}.")
        held = run
    return (f"within {number(threshold)} % of dense up to the highest level measured"
            f" ({level_name(held.level)} %)." if held else "no levels measured.")


def speed_challenges(models: ModelRuns, floor: float) -> list[str]:
    runs = models.with_output("bench", "speedups")
    if not runs:
        return ["- Speed: not measured yet (no `bench.json`)."]
    lines = [f"**Where speedup stops tracking sparsity**: the first level where an engine's efficiency "
             f"(measured speedup / FLOP-ideal) falls below {number(floor)}.", ""]
    for scenario in scenarios(runs):
        for recipe in models.recipes:
            recipe_runs = [r for r in runs if r.recipe == recipe and scenario in r.outputs["bench"]["speedups"]]
            pruned = [r for r in recipe_runs if r.level > 0]
            if not pruned:
                continue
            for engine in (*PLOTTED_ENGINES, "headline"):
                label = HEADLINE if engine == "headline" else SPEED_ENGINES[engine]
                lines.append(f"- {scenario}, `{recipe}`, {label}: {_tracking(pruned, scenario, engine, floor)}")
            top = max(pruned, key=lambda r: r.level)
            ideal = top.outputs["bench"]["flop_ideal"][scenario]
            share = ideal.get("pruned_share")
            if share is not None and share < 1:
                lines.append(
                    f"- {scenario}, `{recipe}`, Amdahl's law: at {level_name(top.level)} % the pruned weights carry "
                    f"{percent(share)} % of the dense multiply-accumulates; the rest (dense weights such as the LM "
                    f"head and unpruned layers: {percent(ideal.get('dense_linear_share'))} %, attention matmuls: "
                    f"{percent(ideal.get('other_matmul_share'))} %) does not shrink, so even at 100 % sparsity the "
                    f"FLOP-ideal speedup is at most {number(round(1 / (1 - share), 2))}× "
                    f"(here {number(ideal.get('speedup'))}×).")
    return lines


def _tracking(runs: list[Run], scenario: str, engine: str, floor: float) -> str:
    entries = [(run, run.outputs["bench"]["speedups"][scenario]) for run in sorted(runs, key=lambda r: r.level)]
    measured = [(run, e.get(engine), (e.get("efficiency") or {}).get(engine)) for run, e in entries]
    measured = [(run, s, eff) for run, s, eff in measured if s is not None and eff is not None]
    if not measured:
        return "not measured (engine unavailable)."
    best = max(measured, key=lambda m: m[1])
    summary = f"best {number(best[1])}× at {level_name(best[0].level)} %"
    below = next(((run, s, eff) for run, s, eff in measured if eff < floor), None)
    if below is None:
        return f"{summary}; efficiency stays at or above {number(floor)} up to {level_name(measured[-1][0].level)} %."
    run, speed, efficiency = below
    ideal = run.outputs["bench"]["flop_ideal"][scenario]["speedup"]
    return (f"{summary}; stops tracking at {level_name(run.level)} % ({number(speed)}× of an ideal "
            f"{number(ideal)}×, efficiency {number(efficiency)}).")


def dense_engine_range(models: ModelRuns) -> str:
    """`(here ONNX Runtime a-b×, ...)`: the spread of the dense-kernel engines' speedups over pruned levels."""
    spreads = []
    for engine in ("onnxruntime", "pytorch"):
        values = [speed[engine] for run in models.with_output("bench", "speedups") if run.level > 0
                  for speed in run.outputs["bench"]["speedups"].values() if speed.get(engine) is not None]
        if values:
            spreads.append(f"{SPEED_ENGINES[engine]} {number(min(values))}–{number(max(values))}×")
    return f" (measured here over the pruned levels: {', '.join(spreads)})" if spreads else ""


def size_challenges(models: ModelRuns) -> list[str]:
    runs = models.with_output("bench", "sizes")
    lines = []
    for recipe in models.recipes:
        recipe_runs = [r for r in runs if r.recipe == recipe]
        if not recipe_runs:
            continue
        top = max(recipe_runs, key=lambda r: r.level)
        sizes = top.outputs["bench"]["sizes"]
        dense, sparse = sizes.get("checkpoint") or {}, sizes.get("sparse_bitmask") or {}
        gzipped = sizes.get("checkpoint_gzip") or {}
        if dense and sparse:
            lines.append(f"- Size, `{recipe}` at {level_name(top.level)} %: sparse-bitmask "
                         f"{number(sparse.get('bits_per_weight'))} bits per weight vs "
                         f"{number(dense.get('bits_per_weight'))} dense and {number(gzipped.get('bits_per_weight'))} "
                         f"gzip-compressed (the format stores 32 bits per non-zero weight plus a one-bit mask per "
                         f"weight: about 1 + 32 × (1 − sparsity) bits).")
    return lines


def section_challenges(models: ModelRuns, threshold: float, floor: float) -> list[str]:
    lines = []
    if not models.shape_only:
        lines += [*accuracy_challenges(models, threshold), ""]
    lines += [*speed_challenges(models, floor), ""]
    if models.with_output("bench", "speedups"):
        lines += ["Why speedup lags sparsity: only the pruned matrix multiplications can shrink (Amdahl's law "
                  "above), and a sparse kernel does not reach the FLOP count either — it must decode which weights "
                  "are present, loses the regular memory access and vector width of dense kernels, and at small "
                  "batch is bound by memory traffic rather than arithmetic. ONNX Runtime and PyTorch multiply the "
                  f"zeros like any value, so their speedups are noise around 1×{dense_engine_range(models)}.", ""]
    size_lines = size_challenges(models)
    if size_lines:
        lines += [*size_lines, ""]
    return lines


# resources -------------------------------------------------------------------------------------------

def section_resources(models: ModelRuns) -> list[str]:
    lines = [RESOURCE_NOTE, ""]
    rows = [[run.recipe, level_name(run.level), *resource_cells(run), run_link(run)]
            for run in models.runs if run.manifest]
    return lines + table(["recipe", "level %", *RESOURCE_COLUMNS, "run directory"], rows)


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


# --- the reports ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Options:
    collapse_percent: float = COLLAPSE_PERCENT
    efficiency_floor: float = EFFICIENCY_FLOOR


def render(models: ModelRuns, plots: PlotSet, options: Options = Options()) -> str:
    """The markdown of one model's report (writing its plots as it goes)."""
    sections = [
        ("Runs and gaps", lambda: section_coverage(models)),
        ("Concepts", section_concepts),
        ("Methods used", lambda: section_methods(models)),
        ("Sparsity reached", lambda: section_sparsity(models)),
        ("Accuracy vs sparsity", lambda: section_accuracy(models, plots)),
        ("Speed vs sparsity", lambda: section_speed(models, plots)),
        ("Size vs sparsity", lambda: section_size(models, plots)),
        ("Sparsity structure", lambda: section_structure(models, plots)),
        ("Challenges, from the measured curves",
         lambda: section_challenges(models, options.collapse_percent, options.efficiency_floor)),
        ("Time and memory per stage", lambda: section_resources(models)),
    ]
    lines = [*section_header(models), *section_contents([title for title, _ in sections])]
    for title, build in sections:
        lines += [f"## {title}", "", *build()]
    return "\n".join(lines).rstrip() + "\n"


def write_report(models: ModelRuns, options: Options = Options()) -> Path:
    """Write `reports/<model>.md` and its PNGs from a model's collected runs; returns the markdown path."""
    name = safe_name(models.model)
    reports_dir().mkdir(parents=True, exist_ok=True)
    plots = PlotSet(name)
    markdown = render(models, plots, options)
    target = reports_dir() / f"{name}.md"
    write_atomic(target, markdown)
    plots.remove_stale()
    return target


def render_shapes(all_models: list[ModelRuns], plots: PlotSet) -> str:
    """`reports/shapes.md`: speed and memory of shape-only models side by side."""
    lines = ["# Full-size shapes: speed and memory (shape-only, random weights)", "",
             "Random weights at the published models' shapes: speed, size and memory are real, accuracy is not "
             "measured. Per-model details: " + ", ".join(f"[{m.name}]({safe_name(m.model)}.md)" for m in all_models)
             + ".", ""]
    measured = [(models, models.with_output("bench", "speedups")) for models in all_models]
    rows = [[models.name, run.recipe, level_name(run.level), *cells, run_link(run)]
            for models, runs in measured for run in runs for scenario in scenarios(runs)
            if (cells := speed_cells(run, scenario))]
    lines += ["## Speedup and efficiency vs the FLOP-ideal", ""]
    if rows:
        path = plots.path("speedup")
        plot_shapes(measured, path)
        lines += [f"Each engine against its own dense run (level 0); headline = {HEADLINE}; efficiency = "
                  "measured / FLOP-ideal.", "", plots.image(path, "speedup of each shape model"), ""]
        lines += table(["model", "recipe", "level %", *SPEED_COLUMNS, "run directory"], rows)
    else:
        lines += ["Missing: no shape model has `bench.json` yet; run `make bench-shapes`.", ""]
    lines += ["## Peak memory per stage", "", RESOURCE_NOTE, ""]
    rows = [[models.name, run.recipe, level_name(run.level), *resource_cells(run), run_link(run)]
            for models in all_models for run in models.runs if run.manifest]
    lines += table(["model", "recipe", "level %", *RESOURCE_COLUMNS, "run directory"], rows)
    found = [line for models in all_models for line in gap_lines(models, prefix=f"{models.name} ")]
    if found:
        lines += ["## Gaps", "", *found, ""]
    return "\n".join(lines).rstrip() + "\n"


def plot_shapes(measured: list[tuple[ModelRuns, list[Run]]], path: Path) -> None:
    """Headline speedup (solid) and FLOP-ideal (dotted) of every shape model and recipe, one panel per scenario."""
    from harness import plots

    names = sorted({s for _, runs in measured for s in scenarios(runs)},
                   key=lambda s: tuple(int(n) for n in re.findall(r"\d+", s)))
    recipes = sorted({run.recipe for _, runs in measured for run in runs})
    markers = {recipe: {"marker": MARKERS[i % len(MARKERS)], "linestyle": "none"} for i, recipe in enumerate(recipes)}
    colors = {models.name: f"C{i}" for i, (models, _) in enumerate(measured)}
    with plots.figure(path, panels=len(names), panel_width=7.0) as (fig, axes):
        for ax, scenario in zip(axes, names):
            for models, runs in measured:
                points = [r for r in runs if scenario in r.outputs["bench"]["speedups"]]
                for recipe, recipe_runs in by_recipe(points).items():
                    style = {"color": colors[models.name], "marker": markers[recipe]["marker"]}
                    draw(ax, recipe_runs, lambda r: r.outputs["bench"]["speedups"][scenario].get("headline"), **style)
                    draw(ax, recipe_runs, lambda r: r.outputs["bench"]["flop_ideal"][scenario]["speedup"],
                         linestyle=":", **style)
            ax.axhline(1, **DENSE_LINE)
            ax.set_ylim(bottom=0)
            ax.set(title=f"{scenario}: {HEADLINE}", ylabel="speedup (× vs dense, median latency)")
            sparsity_axis(ax)
            legend(ax, colors, markers, {"measured": {"color": "black"},
                                         "FLOP-ideal": {"color": "black", "linestyle": ":"},
                                         "dense baseline (1×)": DENSE_LINE})
        fig.suptitle("shape-only models (random weights): speedup vs sparsity")


def report(models: list[str], options: Options = Options()) -> list[Path]:
    """Reports for `models` (`all`: every model with runs); plus `reports/shapes.md` for shape-only models."""
    names = models_with_runs() if models == ["all"] else list(dict.fromkeys(models))
    if not names:
        raise HarnessError(f"no run directories under {runs_dir()}: run `make sweep MODEL=...` first")
    collected = [collect(name) for name in names]  # every model is checked before anything is written
    written = [write_report(m, options) for m in collected]
    shape_models = [m for m in collected if m.shape_only]
    if shape_models:
        plots = PlotSet(SHAPES_REPORT)
        target = reports_dir() / f"{SHAPES_REPORT}.md"
        write_atomic(target, render_shapes(shape_models, plots))
        plots.remove_stale()
        written.append(target)
    return written


def add_arguments(parser) -> None:
    parser.add_argument("--model", nargs="+", required=True,
                        help="one or more models (aliases as used for the runs), or `all` for every model with runs")
    parser.add_argument("--collapse-percent", type=float, default=COLLAPSE_PERCENT,
                        help="accuracy has collapsed when a metric is this many percent worse than dense "
                             "(relative; default %(default)s)")
    parser.add_argument("--efficiency-floor", type=float, default=EFFICIENCY_FLOOR,
                        help="speedup stops tracking sparsity below this share of the FLOP-ideal (default %(default)s)")


def main(args) -> None:
    if args.collapse_percent <= 0 or not 0 < args.efficiency_floor <= 1:
        raise HarnessError("--collapse-percent must be > 0 and --efficiency-floor in (0, 1]")
    for path in report(args.model, Options(args.collapse_percent, args.efficiency_floor)):
        print(f"report: -> {path}")
