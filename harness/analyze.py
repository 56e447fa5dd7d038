"""Stage 3, analyze: how much of a model is (near) zero, overall, per layer, per module type and per section.

The weights are streamed from the safetensors files one tensor at a time (memory-mapped, processed in
chunks), so the model is never materialised. Counts are exact integers; sums are accumulated in
float64; percentiles of |w| come from a log10|w| histogram with 0.001-decade bins (within 0.12 %).

Outputs go to `<run dir>/analysis/` for a pruned run, else to `runs/<model>/analysis/`:
    structure.json   counts, fractions and |w| statistics per group, and one entry per tensor
    structure.csv    one row per tensor
    summary.md       short tables the report stage can include
    hist_log10_abs.png, near_zero_by_layer.png, heatmap_layer_type.png
"""
from __future__ import annotations

import contextlib
import csv
import io
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from harness import load, plots, sparsity
from harness.errors import HarnessError
from harness.paths import runs_dir
from harness.recipes import DEFAULT_RECIPE
from harness.rundir import (MANIFEST, WEIGHT_SUFFIXES, PeakMemory, RunDir, discarded_note, fingerprint, parse_level,
                            read_json, safe_name, stage_run, staging_dir, write_atomic, write_json)

STAGE = "analyze"
ANALYSIS_SUBDIR = "analysis"
STRUCTURE_JSON, STRUCTURE_CSV, SUMMARY_MD = "structure.json", "structure.csv", "summary.md"
HISTOGRAM_PNG, BY_LAYER_PNG, HEATMAP_PNG = "hist_log10_abs.png", "near_zero_by_layer.png", "heatmap_layer_type.png"
OUTPUTS = (STRUCTURE_JSON, STRUCTURE_CSV, SUMMARY_MD, HISTOGRAM_PNG, BY_LAYER_PNG, HEATMAP_PNG)
SPARSITY_FILE = "sparsity.json"  # written by the prune stage

ABSOLUTE_THRESHOLDS = (1e-4, 1e-3, 1e-2, 1e-1)
RELATIVE_THRESHOLDS = (0.01, 0.1)
HEATMAP_THRESHOLD = 1e-2
PERCENTILES = (1, 10, 50, 90, 99)
ZERO = "zero"
OUTSIDE_BLOCKS = "other"  # sparsity.layer_of's name for tensors outside numbered blocks
CROSS = "cross-attention"

# log10|w| histogram of nonzero weights: fine bins for percentiles, coarse ones stored for plots.
LOG10_MIN, LOG10_MAX, LOG10_BIN = -10.0, 3.0, 0.001
LOG10_BINS = round((LOG10_MAX - LOG10_MIN) / LOG10_BIN)
COARSE_FACTOR = 50  # 0.05-decade bins in structure.json and the plot
CHUNK = 1 << 22  # elements converted to float64 at a time


def _table(*rows: tuple[str, str]) -> list[tuple[re.Pattern, str]]:
    return [(re.compile(pattern, re.IGNORECASE), label) for pattern, label in rows]


# Module type of a saved tensor: first match wins (re.search on the full tensor name). Covers
# BERT/MiniLM, GPT-2, DeBERTa-v2, M2M100 and Llama naming.
MODULE_TYPES = _table(
    (r"norm|\.ln_(\d+|f)\.", "norm"),
    (r"\.bias$", "bias"),
    (r"lm_head|embed_out", "lm_head"),
    (r"embed|\.wte\.|\.wpe\.|\.shared\.|^shared\.|position", "embedding"),
    (r"c_attn|qkv|query_key_value", "attn_qkv"),
    (r"\.(q_proj|query_proj|query)\.", "attn_q"),
    (r"\.(k_proj|key_proj|key)\.", "attn_k"),
    (r"\.(v_proj|value_proj|value)\.", "attn_v"),
    (r"attention\.output\.dense|attn\.c_proj|\.(o_proj|out_proj)\.", "attn_out"),
    (r"\.gate_proj\.", "mlp_gate"),
    (r"intermediate\.dense|mlp\.c_fc|\.(fc1|up_proj)\.", "mlp_up"),
    (r"output\.dense|mlp\.c_proj|\.(fc2|down_proj)\.", "mlp_down"),
    (r"pooler|classifier|score", "head"),
    (r"", "other"),
)
# Section of an encoder-decoder model's tensor (other architectures have one stack: no sections).
SECTIONS = _table(
    (r"encoder_attn|EncDecAttention|crossattention", CROSS),
    (r"(^|\.)decoder\.", "decoder"),
    (r"(^|\.)encoder\.", "encoder"),
    (r"", "other"),
)


def classify(table: list[tuple[re.Pattern, str]], name: str) -> str:
    return next(label for pattern, label in table if pattern.search(name))


def _abs_key(threshold: float) -> str:
    return f"abs<{threshold:g}"


def _rel_key(k: float) -> str:
    return f"rel<{k:g}std"


@dataclass(frozen=True)
class Thresholds:
    """Absolute |w| thresholds and relative ones (k: |w| < k * std of the tensor); comparisons are strict."""

    absolute: tuple[float, ...] = ABSOLUTE_THRESHOLDS
    relative: tuple[float, ...] = RELATIVE_THRESHOLDS

    def limits(self, std: float) -> dict[str, float]:
        """Measure key -> |w| limit for a tensor with this standard deviation."""
        return {**{_abs_key(t): t for t in self.absolute}, **{_rel_key(k): k * std for k in self.relative}}

    @property
    def keys(self) -> list[str]:
        return [ZERO, *self.limits(0.0)]

    @property
    def labels(self) -> dict[str, str]:
        return {ZERO: "exact zero", **{_abs_key(t): f"|w| < {t:g}" for t in self.absolute},
                **{_rel_key(k): f"|w| < {k:g}·std" for k in self.relative}}


def parse_thresholds(text: str, what: str) -> tuple[float, ...]:
    """`"1e-4,1e-3"` -> (0.0001, 0.001); positive finite numbers only."""
    try:
        values = tuple(sorted({float(part) for part in text.split(",") if part.strip()}))
    except ValueError:
        raise HarnessError(f"{what} must be comma-separated numbers, got {text!r}") from None
    if not values or not all(0 < v < math.inf for v in values):
        raise HarnessError(f"{what} must be positive numbers, got {text!r}")
    return values


@dataclass
class Tally:
    """Exact counts and float64 sums over a set of weights; tallies merge, so a group is the sum of its tensors."""

    keep_histogram: bool = True
    tensors: int = 0
    params: int = 0
    counts: dict = field(default_factory=dict)
    total: float = 0.0
    total_sq: float = 0.0
    total_abs: float = 0.0
    max_abs: float = 0.0
    histogram: np.ndarray | None = None  # counts of nonzero |w| per fine log10 bin

    def merge(self, other: "Tally") -> None:
        self.tensors += other.tensors
        self.params += other.params
        for key, count in other.counts.items():
            self.counts[key] = self.counts.get(key, 0) + count
        self.total += other.total
        self.total_sq += other.total_sq
        self.total_abs += other.total_abs
        self.max_abs = max(self.max_abs, other.max_abs)
        if self.keep_histogram:
            self.histogram = other.histogram.copy() if self.histogram is None else self.histogram + other.histogram

    @property
    def std(self) -> float:
        mean = self.total / self.params
        return math.sqrt(max(self.total_sq / self.params - mean * mean, 0.0))

    def percentiles(self) -> dict[str, float]:
        """Percentiles of |w| (the centre of the histogram bin holding each rank; 0 while in the exact zeros)."""
        zeros = self.counts[ZERO]
        cumulative = zeros + np.cumsum(self.histogram)
        result = {}
        for q in PERCENTILES:
            rank = q / 100 * self.params
            if rank <= zeros:
                result[f"p{q:g}"] = 0.0
            else:
                index = min(int(np.searchsorted(cumulative, rank)), LOG10_BINS - 1)
                result[f"p{q:g}"] = float(f"{10 ** (LOG10_MIN + (index + 0.5) * LOG10_BIN):.4g}")
        return result

    def summary(self, keys: list[str], coarse_histogram: bool = False) -> dict:
        """JSON-ready: counts, fractions (count / params), |w| statistics, and percentiles when a histogram is kept."""
        result = {
            "tensors": self.tensors, "params": self.params,
            "counts": {key: self.counts[key] for key in keys},
            "fractions": {key: self.counts[key] / self.params for key in keys},
            "mean_abs": self.total_abs / self.params, "std": self.std, "max_abs": self.max_abs,
        }
        if self.histogram is not None:
            result["percentiles_abs"] = self.percentiles()
            if coarse_histogram:
                result["log10_abs_counts"] = self.histogram.reshape(-1, COARSE_FACTOR).sum(axis=1).tolist()
        return result


def exact_limit(value: float, dtype: torch.dtype) -> torch.Tensor:
    """The smallest `dtype` number >= value, so that for x of that dtype `x < result` exactly when x < value.

    (Comparing with a Python float would round the threshold to nearest in the tensor's dtype.)
    """
    limit = torch.tensor(value, dtype=dtype)
    if limit.item() < value:
        limit = torch.nextafter(limit, torch.tensor(math.inf, dtype=dtype))
    return limit


def tally_tensor(name: str, tensor: torch.Tensor, thresholds: Thresholds) -> Tally:
    """Two passes over float chunks: float64 sums (for the std relative thresholds need), then exact counts.

    16-bit tensors are compared in float32 (exact widening); sums are accumulated in float64.
    """
    work_dtype = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    chunks = tensor.reshape(-1).split(CHUNK)
    tally = Tally(tensors=1, params=tensor.numel())
    for chunk in chunks:
        values = chunk.to(work_dtype)
        tally.total += torch.sum(values, dtype=torch.float64).item()
        tally.total_sq += torch.linalg.vector_norm(values, dtype=torch.float64).item() ** 2
    if not math.isfinite(tally.total_sq):
        raise HarnessError(f"tensor {name} holds NaN or infinite values: the checkpoint is broken")
    limits = {key: exact_limit(value, work_dtype) for key, value in thresholds.limits(tally.std).items()}
    tally.counts = dict.fromkeys(thresholds.keys, 0)
    tally.histogram = np.zeros(LOG10_BINS, dtype=np.int64)
    for chunk in chunks:
        magnitudes = chunk.to(work_dtype).abs()
        tally.total_abs += torch.sum(magnitudes, dtype=torch.float64).item()
        tally.max_abs = max(tally.max_abs, magnitudes.max().item())
        tally.counts[ZERO] += int(torch.count_nonzero(magnitudes == 0))
        for key, limit in limits.items():
            tally.counts[key] += int(torch.count_nonzero(magnitudes < limit))
        bins = magnitudes.log10().sub_(LOG10_MIN).div_(LOG10_BIN).clamp_(0, LOG10_BINS - 1).to(torch.int64)
        tally.histogram += np.bincount(bins.numpy(), minlength=LOG10_BINS)
    tally.histogram[0] -= tally.counts[ZERO]  # log10(0) = -inf was clamped into the first bin
    return tally


def layer_order(layer: str) -> tuple[int, int]:
    """Sort key: encoder (or the only stack) layers, then decoder layers, then tensors outside blocks."""
    if layer == OUTSIDE_BLOCKS:
        return (2, 0)
    stack, _, index = layer.rpartition(".")
    return (1 if stack == "decoder" else 0, int(index))


def _group_keys(layer: str, section: str, module_type: str, prunable: bool) -> list[tuple[str, ...]]:
    column = f"{module_type} (cross)" if section == CROSS else module_type
    keys = [("overall", "all"), ("by_layer", layer), ("by_module_type", module_type), ("cells", layer, column)]
    if section:
        keys.append(("by_section", section))
    if prunable:
        keys += [("overall", "prunable"), ("layer_prunable", layer)]
    return keys


HISTOGRAM_GROUPS = {"overall", "by_layer", "by_module_type", "by_section"}  # percentiles reported
COARSE_HISTOGRAM_GROUPS = {"overall", "by_module_type", "by_section"}  # histogram stored in the JSON


@contextlib.contextmanager
def _one_thread():
    """These reductions are memory-bound: a second thread gains little, while on a busy machine its
    synchronisation costs ~10 ms per operation (measured: minilm 33 s with 2 threads, 4 s with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def measure_structure(weights_dir: Path, spec: load.ModelSpec, thresholds: Thresholds, prunable: list[str]) -> dict:
    """Stream every floating-point tensor of a checkpoint and tally it into its groups."""
    keys = thresholds.keys
    wanted = set(prunable)
    sectioned = spec.architecture == "encoder-decoder"
    groups: dict[tuple[str, ...], Tally] = {}
    tensors, skipped = [], []
    with _one_thread():
        for name, tensor in tqdm(sparsity.saved_tensors(weights_dir), desc="analyze", unit=" tensors"):
            if not tensor.is_floating_point() or tensor.numel() == 0:
                skipped.append(f"{name} ({str(tensor.dtype).removeprefix('torch.')}, {tensor.numel()} values)")
                continue
            tally = tally_tensor(name, tensor, thresholds)
            layer, module_type = sparsity.layer_of(name), classify(MODULE_TYPES, name)
            section = classify(SECTIONS, name) if sectioned else ""
            is_prunable = sparsity.match_saved_name(name, wanted) is not None
            tensors.append({"name": name, "layer": layer, "section": section, "module_type": module_type,
                            "prunable": is_prunable, "dtype": str(tensor.dtype).removeprefix("torch."),
                            "shape": list(tensor.shape), **tally.summary(keys)})
            for key in _group_keys(layer, section, module_type, is_prunable):
                groups.setdefault(key, Tally(keep_histogram=key[0] in HISTOGRAM_GROUPS)).merge(tally)
    if not tensors:
        raise HarnessError(f"{weights_dir} has no floating-point weight tensors")

    def collect(kind: str, order) -> dict:
        names = sorted((key[1] for key in groups if key[0] == kind), key=order)
        return {name: groups[(kind, name)].summary(keys, kind in COARSE_HISTOGRAM_GROUPS) for name in names}

    type_rank = {label: rank for rank, (_, label) in enumerate(MODULE_TYPES)}
    section_rank = {label: rank for rank, (_, label) in enumerate(SECTIONS)}
    by_layer = collect("by_layer", layer_order)
    for layer, entry in by_layer.items():
        if ("layer_prunable", layer) in groups:
            entry["prunable"] = groups[("layer_prunable", layer)].summary(keys)
    cells: dict[str, dict] = {layer: {} for layer in by_layer}
    for key in sorted((k for k in groups if k[0] == "cells"),
                      key=lambda k: (type_rank[k[2].removesuffix(" (cross)")], k[2])):
        cells[key[1]][key[2]] = groups[key].summary(keys)
    return {
        "measures": thresholds.labels,
        "thresholds": {"absolute": list(thresholds.absolute), "relative_std": list(thresholds.relative)},
        "histogram": {"log10_abs_start": LOG10_MIN, "bin_width": LOG10_BIN * COARSE_FACTOR,
                      "note": "counts of nonzero |w|; values outside the range are put in the end bins"},
        "skipped_tensors": skipped,
        "overall": collect("overall", ["all", "prunable"].index),
        "by_section": collect("by_section", section_rank.get),
        "by_module_type": collect("by_module_type", type_rank.get),
        "by_layer": by_layer,
        "by_layer_and_type": cells,
        "tensors": tensors,
    }


# --- what to analyse -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Subject:
    """The checkpoint to analyse, where the results go, and the run directory if it is a pruned run."""

    spec: load.ModelSpec
    weights_dir: Path
    out_dir: Path
    run: RunDir | None = None


def resolve_subject(model: str, recipe: str | None = None, level=None) -> Subject:
    """MODEL as a run directory path, as model + level (+ recipe) of a run, or as an alias / Hub id / checkpoint."""
    if recipe is not None and level is None:
        raise HarnessError("--recipe addresses a run directory and needs --level too (or pass the run directory as MODEL)")
    path = Path(model).expanduser()
    if level is not None:
        run = RunDir(load.resolve_spec(model).name, recipe or DEFAULT_RECIPE, parse_level(level))
    elif (path / MANIFEST).is_file():
        manifest = read_json(path / MANIFEST)
        run = RunDir(manifest["model"], manifest["recipe"], parse_level(manifest["level"]))
        if run.path.resolve() != path.resolve():
            raise HarnessError(f"run directory {path} is not under the runs root {runs_dir()}: "
                               f"set HARNESS_RUNS to the directory holding {safe_name(run.model)}/")
    else:
        spec = load.resolve_spec(model)
        return Subject(spec, load.checkpoint_dir(spec), runs_dir() / safe_name(spec.name) / ANALYSIS_SUBDIR)
    run.require("prune")
    if not (run.path / SPARSITY_FILE).exists():
        raise HarnessError(f"{run.path} has no {SPARSITY_FILE}: rerun `make prune` for it with ARGS=--force")
    return Subject(load.resolve_spec(str(run.path)), run.model_dir, run.path / ANALYSIS_SUBDIR, run)


def weight_files(subject: Subject) -> list[Path]:
    """The checkpoint's safetensors files, or one clear line saying why there are none."""
    files = sorted(subject.weights_dir.glob("*.safetensors"))
    if files:
        return files
    others = sorted(p.name for p in subject.weights_dir.iterdir() if p.name.endswith(WEIGHT_SUFFIXES))
    if others:
        raise HarnessError(
            f"{subject.weights_dir} holds {others[0]} but analyze reads only safetensors; convert it once with "
            f"`python -c \"import transformers as t; t.{subject.spec.model_class}.from_pretrained('{subject.weights_dir}')"
            f".save_pretrained('CONVERTED', safe_serialization=True)\"` and pass MODEL=CONVERTED")
    raise HarnessError(discarded_note(subject.weights_dir) or f"{subject.weights_dir} has no weights (no *.safetensors file)")


def prunable_tensors(subject: Subject) -> list[str]:
    """A run's pruned tensors (sparsity.json), else the default targets of sparsity.prunable_names.

    The default set is computed on the model's skeleton instantiated on the meta device, so no
    weights are allocated.
    """
    if subject.run:
        return read_json(subject.run.path / SPARSITY_FILE)["prunable_tensors"]
    import transformers

    config = transformers.AutoConfig.from_pretrained(subject.weights_dir)
    with torch.device("meta"):
        skeleton = getattr(transformers, subject.spec.model_class).from_config(config)
    return sparsity.prunable_names(skeleton)


def _weights_identity(subject: Subject):
    """What changes when the weights change: a run's prune record (its weights may since have been
    discarded to save disk), else the checkpoint files' names, sizes and times."""
    if subject.run:
        record = subject.run.stage_record("prune")
        return record.get("inputs"), record.get("finished")
    return [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in weight_files(subject)]


def _is_current(subject: Subject, inputs: str) -> bool:
    if subject.run:
        return subject.run.is_current(STAGE, inputs, [f"{ANALYSIS_SUBDIR}/{name}" for name in OUTPUTS])
    structure = subject.out_dir / STRUCTURE_JSON
    return (all((subject.out_dir / name).exists() for name in OUTPUTS)
            and read_json(structure).get("inputs") == inputs)


def analyze(model: str, recipe: str | None = None, level=None, thresholds: Thresholds = Thresholds(),
            heatmap_threshold: float = HEATMAP_THRESHOLD, force: bool = False) -> Path:
    """Analyse a model or run directory; returns the analysis directory."""
    subject = resolve_subject(model, recipe, level)
    thresholds = Thresholds(tuple(sorted(set(thresholds.absolute) | {heatmap_threshold})), thresholds.relative)
    inputs = fingerprint(subject.spec.to_dict(), _weights_identity(subject),
                         thresholds.absolute, thresholds.relative, heatmap_threshold)
    if not force and _is_current(subject, inputs):
        print(f"analyze: {subject.out_dir} is up to date (use --force to redo)")
        return subject.out_dir
    files = weight_files(subject)

    recording = stage_run(subject.run.manifest_path, STAGE, inputs) if subject.run else contextlib.nullcontext({})
    with recording as record, staging_dir(subject.out_dir) as tmp:
        start = time.time()
        with PeakMemory() as memory:
            structure = measure_structure(subject.weights_dir, subject.spec, thresholds, prunable_tensors(subject))
        structure = {
            "model": subject.spec.name, "architecture": subject.spec.architecture,
            "weights": str(subject.weights_dir), "weights_bytes": sum(f.stat().st_size for f in files),
            "run": _run_info(subject, structure), "inputs": inputs,
            "wall_time_s": round(time.time() - start, 2), "peak_rss_mb": memory.peak_mb,
            "heatmap_measure": _abs_key(heatmap_threshold), **structure,
        }
        write_outputs(structure, tmp)
        overall = structure["overall"]["all"]
        record.update(outputs=[f"{ANALYSIS_SUBDIR}/{name}" for name in OUTPUTS], params=overall["params"],
                      zero_fraction=overall["fractions"][ZERO])
    print(f"analyze: {subject.spec.name}: {overall['params']:,} weights, "
          + ", ".join(f"{label} {100 * overall['fractions'][key]:.3g}%" for key, label in structure["measures"].items())
          + f"; peak memory {structure['peak_rss_mb']:.0f} MB -> {subject.out_dir}")
    return subject.out_dir


def _run_info(subject: Subject, structure: dict) -> dict | None:
    if not subject.run:
        return None
    target = read_json(subject.run.path / SPARSITY_FILE)["target_percent"] / 100
    prunable = structure["overall"].get("prunable")
    return {"path": str(subject.run.path), "recipe": subject.run.recipe, "level": subject.run.level,
            "target_fraction": target, "achieved_fraction": prunable["fractions"][ZERO] if prunable else None}


# --- outputs -------------------------------------------------------------------------------------

def write_outputs(structure: dict, out_dir: Path) -> None:
    write_json(out_dir / STRUCTURE_JSON, structure)
    write_atomic(out_dir / STRUCTURE_CSV, tensors_csv(structure))
    write_atomic(out_dir / SUMMARY_MD, summary_markdown(structure))
    plot_histograms(structure, out_dir / HISTOGRAM_PNG)
    plot_by_layer(structure, out_dir / BY_LAYER_PNG)
    plot_heatmap(structure, out_dir / HEATMAP_PNG)


def tensors_csv(structure: dict) -> str:
    """One row per tensor: where it sits, its size, every near-zero fraction and |w| statistics."""
    rows = []
    for tensor in structure["tensors"]:
        rows.append({
            **{key: tensor[key] for key in ("name", "layer", "section", "module_type", "prunable", "dtype")},
            "shape": "x".join(map(str, tensor["shape"])), "params": tensor["params"], "zeros": tensor["counts"][ZERO],
            **{f"frac_{key}": value for key, value in tensor["fractions"].items()},
            "mean_abs": tensor["mean_abs"], "std": tensor["std"], "max_abs": tensor["max_abs"],
            **{f"abs_{name}": value for name, value in tensor["percentiles_abs"].items()},
        })
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _percent(fraction: float) -> str:
    return f"{100 * fraction:.3g}%"


def _markdown_table(groups: dict, measures: dict, extra: dict | None = None, first: str = "group") -> list[str]:
    """Rows of `groups` (name -> summary): weights, every measure in percent, |w| statistics, `extra` columns."""
    extra = extra or {}
    header = [first, "weights", *measures.values(), "mean |w|", "median |w|", *extra]
    lines = ["| " + " | ".join(cell.replace("|", "\\|") for cell in header) + " |", "|" + "---|" * len(header)]
    for name, group in groups.items():
        median = group.get("percentiles_abs", {}).get("p50")
        cells = [name, f"{group['params']:,}", *(_percent(group["fractions"][key]) for key in measures),
                 f"{group['mean_abs']:.3g}", "" if median is None else f"{median:.3g}",
                 *(compute(group) for compute in extra.values())]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def summary_markdown(structure: dict) -> str:
    """Short markdown: overall near-zero fractions, then by section, module type and layer, and the plots."""
    measures, overall, run = structure["measures"], structure["overall"], structure["run"]
    prunable = overall.get("prunable")
    lines = [f"### Sparsity structure of {structure['model']}", ""]
    lines.append(
        f"{overall['all']['params']:,} weights in {overall['all']['tensors']} tensors"
        + (f", {prunable['params']:,} of them prunable ({prunable['tensors']} tensors)" if prunable else "")
        + f"; read from `{structure['weights']}` in {structure['wall_time_s']} s, peak memory "
        f"{structure['peak_rss_mb']:.0f} MB." + (f" Not counted: {', '.join(structure['skipped_tensors'])}."
                                                 if structure["skipped_tensors"] else ""))
    if run:
        achieved = run["achieved_fraction"]
        lines.append(f"Run `{run['recipe']}` at level {run['level']:g}%: target {_percent(run['target_fraction'])} "
                     f"of prunable weights, achieved {_percent(achieved) if achieved is not None else 'n/a'}.")
    lines += ["", *_markdown_table(overall, measures, first="set"), ""]
    if structure["by_section"]:
        lines += ["By section:", "", *_markdown_table(structure["by_section"], measures, first="section"), ""]
    lines += ["By module type:", "", *_markdown_table(structure["by_module_type"], measures, first="module type"), ""]
    extra = {"std": lambda group: f"{group['std']:.3g}",
             "p99 |w|": lambda group: f"{group['percentiles_abs']['p99']:.3g}"}
    if run:
        extra[f"zeros in prunable (target {_percent(run['target_fraction'])})"] = (
            lambda group: _percent(group["prunable"]["fractions"][ZERO]) if "prunable" in group else "")
    lines += ["By layer (`other` = outside the numbered blocks):", "",
              *_markdown_table(structure["by_layer"], measures, extra, first="layer"), ""]
    lines += [f"![log10 |w| histogram]({HISTOGRAM_PNG})", f"![near-zero fraction by layer]({BY_LAYER_PNG})",
              f"![layer x module type]({HEATMAP_PNG})", ""]
    return "\n".join(lines)


def _coarse_edges(structure: dict) -> np.ndarray:
    spec = structure["histogram"]
    bins = len(structure["overall"]["all"]["log10_abs_counts"])
    return spec["log10_abs_start"] + spec["bin_width"] * np.arange(bins + 1)


def plot_histograms(structure: dict, path: Path) -> None:
    """log10|w| histograms: all and prunable weights (counts), and each module type (share of its weights)."""
    edges = _coarse_edges(structure)
    overall, by_type = structure["overall"], structure["by_module_type"]
    occupied = np.flatnonzero(np.asarray(overall["all"]["log10_abs_counts"]))
    low, high = (edges[occupied[0]], edges[occupied[-1] + 1]) if occupied.size else (edges[0], edges[-1])
    with plots.figure(path, panels=2) as (fig, (counts_ax, types_ax)):
        for name, group in overall.items():
            label = f"{name} weights ({_percent(group['fractions'][ZERO])} exact zeros, not shown)"
            counts_ax.stairs(group["log10_abs_counts"], edges, label=label, fill=name == "all",
                             alpha=0.5 if name == "all" else 1.0, linewidth=1.5)
        for threshold in structure["thresholds"]["absolute"]:
            counts_ax.axvline(math.log10(threshold), color="grey", linestyle=":", linewidth=1)
        counts_ax.set_yscale("log")
        counts_ax.set(title=f"{structure['model']}: magnitude of every weight (dotted: thresholds)",
                      xlabel="log10 |w|", ylabel=f"weights per {structure['histogram']['bin_width']:g}-decade bin",
                      xlim=(low, high))
        counts_ax.legend(loc="upper left")
        for name, group in by_type.items():
            shares = 100 * np.asarray(group["log10_abs_counts"]) / group["params"]
            types_ax.stairs(shares, edges, label=f"{name} ({group['params']:,})")
        types_ax.set(title="by module type (share of the type's weights)", xlabel="log10 |w|",
                     ylabel="% of the type's weights per bin", xlim=(low, high))
        types_ax.legend(loc="upper left", ncol=2)


def plot_by_layer(structure: dict, path: Path) -> None:
    """Near-zero fraction of each layer, one line per threshold; for a run also achieved vs target."""
    layers = [layer for layer in structure["by_layer"] if layer != OUTSIDE_BLOCKS]
    if not layers:  # no numbered blocks: plot the single group
        layers = list(structure["by_layer"])
    positions = np.arange(len(layers))
    run = structure["run"]
    with plots.figure(path, panel_width=max(8.0, 0.3 * len(layers) + 5), height=4.8) as (fig, (ax,)):
        for key, label in structure["measures"].items():
            values = [100 * structure["by_layer"][layer]["fractions"][key] for layer in layers]
            ax.plot(positions, values, marker="o", markersize=3, label=label,
                    linestyle="--" if key.startswith("rel") else "-")
        if run:
            achieved = [100 * structure["by_layer"][layer]["prunable"]["fractions"][ZERO]
                        if "prunable" in structure["by_layer"][layer] else np.nan for layer in layers]
            ax.plot(positions, achieved, color="black", marker="s", linewidth=2,
                    label="achieved: exact zeros in prunable weights")
            ax.axhline(100 * run["target_fraction"], color="red", linestyle=":",
                       label=f"target {_percent(run['target_fraction'])}")
        ax.set_xticks(positions, layers, rotation=45, ha="right")
        ax.set(title=f"{structure['model']}: near-zero weights by layer", xlabel="layer (transformer block)",
               ylabel="% of the layer's weights", ylim=(0, 100))
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5))


def plot_heatmap(structure: dict, path: Path) -> None:
    """Layer x module type: exact-zero share and near-zero share at the heatmap threshold.

    The longer of the two lists runs down the vertical axis, so the two panels stay side by side and readable.
    """
    cells = structure["by_layer_and_type"]
    layers = list(cells)
    type_rank = {label: rank for rank, (_, label) in enumerate(MODULE_TYPES)}
    columns = sorted({column for row in cells.values() for column in row},
                     key=lambda c: (type_rank[c.removesuffix(" (cross)")], c))
    layers_down = len(layers) >= len(columns)
    rows, cols = (layers, columns) if layers_down else (columns, layers)
    labels = ("layer (`other` = outside blocks)", "module type")
    row_label, col_label = labels if layers_down else labels[::-1]
    annotate = len(rows) * len(cols) <= 250
    with plots.figure(path, panels=2, panel_width=0.5 * len(cols) + 3.5, height=0.3 * len(rows) + 2.5) as (fig, axes):
        for ax, key in zip(axes, [ZERO, structure["heatmap_measure"]]):
            grid = np.full((len(rows), len(cols)), np.nan)
            for i, row in enumerate(rows):
                for j, col in enumerate(cols):
                    layer, column = (row, col) if layers_down else (col, row)
                    if column in cells[layer]:
                        grid[i, j] = 100 * cells[layer][column]["fractions"][key]
            image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap="viridis", vmin=0, vmax=100)
            if annotate:
                for (i, j), value in np.ndenumerate(grid):
                    if not np.isnan(value):
                        ax.text(j, i, f"{value:.0f}" if value >= 10 or value == 0 else f"{value:.1f}",
                                ha="center", va="center", fontsize=6, color="white" if value < 60 else "black")
            ax.set_xticks(range(len(cols)), cols, rotation=60, ha="right")
            ax.set_yticks(range(len(rows)), rows)
            ax.grid(False)
            ax.set(title=f"{structure['measures'][key]} (% of the cell's weights)", xlabel=col_label, ylabel=row_label)
            fig.colorbar(image, ax=ax, label="% of weights")
        fig.suptitle(f"{structure['model']}: layer x module type (blank: no such weights)")


# --- command line --------------------------------------------------------------------------------

def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True,
                        help="registry alias, Hub id, checkpoint directory, or a run directory runs/<model>/<recipe>/<level>")
    parser.add_argument("--level", help="analyse the run directory at this level (with --recipe) instead of the model itself")
    parser.add_argument("--recipe", help=f"recipe of that run directory (default {DEFAULT_RECIPE}; needs --level)")
    parser.add_argument("--thresholds", default=",".join(f"{t:g}" for t in ABSOLUTE_THRESHOLDS),
                        help="comma-separated absolute |w| thresholds (default %(default)s)")
    parser.add_argument("--relative", default=",".join(f"{k:g}" for k in RELATIVE_THRESHOLDS),
                        help="comma-separated k: also count |w| < k * std of each tensor (default %(default)s)")
    parser.add_argument("--heatmap-threshold", default=f"{HEATMAP_THRESHOLD:g}",
                        help="absolute threshold shown in the layer x module-type heatmap (default %(default)s)")
    parser.add_argument("--force", action="store_true", help="redo even if the analysis is up to date")


def main(args) -> None:
    thresholds = Thresholds(parse_thresholds(args.thresholds, "--thresholds"), parse_thresholds(args.relative, "--relative"))
    heatmap_thresholds = parse_thresholds(args.heatmap_threshold, "--heatmap-threshold")
    if len(heatmap_thresholds) != 1:
        raise HarnessError(f"--heatmap-threshold takes one number, got {args.heatmap_threshold!r}")
    heatmap_threshold = heatmap_thresholds[0]
    analyze(args.model, args.recipe, args.level, thresholds, heatmap_threshold, args.force)
