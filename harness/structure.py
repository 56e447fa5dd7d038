"""How much of a checkpoint is (near) zero: exact counts per tensor, merged into groups (overall, per
layer, per module type, per section, per layer x module type).

The weights are streamed from the safetensors files one tensor at a time (memory-mapped, processed in
chunks), so the model is never materialised. Counts are exact integers; sums are accumulated in
float64; percentiles of |w| come from a log10|w| histogram with 0.001-decade bins (within 0.12 %).
`measure_structure` returns the groups as the JSON-ready dict that becomes `analysis/structure.json`.
"""
from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from harness import load, sparsity
from harness.errors import HarnessError

ABSOLUTE_THRESHOLDS = (1e-4, 1e-3, 1e-2, 1e-1)
RELATIVE_THRESHOLDS = (0.01, 0.1)
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


def abs_key(threshold: float) -> str:
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
        return {**{abs_key(t): t for t in self.absolute}, **{_rel_key(k): k * std for k in self.relative}}

    @property
    def keys(self) -> list[str]:
        return [ZERO, *self.limits(0.0)]

    @property
    def labels(self) -> dict[str, str]:
        return {ZERO: "exact zero", **{abs_key(t): f"|w| < {t:g}" for t in self.absolute},
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

