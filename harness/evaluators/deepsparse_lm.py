"""An lm-eval model ("harness-onnx") that scores text with an exported decoder ONNX on DeepSparse.

The graph is the plain causal-LM export (no KV cache): inputs `input_ids`, `attention_mask` and, when
present, `position_ids`; output `logits`. Every forward pass is right-padded to the engine's fixed
sequence length, so the causal mask keeps the padding from touching the scored positions. The
lengths are buckets (powers of two from MIN_BUCKET up to max_length): a short LAMBADA passage runs
at 128 positions, not the full context, at the cost of one engine compile per bucket used.
Tokenization, truncation and rolling windows follow lm-eval's HFLM, so the PyTorch and engine
numbers differ only by the engine.

From lm-eval's CLI: `--model harness-onnx --model_args pretrained=<dir with model.onnx>,max_length=256`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from lm_eval import utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from harness.evaluators.onnx_engine import FixedShapeModel, pad_right


MIN_BUCKET = 64


def buckets(max_length: int) -> list[int]:
    """The padded lengths engines are compiled for: powers of two from MIN_BUCKET, then max_length."""
    lengths = [MIN_BUCKET]
    while lengths[-1] * 2 < max_length:
        lengths.append(lengths[-1] * 2)
    return sorted({length for length in lengths if length < max_length} | {max_length})


def log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


@register_model("harness-onnx")
class OnnxDecoderLM(TemplateLM):
    """Loglikelihoods (plain and rolling) from a decoder ONNX graph on DeepSparse (ONNX Runtime fallback)."""

    def __init__(self, pretrained: str | Path | FixedShapeModel, tokenizer=None, max_length: int | None = None,
                 runtime: str = "deepsparse", num_cores: int | None = None, **_):
        super().__init__()
        if isinstance(pretrained, FixedShapeModel):
            self.graph = pretrained
        else:
            path = Path(pretrained)
            self.graph = FixedShapeModel(path / "model.onnx" if path.is_dir() else path, runtime, num_cores)
        if tokenizer is None or isinstance(tokenizer, (str, Path)):
            from harness.load import load_tokenizer

            tokenizer = load_tokenizer(Path(tokenizer or self.graph.path.parent))
        self.tokenizer = tokenizer
        if max_length is None:
            raise ValueError("harness-onnx needs max_length: the engine is compiled for that many positions")
        self.max_length = int(max_length)
        self.buckets = buckets(self.max_length)  # every forward pass is padded to one of these
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eot_token_id

    @property
    def runtime(self) -> str:
        return self.graph.runtime

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.eot_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        kwargs = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        return self.tokenizer.encode(string, **kwargs)

    def logits(self, tokens: list[int]) -> np.ndarray:
        """Logits [len(tokens), vocab] of one forward pass."""
        length = next(b for b in self.buckets if b >= len(tokens))
        ids, mask = pad_right([tokens], length, self.pad_id)
        out = self.graph.run({"input_ids": ids, "attention_mask": mask})
        return out[0, :len(tokens)]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        results = []
        for request_key, context, continuation in tqdm(requests, disable=disable_tqdm, desc="harness-onnx"):
            # as HFLM: the last max_length tokens before the final one are the input
            tokens = (context + continuation)[-(self.max_length + 1):][:-1]
            scores = log_softmax(self.logits(tokens)[len(tokens) - len(continuation):])
            target = np.asarray(continuation)
            logprob = float(scores[np.arange(len(target)), target].sum())
            greedy = bool((scores.argmax(axis=-1) == target).all())
            results.append((logprob, greedy))
            self.cache_hook.add_partial("loglikelihood", request_key, (logprob, greedy))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        totals = []
        for (text,) in tqdm([req.args for req in requests], disable=disable_tqdm, desc="harness-onnx rolling"):
            windows = map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1))
            scored = self._loglikelihood_tokens([(None, context, continuation) for context, continuation in windows],
                                                disable_tqdm=True)
            totals.append(sum(logprob for logprob, _ in scored))
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), totals[-1])
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        raise NotImplementedError("harness-onnx scores text (loglikelihood tasks); it does not generate")
