"""SparseGPT, sequentially: SparseML's own SparseGPT solver (`SparseGptWrapper`: Hessian from the
layer inputs, then its blocked OBS weight update) applied block by block through `layerwise`, so
each block is calibrated on the outputs of the already-pruned blocks before it, as in the paper,
at the cost of about one forward pass instead of SparseML 1.8's one pass per pruned layer.
"""
from __future__ import annotations

from typing import Callable

import torch
from tqdm import tqdm

from harness import layerwise, reconstruct


def prune(model: torch.nn.Module, targets: list[str], batches: list[dict], sparsity: float | dict[str, float],
          mask_structure: str = "0:0", block_size: int = 128, dampening_frac: float = 0.01,
          reconstruction: reconstruct.Reconstruction | None = None) -> None:
    """Prune `targets` (Linear/Conv1D weights) in place; `sparsity` is one fraction or one per target; each
    block trained after pruning with a `reconstruction`."""
    from sparseml.modifiers.obcq.utils.sgpt_wrapper import SparseGptWrapper

    prunen, prunem = (int(part) for part in mask_structure.split(":"))
    level = sparsity.get if isinstance(sparsity, dict) else (lambda target: sparsity)

    def calibrate_and_prune(block: layerwise.Block, run: Callable[[], object]) -> None:
        modules = {target: model.get_submodule(target.rsplit(".", 1)[0]) for target in block.targets}
        # An allocation's 0 % target stays whole and its 100 % one is zeroed: neither needs a Hessian (at 0 the
        # solver would still prune each column block's smallest weight, at 1 it indexes past its sorted scores).
        wrappers = {target: SparseGptWrapper(target, module) for target, module in modules.items()
                    if 0 < level(target) < 1}
        last_input, twins = {}, {}

        def collect(target: str, layer_input: torch.Tensor) -> None:
            # Layers fed the same tensor (q, k and v; gate and up) have the same Hessian: one of them computes it.
            twin = next((other for other, seen in last_input.items() if seen is layer_input), None)
            last_input[target] = layer_input
            if twin is None:
                wrappers[target].add_batch(layer_input.data, None)
            else:
                twins[target] = twin

        handles = [modules[target].register_forward_hook(lambda mod, args, out, target=target: collect(target, args[0]))
                   for target in wrappers]
        try:
            run()
        finally:
            for handle in handles:
                handle.remove()
            last_input.clear()
        for target, twin in twins.items():
            while twin in twins:
                twin = twins[twin]
            wrappers[target].H, wrappers[target].nsamples = wrappers[twin].H.clone(), wrappers[twin].nsamples
        with torch.no_grad():
            for target, wrapper in wrappers.items():
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
