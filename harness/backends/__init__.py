"""Pruning backends behind one typed contract, `Backend`, and the registry of them.

A backend is a module in this package that provides what `Backend` lists (its NAME, the
ARCHITECTURES it prunes, the LEVEL_HINT shown when a recipe misses its level, `schedule` and
`prune`) and is named in REGISTRY. Adding a backend (e.g. plain `torch.nn.utils.prune`) is one
module here, one REGISTRY entry and a recipe using it. The checks common to every backend (the
schedule's calibration data and training budget, the level reached) are made once, by the prune stage.
A backend whose schedule trains (gradual pruning) does not train itself: it calls `job.train` with its
hooks, and the prune stage's trainer (`harness.recovery`: distillation on training text) runs them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Protocol, runtime_checkable

from harness.errors import HarnessError
from harness.load import ModelSpec

if TYPE_CHECKING:  # recipes imports this package to check backend names: no import back at run time
    from harness.recipes import Recipe

# backend name, as recipes give it in `backend:` -> the module providing `Backend`
REGISTRY = {
    "sparseml": "harness.backends.sparseml",
    "inc": "harness.backends.inc",
}


@dataclass
class PruneJob:
    """Everything a backend needs. `calibration` holds tokenized batches (dicts of tensors)."""

    model: Any
    tokenizer: Any
    spec: ModelSpec
    recipe: Recipe
    sparsity: float  # fraction in [0, 1)
    targets: list[str]  # parameter names to prune
    calibration: list[dict] = field(default_factory=list)
    progress: Callable[[str], Any] = print
    # Trains through the recipe's schedule, calling the schedule's `harness.recovery.Hooks` around each
    # step, and returns the `layout.Recovery` record (its `steps`); set by the prune stage for recipes that train.
    train: Callable[[Any], Any] | None = None

    def rendered(self, **extra) -> dict:
        """The recipe body with sparsity, targets and params filled in."""
        return self.recipe.render(self.sparsity, self.targets, **extra)

    @property
    def target_modules(self) -> list[str]:
        """Module names of the target weights (`...fc1.weight` -> `...fc1`)."""
        return [name.rsplit(".", 1)[0] for name in self.targets]


@dataclass(frozen=True)
class Schedule:
    """What a recipe's schedule needs besides the model, known before anything is loaded."""

    steps: int  # training steps; 0 for a one-shot recipe
    calibrates: bool = False  # reads calibration batches (SparseGPT)


@runtime_checkable
class Backend(Protocol):
    """What a backend module provides."""

    NAME: str  # its REGISTRY key
    ARCHITECTURES: tuple[str, ...]  # architectures it can prune
    LEVEL_HINT: str  # what to check in a recipe whose result misses the level

    def schedule(self, recipe: Recipe, sparsity: float) -> Schedule:
        """The recipe's schedule at `sparsity` (a fraction), read from its rendered text."""

    def prune(self, job: PruneJob) -> None:
        """Set `job.targets` in `job.model` to `job.sparsity`."""


def backend_names() -> list[str]:
    return sorted(REGISTRY)


def get_backend(name: str) -> Backend:
    if name not in REGISTRY:
        raise HarnessError(f"unknown pruning backend '{name}' (available: {', '.join(backend_names())})")
    module = importlib.import_module(REGISTRY[name])
    if not isinstance(module, Backend) or module.NAME != name:
        raise TypeError(f"{REGISTRY[name]} is registered as backend '{name}' but does not provide "
                        f"harness.backends.Backend with NAME '{name}'")
    return module


GROUP_BYTES = 1_000_000_000  # target weights per group of a layer-wise one-shot prune
GROUP_WORKERS = 2  # groups pruned at once by default


def in_groups(job: PruneJob, prune_group: Callable[[PruneJob], None], workers: int = GROUP_WORKERS) -> None:
    """Run `prune_group` on sub-jobs of about GROUP_BYTES of target weights each, `workers` at a time.

    For layer-wise one-shot recipes only: each layer's mask depends on that layer alone, so the groups
    give the same masks as the whole job, while a library's scores and masks (each as large as the
    weights they cover) exist for a few groups at a time; for a whole 1.5B model at once they took
    more than 24 GiB. Groups may run in threads on disjoint weights (SparseML's thresholds,
    torch.kthvalue, use one core each).
    """
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda group: prune_group(dataclasses.replace(job, targets=group)),
                      weight_groups(job.model, job.targets, GROUP_BYTES)))


def weight_groups(model, targets: list[str], max_bytes: int) -> list[list[str]]:
    """`targets` in order, cut into groups of at most `max_bytes` of weights (at least one each)."""
    params = dict(model.named_parameters())
    groups, size = [[]], 0
    for name in targets:
        tensor_bytes = params[name].numel() * params[name].element_size()
        if groups[-1] and size + tensor_bytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += tensor_bytes
    return groups


@contextlib.contextmanager
def quiet(logger: logging.Logger, threshold: int = logging.WARNING):
    """Raise a library's logger to `threshold` for the duration (SparseML and INC log every layer at INFO)."""
    level = logger.level
    logger.setLevel(threshold)
    try:
        yield
    finally:
        logger.setLevel(level)
