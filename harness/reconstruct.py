"""Block-wise reconstruction after one-shot pruning, as EBFT (Guo et al. 2024) does for sparse LLMs.

SparseGPT and Wanda choose each layer's mask (SparseGPT also updates the kept weights) from that
layer's inputs alone, so errors add up from block to block. Here, right after a block is pruned in
`layerwise.sequential`, its remaining weights are trained with the mask fixed so that, on its inputs
(the outputs of the already-pruned blocks before it), it reproduces the dense model's output of that
block: each block corrects the error of the blocks before it, on the calibration data, before the
next block is calibrated. The loss is the squared error over the target's mean square (so one
learning rate fits every block, whatever its scale); a block whose error it does not lower is put
back as pruned. It costs about `epochs` forward and backward passes of the model over the calibration
data, and the dense model's forward pass and block inputs on the samples trained on (the same for every
block) and those the error is measured on.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from harness.errors import HarnessError
from harness.layerwise import Block, BlockInputs, first_output, run_block

TRAINABLE = ("targets", "block")  # block: every parameter of the block (norms and biases too)
ERROR_SAMPLES = 8  # the error before and after is measured on the first of them (16k tokens of SmolLM2's
#                    2,048-token samples): each costs a forward pass of the block, and of the dense one


@dataclass(frozen=True)
class Reconstruction:
    epochs: float  # passes over the calibration samples per block
    lr: float  # Adam's learning rate (constant)
    trainable: str = "targets"
    seed: int = 0

    def order(self, count: int) -> list[int]:
        """The samples trained on, in order: one shuffle of the `count` samples, repeated as the epochs need (the
        same for every block, so the dense model's outputs are needed on these and the error samples only)."""
        generator = torch.Generator().manual_seed(self.seed)
        steps = max(1, round(self.epochs * count))
        return torch.cat([torch.randperm(count, generator=generator)
                          for _ in range(-(-steps // count))])[:steps].tolist()

    def samples(self, count: int) -> list[int]:
        """The samples whose dense outputs `train` needs: those trained on and the first ERROR_SAMPLES."""
        return sorted({*self.order(count), *range(min(ERROR_SAMPLES, count))})

    def train(self, block: Block, inputs: BlockInputs, targets: dict[int, torch.Tensor]) -> list[torch.Tensor]:
        """Train `block` (just pruned) so that on `inputs` it gives `targets` (by sample index, for `samples()`), its
        pruned weights kept at zero; the training is undone if it does not lower the error (the mean loss on the
        first ERROR_SAMPLES samples); one line says which. Returns the block's outputs as kept (on every sample)."""
        params = dict(block.module.named_parameters())
        target_names = [block.local(target) for target in block.targets]
        names = target_names if self.trainable == "targets" else list(params)
        masks = {name: params[name] != 0 for name in target_names}
        was = {name: param.requires_grad for name, param in params.items()}
        pruned = {name: params[name].detach().clone() for name in names}
        for name, param in params.items():
            param.requires_grad_(name in names)
        optimizer = torch.optim.Adam([params[name] for name in names], lr=self.lr)
        checked = list(range(min(ERROR_SAMPLES, len(inputs.calls))))
        before = _error(run_block(block, inputs.subset(checked)), targets)
        try:
            with torch.enable_grad():
                for index in tqdm(self.order(len(inputs.calls)), desc=f"reconstruct {block.name}", unit="sample",
                                  leave=False):
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
        after = _error(outputs[:len(checked)], targets)
        lowered = after < before  # not NaN either
        tqdm.write(f"{block.name}: reconstruction error {before:.4f} -> {after:.4f}"
                   + ("" if lowered else ", not lower: undone"))
        if not lowered:
            with torch.no_grad():
                for name, weights in pruned.items():
                    params[name].copy_(weights)
            outputs = run_block(block, inputs)
        return outputs


def from_params(params: dict) -> Reconstruction | None:
    """The recipe's reconstruction, or None when `reconstruct_epochs` is 0 (or the recipe has none)."""
    epochs = float(params.get("reconstruct_epochs", 0))
    lr, trainable = float(params.get("reconstruct_lr", 1e-3)), params.get("reconstruct_trainable", "block")
    if epochs < 0 or lr <= 0:
        raise HarnessError(f"reconstruct_epochs must be 0 or more and reconstruct_lr positive, "
                           f"got {epochs:g} and {lr:g}")
    if trainable not in TRAINABLE:
        raise HarnessError(f"reconstruct_trainable must be one of {', '.join(TRAINABLE)}, got {trainable!r}")
    return Reconstruction(epochs, lr, trainable) if epochs else None


def _loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((output - target) ** 2).mean() / (target ** 2).mean().clamp_min(1e-12)


def _error(outputs: list[torch.Tensor], targets: dict[int, torch.Tensor]) -> float:
    """The mean loss of the first samples' `outputs` against their `targets`."""
    return sum(float(_loss(output, targets[index])) for index, output in enumerate(outputs)) / len(outputs)
