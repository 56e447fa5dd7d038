"""Reading a model's runs for the report: each run directory's manifest, the records its stages wrote
(layout's types) and its entries in the sweep ledger, plus the runs the ledger names that were never created."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from harness import layout, load
from harness.errors import HarnessError
from harness.paths import runs_dir
from harness.recipes import load_recipe, unquantized
from harness.rundir import RunDir, checked_prune_inputs, read_json, same_recipe_text, safe_name

REPORTED_STAGES = ("prune", "analyze", "bench", "eval")  # the stages whose outputs the report reads
EARLIER_MODEL = "pruned from an earlier entry of its model in harness/models.yaml"
EARLIER_RECIPE = "pruned with an earlier version of its recipe (its files or defaults changed since)"
EARLIER_INPUTS = "pruned with other inputs than the harness gives now (an earlier version of the harness)"
REDONE_BY_PRUNE = (EARLIER_MODEL, EARLIER_RECIPE, EARLIER_INPUTS)  # the other reason, a recipe gone, says what to do


@dataclass
class Run:
    """One run directory (or one the sweep ledger names but that was never created) and what it holds."""

    dir: RunDir
    manifest: dict = field(default_factory=dict)
    sparsity: layout.Sparsity | None = None
    structure: dict | None = None  # analysis/structure.json, as stored
    bench: layout.Bench | None = None
    evaluation: layout.Evaluation | None = None
    recovery: layout.Recovery | None = None  # recipes with a recovery section
    ledger: dict = field(default_factory=dict)  # stage -> its record in runs/<model>/sweep.json

    @classmethod
    def read(cls, run: RunDir, manifest: dict) -> "Run":
        return cls(run, manifest, sparsity=run.read(layout.SPARSITY_FILE, layout.Sparsity),
                   structure=run.read(layout.STAGE_OUTPUTS["analyze"], dict),
                   bench=run.read(layout.BENCH_FILE, layout.Bench),
                   evaluation=run.read(layout.EVAL_FILE, layout.Evaluation),
                   recovery=run.read(layout.RECOVERY_FILE, layout.Recovery))

    @property
    def recipe(self) -> str:
        return self.dir.recipe

    @property
    def level(self) -> float:
        return self.dir.level

    @property
    def path(self) -> Path:
        return self.dir.path

    @property
    def x(self) -> float:
        """Where the run sits on a sparsity axis: the achieved sparsity of its prunable weights, else its level."""
        return self.sparsity.achieved_percent if self.sparsity else self.level

    def has(self, stage: str) -> bool:
        """Whether `stage`'s output was read from the run directory."""
        output = {"prune": self.sparsity, "analyze": self.structure, "bench": self.bench, "eval": self.evaluation}
        return output[stage] is not None

    def stage_record(self, stage: str) -> dict:
        return self.manifest.get("stages", {}).get(stage) or {}

    @cached_property
    def outdated(self) -> str | None:
        """Why `make prune` would redo this run, or None: it was pruned with another inputs fingerprint than its
        model's registry entry and its recipe give now (`checked_prune_inputs`), or its recipe is gone."""
        if "recipe_text" not in self.manifest:
            return None  # never created, or not a prune stage's run
        try:
            recipe = load_recipe(self.manifest["recipe"])
            registry = load.registry()
        except HarnessError as exc:
            return str(exc)
        then = self.manifest.get("spec")
        now = registry[self.dir.model].to_dict() if self.dir.model in registry else then
        if checked_prune_inputs(self.manifest, now, recipe.text, recipe.params, self.level) \
                == self.stage_record("prune").get("inputs"):
            return None
        changes = {EARLIER_MODEL: as_json(now) != then,
                   EARLIER_RECIPE: not same_recipe_text(recipe.text, self.manifest["recipe_text"])
                                   or as_json(recipe.params) != self.manifest.get("params")}
        return next((reason for reason, changed in changes.items() if changed), EARLIER_INPUTS)


def as_json(value):
    """`value` as it reads back from a manifest (tuples become lists)."""
    return json.loads(json.dumps(value))


@dataclass
class ModelRuns:
    """All runs of one model, sorted by recipe then level."""

    model: str
    directory: Path
    runs: list[Run]

    @property
    def spec(self) -> dict:
        return next((run.manifest["spec"] for run in self.runs if run.manifest.get("spec")), {})

    @property
    def name(self) -> str:
        return next((run.manifest["model"] for run in self.runs if run.manifest.get("model")), self.model)

    @property
    def shape_only(self) -> bool:
        return bool(self.spec.get("shape_only"))

    @property
    def recipes(self) -> list[str]:
        return sorted({run.recipe for run in self.runs})

    def with_output(self, stage: str) -> list[Run]:
        return [run for run in self.runs if run.has(stage)]

    def expected_stages(self) -> list[str]:
        return [stage for stage in REPORTED_STAGES if not (stage == "eval" and self.shape_only)]

    def expects(self, run: Run, stage: str) -> bool:
        """Whether a missing output of an expected stage is a gap for `run`. A shape-only run that a sweep ran expects
        only the stages the sweep was asked for (`make bench-shapes` prunes and analyses INC's runs)."""
        return not (self.shape_only and run.ledger and stage not in run.ledger)


def fp32_recipe(recipe: str) -> str | None:
    """The FP32 recipe that a composed INT8 recipe quantizes (any other recipe: itself); None for a recipe since
    renamed or removed (the coverage section says so)."""
    try:
        return unquantized(recipe)
    except HarnessError:
        return None


def read_ledger(model_dir: Path) -> dict:
    """`runs/<model>/sweep.json` as {(recipe, level): {stage: record}}; empty without a sweep."""
    try:
        entries = read_json(model_dir / layout.SWEEP_FILE).get("runs", {})
    except (OSError, ValueError):
        return {}
    ledger = {}
    for key, stages in entries.items():
        recipe, _, level = key.rpartition("/")
        try:
            ledger[(recipe, float(level))] = stages
        except ValueError:
            continue
    return ledger


def collect(model: str) -> ModelRuns:
    """Every run directory of a model (found by its manifest) plus the runs its sweep ledger names."""
    model_dir = runs_dir() / safe_name(model)
    runs: dict[tuple[str, float], Run] = {}
    for manifest_path in sorted(model_dir.rglob(layout.MANIFEST)):
        relative = manifest_path.relative_to(model_dir).parts
        if relative[0] == layout.SENSITIVITY_SUBDIR or any(part.startswith(".") for part in relative):  # sensitivity results; staging dirs
            continue
        try:
            manifest = read_json(manifest_path)
            run = RunDir(model, manifest["recipe"], float(manifest["level"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if run.path == manifest_path.parent:
            runs[(run.recipe, run.level)] = Run.read(run, manifest)
    for (recipe, level), stages in read_ledger(model_dir).items():
        runs.setdefault((recipe, level), Run(RunDir(model, recipe, level))).ledger = stages
    if not runs:
        raise HarnessError(f"no run directories for model '{model}' under {runs_dir()}: "
                           f"run `make sweep MODEL={model}` first")
    return ModelRuns(model, model_dir, sorted(runs.values(), key=lambda r: (r.recipe, r.level)))


def models_with_runs() -> list[str]:
    """Model directory names under the runs root that hold a run or a sweep ledger."""
    root = runs_dir()
    if not root.is_dir():
        return []
    return sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")
                  and ((d / layout.SWEEP_FILE).exists() or any(d.rglob(layout.MANIFEST))))
