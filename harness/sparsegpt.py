"""SparseGPT, sequentially: SparseML's own SparseGPT solver (`SparseGptWrapper`: its blocked OBS weight
update from the Hessian of the layer's inputs) applied block by block through `layerwise`, so each
block is calibrated on the outputs of the already-pruned blocks before it, as in the paper, at the
cost of about one forward pass instead of SparseML 1.8's one pass per pruned layer. The Hessians are
SparseML's, computed here at three quarters of the work and once for layers fed the same tensor.
"""
from __future__ import annotations

from typing import Callable

import torch
from tqdm import tqdm

from harness import layerwise, reconstruct


class Hessian:
    """SparseML's H, 2/n X^T X over the n calibration samples of a layer's input X, of which only the two
    diagonal blocks and one off-diagonal block are multiplied out: three quarters of the work of
    SparseML's `add_batch` (a fifth to a quarter of SparseGPT's time on SmolLM2)."""

    def __init__(self, columns: int):
        self.half = columns // 2
        self.blocks = [torch.zeros(rows, cols) for rows, cols in
                       ((self.half, self.half), (self.half, columns - self.half), (columns - self.half,) * 2)]
        self.samples = 0

    def add(self, layer_input: torch.Tensor) -> None:
        rows = layer_input.detach().reshape(-1, layer_input.shape[-1]).float()
        first, second = rows[:, :self.half], rows[:, self.half:]
        for block, (left, right) in zip(self.blocks, ((first, first), (first, second), (second, second))):
            block.addmm_(left.t(), right)
        self.samples += layer_input.shape[0] if layer_input.dim() == 3 else 1  # as SparseML counts them

    def matrix(self) -> torch.Tensor:
        top_left, top_right, bottom_right = self.blocks
        full = torch.cat([torch.cat([top_left, top_right], 1), torch.cat([top_right.t(), bottom_right], 1)])
        return full * (2 / self.samples)


def prune(model: torch.nn.Module, targets: list[str], batches: list[dict], sparsity: float | dict[str, float],
          mask_structure: str = "0:0", block_size: int = 128, dampening_frac: float = 0.01,
          reconstruction: reconstruct.Reconstruction | None = None) -> None:
    """Prune `targets` (Linear/Conv1D weights) in place; `sparsity` is one fraction or one per target; each
    block trained after pruning with a `reconstruction`."""
    from sparseml.modifiers.obcq.utils.sgpt_wrapper import SparseGptWrapper

    prunen, prunem = (int(part) for part in mask_structure.split(":"))
    level = sparsity.get if isinstance(sparsity, dict) else (lambda target: sparsity)

    def calibrate_and_prune(block: layerwise.Block, run: Callable[[], object]) -> None:
        modules = {target: block.layer(target) for target in block.targets}
        # An allocation's 0 % target stays whole and its 100 % one is zeroed: neither needs a Hessian (at 0 the
        # solver would still prune each column block's smallest weight, at 1 it indexes past its sorted scores).
        solved = [target for target in modules if 0 < level(target) < 1]
        hessians, last_input = {}, {}

        def collect(target: str, layer_input: torch.Tensor) -> None:
            # Layers fed the same tensor (q, k and v; gate and up) have the same Hessian: one of them computes it.
            twin = next((other for other, seen in last_input.items() if seen is layer_input), None)
            last_input[target] = layer_input
            if twin is None:
                hessians.setdefault(target, Hessian(layer_input.shape[-1])).add(layer_input)
            else:
                hessians[target] = hessians[twin]

        handles = [modules[target].register_forward_hook(lambda mod, args, out, target=target: collect(target, args[0]))
                   for target in solved]
        try:
            run()
        finally:
            for handle in handles:
                handle.remove()
            last_input.clear()
        with torch.no_grad():
            for target in solved:
                wrapper = SparseGptWrapper(target, modules[target])
                wrapper.H = hessians[target].matrix()
                wrapper.fasterprune(sparsity=level(target), prunen=prunen, prunem=prunem, blocksize=block_size,
                                    percdamp=dampening_frac)
                wrapper.free()
            for target, module in modules.items():
                if level(target) >= 1:
                    module.weight.zero_()

    found = layerwise.blocks(model, targets)
    pruned_blocks = layerwise.sequential(model, found, batches, calibrate_and_prune, reconstruction)
    for _ in tqdm(pruned_blocks, total=len(found),
                  desc="SparseGPT, block by block", unit="block"):
        pass
