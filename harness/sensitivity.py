"""Stage `sensitivity`: how much each layer (or transformer block) can afford to lose, measured.

For a model and a one-shot recipe, each unit (`layer`: one target weight; `block`: the targets of one
transformer block) is pruned alone at each level with the recipe's own method (its backend, on a job
whose targets are the unit's), the damage is measured on held-out training text (`harness.damage`),
and the unit's original tensors are put back before the next one. Results go to
`runs/<model>/sensitivity/<recipe>/<granularity>/` (`layout.Sensitivity`, JSON and CSV); finished units
are appended to a partial file as they come, so the same command after an interruption skips them,
as long as the inputs' fingerprint (model, recipe text and params, levels, granularity, held-out text)
is unchanged.

`allocate` turns stored results into per-target levels for the `sensitivity` allocation: the levels
at which every target's predicted damage is the same, keeping the overall level.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from harness import backends, corpus, damage, layerwise, load, sparsity
from harness.errors import HarnessError
from harness.layout import (MANIFEST, SENSITIVITY_CSV, SENSITIVITY_FILE, SENSITIVITY_PARTIAL, SENSITIVITY_SUBDIR,
                            Sensitivity, UnitDamage, read_record, to_json)
from harness.paths import runs_dir
from harness.prune import calibration_batches, check_level, check_schedule, check_supported
from harness.recipes import DEFAULT_RECIPE, load_recipe, parse_overrides
from harness.rundir import PRUNE_SEED, fingerprint, level_name, parse_level, safe_name, stage_run, write_atomic, \
    write_json

GRANULARITIES = ("layer", "block")  # the first is the one `allocate` prefers
DEFAULT_LEVELS = (50.0, 90.0)
RESTORE_TOLERANCE = 1e-5  # the damage of the restored model must be this close to none
BISECTION_STEPS = 200


@dataclass
class Unit:
    name: str
    targets: list[str]
    first_block: int  # index of its (first) block in forward order


def output_dir(model_name: str, recipe_name: str, granularity: str) -> Path:
    return runs_dir() / safe_name(model_name) / SENSITIVITY_SUBDIR / recipe_name / granularity


def units_of(model: torch.nn.Module, targets: list[str], granularity: str) -> tuple[list[Unit], list[layerwise.Block]]:
    """The units in forward order, and the blocks holding them."""
    try:
        found = layerwise.blocks(model, targets)
    except HarnessError:
        outside = next((t for t in targets if not any(t.startswith(f"{name}.") for name in _block_names(model))),
                       targets[0])
        raise HarnessError(f"sensitivity measures target weights inside transformer blocks only, but the recipe's "
                           f"targets include {outside}") from None
    if granularity == "block":
        return [Unit(block.name, block.targets, i) for i, block in enumerate(found)], found
    return [Unit(target, [target], i) for i, block in enumerate(found) for target in block.targets], found


def _block_names(model: torch.nn.Module) -> list[str]:
    return [f"{name}.{i}" for name, module in model.named_modules() if isinstance(module, torch.nn.ModuleList)
            for i in range(len(module))]


def check_one_shot(backend: backends.Backend, recipe, levels: list[float]) -> None:
    for level in levels:
        if check_schedule(backend, recipe, level / 100).steps or recipe.recovery is not None:
            raise HarnessError(f"recipe {recipe.name} trains; sensitivity measures one-shot recipes "
                               f"(e.g. {DEFAULT_RECIPE})")


def inputs_fingerprint(spec: load.ModelSpec, recipe, levels: list[float], granularity: str,
                       heldout: damage.HeldOut) -> str:
    """What decides whether stored results (finished or partial) still hold."""
    return fingerprint(spec.to_dict(), recipe.text, recipe.params, levels, granularity, asdict(heldout), PRUNE_SEED)


def write_results(directory: Path, result: Sensitivity) -> None:
    """`sensitivity.json` and `sensitivity.csv` (one row per unit, one damage column per level)."""
    write_json(directory / SENSITIVITY_FILE, to_json(result))
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["unit", "weights", *(f"damage_at_{level_name(level)}" for level in result.levels), "seconds"])
    for unit in result.units:
        writer.writerow([unit.unit, unit.weights, *(f"{value:.6g}" for value in unit.damage), unit.seconds])
    write_atomic(directory / SENSITIVITY_CSV, text.getvalue())


def measure_unit(backend: backends.Backend, job: backends.PruneJob, unit: Unit, levels: list[float],
                 meter: damage.DamageMeter) -> UnitDamage:
    """Prune the unit alone to each level (`job` with its targets and level), measure, put its weights back."""
    started = time.time()
    params = dict(job.model.named_parameters())
    original = {target: params[target].detach().clone() for target in unit.targets}
    damages = []
    for level in levels:
        unit_job = dataclasses.replace(job, sparsity=level / 100, targets=unit.targets)
        backend.prune(unit_job)
        check_level(backend, unit_job)
        damages.append(meter.damage(unit.first_block))
        with torch.no_grad():
            for target, tensor in original.items():
                params[target].copy_(tensor)
    return UnitDamage(unit.name, unit.targets, sum(t.numel() for t in original.values()), damages,
                      round(time.time() - started, 3))


def sensitivity(model: str, recipe_name: str = DEFAULT_RECIPE, overrides: dict | None = None,
                levels=DEFAULT_LEVELS, granularity: str = "layer", heldout: damage.HeldOut = damage.HeldOut(),
                force: bool = False) -> Path:
    """Measure every unit at every level; returns the output directory. Inputs are checked before any work."""
    levels = sorted({parse_level(level) for level in levels})
    if not levels or levels[0] == 0:
        raise HarnessError("sensitivity levels must be above 0 % (the dense model has no damage by definition)")
    if granularity not in GRANULARITIES:
        raise HarnessError(f"granularity must be one of {', '.join(GRANULARITIES)}, got {granularity!r}")
    spec = load.resolve_spec(model)
    recipe = load_recipe(recipe_name).with_params(overrides or {})
    backend = backends.get_backend(recipe.backend)
    check_supported(backend, recipe, spec)
    check_one_shot(backend, recipe, levels)
    load.checkpoint_dir(spec)
    corpus.resolve_corpus(heldout.corpus)
    if recipe.calibration.samples:
        corpus.resolve_corpus(recipe.calibration.corpus)
    directory = output_dir(spec.name, recipe.name, granularity)
    inputs = inputs_fingerprint(spec, recipe, levels, granularity, heldout)
    finished = read_record(directory / SENSITIVITY_FILE, Sensitivity)
    if not force and finished and finished.fingerprint == inputs:
        print(f"sensitivity: {directory} is up to date (use --force to redo)")
        return directory

    random.seed(PRUNE_SEED)
    np.random.seed(PRUNE_SEED)
    torch.manual_seed(PRUNE_SEED)
    write_json(directory / MANIFEST, {"model": spec.name, "spec": spec.to_dict(), "recipe": recipe.name,
                                      "recipe_text": recipe.text, "params": recipe.params, "levels": levels,
                                      "granularity": granularity, "heldout": asdict(heldout), "seed": PRUNE_SEED})
    with stage_run(directory / MANIFEST, "sensitivity", inputs) as record:
        loaded = load.load_model(spec)
        targets = sparsity.prunable_names(loaded.model, recipe.targets)
        units, blocks = units_of(loaded.model, targets, granularity)
        meter = damage.DamageMeter(loaded.model, damage.heldout_batch(loaded, heldout), blocks)
        partial = read_record(directory / SENSITIVITY_PARTIAL, Sensitivity)
        if force or not partial or partial.fingerprint != inputs:
            partial = Sensitivity(spec.name, recipe.name, granularity, levels, meter.measure, asdict(heldout),
                                  meter.dense_loss, inputs, [], 0.0)
        calibration = calibration_batches(loaded, recipe.calibration) if recipe.calibration.samples else []
        done = {unit.unit for unit in partial.units}
        job = backends.PruneJob(model=loaded.model, tokenizer=loaded.tokenizer, spec=spec, recipe=recipe,
                                sparsity=levels[0] / 100, targets=[], calibration=calibration,
                                progress=lambda message: None)
        progress = tqdm(total=len(units), initial=len(done), unit="unit",
                        desc=f"sensitivity of {spec.name} ({granularity}, {recipe.name})")
        for unit in units:
            if unit.name in done:
                continue
            measured = measure_unit(backend, job, unit, levels, meter)
            partial.units.append(measured)
            partial.seconds = round(partial.seconds + measured.seconds, 3)
            write_json(directory / SENSITIVITY_PARTIAL, to_json(partial))
            progress.update()
            progress.set_postfix(damage=f"{measured.damage[-1]:.4g}")
        progress.close()
        left_over = meter.damage(0)
        if abs(left_over) > RESTORE_TOLERANCE:
            raise HarnessError(f"recipe {recipe.name}: the model with every unit restored is still damaged "
                               f"({left_over:.3g}); its backend changes more than the target weights")
        order = {unit.name: i for i, unit in enumerate(units)}
        partial.units.sort(key=lambda unit: order[unit.unit])
        write_results(directory, partial)
        (directory / SENSITIVITY_PARTIAL).unlink(missing_ok=True)
        record.update(units=len(units), levels=levels, units_seconds=partial.seconds)
    print(f"sensitivity: {spec.name} {recipe.name}: {len(units)} {granularity} units x {len(levels)} levels in "
          f"{partial.seconds:.0f} s -> {directory}")
    return directory


# --- allocation -----------------------------------------------------------------------------------------

def stored_results(model_name: str, recipe_name: str) -> Sensitivity:
    """The finished results for a model and recipe, layer granularity preferred; without any, those of the
    recipe's one variant that has some (e.g. SparseGPT measured `@samples=16,seq_len=64`)."""
    root = runs_dir() / safe_name(model_name) / SENSITIVITY_SUBDIR
    found = {}
    for directory in [root / recipe_name, *sorted(root.glob(f"{recipe_name}@*"))]:
        for granularity in GRANULARITIES:
            result = read_record(directory / granularity / SENSITIVITY_FILE, Sensitivity)
            if result and result.recipe not in found:
                found[result.recipe] = result
    if recipe_name in found or len(found) == 1:
        return found.get(recipe_name) or next(iter(found.values()))
    if found:
        raise HarnessError(f"sensitivity results for {model_name} exist for several variants of {recipe_name} "
                           f"({', '.join(found)}) and not for the recipe itself: run "
                           f"`make sensitivity MODEL={model_name} RECIPE={recipe_name}`")
    raise HarnessError(f"no sensitivity results for {model_name} with {recipe_name}: run "
                       f"`make sensitivity MODEL={model_name} RECIPE={recipe_name}` first")


class DamageCurve:
    """A target's predicted damage against its level (fractions): piecewise linear through level 0 (no
    damage) and the measured levels, made non-decreasing, with a slope of at least `floor` everywhere
    (so it can be inverted) and extended beyond the last measured level along its last segment."""

    def __init__(self, levels: list[float], damages: list[float], floor: float):
        self.levels = np.array([0.0, *levels])
        self.damages = np.maximum.accumulate(np.maximum(0.0, [0.0, *damages])) + floor * self.levels
        self.slope = (self.damages[-1] - self.damages[-2]) / (self.levels[-1] - self.levels[-2])

    def level_at(self, value: float) -> float:
        if value <= self.damages[-1]:
            return float(np.interp(value, self.damages, self.levels))
        return float(self.levels[-1] + (value - self.damages[-1]) / self.slope)


def allocate(model_name: str, recipe_name: str, sizes: dict[str, int], level: float,
             bounds: tuple[float, float]) -> dict[str, float]:
    """Per-target fractions whose mean weighted by `sizes` is `level`, within `bounds` (fractions), at which
    every target's predicted damage (from the stored results of `make sensitivity`) is the same, except
    where a bound holds a target back. Block results give each target of a block the block's damage."""
    from harness.allocation import check_bounds  # allocation imports this module when asked for `sensitivity`

    check_bounds(level, bounds)
    low, high = bounds
    result = stored_results(model_name, recipe_name)
    by_target = {target: unit.damage for unit in result.units for target in unit.targets}
    missing = [target for target in sizes if target not in by_target]
    if missing:
        raise HarnessError(f"the sensitivity results in {output_dir(model_name, result.recipe, result.granularity)} do "
                           f"not cover {missing[0]}: rerun `make sensitivity MODEL={model_name} RECIPE={result.recipe}`")
    scale = max([abs(value) for values in by_target.values() for value in values] + [1e-12])
    fractions = [value / 100 for value in result.levels]
    curves = {target: DamageCurve(fractions, by_target[target], 1e-6 * scale) for target in sizes}
    total = sum(sizes.values())

    def levels_at(value: float) -> dict[str, float]:
        return {target: min(high, max(low, curve.level_at(value))) for target, curve in curves.items()}

    def mean_level(value: float) -> float:
        return sum(sizes[target] * fraction for target, fraction in levels_at(value).items()) / total

    below, above = 0.0, max(curve.damages[-1] + curve.slope * max(0.0, high - curve.levels[-1])
                            for curve in curves.values())
    for _ in range(BISECTION_STEPS):
        middle = (below + above) / 2
        below, above = (middle, above) if mean_level(middle) < level else (below, middle)
    return levels_at((below + above) / 2)


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="registry alias, Hub id or checkpoint")
    parser.add_argument("--recipe", default=DEFAULT_RECIPE, help=f"a one-shot recipe (default {DEFAULT_RECIPE})")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="override a recipe parameter")
    parser.add_argument("--levels", nargs="+", default=list(DEFAULT_LEVELS), metavar="PERCENT",
                        help="levels each unit is pruned to (default %(default)s)")
    parser.add_argument("--granularity", choices=GRANULARITIES, default="layer",
                        help="a unit is one target weight (layer) or one transformer block's targets (block)")
    parser.add_argument("--corpus", default=damage.HeldOut.corpus, help="training corpus whose held-out split is measured on")
    parser.add_argument("--sequences", type=int, default=damage.HeldOut.sequences, help="held-out sequences (default %(default)s)")
    parser.add_argument("--seq-len", type=int, default=damage.HeldOut.seq_len, help="tokens per sequence (default %(default)s)")
    parser.add_argument("--force", action="store_true", help="redo every unit even if results are up to date")


def main(args) -> None:
    sensitivity(args.model, args.recipe, parse_overrides(args.set), args.levels, args.granularity,
                damage.HeldOut(args.corpus, args.sequences, args.seq_len), args.force)
