"""Pruning backends behind one small interface.

A backend is a module `harness/backends/<name>.py` (the name recipes give as `backend:`) with

    ARCHITECTURES: tuple[str, ...]     # architectures it can prune
    def prune(job: PruneJob) -> None   # sets job.model's target weights to the requested sparsity

Adding a backend (e.g. plain `torch.nn.utils.prune`) is one new file here and a recipe using it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import pkgutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable

from harness.errors import HarnessError
from harness.load import ModelSpec
from harness.recipes import Recipe


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

    def rendered(self, **extra) -> dict:
        """The recipe body with sparsity, targets and params filled in."""
        return self.recipe.render(self.sparsity, self.targets, **extra)

    @property
    def target_modules(self) -> list[str]:
        """Module names of the target weights (`...fc1.weight` -> `...fc1`)."""
        return [name.rsplit(".", 1)[0] for name in self.targets]


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
def quiet(logger: logging.Logger):
    """Lower a library's logger to WARNING for the duration (SparseML and INC log every layer at INFO)."""
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def backend_names() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def get_backend(name: str) -> ModuleType:
    if name not in backend_names():
        raise HarnessError(f"unknown pruning backend '{name}' (available: {', '.join(backend_names())})")
    return importlib.import_module(f"{__name__}.{name}")
