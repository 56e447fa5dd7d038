"""Stage 2, prune: apply a recipe at a level and write `runs/<model>/<recipe>/<level>/`.

The run directory is built in a temporary sibling and renamed into place at the end, so an
interrupted or failed prune never leaves a half-written run. Level 0 is the dense baseline: the
model is saved unchanged. A recipe with `recovery` then distils the dense model into the pruned one
(`harness.recovery`); its state is checkpointed beside the run (`RunDir.resume_dir`), so the same
command after an interruption goes on from the last checkpoint, and its loss curve is saved in the run.
"""
from __future__ import annotations

import random
import shutil

import numpy as np
import torch

from harness import backends, corpus, load, recovery, sparsity
from harness.errors import HarnessError
from harness.layout import MANIFEST, MODEL_SUBDIR, RECOVERY_FILE, SPARSITY_FILE, to_json
from harness.recipes import DEFAULT_RECIPE, Calibration, Recipe, load_recipe, parse_overrides
from harness.rundir import RunDir, fingerprint, parse_level, stage_run, staging_dir, write_json

SEED = 0
LEVEL_TOLERANCE = 0.01  # a fraction: the targets' sparsity after pruning must be within 1 point of the level


def context_length(config) -> int | None:
    """The longest sequence the model's position embeddings allow, if it says."""
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)


def calibration_batches(loaded: load.LoadedModel, calibration: Calibration) -> list[dict]:
    """One batch per calibration sequence (from the training corpus, full length, no padding); with `labels`
    for models that have a language-modelling loss."""
    spec = loaded.spec
    seq_len = min(calibration.seq_len or spec.seq_len, context_length(loaded.model.config) or 1 << 30)
    sequences = corpus.token_sequences(loaded.tokenizer, calibration.corpus, calibration.samples, seq_len)
    batches = []
    for sequence in sequences:
        batch = {"input_ids": sequence[None], "attention_mask": torch.ones_like(sequence[None])}
        if spec.model_class in ("AutoModelForCausalLM", "AutoModelForSeq2SeqLM"):
            batch["labels"] = sequence[None].clone()
        batches.append(batch)
    return batches


def recovery_plan(recipe: Recipe) -> recovery.RecoveryPlan | None:
    """The recipe's recovery settings as a checked plan, or None without recovery."""
    settings = recipe.recovery
    if settings is None:
        return None
    fields = recovery.RecoveryPlan.__dataclass_fields__
    unknown = sorted(set(settings) - set(fields))
    if unknown:
        raise HarnessError(f"recipe {recipe.name}: recovery has no setting {unknown[0]} (settings: {', '.join(fields)})")
    plan = recovery.RecoveryPlan(**settings)
    plan.check()
    return plan


def check_supported(backend: backends.Backend, recipe: Recipe, spec: load.ModelSpec) -> None:
    supported = set(recipe.architectures) & set(backend.ARCHITECTURES)
    if spec.architecture not in supported:
        raise HarnessError(f"recipe {recipe.name} cannot prune {spec.architecture} models like '{spec.name}' "
                           f"(it supports: {', '.join(sorted(supported))})")


def check_schedule(backend: backends.Backend, recipe: Recipe, fraction: float) -> None:
    """Fail on a recipe whose schedule needs calibration data or a learning rate its header does not give."""
    schedule = backend.schedule(recipe, fraction)
    training = f"fine-tunes for {schedule.steps} steps"
    if schedule.needs_calibration and not recipe.calibration.samples:
        raise HarnessError(f"recipe {recipe.name} {training if schedule.steps else 'calibrates on data'}: give it "
                           f"calibration data (`calibration: {{samples: N}}` in its header)")
    if schedule.steps and "lr" not in recipe.params:
        raise HarnessError(f"recipe {recipe.name} {training}: add `lr` to its params")


def check_level(backend: backends.Backend, job: backends.PruneJob) -> None:
    """Fail unless the job's targets reached its level."""
    params = dict(job.model.named_parameters())
    achieved = sparsity.zero_fraction(params[name] for name in job.targets)
    if abs(achieved - job.sparsity) > LEVEL_TOLERANCE:
        raise HarnessError(f"recipe {job.recipe.name} left the targets {achieved:.2%} sparse instead of "
                           f"{job.sparsity:.2%} ({backend.NAME}): {backend.LEVEL_HINT}")


def prune(model: str, level, recipe_name: str = DEFAULT_RECIPE, overrides: dict | None = None,
          force: bool = False) -> RunDir:
    """Prune `model` to `level` percent with a recipe; returns the finished run directory.

    Everything the user gave is checked before anything is written."""
    level = parse_level(level)
    spec = load.resolve_spec(model)
    recipe = load_recipe(recipe_name).with_params(overrides or {})
    backend = backends.get_backend(recipe.backend)
    check_supported(backend, recipe, spec)
    load.checkpoint_dir(spec)  # fail on a missing model before anything is written
    run = RunDir(spec.name, recipe.name, level)
    inputs = fingerprint(spec.to_dict(), recipe.text, recipe.params, level, SEED)
    if not force and run.is_current("prune", inputs, [MODEL_SUBDIR, SPARSITY_FILE]):
        print(f"prune: {run.path} is up to date (use --force to redo)")
        return run
    plan = recovery_plan(recipe) if level > 0 else None
    if level > 0:
        check_schedule(backend, recipe, level / 100)
        if plan:
            corpus.resolve_corpus(plan.corpus)
        if recipe.calibration.samples:
            corpus.resolve_corpus(recipe.calibration.corpus)

    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    with staging_dir(run.path) as tmp:
        write_json(tmp / MANIFEST, {
            "model": spec.name, "spec": spec.to_dict(), "recipe": recipe.name, "recipe_text": recipe.text,
            "params": recipe.params, "level": level, "seed": SEED, "shape_only": spec.shape_only,
        })
        with stage_run(tmp / MANIFEST, "prune", inputs) as record:
            loaded = load.load_model(spec)
            targets = sparsity.prunable_names(loaded.model, recipe.targets)
            job = backends.PruneJob(model=loaded.model, tokenizer=loaded.tokenizer, spec=spec, recipe=recipe,
                                    sparsity=level / 100, targets=targets)
            resume = recovery.Resume(run.resume_dir, plan, targets, inputs) if plan else None
            if level > 0 and not (resume and resume.exists()):  # a resumed recovery has the pruned weights
                if recipe.calibration.samples:
                    job.calibration = calibration_batches(loaded, recipe.calibration)
                backend.prune(job)
                check_level(backend, job)
            if resume:
                teacher = load.load_model(spec).model
                outcome = recovery.recover(loaded.model, teacher, loaded.tokenizer, spec.architecture, targets,
                                           plan, resume)
                del teacher
                check_level(backend, job)
                write_json(tmp / RECOVERY_FILE, to_json(outcome))
                record.update(recovery_tokens=outcome.tokens, recovery_wall_time_s=outcome.wall_time_s)
            loaded.model.save_pretrained(tmp / MODEL_SUBDIR, safe_serialization=True, max_shard_size=load.SHARD_BYTES)
            loaded.tokenizer.save_pretrained(tmp / MODEL_SUBDIR)
            measured = sparsity.measure(tmp / MODEL_SUBDIR, targets, level)
            write_json(tmp / SPARSITY_FILE, to_json(measured))
            record.update(source=str(loaded.path), achieved_percent=measured.achieved_percent,
                          overall_percent=measured.overall_percent)
    if plan:
        shutil.rmtree(run.resume_dir, ignore_errors=True)
    print(f"prune: {spec.name} {recipe.name} level {level:g}%: achieved {measured.achieved_percent:.2f}% "
          f"of {measured.prunable_params:,} prunable weights, {measured.overall_percent:.2f}% overall "
          f"-> {run.path}")
    return run


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="registry alias, Hub id, checkpoint or run directory")
    parser.add_argument("--level", required=True, help="target sparsity in percent of prunable weights, [0, 100)")
    parser.add_argument("--recipe", default=DEFAULT_RECIPE, help=f"recipe name under recipes/ (default {DEFAULT_RECIPE})")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="override a recipe parameter, e.g. --set steps=200")
    parser.add_argument("--force", action="store_true", help="redo even if the run directory is up to date")


def main(args) -> None:
    prune(args.model, args.level, args.recipe, parse_overrides(args.set), args.force)
