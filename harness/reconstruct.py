"""Block-wise reconstruction after one-shot pruning, as EBFT (Guo et al. 2024) does for sparse LLMs.

SparseGPT and Wanda choose each layer's mask (SparseGPT also updates the kept weights) from that
layer's inputs alone, so errors add up from block to block. Here, right after a block is pruned in
`layerwise.sequential`, its remaining weights are trained with the mask fixed so that, on its inputs
(the outputs of the already-pruned blocks before it), it reproduces the dense model's output of that
block: each block corrects the error of the blocks before it, on the calibration data, before the
next block is calibrated. The loss is the squared error over the target's mean square (so one
learning rate fits every block, whatever its scale). It costs about `epochs` forward and backward
passes of the model over the calibration data, and a second cache of block inputs (the dense ones).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from harness.errors import HarnessError
from harness.layerwise import Block, BlockInputs, first_output, run_block

TRAINABLE = ("targets", "block")  # block: every parameter of the block (norms and biases too)
ERROR_SAMPLES = 16  # the error before and after is measured on the first of them: a pass over all 128 of
#                     SmolLM2's 2,048-token samples would cost a quarter of a block's reconstruction at 1/4 epoch


@dataclass(frozen=True)
class Reconstruction:
    epochs: float  # passes over the calibration samples per block
    lr: float  # Adam's learning rate (constant)
    trainable: str = "targets"
    seed: int = 0

    def train(self, block: Block, inputs: BlockInputs, targets: list[torch.Tensor]) -> tuple[float, float, list]:
        """Train `block` (just pruned) so that on `inputs` it gives `targets`, its pruned weights kept at zero;
        returns its error (the mean loss on the first ERROR_SAMPLES samples) before and after, and its outputs
        after (on every sample)."""
        params = dict(block.module.named_parameters())
        target_names = [target[len(block.name) + 1:] for target in block.targets]
        names = target_names if self.trainable == "targets" else list(params)
        masks = {name: params[name] != 0 for name in target_names}
        was = {name: param.requires_grad for name, param in params.items()}
        for name, param in params.items():
            param.requires_grad_(name in names)
        optimizer = torch.optim.Adam([params[name] for name in names], lr=self.lr)
        generator = torch.Generator().manual_seed(self.seed)
        steps = max(1, round(self.epochs * len(inputs.calls)))
        order = torch.cat([torch.randperm(len(inputs.calls), generator=generator)
                           for _ in range(-(-steps // len(inputs.calls)))])[:steps]
        before = _error(run_block(block, BlockInputs(inputs.calls[:ERROR_SAMPLES])), targets)
        try:
            with torch.enable_grad():
                for index in tqdm(order.tolist(), desc=f"reconstruct {block.name}", unit="sample", leave=False):
                    args, kwargs = inputs.calls[index]
                    _loss(first_output(block.module(*args, **kwargs)), targets[index]).backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    with torch.no_grad():
                        for name, mask in masks.items():
                            params[name].mul_(mask)
        finally:
            for name, param in params.items():
                param.requires_grad_(was[name])
        outputs = run_block(block, inputs)
        return before, _error(outputs[:ERROR_SAMPLES], targets), outputs


def from_params(params: dict) -> Reconstruction | None:
    """The recipe's reconstruction, or None when `reconstruct_epochs` is 0 (or the recipe has none)."""
    epochs = float(params.get("reconstruct_epochs", 0))
    lr, trainable = float(params.get("reconstruct_lr", 1e-4)), params.get("reconstruct_trainable", "targets")
    if epochs < 0 or lr <= 0:
        raise HarnessError(f"reconstruct_epochs must be 0 or more and reconstruct_lr positive, "
                           f"got {epochs:g} and {lr:g}")
    if trainable not in TRAINABLE:
        raise HarnessError(f"reconstruct_trainable must be one of {', '.join(TRAINABLE)}, got {trainable!r}")
    return Reconstruction(epochs, lr, trainable) if epochs else None


def _loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((output - target) ** 2).mean() / (target ** 2).mean().clamp_min(1e-12)


def _error(outputs: list[torch.Tensor], targets: list[torch.Tensor]) -> float:
    """The mean loss of `outputs` against the first as many `targets`."""
    return sum(float(_loss(o, t)) for o, t in zip(outputs, targets)) / len(outputs)
