"""The eval stage: metric code on inputs with known answers, PyTorch vs DeepSparse parity, every
evaluator end to end on the tiny models (and minilm) with small LIMITs, and bad input."""
import json
import logging
import math
import re

import numpy as np
import pytest
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM

from harness import cli, evaluate, layout, load
from harness.errors import HarnessError
from harness.evaluators import DataSource, EvalJob, accuracy, language_modeling
from harness.evaluators.classification import head_labels
from harness.evaluators.deepsparse_lm import OnnxDecoderLM
from harness.evaluators.embeddings import probe_fold_accuracies
from harness.evaluators.translation import corpus_scores
from harness.export import ensure_onnx
from harness.layout import EVAL_FILE, BenchmarkResult, Evaluation, Metric
from harness.recipes import DEFAULT_RECIPE
from harness.rundir import RunDir, read_json
from harness.runargs import dense_baseline

ARTICLES = (" = First Article = \n \n The cat sat on the mat . \n \n = = A section = = \n \n It was 4 @,@ 000 "
            "years old . \n \n = Second Article = \n \n Dogs bark , cats do not . \n")


def run_cli(capsys, *argv):
    """(exit code, stderr lines, stdout) of `python -m harness *argv`, run in-process."""
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.err.strip().splitlines(), captured.out


def job_for(name, loaded=None, data=None, limit=None, engines=("pytorch",), onnx_dir=None):
    entry = evaluate.benchmark_registry()[name]
    sources = data or evaluate.data_sources(name, entry)
    return EvalJob(name, entry, sources, loaded, limit, engines, onnx_dir, None)


# --- metric code on hand-made inputs ---------------------------------------------------------------

def test_accuracy_of_a_fixed_prediction_list():
    result = accuracy(["a", "b", "a", "a"], ["a", "b", "b", "a"])
    assert result.value == 0.75
    assert result.stderr == pytest.approx(0.25)  # sample std 0.5 over sqrt(4)
    with pytest.raises(ValueError):
        accuracy(["a"], ["a", "b"])


def test_bleu_and_chrf_of_identical_and_disjoint_strings():
    references = ["the cat sat on the mat", "dogs bark loudly at night"]
    same = corpus_scores(references, references, "en")
    assert same["bleu"].value == pytest.approx(100) and same["chrf"].value == pytest.approx(100)
    disjoint = corpus_scores(["xyz qqq", "vvv www"], references, "en")
    assert disjoint["bleu"].value == 0 and disjoint["chrf"].value == 0
    with_stderr = corpus_scores(["the cat sat on a mat", "dogs bark at night"] * 10, references * 10, "en", 200)
    assert 0 < with_stderr["bleu"].value < 100 and with_stderr["bleu"].stderr >= 0


def test_mnli_head_answers_rte_with_neutral_and_contradiction_as_not_entailment():
    label_map = evaluate.benchmark_registry()["rte"]["label_map"]
    assert head_labels({0: "CONTRADICTION", 1: "NEUTRAL", 2: "ENTAILMENT"}, label_map, "m") == \
        ["not_entailment", "not_entailment", "entailment"]
    with pytest.raises(HarnessError, match="MNLI-style head"):
        head_labels({0: "LABEL_0", 1: "LABEL_1"}, label_map, "m")


def test_probe_separates_separable_embeddings_and_refuses_too_few_examples():
    rng = np.random.default_rng(0)
    labels = [0, 1] * 20
    embeddings = rng.normal(size=(40, 8)) + np.array(labels)[:, None] * 10.0
    assert probe_fold_accuracies(embeddings, labels, folds=5, seed=0, regularization=[0.1, 1.0]) == [1.0] * 5
    with pytest.raises(HarnessError, match="raise LIMIT"):
        probe_fold_accuracies(embeddings[:6], labels[:6], folds=5, seed=0, regularization=[1.0])


def test_wikitext_is_split_into_articles_at_top_level_headings(tmp_path):
    raw = tmp_path / "wiki.test.raw"
    raw.write_text(ARTICLES)
    pages = language_modeling.wikitext_articles({"text": str(raw)})["test"]["page"]
    assert len(pages) == 2
    assert pages[0].startswith(" = First Article = ") and "= = A section = =" in pages[0]
    assert pages[1].startswith(" = Second Article = ")


def test_ptb_is_scored_in_documents_of_a_hundred_sentences(tmp_path):
    """PTB's sentences grouped into documents; the uniform model's word perplexity is V^(tokens/words)."""
    sentences = [f" the company said {i} shares of <unk> rose N % " for i in range(150)]
    raw = tmp_path / "ptb.test.txt"
    raw.write_text("\n".join(sentences) + "\n")
    pages = language_modeling.ptb_documents({"text": str(raw)})["test"]["page"]
    assert [page.count("\n") + 1 for page in pages] == [100, 50] and pages[1].startswith("the company said 100 ")
    tokenizer = load.load_model("tiny-gpt2").tokenizer
    lm = UniformLM(tokenizer, vocab=260, max_length=64)
    job = job_for("ptb", data={"test": DataSource("test", files={"text": raw})})
    metrics, examples, _ = language_modeling.run_task(lm, job)
    tokens = sum(len(tokenizer.encode(page)) for page in pages)  # byte-level, but <unk> is one token
    words = sum(len(page.split()) for page in pages)
    assert examples == 2
    assert metrics["word_perplexity"].value == pytest.approx(math.exp(tokens * math.log(260) / words), rel=1e-9)


class UniformLM(TemplateLM):
    """Every next token equally likely among `vocab`: perplexities known in closed form."""

    def __init__(self, tokenizer, vocab: int, max_length: int):
        super().__init__()
        self.tokenizer, self.vocab, self.max_length = tokenizer, vocab, max_length
        self.calls = 0

    eot_token_id = OnnxDecoderLM.eot_token_id
    prefix_token_id = OnnxDecoderLM.prefix_token_id
    tok_encode = OnnxDecoderLM.tok_encode
    _loglikelihood_tokens = OnnxDecoderLM._loglikelihood_tokens
    loglikelihood_rolling = OnnxDecoderLM.loglikelihood_rolling
    generate_until = OnnxDecoderLM.generate_until

    def logits(self, tokens):
        self.calls += 1
        return np.zeros((len(tokens), self.vocab), dtype=np.float32)


def test_word_perplexity_of_a_uniform_model_is_known(tmp_path, monkeypatch, caplog):
    """The wikitext task YAML + rolling windows score every token exactly once: ppl = V^(tokens/words)."""
    raw = tmp_path / "wiki.test.raw"
    raw.write_text(ARTICLES)
    tokenizer = load.load_model("tiny-gpt2").tokenizer  # byte-level: one token per UTF-8 byte
    # documents longer than the context are windowed, not truncated: no "indexing errors" warning
    monkeypatch.setattr(tokenizer, "model_max_length", 16)
    monkeypatch.setattr(tokenizer, "deprecation_warnings", {})  # transformers warns once per tokenizer
    monkeypatch.setattr(logging.getLogger("transformers"), "propagate", True)  # to caplog's root handler
    lm = UniformLM(tokenizer, vocab=260, max_length=16)
    job = job_for("wikitext2", data={"test": DataSource("test", files={"text": raw})})
    metrics, examples, _ = language_modeling.run_task(lm, job)

    from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer

    pages = language_modeling.wikitext_articles({"text": str(raw)})["test"]["page"]
    tokens = sum(len(wikitext_detokenizer({"page": page}).encode()) for page in pages)
    # lm-eval counts the words and bytes of the page before detokenization
    words = sum(len(re.split(r"\s+", page)) for page in pages)
    original_bytes = sum(len(page.encode()) for page in pages)
    assert examples == 2
    assert metrics["word_perplexity"].value == pytest.approx(math.exp(tokens * math.log(260) / words), rel=1e-9)
    assert metrics["bits_per_byte"].value == pytest.approx(tokens * math.log2(260) / original_bytes, rel=1e-9)
    assert lm.calls == sum(math.ceil(len(wikitext_detokenizer({"page": p}).encode()) / 16) for p in pages)
    assert not [record for record in caplog.records if "Token indices sequence length" in record.getMessage()]


def test_lambada_perplexity_and_accuracy_of_a_uniform_model_are_known():
    tokenizer = load.load_model("tiny-gpt2").tokenizer
    lm = UniformLM(tokenizer, vocab=260, max_length=64)
    job = job_for("lambada_openai", limit=5)
    metrics, examples, _ = language_modeling.run_task(lm, job)
    with open(job.source.files["jsonl"]) as handle:
        texts = [json.loads(next(handle))["text"] for _ in range(5)]
    target_tokens = [len((" " + text.split(" ")[-1]).encode()) for text in texts]
    assert examples == 5
    assert metrics["perplexity"].value == pytest.approx(math.exp(np.mean(target_tokens) * math.log(260)))
    assert metrics["acc"].value == 0.0  # argmax of a flat distribution is token 0, never the target


# --- PyTorch vs DeepSparse ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gpt2_baseline():
    """The dense tiny-gpt2 run (level 0) and its ONNX export."""
    run = dense_baseline(RunDir("tiny-gpt2", DEFAULT_RECIPE, 0), "eval")
    return run, ensure_onnx(run)


def test_pytorch_and_deepsparse_loglikelihoods_agree_on_a_dense_tiny_model(gpt2_baseline):
    from lm_eval.models.huggingface import HFLM

    run, onnx_dir = gpt2_baseline
    loaded = load.load_model(str(run.path))
    pytorch = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=4, max_length=64)
    engine = OnnxDecoderLM(onnx_dir, tokenizer=loaded.tokenizer, max_length=64, num_cores=1)
    pairs = [("The capital of France is", " Paris"), ("Sparse models run", " fast on CPUs."), ("a" * 80, " b")]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    rolling = [Instance("loglikelihood_rolling", {}, ("Pruned weights are zero. " * 7,), 0)]  # 175 tokens: 3 windows
    expected = [ll for ll, _ in pytorch.loglikelihood(requests)] + pytorch.loglikelihood_rolling(rolling)
    got = [ll for ll, _ in engine.loglikelihood(requests)] + engine.loglikelihood_rolling(rolling)
    assert engine.runtime == "deepsparse"
    assert np.allclose(got, expected, rtol=1e-4, atol=1e-3), (got, expected)
    assert all(ll < 0 for ll in expected)


# --- every evaluator end to end: a well-formed eval.json ---------------------------------------------

def check_document(document, model, names, limit):
    assert document["model"] == model and document["level"] == 0 and document["limit"] == limit
    assert list(document["benchmarks"]) == names
    for name in names:
        result = document["benchmarks"][name]
        assert result["status"] == "done", result
        assert result["limit"] == limit and 0 < result["examples"] and result["wall_time_s"] > 0
        assert set(result["metrics"]) and all(math.isfinite(m["value"]) for m in result["metrics"].values())
        assert result["deepsparse"]["runtime"] == "deepsparse"
    return document["benchmarks"]


def test_decoder_eval_runs_lm_eval_on_pytorch_and_deepsparse(gpt2_baseline, capsys):
    run, _ = gpt2_baseline
    code, errors, out = run_cli(capsys, "eval", "--model", "tiny-gpt2", "--level", "0", "--benchmarks",
                                "lambada_openai", "--limit", "3", "--cores", "1")
    assert code == 0, errors
    results = check_document(read_json(run.path / EVAL_FILE), "tiny-gpt2", ["lambada_openai"], 3)
    lambada = results["lambada_openai"]
    assert lambada["examples"] == 3 and lambada["metrics"]["perplexity"]["stderr"] is not None
    assert abs(lambada["deepsparse"]["difference"]["perplexity"]) <= 1e-3 * lambada["metrics"]["perplexity"]["value"]
    assert run.stage_record("eval")["status"] == "done"
    assert "lambada_openai" in out and "perplexity" in out  # the table
    # unchanged inputs: the stage skips itself
    code, _, out = run_cli(capsys, "eval", "--model", "tiny-gpt2", "--level", "0", "--benchmarks", "lambada_openai",
                           "--limit", "3", "--cores", "1")
    assert code == 0 and "up to date" in out


@pytest.mark.parametrize("model,names,limit", [
    ("tiny-deberta", ["rte", "mnli_matched"], 12),
    ("tiny-m2m100", ["flores200", "wmt14"], 2),
    ("minilm", ["sst2_probe", "embedding_fidelity"], 40),
])
def test_each_evaluator_writes_a_well_formed_eval_json(model, names, limit, monkeypatch):
    for name in ("flores200", "wmt14"):  # the random tiny model never stops: keep its translations short
        monkeypatch.setitem(evaluate.benchmark_registry()[name], "max_new_tokens", 12)
    evaluation = evaluate.evaluate(RunDir(model, DEFAULT_RECIPE, 0), limit=limit, cores=1)
    document = read_json(RunDir(model, DEFAULT_RECIPE, 0).path / EVAL_FILE)
    assert layout.to_json(evaluation) == document
    if model == "tiny-deberta":  # no MNLI file offline: the default benchmark is skipped with its reason
        assert document["benchmarks"]["mnli_matched"]["status"] == "skipped"
        assert "dev_matched.tsv" in document["benchmarks"]["mnli_matched"]["reason"]
        names = ["rte"]
    results = check_document({**document, "benchmarks": {n: document["benchmarks"][n] for n in names}},
                             model, names, limit)
    for name, result in results.items():
        engine = result["deepsparse"]
        assert engine["sample"] == result["examples"] and engine["wall_time_s"] > 0  # every example fits the sample
        if name == "embedding_fidelity":
            assert "agreement" not in engine
        else:  # the share of the sample on which the engine predicts what PyTorch does
            agreeing = engine["agreement"] * engine["sample"]
            assert 0 <= engine["agreement"] <= 1 and agreeing == pytest.approx(round(agreeing))
    if model == "tiny-deberta":
        assert results["rte"]["examples"] == limit and results["rte"]["deepsparse"]["agreement"] == 1.0
    if model == "tiny-m2m100":
        assert set(results["flores200"]["metrics"]) == {"en-fr/bleu", "en-fr/chrf", "en-de/bleu", "en-de/chrf"}
        assert results["wmt14"]["examples"] == 2 * limit
    if model == "minilm":
        assert len(results["sst2_probe"]["folds"]) == 5 and results["sst2_probe"]["metrics"]["accuracy"]["value"] > 0.5
        # level 0 is the dense model itself
        assert results["embedding_fidelity"]["metrics"]["mean_cosine"]["value"] == pytest.approx(1.0, abs=1e-6)
        assert results["embedding_fidelity"]["deepsparse"]["mean_cosine_vs_pytorch"] > 0.999
        assert results["sst2_probe"]["deepsparse"]["mean_cosine_vs_pytorch"] > 0.999


def test_engine_lengths_are_power_of_two_buckets_up_to_the_context():
    from harness.evaluators.deepsparse_lm import buckets

    assert buckets(1024) == [64, 128, 256, 512, 1024]
    assert buckets(100) == [64, 100] and buckets(64) == [64] and buckets(16) == [16]


def test_limit_per_benchmark():
    assert evaluate.parse_limit("5") == 5 and evaluate.parse_limit("") is None
    limit = evaluate.parse_limit("wikitext2=4, lambada_openai=500 20")
    assert limit == {"wikitext2": 4, "lambada_openai": 500, "*": 20}
    assert [evaluate.limit_for(limit, n) for n in ("wikitext2", "lambada_openai", "rte")] == [4, 500, 20]
    assert evaluate.limit_for(evaluate.parse_limit("wikitext2=4"), "rte") is None


def test_delta_to_the_level_0_baseline():
    results = {"rte": BenchmarkResult("done", limit=8, metrics={"accuracy": Metric(0.5, 0.1)}),
               "wmt14": BenchmarkResult("done", limit=8, metrics={"en-de/bleu": Metric(1.0)}),
               "mnli_matched": BenchmarkResult("skipped", "no data")}
    baseline = Evaluation("tiny-deberta", DEFAULT_RECIPE, 0.0, 8, ["pytorch"], None, {
        "rte": BenchmarkResult("done", limit=8, metrics={"accuracy": Metric(0.625)}),
        "wmt14": BenchmarkResult("done", limit=4, metrics={"en-de/bleu": Metric(2.0)})})
    evaluate.deltas(results, baseline)
    assert results["rte"].delta_vs_level0 == {"accuracy": -0.125}
    assert results["wmt14"].delta_vs_level0 is None  # evaluated on other examples: not comparable
    assert results["mnli_matched"].delta_vs_level0 is None


# --- bad input: one line, exit 2, nothing written ----------------------------------------------------

@pytest.mark.parametrize("argv,message", [
    (["--model", "tiny-deberta", "--benchmarks", "nope"], "unknown benchmark 'nope'"),
    (["--model", "tiny-deberta", "--limit", "0"], "LIMIT must be a positive integer"),
    (["--model", "tiny-deberta", "--limit", "-3"], "LIMIT must be a positive integer"),
    (["--model", "tiny-deberta", "--limit", "ten"], "LIMIT must be a positive integer"),
    (["--model", "tiny-deberta", "--limit", "rte=0"], "LIMIT must be a positive integer"),
    (["--model", "tiny-deberta", "--limit", "wikitext2=4"], "LIMIT names 'wikitext2', which is not among"),
    (["--model", "tiny-deberta", "--benchmarks", "mnli_matched"], "dev_matched.tsv is missing"),
    (["--model", "tiny-gpt2", "--benchmarks", "rte"], "benchmark rte needs a model with an MNLI-style"),
    (["--model", "tiny-deberta", "--engines", "deepsparse"], "--engines must list pytorch"),
    (["--model", "tiny-deberta", "--level", "50"], "make prune"),
])
def test_bad_input_is_one_line_and_writes_nothing(capsys, argv, message):
    code, errors, _ = run_cli(capsys, "eval", "--recipe", "inc/oneshot-magnitude", *argv)
    assert code == 2 and len(errors) == 1 and message in errors[0], errors
    assert not RunDir(argv[1], "inc/oneshot-magnitude", 0).path.exists()


def test_missing_data_file_is_named(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HARNESS_DATA", str(tmp_path))
    code, errors, _ = run_cli(capsys, "eval", "--model", "minilm", "--benchmarks", "sst2_probe",
                           "--recipe", "inc/oneshot-magnitude")
    assert code == 2 and len(errors) == 1 and str(tmp_path / "glue/SST-2/dev.tsv") in errors[0]


def test_shape_only_and_benchmarkless_models_are_refused(capsys, monkeypatch):
    from dataclasses import replace

    registry = dict(load.registry())
    monkeypatch.setattr(load, "registry", lambda: {**registry,
                                                   "shape-gpt2": replace(registry["tiny-gpt2"], name="shape-gpt2",
                                                                         shape_only=True)})
    code, errors, _ = run_cli(capsys, "eval", "--model", "shape-gpt2")
    assert code == 2 and "shape-only" in errors[0]
    code, errors, _ = run_cli(capsys, "eval", "--model", "deberta")
    assert code == 2 and "lists no benchmarks" in errors[0]
