"""Training text for calibration, fine-tuning and distillation: named corpora, tokenized once.

A corpus is a registry name (`harness/corpora.yaml`, e.g. `fineweb`), a file path, or (online) a
Hugging Face dataset id. Its documents are split by position into `train` (what calibration and
training read) and `heldout` (every HELDOUT_EVERY-th document: for measuring damage, never trained
on). `token_sequences` concatenates a split's documents, separated by the tokenizer's end-of-text
token, into fixed-length sequences and caches them under `.cache/harness/corpora/`, keyed by a
fingerprint of the corpus file, the tokenizer's vocabulary, the split and the shape.

Evaluation data is never training text: a corpus file anywhere in the data directory outside
`train/`, or named by a benchmark in `evals/benchmarks.yaml`, is refused.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import yaml

from harness.errors import HarnessError
from harness.paths import EVALS_DIR, cache_dir, data_dir

REGISTRY_FILE = Path(__file__).with_name("corpora.yaml")
DEFAULT_CORPUS = "fineweb"
TRAIN_SUBDIR = "train"
HELDOUT_EVERY = 20  # document i is held out when i % HELDOUT_EVERY == 0
SPLITS = ("train", "heldout")


@dataclass(frozen=True)
class Corpus:
    name: str
    path: Path | None = None  # a local file, or
    hub: str | None = None  # a Hugging Face dataset id (online only)
    format: str = "jsonl"
    text_field: str = "text"

    def documents(self) -> Iterator[str]:
        """Every non-empty document, in file order."""
        if self.hub:
            import datasets

            for row in datasets.load_dataset(self.hub, split="train", streaming=True):
                if row.get(self.text_field, "").strip():
                    yield row[self.text_field]
            return
        opener = gzip.open if self.path.suffix == ".gz" else open
        with opener(self.path, "rt", encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                if self.format == "text":
                    yield line.rstrip("\n")
                    continue
                try:
                    text = json.loads(line)[self.text_field]
                except (ValueError, KeyError, TypeError):
                    raise HarnessError(f"corpus {self.name}: line {number} of {self.path} is not a JSON object "
                                       f"with a '{self.text_field}' field") from None
                if text.strip():
                    yield text

    def split(self, split: str) -> Iterator[str]:
        if split not in SPLITS:
            raise HarnessError(f"unknown corpus split '{split}' (splits: {', '.join(SPLITS)})")
        for index, text in enumerate(self.documents()):
            if (index % HELDOUT_EVERY == 0) == (split == "heldout"):
                yield text

    def identity(self):
        """What changes when the text changes (for cache fingerprints)."""
        if self.hub:
            return self.hub
        stat = self.path.stat()
        return str(self.path), stat.st_size, stat.st_mtime_ns


def registry() -> dict[str, dict]:
    return yaml.safe_load(REGISTRY_FILE.read_text()) or {}


def evaluation_files() -> set[Path]:
    """Every data file a benchmark reads."""
    benchmarks = yaml.safe_load((EVALS_DIR / "benchmarks.yaml").read_text()) or {}
    return {(data_dir() / relative).resolve() for entry in benchmarks.values()
            for part in entry.get("data", {}).values() for relative in part.get("files", {}).values()}


def _refuse_evaluation_data(name: str, path: Path) -> None:
    resolved, root = path.resolve(), data_dir()
    inside_data = resolved.is_relative_to(root)
    if resolved in evaluation_files() or (inside_data and not resolved.is_relative_to(root / TRAIN_SUBDIR)):
        raise HarnessError(f"corpus {name}: {path} is evaluation data; calibration and training read only training "
                           f"text (the corpora in {REGISTRY_FILE.name}, or files under {root / TRAIN_SUBDIR})")


def resolve_corpus(name: str) -> Corpus:
    """A registry name, a file path, or a Hub dataset id, checked to exist and not to be evaluation data."""
    from harness.load import hub_offline

    entries = registry()
    if name in entries:
        entry = entries[name]
        path = data_dir() / entry["file"]
        if not path.exists():
            raise HarnessError(f"corpus {name}: {path} is missing; put it there (see {data_dir() / 'SOURCES.md'}) or "
                               f"point HARNESS_DATA at a folder that has {entry['file']}")
        corpus = Corpus(name, path, format=entry.get("format", "jsonl"), text_field=entry.get("text_field", "text"))
    elif Path(name).expanduser().is_file():
        path = Path(name).expanduser()
        is_jsonl = path.name.endswith((".jsonl", ".jsonl.gz"))
        corpus = Corpus(name, path, format="jsonl" if is_jsonl else "text")
    elif "/" in name and not Path(name).expanduser().exists() and not hub_offline():
        return Corpus(name, hub=name)
    else:
        raise HarnessError(f"unknown corpus '{name}': use one of {', '.join(entries)} ({REGISTRY_FILE}), a text or "
                           f"JSONL file, or a Hugging Face dataset id when online")
    _refuse_evaluation_data(name, corpus.path)
    return corpus


def _tokenizer_identity(tokenizer) -> str:
    vocab = json.dumps(sorted(tokenizer.get_vocab().items())).encode()
    return f"{type(tokenizer).__name__}-{hashlib.sha256(vocab).hexdigest()[:16]}"


def separator_id(tokenizer) -> int | None:
    """The token `token_sequences` puts between documents: end-of-text, else [SEP] (None: nothing)."""
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id


def token_sequences(tokenizer, corpus: str, count: int, seq_len: int, split: str = "train", repeat: bool = False):
    """`count` sequences of `seq_len` token ids (a [count, seq_len] int64 tensor) from a corpus split; with
    `repeat`, a split shorter than that is read again (training epochs) instead of failing."""
    import torch

    from harness.rundir import fingerprint, write_atomic

    if count < 1 or seq_len < 2:
        raise HarnessError(f"corpus {corpus}: need at least 1 sequence of at least 2 tokens, got {count} x {seq_len}")
    source = resolve_corpus(corpus)
    key = fingerprint(source.identity(), _tokenizer_identity(tokenizer), split, count, seq_len, HELDOUT_EVERY, repeat)
    cached = cache_dir() / "corpora" / f"{Path(source.name).name.split('.')[0]}-{split}-{count}x{seq_len}-{key}.pt"
    if cached.exists():
        return torch.load(cached)
    separator = separator_id(tokenizer)
    needed, ids = count * seq_len, []
    while len(ids) < needed:
        before = len(ids)
        for text in source.split(split):
            # verbose=False: a document longer than the model's context is cut into sequences below, not fed whole
            ids += tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
            if separator is not None:
                ids.append(separator)
            if len(ids) >= needed:
                break
        if not repeat or len(ids) == before:
            break
    if len(ids) < needed:
        raise HarnessError(f"corpus {corpus} has {len(ids):,} tokens in its {split} split, fewer than the "
                           f"{count} x {seq_len} asked for: ask for fewer or shorter sequences")
    sequences = torch.tensor(ids[:needed], dtype=torch.int64).view(count, seq_len)
    buffer = io.BytesIO()
    torch.save(sequences, buffer)
    write_atomic(cached, buffer.getvalue())
    return sequences
