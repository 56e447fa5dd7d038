"""Run directories: `runs/<model>/<recipe>/<level>/`, their JSON manifest and atomic artifact writes.

Every stage reads its inputs from and writes its outputs to a run directory, and records what it
did in `manifest.json` under `stages.<name>`, so any stage can be rerun alone and a sweep can skip
what is already finished.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import psutil
import yaml

from harness.errors import HarnessError
from harness.layout import DERIVED_COPIES, DISCARDED_NOTE, MANIFEST, MODEL_SUBDIR, RESUME_SUFFIX, SPARSITY_FILE, Record, \
    read_record
from harness.monitor import PeakMemory, stall_watch
from harness.paths import runs_dir

PRUNE_SEED = 0  # prune seeds random, numpy and torch with it, so it is one of the prune stage's inputs
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
STAGING_NAME = re.compile(r"\.(?P<final>.+)\.(?:tmp|old)-(?P<pid>\d+)-.+")  # see staging_dir
TRACKED_PACKAGES = (
    "torch", "transformers", "sparseml", "deepsparse", "neural-compressor", "onnx", "onnxruntime",
    "optimum", "optimum-onnx", "lm-eval", "compressed-tensors", "gguf", "numpy",
)


def safe_name(name: str) -> str:
    """A model alias, Hub id or path turned into one path component."""
    return re.sub(r"[^A-Za-z0-9._-]+", "__", name.strip("/")).strip("_") or "model"


def parse_level(value: Any) -> float:
    """Validate a sparsity level in percent: a number in [0, 100)."""
    try:
        level = float(value)
    except (TypeError, ValueError):
        raise HarnessError(f"LEVEL must be a number in [0, 100), got {value!r}") from None
    if not 0 <= level < 100:
        raise HarnessError(f"LEVEL must be in [0, 100) (percent of prunable weights set to zero), got {value!r}")
    return level


def level_name(level: float) -> str:
    """`90.0` -> `"90"`, `99.5` -> `"99.5"`: the directory name of a level."""
    return f"{level:g}"


def package_versions() -> dict[str, str]:
    versions = {}
    for name in TRACKED_PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write a file so that readers see either the old or the complete new content, never half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "wb" if isinstance(data, bytes) else "w"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            handle.write(data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: Path) -> Any:
    with open(path) as handle:
        return json.load(handle)


def fingerprint(*parts: Any) -> str:
    """A short stable hash of a stage's inputs, to tell whether a finished stage is still current."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def prune_inputs(spec: dict, recipe_text: str, recipe_params: dict, level: float) -> str:
    """The prune stage's inputs fingerprint (`stages.prune.inputs`): a run pruned with the same one is current.
    Here, not in `harness.prune`, so the report tells an outdated run the same way without loading the backends."""
    return fingerprint(spec, recipe_text, recipe_params, level, PRUNE_SEED)


def checked_prune_inputs(manifest: dict, spec: dict, recipe_text: str, recipe_params: dict, level: float) -> str:
    """`prune_inputs` to compare with a run's recorded ones (`manifest`): a recipe text that differs from the
    run's only in comments and layout counts as the run's, so editing a recipe's comments leaves its runs current."""
    recorded = manifest.get("recipe_text")
    if recorded and same_recipe_text(recorded, recipe_text):
        recipe_text = recorded
    return prune_inputs(spec, recipe_text, recipe_params, level)


def same_recipe_text(one: str, other: str) -> bool:
    """Whether two recipe texts say the same: equal, or the same YAML tokens (they differ only in comments and
    layout; a text that does not scan must be equal)."""
    if one == other:
        return True
    tokens = _yaml_tokens(one)
    return tokens is not None and tokens == _yaml_tokens(other)


def _yaml_tokens(text: str) -> list | None:
    """The YAML tokens of `text` (its content without comments and layout), or None when it does not scan."""
    try:
        return [(type(token).__name__, getattr(token, "value", None)) for token in yaml.scan(text)]
    except yaml.YAMLError:
        return None


@dataclass(frozen=True)
class RunDir:
    """One model x recipe x level. `path` may not exist yet (before prune)."""

    model: str
    recipe: str
    level: float

    @property
    def relative(self) -> str:
        """Its path under the runs root: the same on every machine (a Ray node has its own root)."""
        return f"{safe_name(self.model)}/{self.recipe}/{level_name(self.level)}"

    @property
    def path(self) -> Path:
        return runs_dir() / self.relative

    @property
    def model_dir(self) -> Path:
        return self.path / MODEL_SUBDIR

    @property
    def resume_dir(self) -> Path:
        """Beside the run, not in its staging directory: it must outlive an interrupted prune."""
        return self.path.with_name(f".{self.path.name}{RESUME_SUFFIX}")

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    def exists(self) -> bool:
        return self.manifest_path.exists() and self.model_dir.exists()

    def require(self, *stages: str) -> "RunDir":
        """Fail with one clear line if this run directory, or one of `stages` in it, is not finished yet."""
        target = f"MODEL={self.model} LEVEL={level_name(self.level)} RECIPE={self.recipe}"
        if not self.exists():
            raise HarnessError(f"no run directory {self.path} - run `make prune {target}` first")
        for stage in stages:
            if (self.stage_record(stage) or {}).get("status") != "done":
                raise HarnessError(f"{self.path} has no finished {stage} stage - run `make {stage} {target}` first")
        return self

    def manifest(self) -> dict:
        return read_json(self.manifest_path) if self.manifest_path.exists() else {}

    def stage_record(self, stage: str) -> dict | None:
        return self.manifest().get("stages", {}).get(stage)

    def is_current(self, stage: str, inputs_fingerprint: str, outputs: list[str]) -> bool:
        """True when `stage` finished with the same inputs and all its outputs are still on disk."""
        record = self.stage_record(stage)
        return bool(
            record
            and record.get("status") == "done"
            and record.get("inputs") == inputs_fingerprint
            and all((self.path / out).exists() for out in outputs)
        )

    def is_pruned(self, spec: dict, recipe_text: str, recipe_params: dict) -> bool:
        """True when prune finished here with these inputs (`checked_prune_inputs`) and its checkpoint and
        sparsity are still on disk: what a prune, or a composed recipe starting from this run, may skip."""
        inputs = checked_prune_inputs(self.manifest(), spec, recipe_text, recipe_params, self.level)
        return self.is_current("prune", inputs, [MODEL_SUBDIR, SPARSITY_FILE])

    def read(self, name: str, kind: type[Record]) -> Record | None:
        """The record stored in file `name` of this run (a layout name), or None when it is not there."""
        return read_record(self.path / name, kind)

    def discard_artifacts(self) -> int:
        """Delete the checkpoint's weight files and the derived model-sized copies (the ONNX export, the
        compressed copy, the INT8 checkpoint) to save disk, keeping every result and the manifest; returns the bytes freed.

        The stages' records stay valid (their results were computed before), so a rerun skips them;
        loading the model says how to recreate the weights instead of failing obscurely.
        """
        doomed = [p for p in self.model_dir.iterdir() if p.name.endswith(WEIGHT_SUFFIXES)] if self.model_dir.exists() else []
        doomed += [self.path / name for name in DERIVED_COPIES if (self.path / name).exists()]
        if not doomed:
            return 0
        freed = sum(f.stat().st_size for p in doomed for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file())
        level = level_name(self.level)
        write_atomic(self.model_dir / DISCARDED_NOTE,
                     f"The weights of this run were deleted on {time.strftime('%Y-%m-%d %H:%M')} to save disk "
                     f"(sweep --discard-artifacts); its results stand. Recreate them with: "
                     f"python -m harness prune --model {self.model} --level {level} --recipe {self.recipe} --force\n")
        for path in doomed:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        manifest = self.manifest()
        manifest["discarded"] = {"at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "bytes": freed,
                                 "paths": sorted(str(p.relative_to(self.path)) for p in doomed)}
        write_json(self.manifest_path, manifest)
        return freed


def discarded_note(weights_dir: Path) -> str | None:
    """Why `weights_dir` has no weights, if they were discarded on purpose (see RunDir.discard_artifacts)."""
    note = Path(weights_dir) / DISCARDED_NOTE
    has_weights = any(p.name.endswith(WEIGHT_SUFFIXES) for p in Path(weights_dir).iterdir()) if note.exists() else True
    return None if has_weights else note.read_text().strip()


def record_stage(manifest_path: Path, stage: str, record: dict) -> None:
    """Store a stage's record under `stages.<stage>` in a manifest (atomically)."""
    manifest = read_json(manifest_path) if manifest_path.exists() else {}
    manifest.setdefault("stages", {})[stage] = record
    write_json(manifest_path, manifest)


@contextlib.contextmanager
def stage_run(manifest_path: Path, stage: str, inputs_fingerprint: str, details: dict | None = None) -> Iterator[dict]:
    """Time a stage, track its peak memory, warn when it stalls, and record it in the manifest when it completes.

    The body may add entries to the yielded dict; they are stored in the stage's manifest record.
    Nothing is recorded if the body raises, so an interrupted stage is redone next time.
    """
    extra: dict = dict(details or {})
    start = time.time()
    with PeakMemory() as memory, stall_watch(f"{stage} stage of {final_path(manifest_path.parent)}"):
        yield extra
    record_stage(manifest_path, stage, {
        "status": "done",
        "inputs": inputs_fingerprint,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "wall_time_s": round(time.time() - start, 2),
        "peak_rss_mb": memory.peak_mb,
        **({"children_peak_rss_mb": memory.children_peak_mb} if memory.children_peak_bytes else {}),
        "command": " ".join(sys.argv),
        "versions": package_versions(),
        **extra,
    })


def require_free_space(directory: Path, needed_bytes: int, what: str) -> None:
    """Fail with one clear line, before any writing, when `directory`'s disk cannot hold `needed_bytes`."""
    directory.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(directory).free
    if free < needed_bytes:
        raise HarnessError(f"not enough disk space for {what}: needs about {needed_bytes / 1e9:.1f} GB, "
                           f"{free / 1e9:.1f} GB free under {directory}; free some space (e.g. `make clean`, "
                           f"or sweep --discard-artifacts) or point HARNESS_RUNS at a larger disk")


@contextlib.contextmanager
def staging_dir(final: Path) -> Iterator[Path]:
    """A temporary directory beside `final` that replaces it only if the body completes.

    An interrupted or failed run leaves nothing at `final` (the old content, if any, stays until the
    new one is complete), nor the directories it had to create above it.
    """
    created = [d for d in final.parents if not d.exists()]  # deepest first
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_orphaned_staging(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=final.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the final directory gets the usual permissions
    try:
        yield tmp
        if final.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-{os.getpid()}-", dir=final.parent))
            os.replace(final, trash / final.name)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if not final.exists():
            with contextlib.suppress(OSError):  # stops at one that is not empty: something else lives there now
                for directory in created:
                    directory.rmdir()


def remove_orphaned_staging(final: Path) -> None:
    """Delete the staging directories of `final` whose process is gone (killed before it could clean up:
    each can hold a model-sized checkpoint or export)."""
    for path in final.parent.iterdir():
        match = STAGING_NAME.fullmatch(path.name)
        if match and match["final"] == final.name and path.is_dir() and not psutil.pid_exists(int(match["pid"])):
            shutil.rmtree(path, ignore_errors=True)


def final_path(path: Path) -> Path:
    """The directory that staging directory `path` becomes when its body completes; `path` if it is not one."""
    match = STAGING_NAME.fullmatch(path.name)
    return path.with_name(match["final"]) if match else path
