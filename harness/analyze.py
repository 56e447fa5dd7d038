"""Stage 3, analyze: how much of a model is (near) zero, overall, per layer, per module type and per section.

MODEL is a run directory (or a model with --level/--recipe: its run), or a model itself (alias, Hub
id, checkpoint). The measuring is `harness.structure`, the files besides structure.json are
`harness.structure_files`. Outputs go to `<run dir>/analysis/` for a pruned run, else to
`runs/<model>/analysis/`:
    structure.json   counts, fractions and |w| statistics per group, and one entry per tensor
    a CSV with one row per tensor, summary.md (short tables the report links to), and three plots
    (names in harness/layout.py)
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from harness import load, sparsity
from harness.errors import HarnessError
from harness.layout import ANALYSIS_FILES, ANALYSIS_SUBDIR, SPARSITY_FILE, STRUCTURE_JSON, Sparsity
from harness.paths import runs_dir
from harness.rundir import (WEIGHT_SUFFIXES, PeakMemory, RunDir, discarded_note, fingerprint, read_json, safe_name,
                            stage_run, staging_dir)
from harness.runargs import add_run_arguments, resolve_run, run_directory
from harness.structure import (ABSOLUTE_THRESHOLDS, RELATIVE_THRESHOLDS, ZERO, Thresholds, abs_key, measure_structure,
                               parse_thresholds)
from harness.structure_files import write_outputs

STAGE = "analyze"
HEATMAP_THRESHOLD = 1e-2


@dataclass(frozen=True)
class Subject:
    """The checkpoint to analyse, where the results go, and the run directory if it is a pruned run."""

    spec: load.ModelSpec
    weights_dir: Path
    out_dir: Path
    run: RunDir | None = None


def resolve_subject(model: str, recipe: str | None = None, level=None) -> Subject:
    """MODEL as a run directory path, as model + level (+ recipe) of a run, or as an alias / Hub id / checkpoint."""
    if recipe is not None and level is None:
        raise HarnessError("--recipe addresses a run directory and needs --level too (or pass the run directory as MODEL)")
    run = run_directory(model) if level is None else resolve_run(model, recipe, level)
    if run is None:
        spec = load.resolve_spec(model)
        return Subject(spec, load.checkpoint_dir(spec), runs_dir() / safe_name(spec.name) / ANALYSIS_SUBDIR)
    run.require("prune")
    if not (run.path / SPARSITY_FILE).exists():
        raise HarnessError(f"{run.path} has no {SPARSITY_FILE}: rerun `make prune` for it with ARGS=--force")
    return Subject(load.resolve_spec(str(run.path)), run.model_dir, run.path / ANALYSIS_SUBDIR, run)


def weight_files(subject: Subject) -> list[Path]:
    """The checkpoint's safetensors files, or one clear line saying why there are none."""
    files = sorted(subject.weights_dir.glob("*.safetensors"))
    if files:
        return files
    others = sorted(p.name for p in subject.weights_dir.iterdir() if p.name.endswith(WEIGHT_SUFFIXES))
    if others:
        raise HarnessError(
            f"{subject.weights_dir} holds {others[0]} but analyze reads only safetensors; convert it once with "
            f"`python -c \"import transformers as t; t.{subject.spec.model_class}.from_pretrained('{subject.weights_dir}')"
            f".save_pretrained('CONVERTED', safe_serialization=True)\"` and pass MODEL=CONVERTED")
    raise HarnessError(discarded_note(subject.weights_dir) or f"{subject.weights_dir} has no weights (no *.safetensors file)")


def prunable_tensors(subject: Subject) -> list[str]:
    """A run's pruned tensors (sparsity.json), else the default targets of sparsity.prunable_names.

    The default set is computed on the model's skeleton instantiated on the meta device, so no
    weights are allocated.
    """
    if subject.run:
        return subject.run.read(SPARSITY_FILE, Sparsity).prunable_tensors
    import transformers

    config = transformers.AutoConfig.from_pretrained(subject.weights_dir)
    with torch.device("meta"):
        skeleton = getattr(transformers, subject.spec.model_class).from_config(config)
    return sparsity.prunable_names(skeleton)


def _weights_identity(subject: Subject):
    """What changes when the weights change: a run's prune record (its weights may since have been
    discarded to save disk), else the checkpoint files' names, sizes and times."""
    if subject.run:
        record = subject.run.stage_record("prune")
        return record.get("inputs"), record.get("finished")
    return [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in weight_files(subject)]


def _is_current(subject: Subject, inputs: str) -> bool:
    if subject.run:
        return subject.run.is_current(STAGE, inputs, [f"{ANALYSIS_SUBDIR}/{name}" for name in ANALYSIS_FILES])
    structure = subject.out_dir / STRUCTURE_JSON
    return (all((subject.out_dir / name).exists() for name in ANALYSIS_FILES)
            and read_json(structure).get("inputs") == inputs)


def analyze(model: str, recipe: str | None = None, level=None, thresholds: Thresholds = Thresholds(),
            heatmap_threshold: float = HEATMAP_THRESHOLD, force: bool = False) -> Path:
    """Analyse a model or run directory; returns the analysis directory."""
    subject = resolve_subject(model, recipe, level)
    thresholds = Thresholds(tuple(sorted(set(thresholds.absolute) | {heatmap_threshold})), thresholds.relative)
    inputs = fingerprint(subject.spec.to_dict(), _weights_identity(subject),
                         thresholds.absolute, thresholds.relative, heatmap_threshold)
    if not force and _is_current(subject, inputs):
        print(f"analyze: {subject.out_dir} is up to date (use --force to redo)")
        return subject.out_dir
    files = weight_files(subject)

    recording = stage_run(subject.run.manifest_path, STAGE, inputs) if subject.run else contextlib.nullcontext({})
    with recording as record, staging_dir(subject.out_dir) as tmp:
        start = time.time()
        with PeakMemory() as memory:
            structure = measure_structure(subject.weights_dir, subject.spec, thresholds, prunable_tensors(subject))
        structure = {
            "model": subject.spec.name, "architecture": subject.spec.architecture,
            "weights": str(subject.weights_dir), "weights_bytes": sum(f.stat().st_size for f in files),
            "run": _run_info(subject, structure), "inputs": inputs,
            "wall_time_s": round(time.time() - start, 2), "peak_rss_mb": memory.peak_mb,
            "heatmap_measure": abs_key(heatmap_threshold), **structure,
        }
        write_outputs(structure, tmp)
        overall = structure["overall"]["all"]
        record.update(outputs=[f"{ANALYSIS_SUBDIR}/{name}" for name in ANALYSIS_FILES], params=overall["params"],
                      zero_fraction=overall["fractions"][ZERO])
    print(f"analyze: {subject.spec.name}: {overall['params']:,} weights, "
          + ", ".join(f"{label} {100 * overall['fractions'][key]:.3g}%" for key, label in structure["measures"].items())
          + f"; peak memory {structure['peak_rss_mb']:.0f} MB -> {subject.out_dir}")
    return subject.out_dir


def _run_info(subject: Subject, structure: dict) -> dict | None:
    if not subject.run:
        return None
    target = subject.run.read(SPARSITY_FILE, Sparsity).target_percent / 100
    prunable = structure["overall"].get("prunable")
    return {"path": str(subject.run.path), "recipe": subject.run.recipe, "level": subject.run.level,
            "target_fraction": target, "achieved_fraction": prunable["fractions"][ZERO] if prunable else None}


def add_arguments(parser) -> None:
    add_run_arguments(parser, level_default=None)  # no --level: the model itself
    parser.add_argument("--thresholds", default=",".join(f"{t:g}" for t in ABSOLUTE_THRESHOLDS),
                        help="comma-separated absolute |w| thresholds (default %(default)s)")
    parser.add_argument("--relative", default=",".join(f"{k:g}" for k in RELATIVE_THRESHOLDS),
                        help="comma-separated k: also count |w| < k * std of each tensor (default %(default)s)")
    parser.add_argument("--heatmap-threshold", default=f"{HEATMAP_THRESHOLD:g}",
                        help="absolute threshold shown in the layer x module-type heatmap (default %(default)s)")
    parser.add_argument("--force", action="store_true", help="redo even if the analysis is up to date")


def main(args) -> None:
    thresholds = Thresholds(parse_thresholds(args.thresholds, "--thresholds"), parse_thresholds(args.relative, "--relative"))
    heatmap_thresholds = parse_thresholds(args.heatmap_threshold, "--heatmap-threshold")
    if len(heatmap_thresholds) != 1:
        raise HarnessError(f"--heatmap-threshold takes one number, got {args.heatmap_threshold!r}")
    heatmap_threshold = heatmap_thresholds[0]
    analyze(args.model, args.recipe, args.level, thresholds, heatmap_threshold, args.force)
