"""Training corpora: fixed-length sequences from the train split, cached, held-out split disjoint, evaluation data refused."""
import gzip
import json
import logging

import pytest

from harness import corpus, load
from harness.errors import HarnessError
from harness.paths import cache_dir, data_dir


@pytest.fixture(scope="module")
def tokenizer():
    return load.load_model("tiny-gpt2").tokenizer


@pytest.fixture
def documents(tmp_path):
    """A JSONL corpus of 40 distinct documents outside the data directory."""
    path = tmp_path / "docs.jsonl.gz"
    with gzip.open(path, "wt") as handle:
        for i in range(40):
            handle.write(json.dumps({"text": f"document {i:02d} " + "word " * 20}) + "\n")
    return path


def test_sequences_are_the_train_documents_cut_to_length_and_cached(tokenizer, documents, monkeypatch, tmp_path):
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    sequences = corpus.token_sequences(tokenizer, str(documents), 4, 32)
    assert tuple(sequences.shape) == (4, 32)
    text = tokenizer.decode(sequences.flatten().tolist())
    assert "document 01" in text and "document 00" not in text  # document 0 is held out
    cached = list((cache_dir() / "corpora").glob("docs-train-4x32-*.pt"))
    assert len(cached) == 1
    assert (corpus.token_sequences(tokenizer, str(documents), 4, 32) == sequences).all()


def test_documents_longer_than_the_context_are_cut_without_a_tokenizer_warning(tokenizer, documents, monkeypatch,
                                                                              tmp_path, caplog):
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tokenizer, "model_max_length", 8)  # each document is about 110 tokens
    monkeypatch.setattr(tokenizer, "deprecation_warnings", {})  # transformers warns once per tokenizer
    monkeypatch.setattr(logging.getLogger("transformers"), "propagate", True)  # to caplog's root handler
    sequences = corpus.token_sequences(tokenizer, str(documents), 2, 32)
    assert tuple(sequences.shape) == (2, 32)
    assert not [record for record in caplog.records if "Token indices sequence length" in record.getMessage()]


def test_heldout_split_is_every_twentieth_document(tokenizer, documents):
    held = tokenizer.decode(corpus.token_sequences(tokenizer, str(documents), 1, 150, "heldout")[0].tolist())
    assert held.startswith("document 00") and "document 20" in held
    assert "document 01" not in held


def test_too_few_tokens_is_one_clear_error_unless_training_reads_the_corpus_again(tokenizer, documents):
    with pytest.raises(HarnessError, match="fewer than the 1000 x 512"):
        corpus.token_sequences(tokenizer, str(documents), 1000, 512)
    split = [token for text in corpus.resolve_corpus(str(documents)).split("train")
             for token in tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]]
    epochs = corpus.token_sequences(tokenizer, str(documents), 1000, 512, repeat=True).flatten().tolist()
    assert len(epochs) == 1000 * 512 > 2 * len(split)
    assert epochs[:len(split)] == split and epochs[len(split):2 * len(split)] == split


def test_the_registered_corpus_reads_the_shared_training_text(tokenizer):
    if not (data_dir() / "train" / "fineweb_sample.jsonl.gz").exists():
        pytest.skip("no shared training data here")
    sequences = corpus.token_sequences(tokenizer, "fineweb", 2, 64)
    assert tuple(sequences.shape) == (2, 64)


@pytest.mark.parametrize("name, message", [
    ("lambada/lambada_test.jsonl", "is evaluation data"),  # a benchmark's file
    ("wikitext-2/valid.txt", "is evaluation data"),  # an evaluation split no benchmark names
    ("no-such-corpus", "unknown corpus 'no-such-corpus'"),
])
def test_evaluation_files_and_unknown_names_are_refused(name, message):
    path = data_dir() / name
    with pytest.raises(HarnessError, match=message):
        corpus.resolve_corpus(str(path) if "/" in name else name)


def test_a_missing_registered_file_says_where_it_belongs(monkeypatch, tmp_path):
    monkeypatch.setenv("HARNESS_DATA", str(tmp_path))
    with pytest.raises(HarnessError, match="train/fineweb_sample.jsonl.gz"):
        corpus.resolve_corpus("fineweb")
