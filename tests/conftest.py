"""Shared fixtures and run builders: every test session writes runs into a temporary directory, never into runs/."""
import contextlib
import os
import shutil

import pytest
import torch

from harness import environment, load, recovery, sparsity
from harness.layout import MANIFEST, MODEL_SUBDIR, SPARSITY_FILE, to_json
from harness.rundir import RunDir, fingerprint, stage_run, staging_dir, write_json


# A run of the suite writes about 2.2 GB of runs under the temporary directory (and builds ~1 GB of tiny models
# in .cache/). On a full disk dozens of tests fail with scattered "No space left on device": say it once instead.
NEEDED_FREE_GB = 4


@pytest.fixture(autouse=True, scope="session")
def isolated_runs(tmp_path_factory):
    free = shutil.disk_usage(tmp_path_factory.getbasetemp()).free / 1e9
    if free < NEEDED_FREE_GB:
        pytest.exit(f"the tests need about {NEEDED_FREE_GB} GB of free disk under {tmp_path_factory.getbasetemp()}, "
                    f"{free:.1f} GB is free", returncode=2)
    os.environ["HARNESS_RUNS"] = str(tmp_path_factory.mktemp("runs"))
    os.environ["HARNESS_REPORTS"] = str(tmp_path_factory.mktemp("reports"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    environment.configure()
    yield


RECIPE = "fixture/magnitude"  # run directories written here, not by a real recipe


def write_run(model: str, level: float) -> RunDir:
    """A run directory laid out like the prune stage's, pruned here by per-tensor magnitude."""
    spec = load.resolve_spec(model)
    run = RunDir(spec.name, RECIPE, float(level))
    if run.exists():
        return run
    with staging_dir(run.path) as tmp:
        write_json(tmp / MANIFEST, {"model": spec.name, "spec": spec.to_dict(), "recipe": RECIPE, "level": level})
        with stage_run(tmp / MANIFEST, "prune", fingerprint(model, level)):
            loaded = load.load_model(spec)
            targets = sparsity.prunable_names(loaded.model)
            params = dict(loaded.model.named_parameters())
            with torch.no_grad():
                for name in targets:
                    flat = params[name].view(-1)
                    flat[flat.abs().argsort()[:int(flat.numel() * level / 100)]] = 0
            loaded.model.save_pretrained(tmp / MODEL_SUBDIR, safe_serialization=True)
            loaded.tokenizer.save_pretrained(tmp / MODEL_SUBDIR)
            write_json(tmp / SPARSITY_FILE, to_json(sparsity.measure(tmp / MODEL_SUBDIR, targets, level)))
    return run


@contextlib.contextmanager
def killed_after(losses: int):
    """Training raises KeyboardInterrupt (as Ctrl-C would) at its `losses + 1`-th distillation loss."""
    real_loss, calls = recovery.distillation_loss, []

    def killed(*args):
        calls.append(1)
        if len(calls) > losses:
            raise KeyboardInterrupt
        return real_loss(*args)

    recovery.distillation_loss = killed
    try:
        with pytest.raises(KeyboardInterrupt):
            yield
    finally:
        recovery.distillation_loss = real_loss
