"""The run directory's layout: every file name a stage writes and every JSON record it holds.

    runs/<model>/sweep.json                     the sweep ledger (SWEEP_FILE)
    runs/<model>/sensitivity/<recipe>/<granularity>/   make sensitivity: `Sensitivity` (not a run directory)
    runs/<model>/<recipe>/<level>/
        manifest.json                           model spec, recipe, seed, one record per stage (MANIFEST)
        model/                                  the pruned checkpoint (MODEL_SUBDIR)
        sparsity.json                           prune: `Sparsity`
        recovery.json                           prune with recovery: `Recovery`
        quantization/                           prune with `<pruning>+<quantization>`: INT8 state, checkpoint, INC's INT8 graph (QUANTIZATION_SUBDIR)
        analysis/structure.json, ...            analyze (ANALYSIS_SUBDIR, ANALYSIS_FILES)
        onnx/model.onnx, onnx/export.json       export (ONNX_SUBDIR, EXPORT_FILE)
        bench.json, compressed/                 bench: `Bench` (BENCH_FILE, COMPRESSED_SUBDIR)
        compressed-int8/                        bench of a quantized run: its INT8 checkpoint the same way (COMPRESSED_INT8_SUBDIR)
        openvino-int8/                          bench: the OpenVINO INT8 engine's quantized IR (OPENVINO_INT8_SUBDIR)
        eval.json                               eval: `Evaluation`

Writers build these dataclasses and store `to_json(record)`; readers get them back with
`read_record(path, Type)`, so a key is named once, here, for both sides. An optional field that is
None is left out of the JSON (and reads back as None); keys this module does not know are ignored.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

MANIFEST = "manifest.json"
MODEL_SUBDIR = "model"
DISCARDED_NOTE = "DISCARDED.txt"  # left in model/ when its weights were deleted to save disk
SPARSITY_FILE = "sparsity.json"
RECOVERY_FILE = "recovery.json"
RESUME_SUFFIX = ".resume"  # runs/<model>/<recipe>/.<level>.resume/: a prune's recovery state until it finishes
QAT_RESUME_SUBDIR = "qat"  # .<level>.resume/qat/: the state of its quantization-aware training
ANALYSIS_SUBDIR = "analysis"
STRUCTURE_JSON = "structure.json"
STRUCTURE_CSV = "structure.csv"
SUMMARY_MD = "summary.md"
HISTOGRAM_PNG = "hist_log10_abs.png"
BY_LAYER_PNG = "near_zero_by_layer.png"
HEATMAP_PNG = "heatmap_layer_type.png"
ANALYSIS_FILES = (STRUCTURE_JSON, STRUCTURE_CSV, SUMMARY_MD, HISTOGRAM_PNG, BY_LAYER_PNG, HEATMAP_PNG)
ONNX_SUBDIR = "onnx"
EXPORT_FILE = "export.json"  # inside onnx/
BENCH_FILE = "bench.json"
COMPRESSED_SUBDIR = "compressed"  # the sparse-bitmask copy the bench writes to measure its size
COMPRESSED_INT8_SUBDIR = "compressed-int8"  # the same of a quantized run's INT8 checkpoint (sparse + INT8)
EVAL_FILE = "eval.json"
SWEEP_FILE = "sweep.json"  # in runs/<model>/
QUANTIZATION_SUBDIR = "quantization"  # a `<pruning>+<quantization>` recipe's INT8 state and checkpoint (harness.quantize)
OPENVINO_INT8_SUBDIR = "openvino-int8"  # the export quantized by NNCF for the bench's openvino-int8 engine
OPENVINO_INT8_FILE = "quantization.json"  # inside openvino-int8/: what it was quantized from and how
INT8_FILE = "int8.safetensors"  # inside quantization/: the INT8 copy of model/, for its size
INT8_GRAPH_FILE = "model.onnx"  # inside quantization/: the INT8 graph INC quantized (harness.quantize_inc)
INT8_CHECKPOINT = f"{QUANTIZATION_SUBDIR}/{INT8_FILE}"
INT8_GRAPH = f"{QUANTIZATION_SUBDIR}/{INT8_GRAPH_FILE}"
DERIVED_COPIES = (ONNX_SUBDIR, COMPRESSED_SUBDIR, COMPRESSED_INT8_SUBDIR, OPENVINO_INT8_SUBDIR, INT8_CHECKPOINT, INT8_GRAPH)  # model-sized copies a sweep may discard

# stage -> the file that shows it finished (relative to the run directory)
STAGE_OUTPUTS = {
    "prune": SPARSITY_FILE,
    "analyze": f"{ANALYSIS_SUBDIR}/{STRUCTURE_JSON}",
    "export": f"{ONNX_SUBDIR}/{EXPORT_FILE}",
    "bench": BENCH_FILE,
    "eval": EVAL_FILE,
}


# --- prune ------------------------------------------------------------------------------------------

@dataclass
class Sparsity:
    """`sparsity.json`: sparsity measured from the saved weights."""

    target_percent: float
    achieved_percent: float  # over the prunable weights
    overall_percent: float  # over every weight
    prunable_params: int
    total_params: int
    per_layer_percent: dict[str, float]
    prunable_tensors: list[str]


@dataclass
class CurvePoint:
    step: int
    tokens: int
    loss: float


@dataclass
class Recovery:
    """`recovery.json`: a recovery's plan (RecoveryPlan's fields) and its training loss per optimizer step."""

    plan: dict[str, Any]
    curve: list[CurvePoint]
    tokens: int
    steps: int
    wall_time_s: float  # of the training, summed over a resumed run's invocations (the checkpointed work of the earlier ones)
    resumed_from: int | None = None  # the step a resumed run went on from
    precision: str = "fp32"  # what the plan's precision resolved to on the machine: fp32 or bf16


# --- bench ------------------------------------------------------------------------------------------

@dataclass
class PartTiming:
    median_ms: float
    p90_ms: float


@dataclass
class Timing:
    """One engine on one scenario. Encoder-decoders: the combined step, with `parts` per graph."""

    batch_size: int
    seq_len: int
    median_ms: float
    p90_ms: float
    items_per_s: float  # sequences per second
    iterations: int
    threads: int
    parts: dict[str, PartTiming] | None = None


@dataclass
class FlopIdeal:
    """The speedup if each weight's multiply-accumulates scaled with its density (per sequence).

    The shares split the dense MACs into the recipe's prunable weights, other weights (LM head, task
    heads) and other matmuls (attention); `max_speedup` is Amdahl's limit at 100 % sparsity.
    """

    speedup: float
    macs_dense: float
    macs_sparse: float
    prunable_share: float
    other_linear_share: float
    other_matmul_share: float
    max_speedup: float | None
    parts: dict[str, FlopIdeal] | None = None


@dataclass
class Speedup:
    """Per scenario: each engine's sparse vs its own dense, the headline (DeepSparse sparse vs ONNX
    Runtime dense), and each divided by the FLOP-ideal speedup. None where an engine is missing.
    Stored flat: `{<engine>: x, ..., "headline": x, "efficiency": {<engine> | "headline": x}}`."""

    engines: dict[str, float | None]
    headline: float | None
    efficiency: dict[str, float | None]

    def stored(self) -> dict:
        return {**self.engines, "headline": self.headline, "efficiency": self.efficiency}

    @classmethod
    def from_stored(cls, data: dict) -> "Speedup":
        engines = {k: v for k, v in data.items() if k not in ("headline", "efficiency")}
        return cls(engines, data.get("headline"), data.get("efficiency") or {})


@dataclass
class SizeEntry:
    bytes: int
    bits_per_weight: float


@dataclass
class Sizes:
    params: int
    checkpoint: SizeEntry
    checkpoint_gzip: SizeEntry
    onnx: SizeEntry
    onnx_gzip: SizeEntry
    sparse_bitmask: SizeEntry  # compressed-tensors' sparse-bitmask format, written to compressed/
    checkpoint_int8: SizeEntry | None = None  # a quantized run's INT8 checkpoint (quantization/int8.safetensors)
    sparse_bitmask_int8: SizeEntry | None = None  # that checkpoint in the sparse-bitmask format (compressed-int8/)


@dataclass
class EngineStatus:
    status: str  # "ok" | "unavailable"
    threads: int
    reason: str | None = None
    precision: str | None = None  # "fp32" | "int8" (None in files written before engines had one)


@dataclass
class FastestDense:
    """The fastest engine on the dense baseline at one precision in one scenario, and the speedup of the run
    on DeepSparse against it (None without DeepSparse timings of the run)."""

    engine: str
    median_ms: float
    speedup: float | None


@dataclass
class Bench:
    """`bench.json`. Scenarios are named `b<batch>_s<seq>`, e.g. `b1_s128`."""

    model: str
    recipe: str
    level: float
    architecture: str
    achieved_percent: float
    run: str
    dense_run: str
    settings: dict[str, Any]
    cpu: dict[str, Any]
    engines: dict[str, EngineStatus]
    results: dict[str, dict[str, Timing]]  # engine -> scenario -> timing
    dense_results: dict[str, dict[str, Timing]]  # the same for the dense baseline
    speedups: dict[str, Speedup]  # scenario ->
    flop_ideal: dict[str, FlopIdeal]  # scenario ->
    sizes: Sizes
    warnings: list[str] = field(default_factory=list)
    fastest_dense: dict[str, dict[str, FastestDense]] = field(default_factory=dict)  # scenario -> precision -> (empty before)


# --- eval -------------------------------------------------------------------------------------------

@dataclass
class Metric:
    value: float
    stderr: float | None = None


@dataclass
class EngineCheck:
    """How a deployed engine (DeepSparse, or ONNX Runtime where DeepSparse cannot run) compares with
    PyTorch on a benchmark: its own metrics and their difference (decoders), how often it predicts
    the same class (classifiers) or its embeddings' cosine to PyTorch's (encoders)."""

    runtime: str
    wall_time_s: float
    sample: int | None = None
    metrics: dict[str, Metric] | None = None
    difference: dict[str, float] | None = None
    agreement: float | None = None
    mean_cosine_vs_pytorch: float | None = None


@dataclass
class Outcome:
    """What an evaluator returns for one benchmark."""

    examples: int
    metrics: dict[str, Metric]
    deepsparse: EngineCheck | None = None
    max_length: int | None = None  # decoders: the context the lm-eval requests were cut to
    folds: list[float] | None = None  # embedding probe: held-out accuracy of each cross-validation fold


@dataclass
class BenchmarkResult:
    """One benchmark in `eval.json`: an evaluator's outcome and how it was obtained, or why it was skipped."""

    status: str  # "done" | "skipped"
    reason: str | None = None  # skipped only
    description: str | None = None
    evaluator: str | None = None
    data: dict[str, str] | None = None
    limit: int | None = None
    wall_time_s: float | None = None
    examples: int | None = None
    metrics: dict[str, Metric] | None = None
    deepsparse: EngineCheck | None = None
    max_length: int | None = None
    folds: list[float] | None = None
    delta_vs_level0: dict[str, float] | None = None


@dataclass
class Evaluation:
    """`eval.json`."""

    model: str
    recipe: str
    level: float
    limit: Any  # None, a number, or {benchmark: number}
    engines: list[str]
    baseline: dict[str, Any] | None  # the level-0 run the deltas are against: {path, finished}
    benchmarks: dict[str, BenchmarkResult]


# --- sensitivity --------------------------------------------------------------------------------------
# runs/<model>/sensitivity/<recipe>/<granularity>/: manifest.json (no `level`: not a pruning run),
# sensitivity.json and .csv when finished, sensitivity.partial.json (units so far) until then.

SENSITIVITY_SUBDIR = "sensitivity"
SENSITIVITY_FILE = "sensitivity.json"
SENSITIVITY_CSV = "sensitivity.csv"
SENSITIVITY_PARTIAL = "sensitivity.partial.json"


@dataclass
class UnitDamage:
    """One unit (a target weight, or a transformer block's targets) pruned alone: its damage at each level."""

    unit: str
    targets: list[str]
    weights: int
    damage: list[float]  # in the order of `Sensitivity.levels`
    seconds: float


@dataclass
class Sensitivity:
    """`sensitivity.json` (and the partial file): the damage of pruning one unit at a time, on held-out text."""

    model: str
    recipe: str
    granularity: str  # "layer" | "block"
    levels: list[float]  # percent
    measure: str  # what `damage` is: the loss increase, or 1 - cosine of pooled embeddings to the dense model's
    heldout: dict[str, Any]  # corpus, sequences, seq_len
    dense_loss: float | None  # models with a loss: the dense model's mean loss on the held-out text
    fingerprint: str  # of the inputs; a partial file with another one is not resumed
    units: list[UnitDamage]
    seconds: float  # pruning and measuring the units, summed over resumed invocations


# --- reading and writing ------------------------------------------------------------------------------

Record = TypeVar("Record")


def to_json(record):
    """A record (or a dict or list of them) as the JSON-ready value a stage stores."""
    if hasattr(record, "stored"):
        return to_json(record.stored())
    if dataclasses.is_dataclass(record):
        return {f.name: to_json(getattr(record, f.name)) for f in dataclasses.fields(record)
                if not (f.default is None and getattr(record, f.name) is None)}
    if isinstance(record, dict):
        return {k: to_json(v) for k, v in record.items()}
    if isinstance(record, list):
        return [to_json(v) for v in record]
    return record


def from_json(kind: type[Record], data: dict) -> Record:
    """A record from its stored dict (missing optional keys become their defaults, unknown keys are dropped)."""
    return _convert(kind, data)


def read_record(path: Path, kind: type[Record]) -> Record | None:
    """The record stored at `path`, or None when the file is missing or unreadable."""
    try:
        with open(path) as handle:
            return from_json(kind, json.load(handle))
    except (OSError, ValueError, TypeError, KeyError):
        return None


def _convert(kind, value):
    if value is None:
        return None
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        return _convert(next(a for a in typing.get_args(kind) if a is not type(None)), value)
    if origin is dict:
        _, item = typing.get_args(kind)
        return {k: _convert(item, v) for k, v in value.items()}
    if origin is list:
        (item,) = typing.get_args(kind)
        return [_convert(item, v) for v in value]
    if hasattr(kind, "from_stored"):
        return kind.from_stored(value)
    if dataclasses.is_dataclass(kind):
        hints = typing.get_type_hints(kind)
        fields = {f.name: f for f in dataclasses.fields(kind)}
        missing = [name for name, f in fields.items() if name not in value
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise KeyError(f"{kind.__name__} record without {', '.join(missing)}")
        return kind(**{name: _convert(hints[name], value[name]) for name in fields if name in value})
    return value
