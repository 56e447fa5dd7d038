"""Stage 2, prune: apply a recipe at a level and write `runs/<model>/<recipe>/<level>/`.

The run directory is built in a temporary sibling and renamed into place at the end, so an
interrupted or failed prune never leaves a half-written run. Level 0 is the dense baseline: the
model is saved unchanged.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from harness import backends, load, sparsity
from harness.errors import HarnessError
from harness.layout import MANIFEST, MODEL_SUBDIR, SPARSITY_FILE, to_json
from harness.paths import data_dir
from harness.recipes import DEFAULT_RECIPE, Recipe, load_recipe, parse_overrides
from harness.rundir import RunDir, fingerprint, parse_level, stage_run, staging_dir, write_json

SEED = 0
CALIBRATION_FILE = "wikitext-2/valid.txt"
LEVEL_TOLERANCE = 0.01  # a fraction: the targets' sparsity after pruning must be within 1 point of the level


def calibration_file() -> Path:
    """The calibration text file; fails with one line if it is missing."""
    path = data_dir() / CALIBRATION_FILE
    if not path.exists():
        raise HarnessError(f"calibration data {path} is missing: set HARNESS_DATA to the folder holding "
                           f"{CALIBRATION_FILE} (see ../shared/data/SOURCES.md)")
    return path


def calibration_texts(count: int) -> list[str]:
    """`count` paragraphs of WikiText-2 validation text (never the test split the evaluations use)."""
    paragraphs = [line.strip() for line in calibration_file().read_text(encoding="utf-8").splitlines()
                  if len(line.split()) > 40 and not line.strip().startswith("=")]
    return paragraphs[:count]


def calibration_batches(loaded: load.LoadedModel, count: int, batch_size: int = 1) -> list[dict]:
    """Tokenized calibration batches; with `labels` for models that have a language-modelling loss."""
    texts = calibration_texts(count)
    spec, tokenizer = loaded.spec, loaded.tokenizer
    batches = []
    for start in range(0, len(texts), batch_size):
        batch = dict(tokenizer(texts[start:start + batch_size], truncation=True, max_length=spec.seq_len,
                               padding=True, return_tensors="pt"))
        if spec.model_class in ("AutoModelForCausalLM", "AutoModelForSeq2SeqLM"):
            labels = batch["input_ids"].clone()
            labels[batch["attention_mask"] == 0] = -100
            batch["labels"] = labels
        batches.append(batch)
    return batches


def check_supported(backend: backends.Backend, recipe: Recipe, spec: load.ModelSpec) -> None:
    supported = set(recipe.architectures) & set(backend.ARCHITECTURES)
    if spec.architecture not in supported:
        raise HarnessError(f"recipe {recipe.name} cannot prune {spec.architecture} models like '{spec.name}' "
                           f"(it supports: {', '.join(sorted(supported))})")


def check_schedule(backend: backends.Backend, recipe: Recipe, fraction: float) -> None:
    """Fail on a recipe whose schedule needs calibration data or a learning rate its header does not give."""
    schedule = backend.schedule(recipe, fraction)
    training = f"fine-tunes for {schedule.steps} steps"
    if schedule.needs_calibration and not recipe.calibration_samples:
        raise HarnessError(f"recipe {recipe.name} {training if schedule.steps else 'calibrates on data'}: give it "
                           f"calibration data (`calibration: {{samples: N}}` in its header)")
    if schedule.steps and "lr" not in recipe.params:
        raise HarnessError(f"recipe {recipe.name} {training}: add `lr` to its params")


def run_backend(backend: backends.Backend, job: backends.PruneJob) -> None:
    """Prune the job's targets with the backend; fail unless they reached the level."""
    backend.prune(job)
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
    if level > 0:
        check_schedule(backend, recipe, level / 100)
        if recipe.calibration_samples:
            calibration_file()

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
            if level > 0:
                job = backends.PruneJob(
                    model=loaded.model, tokenizer=loaded.tokenizer, spec=spec, recipe=recipe,
                    sparsity=level / 100, targets=targets,
                    calibration=calibration_batches(loaded, recipe.calibration_samples)
                    if recipe.calibration_samples else [],
                )
                run_backend(backend, job)
            loaded.model.save_pretrained(tmp / MODEL_SUBDIR, safe_serialization=True, max_shard_size=load.SHARD_BYTES)
            loaded.tokenizer.save_pretrained(tmp / MODEL_SUBDIR)
            measured = sparsity.measure(tmp / MODEL_SUBDIR, targets, level)
            write_json(tmp / SPARSITY_FILE, to_json(measured))
            record.update(source=str(loaded.path), achieved_percent=measured.achieved_percent,
                          overall_percent=measured.overall_percent)
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
