"""Wanda (Sun et al. 2023): in each output row, prune the weights with the smallest |W| x ||X||_2, where
||X||_2 is the norm of the weight's input feature over the calibration tokens; no weight update.

The mask is SparseML's own (`WandaWrapper.fasterprune`, unstructured or N:M). The statistic is gathered
here: SparseML 1.8's `WandaWrapper.add_batch` flattens the inputs of Linear layers only and fails on
GPT-2's Conv1D with a shape mismatch, while both take inputs whose last axis is the input feature
(`fasterprune` transposes a Conv1D weight itself). With `sequential`, as in the paper's code, blocks are
pruned one after another through `layerwise`, each calibrated on the outputs of the pruned blocks
before it; otherwise every statistic comes from one pass of the dense model (`dense_input_norms`),
the same pass OWL's allocation reads.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from tqdm import tqdm

from harness import layerwise, reconstruct


@contextlib.contextmanager
def squared_input_norms(model: torch.nn.Module, targets: list[str]):
    """While the model runs inside, accumulate per target the sum over tokens of each squared input feature."""
    sums: dict[str, torch.Tensor] = {}

    def hook(target: str):
        def add(module, inputs, output):
            features = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            sums[target] = sums.get(target, 0) + features.pow(2).sum(0)
        return add

    handles = [layerwise.layer_of(model, target).register_forward_hook(hook(target)) for target in targets]
    try:
        yield sums
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def dense_input_norms(model: torch.nn.Module, targets: list[str], batches: list[dict]) -> dict[str, torch.Tensor]:
    """`squared_input_norms` over one forward pass of the model on every batch."""
    model.eval()
    with squared_input_norms(model, targets) as sums:
        for batch in batches:
            model(**batch)
    return sums


def scores(model: torch.nn.Module, target: str, squared_norms: torch.Tensor) -> torch.Tensor:
    """Wanda's |W| x ||X||_2 in the weight's own layout (a Conv1D weight is [in, out], a Linear one [out, in])."""
    from transformers.pytorch_utils import Conv1D

    layer = layerwise.layer_of(model, target)
    weight = layer.weight.detach().abs().float()
    norms = squared_norms.sqrt()
    return weight * (norms[:, None] if isinstance(layer, Conv1D) else norms[None, :])


def prune(model: torch.nn.Module, targets: list[str], batches: list[dict], sparsity: float | dict[str, float],
          mask_structure: str = "0:0", sequential: bool = True,
          reconstruction: reconstruct.Reconstruction | None = None) -> None:
    """Prune `targets` (Linear/Conv1D weights) in place; `sparsity` is one fraction or one per target; each
    block trained after pruning with a `reconstruction` (sequential only: the caller checks)."""
    from sparseml.modifiers.pruning.wanda.utils.wanda_wrapper import WandaWrapper

    prunen, prunem = (int(part) for part in mask_structure.split(":"))
    level = sparsity.get if isinstance(sparsity, dict) else (lambda target: sparsity)

    @torch.no_grad()
    def prune_with(names: list[str], sums: dict[str, torch.Tensor]) -> None:
        for target in names:
            wrapper = WandaWrapper(target, layerwise.layer_of(model, target))
            wrapper.scaler_row = sums[target]  # a scale common to a row does not change its ranking
            wrapper.fasterprune(sparsity=level(target), prunen=prunen, prunem=prunem)

    if not sequential:
        prune_with(targets, dense_input_norms(model, targets, batches))
        return

    def calibrate_and_prune(block: layerwise.Block, run: Callable[[], object]) -> None:
        with squared_input_norms(model, block.targets) as sums:
            run()
        prune_with(block.targets, sums)

    found = layerwise.blocks(model, targets)
    pruned_blocks = layerwise.sequential(model, found, batches, calibrate_and_prune, reconstruction)
    for _ in tqdm(pruned_blocks, total=len(found),
                  desc="Wanda, block by block", unit="block"):
        pass
