"""Stage 2, prune: apply a recipe at a level and write `runs/<model>/<recipe>/<level>/`.

The run directory is built in a temporary sibling and renamed into place at the end, so an
interrupted or failed prune never leaves a half-written run. Level 0 is the dense baseline: the
model is saved unchanged. A recipe with a recovery step (`<pruning>+distil`) then distils the dense
model into the pruned one (`harness.recovery`); its state is checkpointed beside the run
(`RunDir.resume_dir`), so the same command after an interruption goes on from the last checkpoint, and
its loss curve is saved in the run.
A composed recipe (`<pruning>+distil+int8`) starts from the finished, current run of its longest earlier
part (`<pruning>+distil`, else `<pruning>`) instead of pruning and training again.
"""
from __future__ import annotations

import dataclasses
import random
import shutil

import numpy as np
import torch

from harness import backends, corpus, layout, load, quantize, quantize_inc, recovery, sparsity
from harness.errors import HarnessError
from harness.layout import MANIFEST, MODEL_SUBDIR, QAT_RESUME_SUBDIR, RECOVERY_FILE, SPARSITY_FILE, to_json
from harness.recipes import DEFAULT_RECIPE, KIND_VERBS, STEP_MARK, Calibration, Recipe, earlier_steps, load_recipe, \
    parse_overrides
from harness.rundir import PRUNE_SEED, RunDir, parse_level, prune_inputs, stage_run, staging_dir, write_json

LEVEL_TOLERANCE = 0.01  # a fraction: the targets' sparsity after pruning must be within 1 point of the level
# A quantization recipe's backend -> its step: (loaded, recipe, calibration, targets, staging dir) -> summary.
QUANTIZERS = {"sparseml": quantize.quantize, "inc": quantize_inc.quantize}


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
        if spec.has_lm_loss:
            batch["labels"] = sequence[None].clone()
        batches.append(batch)
    return batches


def check_supported(backend: backends.Backend, recipe: Recipe, spec: load.ModelSpec) -> None:
    supported = set(recipe.architectures) & set(backend.ARCHITECTURES)
    if spec.architecture not in supported:
        raise HarnessError(f"recipe {recipe.name} cannot prune {spec.architecture} models like '{spec.name}' "
                           f"(it supports: {', '.join(sorted(supported))})")


def check_schedule(backend: backends.Backend, recipe: Recipe, fraction: float) -> backends.Schedule:
    """The recipe's schedule; fails on one that needs calibration data or training its header does not give."""
    schedule = backend.schedule(recipe, fraction)
    if schedule.calibrates and not recipe.calibration.samples:
        raise HarnessError(f"recipe {recipe.name} calibrates on data: give it calibration data "
                           f"(`calibration: {{samples: N}}` in its header)")
    plan = recipe.recovery
    if schedule.steps and not plan:
        raise HarnessError(f"recipe {recipe.name} trains for {schedule.steps} steps: give it a `recovery` section "
                           f"(its training text and token budget)")
    if schedule.steps > (plan.steps if plan else 0):
        raise HarnessError(f"recipe {recipe.name} schedules {schedule.steps} training steps but its recovery budget "
                           f"is {plan.steps} steps: end its schedule by ${{train_steps}}")
    return schedule


def quantization_training(recipe: Recipe):
    """The plan of a composed recipe's quantization-aware training (its quantization step's `qat_tokens` > 0): the
    recovery step's settings with that budget and `qat_lr` (if > 0); None without."""
    params = recipe.quantization.params if recipe.quantization else {}
    tokens = params.get("qat_tokens", 0)
    if not tokens:
        return None
    if recipe.recovery_header is None:
        raise HarnessError(f"recipe {recipe.name}: qat_tokens trains with a recovery step's settings: compose "
                           f"<pruning>{STEP_MARK}distil{STEP_MARK}{recipe.quantization.base_name.rpartition('/')[2]}")
    plan = recipe.recovery
    return dataclasses.replace(plan, tokens=tokens, lr=params.get("qat_lr") or plan.lr, ramp=0.0, control=False)


def run_inputs(spec: load.ModelSpec, recipe: Recipe, level: float) -> str:
    """The prune stage's inputs fingerprint: a run with the same one is up to date."""
    return prune_inputs(spec.to_dict(), recipe.text, recipe.params, level)


def starting_run(spec: load.ModelSpec, recipe: Recipe, level: float) -> tuple[RunDir, Recipe] | None:
    """For a composed recipe at level > 0: the run of its longest earlier part (`earlier_steps`) at this level
    that is finished and current, and that part's recipe. The run starts from its weights: a recovery from
    the one-shot run's, a quantization from the FP32 run's."""
    if level == 0:
        return None
    for name in earlier_steps(recipe.name):
        earlier = load_recipe(name)
        run = RunDir(spec.name, earlier.name, level)
        if run.is_pruned(spec.to_dict(), earlier.text, earlier.params):
            return run, earlier
    return None


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
    if recipe.kind != "pruning":
        raise HarnessError(f"recipe {recipe.name} {KIND_VERBS[recipe.kind]}: compose it after a pruning recipe, "
                           f"e.g. {DEFAULT_RECIPE}{STEP_MARK}{recipe.base_name.rpartition('/')[2]}")
    backend = backends.get_backend(recipe.backend)
    check_supported(backend, recipe, spec)
    source = load.checkpoint_dir(spec)  # fail on a missing model before anything is written
    quantize.check_available(recipe, source)
    run = RunDir(spec.name, recipe.name, level)
    inputs = run_inputs(spec, recipe, level)
    if not force and run.is_pruned(spec.to_dict(), recipe.text, recipe.params):
        print(f"prune: {run.path} is up to date (use --force to redo)")
        return run
    plan = recipe.recovery
    start, started_from = starting_run(spec, recipe, level) or (None, None)
    if (level == 0 and not (plan and plan.control)) or (started_from and started_from.recovery_header is not None):
        plan = None  # the dense baseline, or a recovered run to quantize
    qat_plan = quantization_training(recipe)
    gradual = False  # the recipe prunes while training (then the training is its recovery)
    if level > 0 and not start:
        gradual = check_schedule(backend, recipe, level / 100).steps > 0
        if recipe.calibration.samples:
            corpus.resolve_corpus(recipe.calibration.corpus)
    if plan:
        corpus.resolve_corpus(plan.corpus)
    if recipe.quantization:
        corpus.resolve_corpus(recipe.quantization.calibration.corpus)

    random.seed(PRUNE_SEED)
    np.random.seed(PRUNE_SEED)
    torch.manual_seed(PRUNE_SEED)
    with staging_dir(run.path) as tmp:
        write_json(tmp / MANIFEST, {
            "model": spec.name, "spec": spec.to_dict(), "recipe": recipe.name, "recipe_text": recipe.text,
            "params": recipe.params, "level": level, "seed": PRUNE_SEED, "shape_only": spec.shape_only,
        })
        with stage_run(tmp / MANIFEST, "prune", inputs) as record:
            loaded = load.load_model(spec)
            targets = sparsity.prunable_names(loaded.model, recipe.targets)
            if recipe.quantization:
                quantize.check_layers(recipe, loaded.model)
            job = backends.PruneJob(model=loaded.model, tokenizer=loaded.tokenizer, spec=spec, recipe=recipe,
                                    sparsity=level / 100, targets=targets)
            resume = recovery.Resume(run.resume_dir, plan, targets, inputs) if plan else None
            teacher = load.load_model(spec, dtype=recovery.teacher_dtype(plan or qat_plan)).model \
                if plan or qat_plan else None
            outcomes = []

            def distil(hooks: recovery.Hooks | None = None) -> layout.Recovery:
                outcomes.append(recovery.recover(loaded.model, teacher, loaded.tokenizer, spec.architecture, targets,
                                                 plan, resume, hooks=hooks))
                return outcomes[-1]

            if gradual:
                job.train = distil
            if start:
                _load_weights(loaded.model, start)
                check_level(backend, job)
                record.update(started_from=start.relative)
                print(f"prune: starting from the finished run {start.path}")
            elif level > 0 and not (resume and resume.exists() and not gradual):  # a resumed recovery has the pruned weights
                if recipe.calibration.samples:
                    job.calibration = calibration_batches(loaded, recipe.calibration)
                backend.prune(job)
                check_level(backend, job)
            if plan and not gradual:
                distil()
                check_level(backend, job)
            if outcomes:
                write_json(tmp / RECOVERY_FILE, to_json(outcomes[0]))
                record.update(recovery_tokens=outcomes[0].tokens, recovery_wall_time_s=outcomes[0].wall_time_s)
            if recipe.quantization:  # last: the quantized weights are what the run saves
                training = {}
                if qat_plan:
                    qat_resume = recovery.Resume(run.resume_dir / QAT_RESUME_SUBDIR, qat_plan, targets, inputs)
                    training["train"] = lambda qat_model, qat_targets: recovery.recover(
                        qat_model, teacher, loaded.tokenizer, spec.architecture, qat_targets, qat_plan, qat_resume)
                quantized = QUANTIZERS[recipe.quantization.backend](loaded, recipe, calibration_batches(
                    loaded, recipe.quantization.calibration), targets, tmp, **training)
                record.update(quantized_weights=quantized["quantized_weights"],
                              quantization_zeros_preserved=quantized["zeros_preserved"])
                if qat_plan:
                    qat = quantized["qat"]
                    record.update(qat_tokens=qat["tokens"], qat_wall_time_s=qat["wall_time_s"])
            del teacher
            loaded.model.save_pretrained(tmp / MODEL_SUBDIR, safe_serialization=True, max_shard_size=load.SHARD_BYTES)
            loaded.tokenizer.save_pretrained(tmp / MODEL_SUBDIR)
            measured = sparsity.measure(tmp / MODEL_SUBDIR, targets, level)
            write_json(tmp / SPARSITY_FILE, to_json(measured))
            record.update(source=str(loaded.path), achieved_percent=measured.achieved_percent,
                          overall_percent=measured.overall_percent)
    if plan or qat_plan:
        shutil.rmtree(run.resume_dir, ignore_errors=True)
    print(f"prune: {spec.name} {recipe.name} level {level:g}%: achieved {measured.achieved_percent:.2f}% "
          f"of {measured.prunable_params:,} prunable weights, {measured.overall_percent:.2f}% overall "
          f"-> {run.path}")
    return run


def _load_weights(model: torch.nn.Module, run: RunDir) -> None:
    missing, _ = model.load_state_dict(dict(sparsity.saved_tensors(run.model_dir)), strict=False)
    params = {name for name, _ in model.named_parameters()}
    if set(missing) & params - set(getattr(model, "_tied_weights_keys", None) or []):
        raise HarnessError(f"{run.model_dir} lacks weights of the model ({sorted(set(missing) & params)[0]}): "
                           f"prune it again with --force")


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="registry alias, Hub id, checkpoint or run directory")
    parser.add_argument("--level", required=True, help="target sparsity in percent of prunable weights, [0, 100)")
    parser.add_argument("--recipe", default=DEFAULT_RECIPE, help=f"recipe name under recipes/ (default {DEFAULT_RECIPE})")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="override a recipe parameter, e.g. --set steps=200")
    parser.add_argument("--force", action="store_true", help="redo even if the run directory is up to date")


def main(args) -> None:
    prune(args.model, args.level, args.recipe, parse_overrides(args.set), args.force)
