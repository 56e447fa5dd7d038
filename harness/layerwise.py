"""Sequential layer-wise calibration at the cost of about one forward pass.

The SparseGPT paper prunes a transformer block by block, each block calibrated on the outputs of the
already-pruned blocks before it. SparseML 1.8's `sequential_update: true` gets that by running the
whole model over all calibration data once per pruned module (hours on a CPU). Here, as in the
reference implementation, the inputs of a stack's first block are captured once; then each block
runs alone on its cached inputs: once to calibrate (the caller's hooks collect statistics, then it
prunes), once more to compute its pruned outputs, which are the next block's inputs. With a
reconstruction (`harness.reconstruct`), each pruned block is trained in between, towards the dense
model's output of that block.

Blocks are the members of the model's `ModuleList`s that hold target weights (GPT-2 `h`, Llama
`layers`, BERT/DeBERTa `layer`, M2M100's encoder and decoder `layers`), in forward order. Where a
model transforms the hidden states between two blocks (DeBERTa-v2 adds a convolution after its
first layer), the next block's inputs are captured again from a full forward pass instead: a dense
forward of the first sample shows which transitions are not plain block outputs.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator

import torch
from tqdm import tqdm

from harness.errors import HarnessError

if TYPE_CHECKING:
    from harness.reconstruct import Reconstruction


class _Stop(Exception):
    """Raised by a capture hook to end the forward pass at the block it watches."""


@dataclass
class Block:
    name: str
    module: torch.nn.Module
    targets: list[str]  # full parameter names of the target weights inside it

    def local(self, target: str) -> str:
        """A target's name inside the block (`h.3.attn.c_attn.weight` -> `attn.c_attn.weight`)."""
        return target[len(self.name) + 1:]

    def layer(self, target: str) -> torch.nn.Module:
        """The layer holding a target weight of this block."""
        return layer_of(self.module, self.local(target))


def layer_of(model: torch.nn.Module, target: str) -> torch.nn.Module:
    """The layer holding target weight `target` (`a.b.weight` -> module `a.b`)."""
    return model.get_submodule(target.rpartition(".")[0])


@dataclass
class BlockInputs:
    """Each sample's positional and keyword arguments to a block; tensors equal to the first sample's
    (attention masks, position ids) are shared, so only the hidden states cost memory per sample."""

    calls: list[tuple[tuple, dict]]

    def subset(self, indices: list[int]) -> BlockInputs:
        return BlockInputs([self.calls[i] for i in indices])

    def replace_hidden(self, hidden: list[torch.Tensor]) -> BlockInputs:
        return BlockInputs([((h, *args[1:]), kwargs) for h, (args, kwargs) in zip(hidden, self.calls)])


def blocks(model: torch.nn.Module, targets: list[str]) -> list[Block]:
    """The blocks holding `targets`, in forward order; fails if a target lies outside every block."""
    found, covered = [], set()
    for list_name, module_list in model.named_modules():
        if not isinstance(module_list, torch.nn.ModuleList):
            continue
        for index, block in enumerate(module_list):
            prefix = f"{list_name}.{index}."
            inside = [t for t in targets if t.startswith(prefix) and t not in covered]
            if inside:
                found.append(Block(prefix[:-1], block, inside))
                covered.update(inside)
    outside = [t for t in targets if t not in covered]
    if outside:
        raise HarnessError(f"sequential calibration prunes weights inside transformer blocks only, "
                           f"but the targets include {outside[0]}")
    return sorted(found, key=_forward_order(model, found))


def _forward_order(model, found: list[Block]):
    """Blocks sort by the position of their stack in the module tree, then by index (encoder stacks come
    before decoder stacks in every supported model)."""
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return lambda block: order[block.name]


def _model_kwargs(model, batch: dict) -> dict:
    """The batch as the model's arguments (labels stay: encoder-decoders derive their decoder inputs from them)."""
    kwargs = dict(batch)
    if "use_cache" in inspect.signature(model.forward).parameters:
        kwargs["use_cache"] = False
    return kwargs


def _share(value, first):
    """`value`, or the first sample's equal tensor (so equal masks are stored once)."""
    if isinstance(value, torch.Tensor) and isinstance(first, torch.Tensor) and value.shape == first.shape \
            and torch.equal(value, first):
        return first
    return value


@torch.no_grad()
def capture(model, block: Block, batches: list[dict]) -> BlockInputs:
    """Run the model on every batch up to `block` and keep the block's arguments."""
    calls: list[tuple[tuple, dict]] = []

    def hook(module, args, kwargs):
        if calls:
            first_args, first_kwargs = calls[0]
            args = (args[0], *(_share(a, f) for a, f in zip(args[1:], first_args[1:])))
            kwargs = {k: _share(v, first_kwargs.get(k)) for k, v in kwargs.items()}
        calls.append((args, kwargs))
        raise _Stop

    handle = block.module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            try:
                model(**_model_kwargs(model, batch))
            except _Stop:
                pass
    finally:
        handle.remove()
    if len(calls) != len(batches):
        raise HarnessError(f"sequential calibration: block {block.name} was not reached by the forward pass")
    return BlockInputs(calls)


@torch.no_grad()
def chained_transitions(model, found: list[Block], batch: dict) -> set[int]:
    """Indices i for which block i+1 is called on block i's output with block i's other arguments
    (checked on one dense forward), so its inputs can be computed from block i alone."""
    calls, outputs = {}, {}
    handles = []
    for i, block in enumerate(found):
        handles.append(block.module.register_forward_pre_hook(
            lambda m, args, kwargs, i=i: calls.__setitem__(i, (args, kwargs)), with_kwargs=True))
        handles.append(block.module.register_forward_hook(
            lambda m, args, output, i=i: outputs.__setitem__(i, first_output(output))))
    try:
        model(**_model_kwargs(model, batch))
    finally:
        for handle in handles:
            handle.remove()
    return {i for i in range(len(found) - 1)
            if i in outputs and i + 1 in calls and _same(outputs[i], calls[i + 1][0][0])
            and _same(calls[i][0][1:], calls[i + 1][0][1:]) and _same(calls[i][1], calls[i + 1][1])}


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape \
            and torch.equal(a, b)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a is b or a == b


def first_output(output):
    """A block's hidden-state output (blocks return it alone or first in a tuple)."""
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def run_block(block: Block, inputs: BlockInputs) -> list[torch.Tensor]:
    """The block's hidden-state output for every cached input."""
    return [first_output(block.module(*args, **kwargs)) for args, kwargs in inputs.calls]


@torch.no_grad()
def calibration_pass(block: Block, inputs: BlockInputs) -> None:
    """Run the block on every cached input for the caller's hooks on its target layers, each sample's pass
    stopped at the last target layer of the first sample's (what follows it is not needed)."""
    layers = {block.layer(target) for target in block.targets}
    called, last = [], None

    def stop_after_last(module, args, output):
        if last is None:
            called.append(module)
        elif module is last:
            raise _Stop

    handles = [layer.register_forward_hook(stop_after_last) for layer in layers]  # after the caller's
    try:
        for args, kwargs in inputs.calls:
            try:
                block.module(*args, **kwargs)
            except _Stop:
                pass
            if last is None and called and called.count(called[-1]) == 1:  # a layer called twice: never stop
                last = called[-1]
    finally:
        for handle in handles:
            handle.remove()


def sequential(model, found: list[Block], batches: list[dict],
               calibrate_and_prune: Callable[[Block, Callable[[], object]], None],
               reconstruction: Reconstruction | None = None) -> Iterator[str]:
    """Prune block by block: `calibrate_and_prune(block, run)` installs its statistics hooks, calls `run()`
    (`calibration_pass`: the block on its inputs, the outputs of the already-pruned blocks before it), removes them and
    prunes the block's targets. `found` is `blocks(model, targets)`. With a `reconstruction`, each pruned
    block is then trained to give the dense model's output of that block (`harness.reconstruct`): the dense
    model's block inputs on the samples it needs are kept alongside (captured before any pruning where a
    transition is not chained).
    Yields each block's name when it is done."""
    if not batches:
        raise HarnessError("sequential calibration needs calibration batches")
    model.eval()
    chained = chained_transitions(model, found, batches[0])
    inputs = capture(model, found[0], batches)
    dense_inputs, dense_captured = None, {}
    if reconstruction:  # the dense model's block inputs, on the samples the reconstruction needs
        needed = reconstruction.samples(len(batches))
        dense_inputs = inputs.subset(needed)
        dense_captured = {i + 1: capture(model, found[i + 1], [batches[j] for j in needed])
                          for i in range(len(found) - 1) if i not in chained}
    for i, block in enumerate(found):
        dense_outputs = run_block(block, dense_inputs) if reconstruction else None
        calibrate_and_prune(block, lambda: calibration_pass(block, inputs))
        outputs = None
        if reconstruction:
            outputs = reconstruction.train(block, inputs, dict(zip(needed, dense_outputs)))
        if i + 1 < len(found):
            inputs = (inputs.replace_hidden(outputs or run_block(block, inputs)) if i in chained
                      else capture(model, found[i + 1], batches))
            if reconstruction:
                dense_inputs = (dense_inputs.replace_hidden(dense_outputs) if i in chained
                                else dense_captured.pop(i + 1))
        yield block.name
