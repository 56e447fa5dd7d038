"""Decoder benchmarks through lm-eval: the task YAMLs in evals/lm_eval/ on PyTorch (HFLM) and on the
exported ONNX on DeepSparse (`harness-onnx`), with the same tokenization and windows.

The task YAMLs read local files through `custom_dataset` functions below; the harness passes the
files as TaskManager metadata (`data_files: {role: path}`), because a YAML cannot know the data
directory. When a file is missing and the Hub is online, lm-eval's own task of the same benchmark
runs instead (`hub: {task: ...}` in evals/benchmarks.yaml).

lm-eval bootstraps the stderr of perplexity-like metrics in a `multiprocessing.Pool` forked from this
process unless DISABLE_MULTIPROC is set; a fork of a process running torch/OpenMP threads can
inherit a lock that no thread will ever release and hang for good (issue 16). `run_task` therefore
always bootstraps in-process, with the same seeds per chunk, so the stderr is the same.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Iterator

from harness import quantize
from harness.evaluators import EvalJob, metric
from harness.layout import EngineCheck, Metric, Outcome
from harness.paths import EVALS_DIR

TASKS_DIR = EVALS_DIR / "lm_eval"
PTB_SENTENCES = 100  # 3,761 test sentences -> 38 documents of about 2,200 words


def wikitext_articles(data_files: dict, **_):
    """WikiText raw text split into one document per article (at each ` = Title = ` heading), as
    lm-eval's `EleutherAI/wikitext_document_level` dataset does."""
    import datasets

    lines = Path(data_files["text"]).read_text(encoding="utf-8").split("\n")
    pages, current = [], []
    for line in lines:
        heading = line.replace("= = =", "===").replace("= =", "==").strip()
        if heading.startswith("= ") and heading.endswith(" ="):
            if "\n".join(current).strip():
                pages.append("\n".join(current))
            current = []
        current.append(line)
    pages.append("\n".join(current))
    return datasets.DatasetDict({"test": datasets.Dataset.from_dict({"page": pages})})


def ptb_documents(data_files: dict, **_):
    """Penn Treebank (one sentence a line, no article boundaries) as documents of PTB_SENTENCES sentences, so
    LIMIT counts documents as it does WikiText-2's articles."""
    import datasets

    lines = [line.strip() for line in Path(data_files["text"]).read_text(encoding="utf-8").splitlines()
             if line.strip()]
    pages = ["\n".join(lines[i:i + PTB_SENTENCES]) for i in range(0, len(lines), PTB_SENTENCES)]
    return datasets.DatasetDict({"test": datasets.Dataset.from_dict({"page": pages})})


def jsonl_records(data_files: dict, **_):
    """A JSON-lines file as the `test` split."""
    import datasets

    with open(data_files["jsonl"], encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(records)})


def context_length(config, cap: int | None) -> int | None:
    """The model's own context length (as HFLM reads it from the config), capped at `cap`."""
    own = next((getattr(config, name) for name in ("n_positions", "max_position_embeddings", "n_ctx")
                if getattr(config, name, None)), None)
    return min(own, cap) if own and cap else own or cap


def _task(job: EvalJob):
    """(task name, TaskManager) for the local files, or lm-eval's own task on the Hub."""
    from lm_eval.tasks import TaskManager

    source = job.source
    if source.files:
        data_files = {role: str(path) for role, path in source.files.items()}
        return job.config["task"], TaskManager(include_path=str(TASKS_DIR), include_defaults=False,
                                               metadata={"data_files": data_files})
    return source.hub["task"], TaskManager()


@contextlib.contextmanager
def bootstrap_in_process() -> Iterator[None]:
    """lm-eval's `bootstrap_stderr` without its forked pool (DISABLE_MULTIPROC), restored afterwards."""
    before = os.environ.get("DISABLE_MULTIPROC")
    os.environ["DISABLE_MULTIPROC"] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ["DISABLE_MULTIPROC"]
        else:
            os.environ["DISABLE_MULTIPROC"] = before


class _WholeDocuments(logging.Filter):
    """Drops transformers' warning that a text has more tokens than the model's context ("will result in
    indexing errors"): lm-eval encodes each document whole, then scores it in windows of the context."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token indices sequence length is longer")


@contextlib.contextmanager
def whole_documents_encoded() -> Iterator[None]:
    tokenizer_log = logging.getLogger("transformers.tokenization_utils_base")
    log_filter = _WholeDocuments()
    tokenizer_log.addFilter(log_filter)
    try:
        yield
    finally:
        tokenizer_log.removeFilter(log_filter)


def run_task(lm, job: EvalJob) -> tuple[dict[str, Metric], int, float]:
    """(metrics, examples, seconds) of the benchmark's lm-eval task scored by `lm` (any lm-eval LM)."""
    import lm_eval

    task, task_manager = _task(job)
    start = time.time()
    with bootstrap_in_process(), whole_documents_encoded():
        output = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=task_manager, limit=job.limit,
                                         bootstrap_iters=job.config.get("bootstrap_iters", 1000), log_samples=False)
    scores = output["results"][task]
    metrics = {}
    for name in job.config["metrics"]:
        stderr = scores.get(f"{name}_stderr,none")  # "N/A" where lm-eval has none
        metrics[name] = metric(scores[f"{name},none"], stderr if isinstance(stderr, (int, float)) else None)
    return metrics, int(output["n-samples"][task]["effective"]), time.time() - start


def evaluate(job: EvalJob) -> Outcome:
    """The benchmark's lm-eval task on PyTorch and, if asked, on the exported ONNX on DeepSparse; for an INT8
    run, the exported graph's metrics are the run's (PyTorch's are the difference's reference)."""
    from lm_eval.models.huggingface import HFLM

    from harness.evaluators.deepsparse_lm import OnnxDecoderLM

    # lm-eval warns per request (truncated contexts) and per custom dataset; errors still show
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    loaded = job.loaded
    pytorch_lm = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=job.config.get("batch_size", 8),
                      max_length=context_length(loaded.model.config, job.config.get("max_length")))
    metrics, examples, _ = run_task(pytorch_lm, job)
    outcome = Outcome(examples, metrics, max_length=pytorch_lm.max_length)
    int8 = quantize.is_quantized(loaded.path)
    if "deepsparse" in job.engines or int8:
        engine_lm = OnnxDecoderLM(job.engine("model.onnx"), tokenizer=loaded.tokenizer,
                                  max_length=pytorch_lm.max_length)
        engine_metrics, _, engine_seconds = run_task(engine_lm, job)
        outcome.deepsparse = EngineCheck(
            engine_lm.runtime, round(engine_seconds, 2), metrics=engine_metrics,
            difference={name: engine_metrics[name].value - metrics[name].value for name in metrics})
        if int8:  # PyTorch computes the INT8 weights with FP32 activations: the INT8 graph is the model
            outcome.metrics = engine_metrics
    return outcome
