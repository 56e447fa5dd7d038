"""Sentence-embedding benchmarks for encoders without a task head (all-MiniLM-L6-v2).

A sentence embedding is the mean of the last hidden states over the sentence's tokens, L2-normalised
(as sentence-transformers does for all-MiniLM-L6-v2). Two benchmarks use it:
- embedding_probe: accuracy of a logistic-regression probe on frozen embeddings, stratified k-fold
  cross-validation on the labelled sentences (mean over folds, stderr across folds; the probe's
  regularization is chosen inside each training fold);
- embedding_fidelity: mean cosine between this run's embeddings and those of the dense source
  checkpoint on the same sentences (1.0 = pruning changed nothing).

An INT8 run's probe and fidelity read the exported INT8 graph's embeddings (on DeepSparse, or ONNX Runtime where
it cannot run): PyTorch holds its INT8 weights but computes in FP32, so the deployed graph is the model;
its engine check then records the cosine to those PyTorch embeddings.
"""
from __future__ import annotations

import time

import numpy as np

from harness import quantize
from harness.errors import HarnessError
from harness.evaluators import EvalJob, agreement, engine_outputs, label_index, mean_metric, pytorch_outputs, table
from harness.layout import EngineCheck, Outcome


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Masked mean over tokens [batch, tokens, hidden] -> [batch, hidden], L2-normalised."""
    mask = mask[..., None].astype(hidden.dtype)
    pooled = (hidden * mask).sum(1) / np.clip(mask.sum(1), 1e-9, None)
    return pooled / np.clip(np.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12, None)


def embed(loaded, texts: list[tuple[str]], batch_size: int, desc: str) -> np.ndarray:
    """PyTorch sentence embeddings [len(texts), hidden]."""
    return pytorch_outputs(loaded, texts, batch_size,
                           lambda outputs, encoding: mean_pool(outputs.last_hidden_state.numpy(),
                                                               encoding["attention_mask"].numpy()),
                           desc=desc)


def probe(regularization: list[float], seed: int):
    """A standardised logistic regression whose inverse regularization C is chosen from `regularization`
    by 3-fold cross-validation on the data it is fitted to (so held-out folds never pick C)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    return GridSearchCV(model, {"logisticregression__C": regularization},
                        cv=StratifiedKFold(n_splits=3, shuffle=True, random_state=seed))


def probe_fold_accuracies(embeddings: np.ndarray, labels: list[int], folds: int, seed: int,
                          regularization: list[float]) -> list[float]:
    """Held-out accuracy of the probe in each of `folds` stratified folds."""
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from threadpoolctl import threadpool_limits

    smallest_class = min(np.bincount(labels)) if len(set(labels)) > 1 else 0
    if smallest_class < folds:
        raise HarnessError(f"{folds}-fold cross-validation needs at least {folds} sentences of each class, "
                           f"got {smallest_class}: raise LIMIT")
    splits = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    with threadpool_limits(1):  # small fits: BLAS threads only add contention
        scores = cross_val_score(probe(regularization, seed), embeddings, labels, cv=splits, scoring="accuracy")
    return [float(a) for a in scores]


def _engine_embeddings(job: EvalJob, texts: list[tuple[str]]) -> tuple[np.ndarray, str]:
    graph = job.engine("model.onnx")
    embeddings = engine_outputs(graph, job.loaded.tokenizer, texts, job.spec.seq_len,
                                lambda hidden, encoding: mean_pool(hidden, encoding["attention_mask"]),
                                desc=f"{job.benchmark} ({graph.runtime})")
    return embeddings, graph.runtime


def _int8_embeddings(job: EvalJob, texts: list[tuple[str]],
                     pytorch_embeddings: np.ndarray) -> tuple[np.ndarray, EngineCheck]:
    """An INT8 run's embeddings: its exported graph's, and the engine check with their cosine to PyTorch's."""
    start = time.time()
    embeddings, runtime = _engine_embeddings(job, texts)
    return embeddings, EngineCheck(runtime, round(time.time() - start, 2), sample=len(texts),
                                   mean_cosine_vs_pytorch=float((embeddings * pytorch_embeddings).sum(1).mean()))


def evaluate_probe(job: EvalJob) -> Outcome:
    """SST-2-style probe accuracy; on DeepSparse, agreement of the probe's predictions on a sample."""
    config = job.config
    texts, raw_labels = table(job.source, config["columns"], config["label_column"], job.limit)
    labels = [label_index(raw, ["0", "1"], job.source.describe()) for raw in raw_labels]
    embeddings = embed(job.loaded, texts, config.get("batch_size", 32), f"{job.benchmark} (PyTorch)")
    int8 = quantize.is_quantized(job.loaded.path)
    if int8:
        embeddings, check = _int8_embeddings(job, texts, embeddings)
    regularization, seed = config["C"], config["seed"]
    folds = probe_fold_accuracies(embeddings, labels, config["folds"], seed, regularization)
    outcome = Outcome(len(texts), {"accuracy": mean_metric(folds)}, folds=folds)
    if int8:
        outcome.deepsparse = check
    elif "deepsparse" in job.engines:
        start = time.time()
        sample = texts[:config.get("engine_sample", 128)]
        engine_embeddings, runtime = _engine_embeddings(job, sample)
        fitted = probe(regularization, seed).fit(embeddings, labels)
        outcome.deepsparse = agreement(list(fitted.predict(engine_embeddings)),
                                       list(fitted.predict(embeddings[:len(sample)])), runtime, time.time() - start)
        outcome.deepsparse.mean_cosine_vs_pytorch = float((engine_embeddings * embeddings[:len(sample)]).sum(1).mean())
    return outcome


def evaluate_fidelity(job: EvalJob) -> Outcome:
    """Mean cosine between this run's and the dense checkpoint's embeddings of the same sentences."""
    config = job.config
    texts, _ = table(job.source, config["columns"], limit=job.limit)
    batch_size = config.get("batch_size", 32)
    embeddings = embed(job.loaded, texts, batch_size, f"{job.benchmark} (PyTorch)")
    dense = embed(job.reference_model(), texts, batch_size, f"{job.benchmark} (dense reference)")
    int8 = quantize.is_quantized(job.loaded.path)
    if int8:
        embeddings, check = _int8_embeddings(job, texts, embeddings)
    outcome = Outcome(len(texts), {"mean_cosine": mean_metric((embeddings * dense).sum(1))})
    if int8:
        outcome.deepsparse = check
    elif "deepsparse" in job.engines:
        start = time.time()
        sample = texts[:config.get("engine_sample", 128)]
        engine_embeddings, runtime = _engine_embeddings(job, sample)
        cosines = (engine_embeddings * embeddings[:len(sample)]).sum(1)
        outcome.deepsparse = EngineCheck(runtime, round(time.time() - start, 2), sample=len(sample),
                                         mean_cosine_vs_pytorch=float(cosines.mean()))
    return outcome
