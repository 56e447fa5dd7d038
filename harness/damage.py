"""How much a change to some weights damages a model, measured on held-out training text.

The text is the held-out split of a training corpus (`corpus.token_sequences(..., split="heldout")`),
never evaluation data. Models with a language-modelling loss (decoders, encoder-decoders) are measured
by the increase of their mean loss over the dense model's; headless encoders by 1 minus the mean
cosine of their mean-pooled, L2-normalised embeddings to the dense model's (the pooling of
`harness.evaluators.embeddings`).

Only the transformer blocks from the first changed one onwards are recomputed: every block before it
returns the output it gave in the dense pass (its inputs and weights are unchanged): a unit in the last
block costs little more than the output layer.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from harness import corpus, layerwise
from harness.prune import context_length

MEASURES = {True: "loss increase", False: "1 - cosine to the dense embeddings"}  # has a loss ->


@dataclass(frozen=True)
class HeldOut:
    """The held-out text a damage is measured on: `sequences` x `seq_len` tokens of `corpus`."""

    corpus: str = corpus.DEFAULT_CORPUS
    sequences: int = 8
    seq_len: int = 128


def heldout_batch(loaded, heldout: HeldOut) -> dict:
    """One batch of all held-out sequences (with `labels` for models that have a loss)."""
    seq_len = min(heldout.seq_len, context_length(loaded.model.config) or 1 << 30)
    ids = corpus.token_sequences(loaded.tokenizer, heldout.corpus, heldout.sequences, seq_len, split="heldout")
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if loaded.spec.has_lm_loss:
        batch["labels"] = ids.clone()
    return batch


@contextlib.contextmanager
def _replayed(blocks: list[layerwise.Block], outputs: list):
    """Blocks that return their recorded outputs instead of computing them."""
    for block, output in zip(blocks, outputs):
        block.module.forward = lambda *args, _output=output, **kwargs: _output
    try:
        yield
    finally:
        for block in blocks:
            del block.module.forward


class DamageMeter:
    """The damage of the model's current weights relative to its weights when the meter was made."""

    def __init__(self, model: torch.nn.Module, batch: dict, blocks: list[layerwise.Block]):
        self.model, self.batch, self.blocks = model.eval(), batch, blocks
        self.has_loss = "labels" in batch
        outputs: dict[int, object] = {}
        handles = [block.module.register_forward_hook(lambda module, args, output, i=i: outputs.__setitem__(i, output))
                   for i, block in enumerate(blocks)]
        try:
            self.dense = self._forward()
        finally:
            for handle in handles:
                handle.remove()
        self.recorded = [outputs[i] for i in range(len(blocks))]

    @property
    def measure(self) -> str:
        return MEASURES[self.has_loss]

    @property
    def dense_loss(self) -> float | None:
        return float(self.dense) if self.has_loss else None

    @torch.no_grad()
    def _forward(self) -> torch.Tensor:
        """The mean loss, or the pooled embeddings [sequences, hidden]."""
        kwargs = layerwise._model_kwargs(self.model, self.batch)
        if not self.has_loss:
            kwargs["output_hidden_states"] = True
        output = self.model(**kwargs)
        if self.has_loss:
            return output.loss
        hidden = getattr(output, "last_hidden_state", None)
        hidden = output.hidden_states[-1] if hidden is None else hidden
        mask = self.batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)

    def damage(self, first_changed_block: int = 0) -> float:
        """The damage now; blocks before `first_changed_block` (in forward order) must be unchanged."""
        with _replayed(self.blocks[:first_changed_block], self.recorded[:first_changed_block]):
            value = self._forward()
        if self.has_loss:
            return float(value - self.dense)
        return float(1 - (value * self.dense).sum(-1).mean())
