"""No evaluator forks: a fork of a process that runs torch/OpenMP threads can inherit a lock that no
thread will ever release, and hang for good (issue 16: lm-eval's bootstrap pool in a sweep).

The decoder evaluator (tiny-gpt2 on PyTorch, whose lm-eval run bootstraps the perplexity stderr) and
sacrebleu's bootstrap run as library calls in a child Python that has started torch's thread pool
and in which `os.fork` raises: a fork fails the test, and a hang ends at the timeout instead of
stalling the suite.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

BOOTSTRAPS = """
import json, os, sys
import torch

torch.set_num_threads(2)
torch.ones(512, 512) @ torch.ones(512, 512)  # the OpenMP threads now exist

forks = []
def refuse_fork():
    forks.append(1)
    raise RuntimeError("os.fork called")
os.fork = refuse_fork

from harness import evaluate, load
from harness.evaluators import EvalJob, language_modeling
from harness.evaluators.translation import corpus_scores

entry = evaluate.benchmark_registry()["lambada_openai"]
job = EvalJob("lambada_openai", entry, evaluate.data_sources("lambada_openai", entry), load.load_model("tiny-gpt2"),
              limit=5, engines=("pytorch",), onnx_dir=None)
metrics = language_modeling.evaluate(job).metrics
bleu = corpus_scores(["the cat sat on a mat", "dogs bark at night"] * 5, ["the cat sat on the mat"] * 10, "en", 100)
print(json.dumps({"forks": len(forks), "perplexity_stderr": metrics["perplexity"].stderr,
                  "bleu_stderr": bleu["bleu"].stderr, "disable_multiproc": os.environ.get("DISABLE_MULTIPROC")}))
"""


def test_bootstraps_never_fork_a_process_running_torch_threads():
    environment = {key: value for key, value in os.environ.items() if key != "DISABLE_MULTIPROC"}
    done = subprocess.run([sys.executable, "-c", BOOTSTRAPS], env=environment,
                          cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["forks"] == 0
    assert result["perplexity_stderr"] > 0 and result["bleu_stderr"] > 0  # the bootstraps did run
    assert result["disable_multiproc"] is None  # the evaluator left the environment as it found it
