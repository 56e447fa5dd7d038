"""Evaluators: one module per kind of benchmark, each exposing `evaluate(job) -> layout.Outcome`.

`harness.evaluate` resolves a benchmark's data (`DataSource`), loads the run's model and hands both
to the evaluator in an `EvalJob`. An evaluator returns a `layout.Outcome`: the examples scored, the
PyTorch metrics (`layout.Metric`), and, when DeepSparse is among the engines, a `layout.EngineCheck`
of the deployed graph: its runtime ("deepsparse", or "onnxruntime" if DeepSparse could not compile
the graph), and either its own metrics and their difference to PyTorch's (decoders: the same
benchmark on the engine), or on a sample the share predicted as PyTorch does (`agreement`) and/or
the embeddings' cosine to PyTorch's (`mean_cosine_vs_pytorch`).

This module holds what they share: the job, data readers and metric helpers.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from harness.errors import HarnessError
from harness.layout import EngineCheck, Metric


@dataclass(frozen=True)
class DataSource:
    """One part of a benchmark's data: local files (by role), or the Hub entry used when they are missing."""

    part: str
    files: dict[str, Path] | None = None
    hub: dict | None = None

    def describe(self) -> str:
        if self.files:
            return ", ".join(str(path) for path in self.files.values())
        return "hub: " + "/".join(str(self.hub[k]) for k in ("path", "name", "split", "task") if k in self.hub)


@dataclass
class EvalJob:
    """Everything an evaluator needs for one benchmark on one run."""

    benchmark: str
    config: dict  # the benchmark's entry in evals/benchmarks.yaml
    sources: dict[str, DataSource]  # part -> data
    loaded: Any  # harness.load.LoadedModel of the run's checkpoint
    limit: int | None
    engines: tuple[str, ...]
    onnx_dir: Callable[[], Path]  # exports the run to ONNX on first use
    reference_model: Callable[[], Any] = None  # the dense source checkpoint (LoadedModel)
    engine_cores: int | None = None  # DeepSparse cores (None: all)
    graphs: dict = field(default_factory=dict)  # compiled graphs, shared by the benchmarks of one eval

    @property
    def spec(self):
        return self.loaded.spec

    @property
    def source(self) -> DataSource:
        """The data of a single-part benchmark."""
        (source,) = self.sources.values()
        return source

    def engine(self, filename: str):
        """The run's exported graph `filename` on DeepSparse (an `onnx_engine.FixedShapeModel`), made once."""
        from harness.evaluators.onnx_engine import FixedShapeModel

        if filename not in self.graphs:
            self.graphs[filename] = FixedShapeModel(self.onnx_dir() / filename, num_cores=self.engine_cores)
        return self.graphs[filename]


# --- metrics ---------------------------------------------------------------------------------------

def metric(value: float, stderr: float | None = None) -> Metric:
    return Metric(float(value), None if stderr is None or math.isnan(stderr) else float(stderr))


def mean_metric(values) -> Metric:
    """Mean of per-example (or per-fold) values, with the standard error of the mean."""
    values = np.asarray(values, dtype=np.float64)
    stderr = float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else None
    return metric(values.mean(), stderr)


def accuracy(predictions: list, references: list) -> Metric:
    """Fraction of predictions equal to their reference, with its standard error."""
    if len(predictions) != len(references) or not references:
        raise ValueError(f"accuracy needs equally many predictions and references, got "
                         f"{len(predictions)} and {len(references)}")
    return mean_metric([p == r for p, r in zip(predictions, references)])


def agreement(engine_predictions: list, pytorch_predictions: list, runtime: str, seconds: float) -> EngineCheck:
    """The engine check of a non-decoder benchmark: how often the engine predicts what PyTorch does."""
    rate = float(np.mean([e == p for e, p in zip(engine_predictions, pytorch_predictions)]))
    return EngineCheck(runtime, round(seconds, 2), sample=len(pytorch_predictions), agreement=rate)


# --- data ------------------------------------------------------------------------------------------

def hub_rows(hub: dict):
    """A Hub dataset split (only reached when the local file is missing and the Hub is online)."""
    import datasets

    try:
        return datasets.load_dataset(hub["path"], hub.get("name"), split=hub["split"])
    except Exception as exc:
        raise HarnessError(f"cannot load {hub['path']}/{hub.get('name')} ({hub['split']}) from the Hub: "
                           f"{str(exc).splitlines()[0][:200]}") from None


def table(source: DataSource, columns: list[str], label_column: str | None = None,
          limit: int | None = None) -> tuple[list[tuple[str, ...]], list]:
    """(texts, labels) of a TSV file (role `tsv`, header row; GLUE layout) or of its Hub split.

    `texts` holds one tuple of the `columns` per row; labels are the raw label cells ([] without
    `label_column`). A Hub entry may rename the columns (`columns`, `label_column`).
    """
    if source.files:
        with open(source.files["tsv"], newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle, delimiter="\t"))
    else:
        rows = hub_rows(source.hub)
        columns = source.hub.get("columns", columns)
        label_column = source.hub.get("label_column", label_column) if label_column else None
    if limit is not None:
        rows = rows.select(range(min(limit, len(rows)))) if source.hub else rows[:limit]
    where = source.describe()
    try:
        texts = [tuple(row[c] for c in columns) for row in rows]
        labels = [row[label_column] for row in rows] if label_column else []
    except KeyError as exc:
        raise HarnessError(f"{where} has no column {exc} (expected {columns + [label_column or '']})") from None
    return texts, labels


def label_index(raw, names: list[str], where: str) -> int:
    """A label cell (an index like `1`, or a name like `entailment`) as an index into `names`."""
    text = str(raw).strip().lower()
    if text.lstrip("-").isdigit() and 0 <= int(text) < len(names):
        return int(text)
    if text in names:
        return names.index(text)
    raise HarnessError(f"{where}: label {raw!r} is neither an index nor one of {names}")


def parallel_lines(source: DataSource, limit: int | None = None) -> tuple[list[str], list[str]]:
    """(source sentences, reference translations): two aligned line files, or two fields of a Hub split."""
    if source.files:
        sides = [Path(source.files[role]).read_text(encoding="utf-8").splitlines() for role in ("source", "target")]
    else:
        rows = hub_rows(source.hub)
        sides = [[_dotted(row, source.hub[role]) for row in rows] for role in ("source", "target")]
    if len(sides[0]) != len(sides[1]):
        raise HarnessError(f"{source.describe()}: {len(sides[0])} source lines but {len(sides[1])} references")
    return sides[0][:limit], sides[1][:limit]


def _dotted(row: dict, path: str):
    for key in path.split("."):
        row = row[key]
    return row


# --- encoder forward passes ------------------------------------------------------------------------

def _tokenize(tokenizer, texts: list[tuple[str, ...]], max_length: int, padding, tensors: str):
    segments = [list(column) for column in zip(*texts)]  # one list per text column (1 or 2)
    return tokenizer(*segments, truncation=True, max_length=max_length, padding=padding, return_tensors=tensors)


def pytorch_outputs(loaded, texts: list[tuple[str, ...]], batch_size: int,
                    select: Callable[[Any, Any], Any], desc: str) -> np.ndarray:
    """`select(model outputs, encoding)` for every text (tuples of 1 or 2 segments), batched, as one array."""
    import torch
    from tqdm import tqdm

    parts = []
    with torch.inference_mode():
        for start in tqdm(range(0, len(texts), batch_size), desc=desc, unit="batch"):
            encoding = _tokenize(loaded.tokenizer, texts[start:start + batch_size], loaded.spec.seq_len, True, "pt")
            parts.append(np.asarray(select(loaded.model(**encoding), encoding), dtype=np.float32))
    return np.concatenate(parts)


def engine_outputs(graph, tokenizer, texts: list[tuple[str, ...]], seq_len: int,
                   select: Callable[[np.ndarray, dict], np.ndarray], desc: str) -> np.ndarray:
    """The same on an ONNX graph, one text at a time, padded to the engine's fixed `seq_len`."""
    from tqdm import tqdm

    parts = []
    for text in tqdm(texts, desc=desc, unit="text"):
        encoding = dict(_tokenize(tokenizer, [text], seq_len, "max_length", "np"))
        encoding = {name: array.astype(np.int64) for name, array in encoding.items()}
        parts.append(select(graph.run(encoding), encoding))
    return np.concatenate(parts)
