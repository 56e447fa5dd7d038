"""Pruning backends behind one small interface.

A backend is a module `harness/backends/<name>.py` (the name recipes give as `backend:`) with

    ARCHITECTURES: tuple[str, ...]     # architectures it can prune
    def prune(job: PruneJob) -> None   # sets job.model's target weights to the requested sparsity

Adding a backend (e.g. plain `torch.nn.utils.prune`) is one new file here and a recipe using it.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import pkgutil
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
