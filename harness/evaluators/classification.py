"""Sentence-pair classification (GLUE RTE, MNLI) with the model's own classification head.

The head's classes are named by `config.id2label` (e.g. CONTRADICTION / NEUTRAL / ENTAILMENT, any
case); the benchmark's `label_map` turns each name into one of the benchmark's labels, so a 3-way
MNLI head answers 2-way RTE (neutral and contradiction both mean not_entailment).
"""
from __future__ import annotations

import time

from harness.errors import HarnessError
from harness.evaluators import (EvalJob, accuracy, agreement, engine_outputs, label_index, pytorch_outputs,
                                table)
from harness.layout import Outcome


def head_labels(id2label: dict, label_map: dict, model_name: str) -> list[str]:
    """The benchmark label each output class of the head stands for, by class index."""
    mapped = []
    for index in range(len(id2label)):
        name = str(id2label.get(index, id2label.get(str(index), ""))).lower()
        if name not in label_map:
            raise HarnessError(f"model '{model_name}' names its class {index} {name!r}, which the benchmark's "
                               f"label_map does not know ({', '.join(label_map)}): it needs an MNLI-style head")
        mapped.append(label_map[name])
    return mapped


def evaluate(job: EvalJob) -> Outcome:
    """Accuracy of the head's predictions; on DeepSparse, how often the predicted class matches PyTorch's."""
    config = job.config
    texts, raw_labels = table(job.source, config["columns"], config["label_column"], job.limit)
    names = [name.lower() for name in config["labels"]]
    references = [names[label_index(raw, names, job.source.describe())] for raw in raw_labels]
    classes = head_labels(job.loaded.model.config.id2label, config["label_map"], job.spec.name)

    logits = pytorch_outputs(job.loaded, texts, config.get("batch_size", 16),
                             lambda outputs, _: outputs.logits, desc=f"{job.benchmark} (PyTorch)")
    predicted = logits.argmax(axis=-1)
    outcome = Outcome(len(texts), {"accuracy": accuracy([classes[i] for i in predicted], references)})
    if "deepsparse" in job.engines:
        start = time.time()
        graph = job.engine("model.onnx")
        sample = texts[:config.get("engine_sample", 64)]
        engine_logits = engine_outputs(graph, job.loaded.tokenizer, sample, job.spec.seq_len,
                                       lambda output, _: output, desc=f"{job.benchmark} ({graph.runtime})")
        outcome.deepsparse = agreement(list(engine_logits.argmax(axis=-1)), list(predicted[:len(sample)]),
                                       graph.runtime, time.time() - start)
    return outcome
