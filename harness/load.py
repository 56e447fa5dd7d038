"""Stage 1, load: the model registry (`harness/models.yaml`) and turning a MODEL argument into weights.

MODEL may be a registry alias, a run directory, a local checkpoint directory, a `.gguf` file or a
Hugging Face id. Every source is first materialised as a local checkpoint directory
(`checkpoint_dir`), then loaded with the spec's transformers Auto class (`load_model`).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import yaml

from harness.errors import HarnessError
from harness.paths import cache_dir
from harness.rundir import MANIFEST, MODEL_SUBDIR, discarded_note, fingerprint, staging_dir

REGISTRY_FILE = Path(__file__).with_name("models.yaml")
CONFIGS_DIR = Path(__file__).with_name("configs")
ARCHITECTURES = ("encoder", "decoder", "encoder-decoder")
BUILD_SEED = 0
# safetensors serializes a whole shard in memory before writing it, and transformers loads one shard
# at a time: 1 GB shards bound that extra memory to 1 GB (transformers' default is 5 GB).
SHARD_BYTES = 1_000_000_000


@dataclass(frozen=True)
class ModelSpec:
    """One registry entry (or the same fields inferred for a checkpoint given by path or Hub id)."""

    name: str
    architecture: str
    source: dict
    model_class: str
    task: str
    seq_len: int = 128
    benchmarks: tuple = ()
    shape_only: bool = False
    description: str = ""
    lang_tokens: tuple = ()
    extra: dict = field(default_factory=dict)

    @property
    def has_lm_loss(self) -> bool:
        """Its model class computes a language-modelling loss from `labels` (decoders, encoder-decoders)."""
        return self.model_class in ("AutoModelForCausalLM", "AutoModelForSeq2SeqLM")

    @property
    def source_kind(self) -> str:
        return next(iter(self.source))

    def to_dict(self) -> dict:
        return {
            "name": self.name, "architecture": self.architecture, "source": self.source,
            "model_class": self.model_class, "task": self.task, "seq_len": self.seq_len,
            "benchmarks": list(self.benchmarks), "shape_only": self.shape_only,
            "description": self.description, "lang_tokens": list(self.lang_tokens), **self.extra,
        }

    @classmethod
    def from_dict(cls, name: str, entry: dict, where: str = str(REGISTRY_FILE)) -> "ModelSpec":
        required = {"architecture", "source", "model_class", "task"}
        missing = sorted(required - set(entry))
        if missing:
            raise HarnessError(f"{where}: model '{name}' lacks {', '.join(missing)}")
        if entry["architecture"] not in ARCHITECTURES:
            raise HarnessError(f"{where}: model '{name}' has architecture {entry['architecture']!r}, "
                               f"expected one of {', '.join(ARCHITECTURES)}")
        source = entry["source"]
        if not isinstance(source, dict) or len(source) != 1 or next(iter(source)) not in SOURCE_KINDS:
            raise HarnessError(f"{where}: model '{name}' needs a source with exactly one of "
                               f"{', '.join(SOURCE_KINDS)}, got {source!r}")
        known = set(cls.__dataclass_fields__) - {"name", "extra"}
        fields = {k: v for k, v in entry.items() if k in known}
        fields["benchmarks"] = tuple(fields.get("benchmarks") or ())
        fields["lang_tokens"] = tuple(fields.get("lang_tokens") or ())
        extra = {k: v for k, v in entry.items() if k not in known and k != "name"}
        return cls(name=name, extra=extra, **fields)


@dataclass
class LoadedModel:
    spec: ModelSpec
    path: Path
    model: Any
    tokenizer: Any


def registry_files() -> list[Path]:
    """harness/models.yaml, then any extra registry files listed in HARNESS_EXTRA_MODELS (os.pathsep-separated)."""
    extra = [Path(p) for p in os.environ.get("HARNESS_EXTRA_MODELS", "").split(os.pathsep) if p]
    return [REGISTRY_FILE, *extra]


def registry() -> dict[str, ModelSpec]:
    """All registry entries by alias (later files override earlier ones)."""
    return {name: spec for path in registry_files() for name, spec in _read_registry(path).items()}


@lru_cache(maxsize=None)
def _read_registry(path: Path) -> dict[str, ModelSpec]:
    try:
        entries = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise HarnessError(f"model registry {path} cannot be read: {exc}") from None
    return {name: ModelSpec.from_dict(name, entry, where=str(path)) for name, entry in entries.items()}


def resolve_spec(model: str) -> ModelSpec:
    """Turn a MODEL argument into a spec, or fail with one line listing what is known."""
    specs = registry()
    if model in specs:
        return specs[model]
    path = Path(model).expanduser()
    if (path / MANIFEST).exists() and (path / MODEL_SUBDIR).is_dir():
        manifest = json.loads((path / MANIFEST).read_text())
        base = ModelSpec.from_dict(manifest["model"], manifest["spec"], where=str(path / MANIFEST))
        return replace(base, source={"local": str((path / MODEL_SUBDIR).resolve())})
    if path.suffix == ".gguf":
        if not path.is_file():
            raise HarnessError(f"GGUF file {path} does not exist")
        return replace(_spec_for_gguf(path.resolve()), name=path.stem)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise HarnessError(f"{path} is not a model directory (no config.json)")
        return infer_spec(str(path), {"local": str(path.resolve())}, json.loads((path / "config.json").read_text()))
    if "/" in model and not model.startswith((".", "/", "~")) and model.count("/") == 1:
        return infer_spec(model, {"hub": model}, _hub_config(model))
    raise HarnessError(f"unknown model '{model}': known aliases are {', '.join(specs)}; "
                       f"or pass a Hugging Face id (org/name), a checkpoint directory, a run directory or a .gguf file")


def infer_spec(name: str, source: dict, config: dict) -> ModelSpec:
    """Spec for a checkpoint outside the registry, from its config.json."""
    archs = config.get("architectures") or [""]
    head = archs[0]
    if config.get("is_encoder_decoder"):
        architecture, model_class, task = "encoder-decoder", "AutoModelForSeq2SeqLM", "text2text-generation"
    elif head.endswith(("ForCausalLM", "LMHeadModel")):
        architecture, model_class, task = "decoder", "AutoModelForCausalLM", "text-generation"
    elif head.endswith("ForSequenceClassification"):
        architecture, model_class, task = "encoder", "AutoModelForSequenceClassification", "text-classification"
    else:
        architecture, model_class, task = "encoder", "AutoModel", "feature-extraction"
    return ModelSpec(name=name, architecture=architecture, source=source, model_class=model_class, task=task)


def _spec_for_gguf(path: Path) -> ModelSpec:
    return ModelSpec(name=path.stem, architecture="decoder", source={"gguf": str(path)},
                     model_class="AutoModelForCausalLM", task="text-generation")


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")


def _hub_missing(repo_id: str) -> HarnessError:
    return HarnessError(
        f"model '{repo_id}' is not in the Hugging Face cache and the Hub cannot be reached: download it once "
        f"online (`huggingface-cli download {repo_id}`), or pass a local checkpoint directory as MODEL=/path"
    )


def _hub_snapshot(repo_id: str, allow_patterns: list[str] | None = None) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True, allow_patterns=allow_patterns))
    except Exception:
        if hub_offline():
            raise _hub_missing(repo_id) from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=allow_patterns))
    except Exception:
        raise _hub_missing(repo_id) from None


def _hub_config(repo_id: str) -> dict:
    return json.loads((_hub_snapshot(repo_id, ["config.json"]) / "config.json").read_text())


# --- sources: each turns a spec into a local checkpoint directory -------------------------------

def _from_hub(spec: ModelSpec, repo_id: str) -> Path:
    return _hub_snapshot(repo_id, ["*.json", "*.safetensors", "*.model", "*.txt", "*.bin"])


def _from_local(spec: ModelSpec, path: str) -> Path:
    return Path(path)


def _from_package(spec: ModelSpec, location: str) -> Path:
    import importlib.util

    module, _, subdir = location.partition("/")
    found = importlib.util.find_spec(module)
    if found is None or not found.origin:
        raise HarnessError(f"model '{spec.name}' ships in the Python package '{module}', which is not installed: "
                           f"run `make setup`")
    return Path(found.origin).parent / subdir


def _from_config(spec: ModelSpec, config: dict) -> Path:
    return _build_once(spec, {**config})


def _from_config_file(spec: ModelSpec, location: str | dict) -> Path:
    """`gpt2-xl.json`, or `{file: gpt2-xl.json, n_layer: 1}` to override values (e.g. fewer layers)."""
    overrides = dict(location) if isinstance(location, dict) else {"file": location}
    path = CONFIGS_DIR / overrides.pop("file")
    if not path.exists():
        raise HarnessError(f"model '{spec.name}': config file {path} does not exist")
    return _build_once(spec, {**json.loads(path.read_text()), **overrides})


def _from_gguf(spec: ModelSpec, location: str) -> Path:
    from harness import gguf

    path = Path(location).expanduser()
    if not path.is_absolute() and not path.exists():
        path = _from_package(spec, location)
    return gguf.converted_checkpoint(path)


SOURCE_KINDS: dict[str, Callable[[ModelSpec, Any], Path]] = {
    "hub": _from_hub,
    "local": _from_local,
    "package": _from_package,
    "config": _from_config,
    "config_file": _from_config_file,
    "gguf": _from_gguf,
}


def checkpoint_dir(spec: ModelSpec) -> Path:
    """A local directory with the spec's config, weights and tokenizer, building or converting it if needed."""
    path = SOURCE_KINDS[spec.source_kind](spec, spec.source[spec.source_kind])
    if not (path / "config.json").exists():
        raise HarnessError(f"model '{spec.name}': {path} has no config.json")
    return path


def load_model(model: str | ModelSpec, dtype=None) -> LoadedModel:
    """Load a model and its tokenizer (fp32, eval mode) from the registry, a path or the Hub."""
    import torch
    import transformers

    spec = model if isinstance(model, ModelSpec) else resolve_spec(model)
    path = checkpoint_dir(spec)
    auto_class = getattr(transformers, spec.model_class)
    if path.is_dir() and discarded_note(path):
        raise HarnessError(f"cannot load model '{spec.name}': {discarded_note(path)}")
    try:
        loaded = auto_class.from_pretrained(path, torch_dtype=dtype or torch.float32)
    except OSError as exc:
        raise HarnessError(f"cannot load model '{spec.name}' from {path}: {exc}") from None
    return LoadedModel(spec=spec, path=path, model=loaded.eval(), tokenizer=load_tokenizer(path))


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        raise HarnessError(f"cannot load the tokenizer in {path}: {exc}") from None


# --- models built here from a config: random weights, fixed seed, byte-level tokenizer ------------

# Token ids 0-3 follow fairseq (M2M100): <s>, <pad>, </s>, <unk>; then the 256 bytes; then language tokens.
SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")
# How each architecture frames a sequence (or a pair): decoders add nothing, like GPT-2; encoders
# wrap like BERT; encoder-decoders end with </s> like M2M100.
TEMPLATES = {
    "decoder": None,
    "encoder": ("<s> $A </s>", "<s> $A </s> $B </s>"),
    "encoder-decoder": ("$A </s>", "$A </s> $B </s>"),
}


def byte_tokenizer(architecture: str, lang_tokens: tuple = ()):
    """A byte-level BPE tokenizer with no merges: every UTF-8 byte is a token. Needs no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for char in bytes_to_unicode().values():
        vocab[char] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    template = TEMPLATES[architecture]
    if template:
        backend.post_processor = processors.TemplateProcessing(
            single=template[0], pair=template[1],
            special_tokens=[(t, vocab[t]) for t in ("<s>", "</s>")],
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
        cls_token="<s>", sep_token="</s>", mask_token="<unk>",
        additional_special_tokens=[f"__{lang}__" for lang in lang_tokens],
        model_input_names=["input_ids", "attention_mask"],
    )
    return tokenizer


def _build_once(spec: ModelSpec, config_values: dict) -> Path:
    """Build a random-weight model from a config into the cache (once; the key covers the spec)."""
    target = cache_dir() / "models" / f"{spec.name}-{fingerprint(spec.to_dict(), config_values)}"
    if (target / "config.json").exists():
        return target
    import torch
    import transformers
    from transformers import AutoConfig

    tokenizer = byte_tokenizer(spec.architecture, spec.lang_tokens)
    values = dict(config_values)
    model_type = values.pop("model_type")
    values.setdefault("vocab_size", len(tokenizer))
    values = {**values, "pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
              "eos_token_id": tokenizer.eos_token_id}
    if spec.architecture == "encoder-decoder":
        values["decoder_start_token_id"] = tokenizer.eos_token_id
    if values["vocab_size"] < len(tokenizer):
        raise HarnessError(f"model '{spec.name}': vocab_size {values['vocab_size']} is smaller than the "
                           f"tokenizer's {len(tokenizer)}")
    config = AutoConfig.for_model(model_type, **values)
    torch.manual_seed(BUILD_SEED)
    model = getattr(transformers, spec.model_class).from_config(config)
    with staging_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size=SHARD_BYTES)
        tokenizer.save_pretrained(tmp)
    return target


def describe_models() -> str:
    """The registry as a table for `python -m harness models`."""
    rows = [f"{'alias':<14} {'architecture':<16} {'source':<44} description"]
    for name, spec in registry().items():
        source = f"{spec.source_kind}: {spec.source[spec.source_kind]}"
        if spec.source_kind == "config":
            source = "config (built here, random weights)"
        rows.append(f"{name:<14} {spec.architecture:<16} {source[:44]:<44} {spec.description}")
    return "\n".join(rows)
