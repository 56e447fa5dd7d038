"""GGUF sources: convert a llama.cpp GGUF file once into a Hugging Face checkpoint in the project cache.

The pinned transformers (4.40) cannot read GGUF, so the `gguf` package reads the file here: every
tensor is dequantized to fp32 and renamed to the transformers layout (undoing llama.cpp's rotary
permutation of the q and k projections), the config comes from the metadata, and a fast byte-level
BPE tokenizer is rebuilt from the vocabulary and merges stored in the file. The result is an ordinary
checkpoint directory (model.safetensors, config.json, tokenizer files) that every stage loads like
any other.
"""
from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from harness.errors import HarnessError
from harness.paths import cache_dir
from harness.rundir import PeakMemory, fingerprint, staging_dir

# Per GGUF `general.architecture`: the transformers model, its config fields read from the metadata
# (`<architecture>.<key>`; the `required` ones have no sensible default), the tensor names (`{i}` is
# the layer) and the tensors llama.cpp stored permuted for its rotary embedding, with the config field
# holding their head count.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "llama": {
        "model_type": "llama",
        "model_class": "LlamaForCausalLM",
        "config": {
            "hidden_size": "embedding_length",
            "num_hidden_layers": "block_count",
            "intermediate_size": "feed_forward_length",
            "num_attention_heads": "attention.head_count",
            "num_key_value_heads": "attention.head_count_kv",
            "rms_norm_eps": "attention.layer_norm_rms_epsilon",
            "max_position_embeddings": "context_length",
            "rope_theta": "rope.freq_base",
        },
        "required": ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
                     "rms_norm_eps"),
        "tensors": {
            "token_embd.weight": "model.embed_tokens.weight",
            "output_norm.weight": "model.norm.weight",
            "output.weight": "lm_head.weight",
            "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
            "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
            "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
            "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
            "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
            "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
            "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
            "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
            "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
        },
        "lm_head": "output.weight",  # absent from the file when the head is tied to the embeddings
        "rotary_permuted": {
            "blk.{i}.attn_q.weight": "num_attention_heads",
            "blk.{i}.attn_k.weight": "num_key_value_heads",
        },
    },
}

# Byte-level BPE pre-tokenizers by GGUF `tokenizer.ggml.pre`: the regex splits llama.cpp applies in
# order (llama-vocab.cpp) before mapping bytes to the GPT-2 alphabet.
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS = {
    "gpt-2": (GPT2_SPLIT,),
    "smollm": (r"\p{N}", GPT2_SPLIT),  # every digit is its own token, as HF's SmolLM tokenizer does
    "llama-bpe": (LLAMA3_SPLIT,),
}
TOKENIZER_MODELS = ("gpt2",)  # byte-level BPE; SentencePiece vocabularies (`llama`) are not supported


def converted_checkpoint(path: Path) -> Path:
    """The checkpoint directory converted from GGUF file `path` (converting it on first use)."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise HarnessError(f"GGUF file {path} does not exist")
    stat = path.stat()
    # The converter's own source is part of the key, so a fix to it never reuses an older conversion.
    key = fingerprint(str(path), stat.st_size, stat.st_mtime_ns, Path(__file__).read_text())
    target = cache_dir() / "gguf" / f"{path.stem}-{key}"
    if (target / "config.json").exists():
        return target
    start = time.time()
    with PeakMemory() as memory, staging_dir(target) as tmp:
        convert(path, tmp)
    print(f"gguf: converted {path.name} in {time.time() - start:.1f}s (peak RSS {memory.peak_mb:.0f} MB) -> {target}")
    return target


def convert(path: Path, out_dir: Path) -> None:
    """Write the Hugging Face checkpoint of GGUF file `path` (fp32 weights, config, tokenizer) into `out_dir`."""
    import torch
    from safetensors.torch import save_file

    reader = _read(path)
    metadata = _metadata(reader, path)
    arch_name = metadata.get("general.architecture")
    arch = ARCHITECTURES.get(arch_name)
    if arch is None:
        raise HarnessError(f"{path.name}: GGUF architecture {arch_name!r} is not supported "
                           f"(supported: {', '.join(ARCHITECTURES)})")
    tokenizer = gguf_tokenizer(metadata, path.name)
    tensor_names = {tensor.name for tensor in reader.tensors}
    config = _config(metadata, arch, tied=arch["lm_head"] not in tensor_names, vocab_size=len(tokenizer), name=path.name)
    expected = _expected_shapes(config, arch["model_class"])

    state = {}
    for tensor in _progress(reader.tensors, path.name):
        hf_name, permuted_heads = _hf_name(tensor.name, arch_name, path.name)
        values = _dequantized(tensor, path.name)
        if permuted_heads:
            values = unpermute_rotary(values, getattr(config, permuted_heads))
        if expected.get(hf_name) != values.shape:
            raise HarnessError(f"{path.name}: tensor {tensor.name} has shape {values.shape}, the config in its "
                               f"metadata expects {expected.get(hf_name)}")
        state[hf_name] = torch.from_numpy(values)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise HarnessError(f"{path.name}: the GGUF file lacks {len(missing)} tensors, e.g. {missing[0]}")

    save_file(state, out_dir / "model.safetensors", metadata={"format": "pt"})
    config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def unpermute_rotary(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k permutation: it interleaves each head's two rotary halves, HF keeps them apart."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def gguf_tokenizer(metadata: dict, name: str):
    """A fast byte-level BPE tokenizer from the GGUF vocabulary, merges and special-token ids."""
    from gguf import TokenType
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    kind = metadata.get("tokenizer.ggml.model")
    if kind not in TOKENIZER_MODELS:
        raise HarnessError(f"{name}: tokenizer model {kind!r} is not supported (supported: {', '.join(TOKENIZER_MODELS)})")
    pre = metadata.get("tokenizer.ggml.pre")
    if pre not in PRE_TOKENIZER_SPLITS:
        raise HarnessError(f"{name}: pre-tokenizer {pre!r} is not supported "
                           f"(supported: {', '.join(PRE_TOKENIZER_SPLITS)})")
    tokens = metadata["tokenizer.ggml.tokens"]
    token_types = metadata.get("tokenizer.ggml.token_type") or [TokenType.NORMAL] * len(tokens)
    merges = [tuple(merge.split(" ", 1)) for merge in metadata.get("tokenizer.ggml.merges", [])]

    vocab = {token: i for i, token in enumerate(tokens)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(pattern), behavior="isolated") for pattern in PRE_TOKENIZER_SPLITS[pre]]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False)
                                for token, token_type in zip(tokens, token_types) if token_type == TokenType.CONTROL])
    backend.add_tokens([AddedToken(token, special=False, normalized=False)
                        for token, token_type in zip(tokens, token_types) if token_type == TokenType.USER_DEFINED])

    def special(role: str) -> str | None:
        token_id = metadata.get(f"tokenizer.ggml.{role}_token_id")
        return tokens[token_id] if token_id is not None and token_id < len(tokens) else None

    added = [special(role) if metadata.get(f"tokenizer.ggml.add_{role}_token") else None for role in ("bos", "eos")]
    if any(added):
        def frame(text: str) -> str:
            return " ".join(piece for piece in (added[0], text, added[1]) if piece)

        backend.post_processor = processors.TemplateProcessing(
            single=frame("$A"), pair=f"{frame('$A')} {frame('$B:1')}",
            special_tokens=[(token, vocab[token]) for token in added if token],
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=special("bos"), eos_token=special("eos"), unk_token=special("unknown"),
        pad_token=special("padding"), chat_template=metadata.get("tokenizer.chat_template"),
        model_max_length=metadata.get(f"{metadata.get('general.architecture')}.context_length", 2048),
        clean_up_tokenization_spaces=False,  # else decode() would not give back the text
        model_input_names=["input_ids", "attention_mask"],
    )


def _read(path: Path):
    from gguf import GGUFReader

    try:
        return GGUFReader(path)
    except (ValueError, IndexError, KeyError, OverflowError) as exc:
        raise HarnessError(f"{path} is not a readable GGUF file (corrupt or truncated?): {exc}") from None


def _metadata(reader, path: Path) -> dict:
    try:
        return {name: field.contents() for name, field in reader.fields.items()}
    except (ValueError, IndexError, UnicodeDecodeError) as exc:
        raise HarnessError(f"{path} has unreadable GGUF metadata (corrupt file?): {exc}") from None


def _config(metadata: dict, arch: dict, tied: bool, vocab_size: int, name: str):
    from transformers import AutoConfig

    prefix = metadata["general.architecture"]
    values = {field: metadata[f"{prefix}.{key}"] for field, key in arch["config"].items()
              if f"{prefix}.{key}" in metadata}
    missing = [f"{prefix}.{arch['config'][field]}" for field in arch["required"] if field not in values]
    if missing:
        raise HarnessError(f"{name}: the GGUF metadata lacks {', '.join(missing)}")
    head_dim = values["hidden_size"] // values["num_attention_heads"]
    if metadata.get(f"{prefix}.rope.dimension_count", head_dim) != head_dim:
        raise HarnessError(f"{name}: partial rotary embeddings ({prefix}.rope.dimension_count) are not supported")
    if metadata.get(f"{prefix}.rope.scaling.type", "none") != "none":
        raise HarnessError(f"{name}: rope scaling {metadata[f'{prefix}.rope.scaling.type']!r} is not supported")
    return AutoConfig.for_model(
        arch["model_type"], **values, vocab_size=metadata.get(f"{prefix}.vocab_size", vocab_size),
        tie_word_embeddings=tied, bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=metadata.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=metadata.get("tokenizer.ggml.padding_token_id"),
        architectures=[arch["model_class"]], torch_dtype="float32",
    )


def _expected_shapes(config, model_class: str) -> dict[str, tuple]:
    """Parameter shapes of the transformers model for `config` (built on the meta device: no memory)."""
    import torch
    import transformers

    with torch.device("meta"):
        model = getattr(transformers, model_class)(config)
    shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    if config.tie_word_embeddings:
        for name in model._tied_weights_keys or []:
            shapes.pop(name, None)
    return shapes


def _hf_name(gguf_name: str, arch_name: str, name: str) -> tuple[str, str | None]:
    """The transformers name of a GGUF tensor, and the head-count field if it is rotary-permuted."""
    arch = ARCHITECTURES[arch_name]
    layer = re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_name)
    template = f"blk.{{i}}.{layer.group(2)}" if layer else gguf_name
    if template not in arch["tensors"]:
        raise HarnessError(f"{name}: GGUF tensor {gguf_name} is not supported for architecture {arch_name}")
    hf_name = arch["tensors"][template].format(i=layer.group(1) if layer else "")
    return hf_name, arch["rotary_permuted"].get(template)


def _dequantized(tensor, name: str) -> np.ndarray:
    """The tensor as fp32 in numpy (row-major) order: GGUF lists dimensions innermost first."""
    from gguf import quants

    try:
        values = quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise HarnessError(f"{name}: tensor {tensor.name} uses quantization type {tensor.tensor_type.name}, "
                           f"which the gguf package cannot dequantize") from None
    values = np.array(values, dtype=np.float32).reshape(tuple(int(d) for d in reversed(tensor.shape)))
    if not np.isfinite(values).all():
        raise HarnessError(f"{name}: tensor {tensor.name} holds non-finite values (corrupt file?)")
    return values


def _progress(items, name: str):
    from tqdm import tqdm

    return tqdm(items, desc=f"converting {name}", unit="tensor", leave=False)
