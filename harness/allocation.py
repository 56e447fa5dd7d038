"""Per-layer sparsity allocation: how a recipe's overall level is shared out over its target weights.

A recipe's `allocation` parameter names one of ALLOCATIONS:
- `uniform`: every target at the level (what every recipe did before allocations).
- `owl` (outlier-weighted layerwise sparsity, Yin et al. 2024; luuyin/OWL): per transformer block, the
  outlier ratio is the fraction of its Wanda scores |W| x ||X||_2 (dense activations of the calibration
  batches) above `owl_threshold_m` times their mean; the ratios are scaled to [0, 2 x `owl_lambda`] and
  mean-centred, and each block's level is the level minus its scaled ratio: blocks with more outliers
  are pruned less. (SparseML 1.8's `sparsity_profile: owl` computes the same inside its SparseGPT and
  Wanda modifiers only, per SparseML layer, from its own extra pass; here it serves every method.)
- `sensitivity`: from the model's stored `make sensitivity` results (`harness.sensitivity.allocate`).

Whatever a non-uniform allocation proposes is then made exact (`balance`): clipped to the recipe's
[`min_level`, `max_level`] (percent), shifted together until the mean weighted by the targets' sizes is
the level, and rounded to whole weights per group so that the groups prune round(level x all weights).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from harness import sparsity
from harness.errors import HarnessError

DEFAULT = "uniform"
PARAMS = ("allocation", "owl_threshold_m", "owl_lambda", "min_level", "max_level")  # the recipe params it reads
SHIFT_STEPS = 200  # bisection steps for the common shift: far below one weight in a billion


@dataclass(frozen=True)
class Request:
    """What an allocation reads. `scores()` computes the targets' Wanda scores (one dense pass) when asked."""

    model_name: str
    recipe_name: str
    sizes: dict[str, int]  # target -> weights, in forward order
    level: float  # fraction of all target weights to prune
    bounds: tuple[float, float]  # lowest and highest fraction of any target
    params: dict  # the recipe's params (owl_threshold_m, owl_lambda)
    scores: Callable[[], dict[str, torch.Tensor]]


def uniform(request: Request) -> dict[str, float]:
    check_bounds(request.level, request.bounds)
    return {target: request.level for target in request.sizes}


def owl(request: Request) -> dict[str, float]:
    threshold_m, spread = float(request.params["owl_threshold_m"]), float(request.params["owl_lambda"])
    scores = request.scores()
    blocks: dict[str, list[str]] = {}
    for target in request.sizes:
        blocks.setdefault(sparsity.layer_of(target), []).append(target)
    ratios = {}
    for block, targets in blocks.items():
        values = torch.cat([scores[target].flatten().float() for target in targets])
        ratios[block] = float((values > threshold_m * values.mean()).float().mean())
    low, high = min(ratios.values()), max(ratios.values())
    scaled = {block: (ratio - low) / (high - low) * 2 * spread if high > low else 0.0 for block, ratio in ratios.items()}
    # mean-centring is left to `balance`, which shifts all levels together onto the overall level
    raw = {target: request.level - scaled[block] for block, targets in blocks.items() for target in targets}
    return balance(raw, request.sizes, request.level, request.bounds, group_of=sparsity.layer_of)


def from_sensitivity(request: Request) -> dict[str, float]:
    from harness import sensitivity  # the sensitivity stage's module; imported only for this allocation

    raw = sensitivity.allocate(request.model_name, request.recipe_name, dict(request.sizes), request.level,
                               request.bounds)
    return balance(raw, request.sizes, request.level, request.bounds, group_of=lambda target: target)


ALLOCATIONS: dict[str, Callable[[Request], dict[str, float]]] = {
    "uniform": uniform,
    "owl": owl,
    "sensitivity": from_sensitivity,
}


def check_bounds(level: float, bounds: tuple[float, float]) -> None:
    low, high = bounds
    if not 0 <= low <= level <= high <= 1:
        raise HarnessError(f"allocation bounds {low:.2%}..{high:.2%} must hold the level {level:.2%} within 0..100 %")


def balance(raw: dict[str, float], sizes: dict[str, int], level: float, bounds: tuple[float, float],
            group_of: Callable[[str], str]) -> dict[str, float]:
    """Per-target fractions near `raw` (one value per group), within `bounds`, pruning round(level x total)
    weights in all: each group prunes a whole number of weights."""
    check_bounds(level, bounds)
    low, high = bounds
    groups: dict[str, list[str]] = {}
    for target in sizes:
        groups.setdefault(group_of(target), []).append(target)
    group_raw = {group: raw[targets[0]] for group, targets in groups.items()}
    if any(raw[target] != group_raw[group] for group, targets in groups.items() for target in targets):
        raise HarnessError("an allocation gave different levels to targets it allocates together")
    group_size = {group: sum(sizes[target] for target in targets) for group, targets in groups.items()}
    total = sum(group_size.values())

    def clipped(shift: float) -> dict[str, float]:
        return {group: min(high, max(low, value + shift)) for group, value in group_raw.items()}

    def pruned(shift: float) -> float:
        return sum(group_size[group] * value for group, value in clipped(shift).items())

    lo, hi = -1.0 - max(group_raw.values()), 1.0 - min(group_raw.values())  # all at `low`, all at `high`
    for _ in range(SHIFT_STEPS):
        middle = (lo + hi) / 2
        lo, hi = (middle, hi) if pruned(middle) < level * total else (lo, middle)
    fractions = clipped((lo + hi) / 2)
    counts = {group: math.floor(fractions[group] * group_size[group]) for group in groups}
    remainder = round(level * total) - sum(counts.values())
    by_rest = sorted(groups, key=lambda group: counts[group] - fractions[group] * group_size[group])
    for group in by_rest[:remainder]:  # the groups floor() cut most get one weight more
        counts[group] += 1
    return {target: counts[group] / group_size[group] for group, targets in groups.items() for target in targets}


def plan(job, scores: Callable[[], dict[str, torch.Tensor]]) -> dict[str, float]:
    """Each target's fraction under the job's recipe's `allocation` (uniform for a recipe without one);
    `scores()` gives the targets' dense Wanda scores, which `owl` reads."""
    params = job.recipe.params
    name = params.get("allocation", DEFAULT)
    if name not in ALLOCATIONS:
        raise HarnessError(f"recipe {job.recipe.name}: unknown allocation '{name}' (available: {', '.join(ALLOCATIONS)})")
    if name == "owl" and not job.calibration:
        raise HarnessError(f"recipe {job.recipe.name}: allocation owl reads calibration activations; give it "
                           f"calibration samples (e.g. {job.recipe.base_name}@allocation=owl,samples=32)")
    weights = dict(job.model.named_parameters())
    request = Request(job.spec.name, job.recipe.pruning_name, {t: weights[t].numel() for t in job.targets}, job.sparsity,
                      (float(params.get("min_level", 0.0)) / 100, float(params.get("max_level", 100.0)) / 100),
                      params, scores)
    return ALLOCATIONS[name](request)


def planned(job) -> dict[str, float]:
    """`plan` with OWL's scores from one dense pass over the job's calibration batches (Wanda's |W| x ||X||)."""
    from harness import wanda

    return plan(job, lambda: {target: wanda.scores(job.model, target, norms)
                              for target, norms in wanda.dense_input_norms(job.model, job.targets,
                                                                           job.calibration).items()})


def by_level(job) -> list[tuple[float, list[str]]]:
    """The job's targets grouped by their planned level, for backends that prune one level at a time. Targets
    planned at 0 % are left out and those at 100 % zeroed here: pruning libraries refuse both levels."""
    groups: dict[float, list[str]] = {}
    for target, level in planned(job).items():
        groups.setdefault(level, []).append(target)
    params = dict(job.model.named_parameters())
    with torch.no_grad():
        for target in groups.pop(1.0, []):
            params[target].zero_()
    groups.pop(0.0, None)
    return sorted(groups.items())
