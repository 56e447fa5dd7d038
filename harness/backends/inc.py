"""Intel Neural Compressor (neural-compressor 3.x, its 2.x-style PyTorch pruning API).

The recipe body holds `neural_compressor.config.WeightPruningConfig` keyword arguments; the job's
target modules are filled in as `${op_names}` (anchored, escaped regexes). The config is driven
through `neural_compressor.training.prepare_compression` callbacks: INC's schedule covers steps
`start_step..end_step` of the prune stage's training (`job.train`, the recipe's token budget; INC
keeps applying its masks after `end_step`), then the harness calls INC's `on_step_begin` at `end_step`
once more when the training ends there, so its last pruning step sets the final mask. With
`end_step: 0` nothing is trained: one-shot.
INC keeps its masks in the pruner objects and attaches nothing to the model, so once `prune`
returns the model is a plain transformers model again.

GPT-2's transformers `Conv1D` stores its weight as [in, out], the transpose of `nn.Linear`. INC
would accept it (its op-type match is by class-name substring "Conv") but lay 4x1 blocks and N:M
groups along the wrong axes, so while pruning each Conv1D target is replaced by an `nn.Linear`
holding the transposed weight, and put back with the pruned weight afterwards.
"""
from __future__ import annotations

import dataclasses
import re
from contextlib import contextmanager

import torch

from harness import allocation
from harness.backends import PruneJob, Schedule, in_groups, quiet
from harness.errors import HarnessError
from harness.recipes import Recipe
from harness.sparsity import zero_fraction

NAME = "inc"
ARCHITECTURES = ("encoder", "decoder", "encoder-decoder")
LEVEL_HINT = "check its schedule (start_step, end_step, pruning_frequency)"


def _set_module(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


@contextmanager
def _linear_views(model: torch.nn.Module, module_names: list[str]):
    """Replace the Conv1D modules among `module_names` by nn.Linear modules holding the transposed weight;
    on exit put the Conv1D modules (and their Parameter objects) back with the pruned weights."""
    from transformers.pytorch_utils import Conv1D

    swapped = {}
    try:
        for name in module_names:
            conv = model.get_submodule(name)
            if isinstance(conv, Conv1D):
                linear = torch.nn.Linear(conv.weight.shape[0], conv.nf, bias=False)
                linear.weight = torch.nn.Parameter(conv.weight.detach().t().contiguous(),
                                                   requires_grad=conv.weight.requires_grad)
                linear.bias = conv.bias
                swapped[name] = (conv, linear)
                conv.weight.data = torch.empty(0)  # one copy of the weights at a time
                _set_module(model, name, linear)
        yield
    finally:
        for name, (conv, linear) in swapped.items():
            conv.weight.data = linear.weight.detach().t().contiguous()
            _set_module(model, name, conv)


def _quiet_inc():
    """INC logs every layer's config and sparsity at INFO; keep its warnings."""
    from neural_compressor.utils.logger import Logger  # its first import sets the level: import, then lower it

    return quiet(Logger().get_logger())


def _pruning_config(recipe: Recipe, sparsity: float, targets: list[str], modules: list[str]):
    from neural_compressor.config import WeightPruningConfig

    arguments = recipe.render(sparsity, targets, op_names=[f"^{re.escape(name)}$" for name in modules])
    if not isinstance(arguments, dict):
        raise HarnessError(f"recipe {recipe.path}: the body must map WeightPruningConfig arguments to values")
    # INC fills these lists in place; its defaults are shared mutable arguments, so pass fresh ones.
    arguments.setdefault("pruning_configs", [{}])
    arguments.setdefault("excluded_op_names", [])
    return WeightPruningConfig(**arguments)


def _prepare(job: PruneJob):
    """INC's compression manager for the job, checked to cover exactly the target modules."""
    from neural_compressor.training import prepare_compression

    not_weights = [name for name in job.targets if not name.endswith(".weight")]
    if not_weights:
        raise HarnessError(f"INC prunes module weights only, but the targets include {not_weights[0]}: "
                           f"change the recipe's targets")
    try:
        manager = prepare_compression(job.model, _pruning_config(job.recipe, job.sparsity, job.targets, job.target_modules))
    except AssertionError as exc:
        raise HarnessError(f"INC rejects recipe {job.recipe.name} at {job.sparsity:.0%} sparsity: {exc}") from None
    pruners = [pruner for callbacks in manager.callbacks.callbacks_list for pruner in callbacks.pruners]
    covered = {name for pruner in pruners for name in pruner.modules
               if name not in getattr(pruner.pattern, "invalid_layers", ())}
    missing = sorted(set(job.target_modules) - covered)
    if missing:
        raise HarnessError(f"INC would leave {len(missing)} target modules unpruned (not Linear/Conv, excluded as a "
                           f"classifier head, or not divisible by pattern {pruners[0].config['pattern']}), "
                           f"e.g. {missing[0]}: change the recipe's targets or pattern")
    ceiling = min(pruner.config["max_sparsity_ratio_per_op"] for pruner in pruners)
    if job.sparsity > ceiling:
        raise HarnessError(f"recipe {job.recipe.name} caps every layer at {ceiling:.0%} sparsity "
                           f"(max_sparsity_ratio_per_op): choose a lower level or raise the cap in the recipe")
    return manager, pruners


def _pruner_configs(config) -> list[dict]:
    """Each pruner's settings: the config's own, overridden by its entry in `pruning_configs`."""
    return [{**config.weight_compression, **local} for local in config.pruning_configs]


def _layer_wise_one_shot(config) -> bool:
    """Whether every pruner prunes each layer on its own, in one step without training (then groups of
    layers get the same masks as the whole model)."""
    return all(c["end_step"] == 0 and c["pruning_scope"] == "local" for c in _pruner_configs(config))


def _run_schedule(job: PruneJob) -> dict[int, float]:
    """INC's callbacks over the recipe's schedule, fine-tuning if it has steps; returns the targets' zero
    fraction after each pruning step."""
    manager, pruners = _prepare(job)
    callbacks = manager.callbacks
    end_step = max(pruner.end_step for pruner in pruners)
    params = dict(job.model.named_parameters())
    targets = [params[name] for name in job.targets]
    ramp = {}

    def step_begin(step: int) -> None:
        callbacks.on_step_begin(step)
        if any(pruner.check_is_pruned_step(step) for pruner in pruners):
            ramp[step] = zero_fraction(targets)

    def before_optimizer_step(step: int) -> None:
        # A layer skipped by LayerDrop (M2M100 trains with it) got no gradient; INC's snip criteria need one.
        for param in targets:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
        callbacks.on_before_optimizer_step()

    def step_end(step: int) -> None:
        callbacks.on_after_optimizer_step()
        callbacks.on_step_end()

    callbacks.on_train_begin()
    trained_steps = 0
    if end_step > 0:
        from harness.recovery import Hooks

        trained_steps = job.train(Hooks(step_begin, before_optimizer_step, step_end)).steps
    if trained_steps <= end_step:
        step_begin(end_step)
    callbacks.on_train_end()
    return ramp


def schedule(recipe: Recipe, sparsity: float) -> Schedule:
    """INC's schedule trains until (at least) the last pruner's `end_step`."""
    with _quiet_inc():
        return Schedule(steps=max(c["end_step"] for c in _pruner_configs(_pruning_config(recipe, sparsity, [], []))))


def prune(job: PruneJob) -> None:
    """Prune `job.targets` with INC's pruners to `job.sparsity`, fine-tuning if the schedule has steps
    (layer-wise one-shot recipes in groups of layers, `in_groups`)."""
    with _quiet_inc(), _linear_views(job.model, job.target_modules):
        if _layer_wise_one_shot(_pruning_config(job.recipe, job.sparsity, job.targets, job.target_modules)):
            for level, targets in allocation.by_level(job):  # one pass per level the recipe's allocation chose
                # one group at a time: INC's model wrapper sets and pops os.environ keys, which races in threads
                in_groups(dataclasses.replace(job, sparsity=level, targets=targets), _run_schedule, workers=1)
        else:
            ramp = _run_schedule(job)
            job.progress("inc: zero fraction of the targets at each pruning step: "
                         + " ".join(f"{step}:{100 * fraction:.2f}%" for step, fraction in ramp.items()))
