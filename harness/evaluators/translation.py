"""Translation (FLORES-200, WMT) with M2M100-style models: corpus BLEU and chrF from sacrebleu.

The source text is prefixed with the source-language token (`__en__`) and generation starts with the
target-language token forced as the first generated token (`forced_bos_token_id`, `__fr__`), as
M2M100 was trained. The real M2M100Tokenizer adds the source token itself (`src_lang`); the byte
tokenizer of the tiny models knows the language tokens only as special tokens, so they are written
into the text.

On DeepSparse, the exported encoder and decoder (no KV cache) translate a sample greedily, each
decoder pass padded to a fixed length; agreement is the share of sentences whose tokens match
PyTorch's greedy translation exactly.
"""
from __future__ import annotations

import time

import numpy as np

from harness.errors import HarnessError
from harness.evaluators import EvalJob, agreement, metric, parallel_lines
from harness.evaluators.onnx_engine import FixedShapeModel, pad_right
from harness.layout import Metric, Outcome

BOOTSTRAP_CI_TO_STDERR = 1.96  # sacrebleu reports the half-width of a 95% bootstrap interval


def encode_sources(tokenizer, texts: list[str], src_lang: str, max_length: int, tensors: str = "pt"):
    """Source sentences tokenized with the source-language token first, truncated to `max_length`."""
    if hasattr(tokenizer, "src_lang"):
        tokenizer.src_lang = src_lang
        return tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors=tensors)
    return tokenizer([f"__{src_lang}__{text}" for text in texts], truncation=True, max_length=max_length,
                     padding=True, return_tensors=tensors)


def language_token_id(tokenizer, lang: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(f"__{lang}__")
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise HarnessError(f"the tokenizer has no language token __{lang}__: this model cannot translate "
                           f"to or from '{lang}'")
    return token_id


def corpus_scores(hypotheses: list[str], references: list[str], target_lang: str,
                  bootstrap: int = 0) -> dict[str, Metric]:
    """Corpus BLEU and chrF (0-100); with `bootstrap` resamples, their standard errors too."""
    from sacrebleu.metrics import BLEU, CHRF

    scores = {}
    for name, scorer in (("bleu", BLEU(trg_lang=target_lang)), ("chrf", CHRF())):
        score = scorer.corpus_score(hypotheses, [references], n_bootstrap=bootstrap or 1)
        ci = getattr(score, "_ci", None)
        scores[name] = metric(score.score, ci / BOOTSTRAP_CI_TO_STDERR if ci is not None and bootstrap > 1 else None)
    return scores


def translate(loaded, texts: list[str], src: str, tgt: str, num_beams: int, max_new_tokens: int,
              batch_size: int, desc: str) -> list[list[int]]:
    """Generated token ids (without the decoder start token) of every source sentence, with PyTorch."""
    import torch
    from tqdm import tqdm

    forced = language_token_id(loaded.tokenizer, tgt)
    outputs = []
    with torch.inference_mode():
        for start in tqdm(range(0, len(texts), batch_size), desc=desc, unit="batch"):
            encoding = encode_sources(loaded.tokenizer, texts[start:start + batch_size], src, loaded.spec.seq_len)
            generated = loaded.model.generate(**encoding, forced_bos_token_id=forced, num_beams=num_beams,
                                              do_sample=False, max_new_tokens=max_new_tokens)
            outputs.extend(row[1:].tolist() for row in generated)
    return outputs


def engine_translate(encoder: FixedShapeModel, decoder: FixedShapeModel, loaded, texts: list[str], src: str,
                     tgt: str, max_new_tokens: int) -> list[list[int]]:
    """Greedy translation on the exported encoder/decoder, every pass padded to fixed lengths."""
    from tqdm import tqdm

    tokenizer, config = loaded.tokenizer, loaded.model.config
    source_length = loaded.spec.seq_len
    forced = language_token_id(tokenizer, tgt)
    outputs = []
    for text in tqdm(texts, desc=f"translate ({encoder.runtime})", unit="text"):
        encoding = encode_sources(tokenizer, [text], src, source_length, tensors="np")
        ids, mask = pad_right(encoding["input_ids"].tolist(), source_length, tokenizer.pad_token_id)
        hidden = encoder.run({"input_ids": ids, "attention_mask": mask})
        tokens = [config.decoder_start_token_id]
        while len(tokens) <= max_new_tokens:  # the last generated token is never fed back
            decoder_ids, _ = pad_right([tokens], max_new_tokens, tokenizer.pad_token_id)
            logits = decoder.run({"input_ids": decoder_ids, "encoder_hidden_states": hidden,
                                  "encoder_attention_mask": mask})
            next_token = forced if len(tokens) == 1 else int(np.argmax(logits[0, len(tokens) - 1]))
            tokens.append(next_token)
            if next_token == config.eos_token_id:
                break
        outputs.append(tokens[1:])
    return outputs


def evaluate(job: EvalJob) -> Outcome:
    """BLEU and chrF for each language pair (`examples` counts sentences over all pairs); on DeepSparse,
    greedy agreement with PyTorch on a sample of each pair."""
    config, loaded = job.config, job.loaded
    tokenizer = loaded.tokenizer
    max_new_tokens = config.get("max_new_tokens", 128)
    metrics, examples, samples = {}, 0, {}
    for pair, source in job.sources.items():
        src, tgt = pair.split("-")
        sources, references = parallel_lines(source, job.limit)
        generated = translate(loaded, sources, src, tgt, config.get("num_beams", 1), max_new_tokens,
                              config.get("batch_size", 8), desc=f"{job.benchmark} {pair} (PyTorch)")
        hypotheses = tokenizer.batch_decode(generated, skip_special_tokens=True)
        for name, value in corpus_scores(hypotheses, references, tgt, config.get("bootstrap", 1000)).items():
            metrics[f"{pair}/{name}"] = value
        examples += len(sources)
        samples[pair] = sources[:config.get("engine_sample", 8)]
    outcome = Outcome(examples, metrics)
    if "deepsparse" in job.engines:
        start = time.time()
        encoder, decoder = job.engine("encoder_model.onnx"), job.engine("decoder_model.onnx")
        engine, pytorch = [], []
        for pair, sample in samples.items():
            src, tgt = pair.split("-")
            engine += engine_translate(encoder, decoder, loaded, sample, src, tgt, max_new_tokens)
            # one sentence per batch: no padding after </s> to tell apart from the engine's output
            pytorch += translate(loaded, sample, src, tgt, 1, max_new_tokens, 1, desc=f"{pair} greedy (PyTorch)")
        outcome.deepsparse = agreement(engine, pytorch, decoder.runtime, time.time() - start)
    return outcome
