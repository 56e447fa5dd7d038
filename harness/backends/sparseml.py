"""SparseML 1.8 pruning, through whichever of its two APIs the recipe is written for.

- Legacy `sparseml.pytorch` recipes (modifiers tagged `- !GMPruningModifier`) run through a
  `ScheduledModifierManager`. A recipe without an `!EpochRangeModifier` is applied one-shot
  (`manager.apply`: every modifier jumps to its end state). A recipe with one is a training
  schedule: the harness fine-tunes for that many steps, one optimizer step per SparseML epoch
  (steps_per_epoch = 1), calling the manager around each step the way SparseML's own optimizer
  wrapper does; only the target weights train, so every other tensor stays bit-identical.
  (Magnitude pruning uses this API: in 1.8.0, `sparseml.core`'s MagnitudePruningModifier writes its
  masks into the weights only on optimizer-step events, so it cannot prune one-shot.)
- `sparseml.core` recipes (plain YAML stages, e.g. `SparseGPTModifier`) run one-shot in a
  `sparseml.core` session with the job's calibration batches.

GPT-2's transformers `Conv1D` stores its weight as [in, out]: SparseGPT transposes it itself, and an
unstructured magnitude mask does not depend on the orientation (a block `mask_type` would). SparseML
is imported only when pruning: it takes seconds to import.
"""
from __future__ import annotations

import dataclasses
import logging
import re

import yaml

from harness import allocation, reconstruct, sparsegpt, wanda
from harness.backends import PruneJob, Schedule, in_groups, quiet
from harness.errors import HarnessError
from harness.recipes import Recipe

NAME = "sparseml"
ARCHITECTURES = ("encoder", "decoder", "encoder-decoder")
LEVEL_HINT = "check that its schedule ends on the target (${sparsity})"
LEGACY_MODIFIER_TAG = re.compile(r"!\w+Modifier\b")
STEPS_PER_EPOCH = 1  # one fine-tuning step per SparseML epoch: a training recipe's epochs count steps
LOGGER = logging.getLogger(__name__)


def _quiet_sparseml():
    """SparseML logs every layer it prepares and compresses at INFO; keep its warnings."""
    from sparseml.log import get_nm_root_logger  # importing SparseML sets its level to INFO

    return quiet(get_nm_root_logger())


def _loggers(logger_module):
    """SparseML's default loggers write files into ./sparse_logs; send its logs to Python logging instead."""
    return logger_module.LoggerManager([logger_module.PythonLogger(logger=LOGGER)])


def _training_steps(manager) -> int:
    """The end of the recipe's EpochRangeModifier (its training length), 0 for a one-shot recipe."""
    from sparseml.pytorch.sparsification import EpochRangeModifier

    ends = [mod.end_epoch for mod in manager.iter_modifiers() if isinstance(mod, EpochRangeModifier)]
    return round(max(ends)) if ends else 0


def _manager(recipe: Recipe, sparsity: float, targets: list[str]):
    """The legacy recipe's `ScheduledModifierManager` for `targets`."""
    from sparseml.pytorch.optim import ScheduledModifierManager
    from sparseml.utils.restricted_eval import UnknownVariableException

    try:
        return ScheduledModifierManager.from_yaml(recipe.render_text(sparsity, targets))
    except (ValueError, TypeError, yaml.YAMLError, UnknownVariableException) as exc:
        raise HarnessError(f"recipe {recipe.path}: SparseML cannot load it: {exc}") from None


def _train_with(manager, job: PruneJob, steps: int, loggers) -> None:
    """Train `steps` steps (`job.train`) with the manager's schedule around each, then end it."""
    from harness.recovery import Hooks

    model = job.model

    def before_step(step: int) -> None:
        if step == 0:
            manager.initialize(model, epoch=0.0, loggers=loggers)

    # Pruning modifiers do not use the optimizer argument, and the trainer keeps its optimizer to itself.
    def before_optimizer_step(step: int) -> None:
        manager.update(model, None, float(step), STEPS_PER_EPOCH)
        manager.optimizer_pre_step(model, None, float(step), STEPS_PER_EPOCH)

    def after_step(step: int) -> None:
        manager.optimizer_post_step(model, None, float(step), STEPS_PER_EPOCH)

    job.train(Hooks(before_step, before_optimizer_step, after_step))
    # One more update at the end of the schedule, so a ramp ending with the training lands on its target.
    manager.update(model, None, float(steps), STEPS_PER_EPOCH)
    manager.finalize(model)


def _check_mask_types(recipe: Recipe, manager) -> None:
    """A modifier's `mask_type` SparseML does not know fails here in one line, not deep in its first update."""
    from sparseml.pytorch.sparsification.pruning.mask_creator import get_mask_creator_default

    for modifier in manager.iter_modifiers():
        if hasattr(modifier, "mask_type"):
            try:
                get_mask_creator_default(modifier.mask_type)
            except ValueError as exc:
                raise HarnessError(f"recipe {recipe.name}: {exc}") from None


def _run_manager(job: PruneJob) -> str:
    """A legacy `sparseml.pytorch` recipe: one-shot, or a schedule run while the prune stage trains."""
    from sparseml.pytorch import utils as logger_module

    manager = _manager(job.recipe, job.sparsity, job.targets)
    steps = _training_steps(manager)
    if steps:
        _train_with(manager, job, steps, _loggers(logger_module))
    elif any(getattr(mod, "global_sparsity", False) for mod in manager.iter_modifiers()):
        manager.apply(job.model, loggers=_loggers(logger_module))
    else:
        for level, targets in allocation.by_level(job):  # one manager per level the allocation chose
            in_groups(dataclasses.replace(job, sparsity=level, targets=targets),
                      lambda group: _manager(job.recipe, group.sparsity, group.targets)
                      .apply(job.model, loggers=_loggers(logger_module)))
    return "a sparseml.pytorch manager"


def _solver_arguments(rendered: dict) -> tuple[str, dict] | None:
    """(modifier, its arguments) when the recipe is one modifier the harness runs through `SOLVERS`: Wanda,
    or SparseGPT with `sequential_update: true`."""
    modifiers = [(name, arguments) for stage in rendered.values() if isinstance(stage, dict)
                 for group in stage.values() if isinstance(group, dict) for name, arguments in group.items()]
    if len(modifiers) == 1 and modifiers[0][0] in SOLVERS and (
            modifiers[0][0] != "SparseGPTModifier" or _sequential(*modifiers[0])):
        return modifiers[0]
    return None


def _sequential(modifier: str, arguments: dict) -> bool:
    """Whether the modifier prunes block by block: SparseGPT when its recipe says `sequential_update: true`
    (else SparseML runs it), Wanda unless it says false (the harness runs Wanda either way)."""
    return bool(arguments.get("sequential_update", modifier == "WandaPruningModifier"))


# modifier -> (how the harness runs it on (job, per-target levels, modifier arguments, block reconstruction),
# what to tell the user)
SOLVERS = {
    "SparseGPTModifier": (
        lambda job, levels, args, reconstruction: sparsegpt.prune(
            job.model, job.targets, job.calibration, levels, args.get("mask_structure", "0:0"),
            int(args.get("block_size", 128)), float(args.get("dampening_frac", 0.01)), reconstruction),
        "SparseML's SparseGPT solver, block by block (harness.sparsegpt)"),
    "WandaPruningModifier": (
        lambda job, levels, args, reconstruction: wanda.prune(
            job.model, job.targets, job.calibration, levels, args.get("mask_structure", "0:0"),
            _sequential("WandaPruningModifier", args), reconstruction),
        "SparseML's Wanda masks (harness.wanda)"),
}


def _check_mask_structure(job: PruneJob, mask_structure: str) -> None:
    """An N:M mask prunes N of every M weights: its level is N/M in every layer."""
    if not re.fullmatch(r"\d+:\d+", mask_structure):
        raise HarnessError(f"recipe {job.recipe.name}: mask_structure must be N:M (0:0 for unstructured), "
                           f"got {mask_structure!r}")
    prunen, prunem = (int(part) for part in mask_structure.split(":"))
    if prunem and (prunen / prunem != job.sparsity or job.recipe.params.get("allocation", "uniform") != "uniform"):
        raise HarnessError(f"recipe {job.recipe.name}: mask_structure {mask_structure} prunes {prunen} of every "
                           f"{prunem} weights: use level {100 * prunen / prunem:g} with allocation uniform")


def _run_session(job: PruneJob) -> str:
    """A `sparseml.core` recipe, applied one-shot with the calibration batches. Wanda and sequential SparseGPT
    run SparseML's own solvers through the harness (`SOLVERS`) instead: block by block on cached inputs
    (SparseML 1.8 runs the whole model over the calibration data once per pruned layer for them), with the
    recipe's per-layer `allocation`, and on GPT-2's Conv1D layers."""
    solver = _solver_arguments(job.rendered())
    reconstruction = reconstruct.from_params(job.recipe.params)
    if reconstruction and not (solver and _sequential(*solver)):
        raise HarnessError(f"recipe {job.recipe.name}: block-wise reconstruction needs the harness's solver, "
                           f"block by block (sequential: true)")
    if solver:
        name, arguments = solver
        _check_mask_structure(job, str(arguments.get("mask_structure", "0:0")))
        run, how = SOLVERS[name]
        run(job, allocation.planned(job), arguments, reconstruction)
        return how
    if job.recipe.params.get("allocation", "uniform") != "uniform":
        raise HarnessError(f"recipe {job.recipe.name}: a non-uniform allocation needs the harness's solver "
                           f"(sequential: true)")
    from sparseml import core as logger_module
    from sparseml.core.framework import Framework
    from sparseml.core.recipe import Recipe as SessionRecipe
    from sparseml.core.session import create_session

    try:
        recipe = SessionRecipe.model_validate(job.rendered())
    except ValueError as exc:
        raise HarnessError(f"recipe {job.recipe.path}: not a sparseml.core recipe: {exc}") from None
    with create_session() as session:
        session.initialize(framework=Framework.pytorch, recipe=recipe, model=job.model,
                           calib_data=job.calibration, start=-1, loggers=_loggers(logger_module))
        session.finalize()
    return "a sparseml.core session"


def schedule(recipe: Recipe, sparsity: float) -> Schedule:
    """A legacy recipe fine-tunes for its EpochRangeModifier's length; a sparseml.core recipe calibrates."""
    if not LEGACY_MODIFIER_TAG.search(recipe.body):
        reconstruct.from_params(recipe.params)  # a bad value fails here, before the model loads
        return Schedule(steps=0, calibrates=True)
    with _quiet_sparseml():
        manager = _manager(recipe, sparsity, [])
        _check_mask_types(recipe, manager)
        return Schedule(steps=_training_steps(manager))


def prune(job: PruneJob) -> None:
    """Prune `job.targets` to `job.sparsity` with the SparseML recipe."""
    legacy = LEGACY_MODIFIER_TAG.search(job.recipe.body)
    with _quiet_sparseml():
        how = (_run_manager if legacy else _run_session)(job)
    job.progress(f"sparseml: pruned through {how}")
