"""The sweep's grid as Ray tasks, on a local Ray instance or a cluster (`sweep --executor ray`).

Each run (model x recipe x level) is a chain of Ray tasks, one per segment of its stages: the
stages before bench, bench, the stages after it. Each runs the sweep's own `run_level` on the node
with every stage in a fresh process, in a node-local runs directory: the run's current state comes
in as a tar archive through Ray's object store and goes back out the same way, and the driver
unpacks it beside its own run directory and renames it into place. So nodes need no shared
filesystem, and a task whose node dies leaves nothing behind (Ray retries it, `MAX_RETRIES` times).
Resources are Ray's: every task asks for memory estimated from the model's parameter count; every
node offers one `harness_node` slot, of which a bench takes all (plus the nodes' CPUs) and any
other task a sliver, so no harness task runs beside a timing. The segments from bench on wait for
level 0 of their model and recipe, whose run they compare with. The prune of a composed recipe
(`<pruning>+distil`, `...+int8`) gets the runs of its earlier parts at its level, from the grid or the driver,
so it starts from them as it does locally (`prune.starting_run`) instead of pruning again on the node.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import json
import os
import socket
import tarfile
import tempfile
from collections import Counter
from pathlib import Path
from typing import Iterator

import numpy as np
import ray
from tqdm import tqdm

from harness import load
from harness.errors import HarnessError
from harness.paths import PROJECT_ROOT, data_dir
from harness.recipes import earlier_steps, load_recipe
from harness.rundir import RunDir, read_json, record_stage, staging_dir
from harness.sweep import GridRun, LevelOptions, run_level

SLOT = "harness_node"  # custom resource, 1 per node: a bench takes the whole slot
SHARE = 0.001  # what any other task takes of it
MAX_RETRIES = 2  # reruns of a task whose worker or node died
BYTES_PER_PARAM = 10  # prune / export / bench peak memory per fp32 parameter (gpt2xl-shape: 15.6 GB)
MIN_MEMORY = 1 << 30
UNKNOWN_MEMORY = 4 << 30  # for a model whose configuration is not at hand (a GGUF file, an uncached Hub id)
NEEDS_BASELINE = {"bench", "eval"}  # stages that compare with level 0


def run_grid(grid: list[GridRun], stages: list[str], options: LevelOptions) -> Iterator[tuple[GridRun, dict]]:
    """Run the grid on Ray; yields (run, {stage: status}) as runs finish, each one already in place."""
    started = _connect()
    try:
        limits = _cluster_limits()
        finals = _submit(grid, stages, options, limits)
        yield from _collect(finals, stages)
    finally:
        if started:
            ray.shutdown()


def _connect() -> bool:
    """Join RAY_ADDRESS's cluster, or start a local instance sized to this machine; True if this call connected."""
    if ray.is_initialized():
        return False
    path = os.pathsep.join(p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH")) if p)
    runtime_env = {"env_vars": {"PYTHONPATH": path}}  # each node has the project at the same path
    if os.environ.get("RAY_ADDRESS"):
        context = ray.init(runtime_env=runtime_env)
    else:
        context = ray.init(resources={SLOT: 1}, runtime_env=runtime_env)
    if context.dashboard_url:
        tqdm.write(f"sweep: Ray dashboard at http://{context.dashboard_url}")
    return True


@dataclasses.dataclass(frozen=True)
class ClusterLimits:
    bench_cpus: float  # the fewest CPUs of a node: what a bench asks for, besides the whole slot
    memory: float  # the most memory a node offers: no request may exceed it, or the task never starts


def _cluster_limits() -> ClusterLimits:
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"] and n["Resources"].get(SLOT)]
    if not nodes:
        raise HarnessError(f"no node of the Ray cluster offers the {SLOT!r} resource: start each node with "
                           f"`ray start ... --resources='{{\"{SLOT}\": 1}}'` (see README, Scaling out)")
    return ClusterLimits(min(n.get("CPU", 1) for n in nodes), max(n.get("memory", MIN_MEMORY) for n in nodes))


def _submit(grid: list[GridRun], stages: list[str], options: LevelOptions,
            limits: ClusterLimits) -> dict[ray.ObjectRef, GridRun]:
    """Each run's chain of segment tasks, level 0 first; returns each run's last task's result."""
    finals: dict[tuple, ray.ObjectRef] = {}
    stored: dict[tuple, ray.ObjectRef | None] = {}  # runs already on the driver, shipped once
    specs = {cell.spec.name: cell.spec for cell in grid}
    memory = {name: min(estimated_memory(spec), limits.memory) for name, spec in specs.items()}
    for cell in sorted(grid, key=lambda c: (c.level != 0, len(earlier_steps(c.recipe)))):  # what others wait for first
        baseline_id = (cell.spec.name, cell.recipe, 0.0)
        baseline = None if not cell.level else \
            finals[baseline_id] if baseline_id in finals else _stored(RunDir(*baseline_id), stored)
        state = _stored(cell.run, stored)
        if state is None:
            state = ray.put({"statuses": {}, "archive": None, "changed": False})
        segments = _segments(stages)
        for segment in segments:
            bench = segment == ["bench"]
            task = _run_segment.options(
                num_cpus=limits.bench_cpus if bench else 1, memory=memory[cell.spec.name],
                resources={SLOT: 1 if bench else SHARE}, name=f"{cell.spec.name} {cell.key} {','.join(segment)}")
            last = segment is segments[-1]  # a run's artifacts go only once all its stages are done
            starts = _starts(cell, finals, stored, options.force) if "prune" in segment else {}
            state = task.remote(cell, segment, options if last else dataclasses.replace(options, discard_artifacts=False),
                                state, baseline if NEEDS_BASELINE & set(segment) else None, list(starts), *starts.values())
        finals[cell.spec.name, cell.recipe, cell.level] = state
    return {finals[c.spec.name, c.recipe, c.level]: c for c in grid}


def _stored(run: RunDir, stored: dict) -> ray.ObjectRef | None:
    """The driver's copy of `run` in the object store (None when it has none)."""
    key = (run.model, run.recipe, run.level)
    if key not in stored:
        stored[key] = ray.put({"statuses": {}, "archive": pack(run.path), "changed": False}) \
            if run.manifest_path.exists() else None
    return stored[key]


def _starts(cell: GridRun, finals: dict, stored: dict, force: bool) -> dict[str, ray.ObjectRef]:
    """{recipe: its run} for the earlier parts of a composed recipe at the cell's level, from the grid (once
    finished) or the driver; none at level 0, or when the cell's own prune is current and not forced."""
    earlier = earlier_steps(cell.recipe) if cell.level else []
    if not earlier:
        return {}
    recipe = load_recipe(cell.recipe)
    if not force and cell.run.is_pruned(cell.spec.to_dict(), recipe.text, recipe.params):
        return {}
    starts = {}
    for name in earlier:
        key = (cell.spec.name, name, cell.level)
        ref = finals[key] if key in finals else _stored(RunDir(*key), stored)
        if ref is not None:
            starts[name] = ref
    return starts


def _segments(stages: list[str]) -> list[list[str]]:
    """[stages before bench], [bench], [stages after bench] (the empty ones left out)."""
    if "bench" not in stages:
        return [stages]
    at = stages.index("bench")
    return [s for s in (stages[:at], ["bench"], stages[at + 1:]) if s]


def _collect(finals: dict[ray.ObjectRef, GridRun], stages: list[str]) -> Iterator[tuple[GridRun, dict]]:
    """Wait for the runs, install each finished one and show progress: done, pending, failed, runs per node."""
    pending = dict(finals)
    per_node: Counter = Counter()
    failed = 0
    with tqdm(total=len(pending), unit="run", desc="sweep (ray)") as progress:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            cell = pending.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except ray.exceptions.RayError as exc:  # retries used up, or level 0 it waited for was lost
                reason = str(exc).strip().splitlines()[-1][:300]  # the error, after Ray's traceback
                tqdm.write(f"error: {cell.spec.name} {cell.key}: Ray task failed: {reason}")
                result = {"statuses": {s: {"status": "failed", "error": f"Ray task failed: {reason}"} for s in stages},
                          "archive": None, "changed": False}
            if result["changed"]:
                with staging_dir(cell.run.path) as staged:
                    unpack(result["archive"], staged)
            statuses = result["statuses"]
            failed += any(s["status"] == "failed" for s in statuses.values())
            per_node.update({s["node"] for s in statuses.values() if "node" in s})
            progress.set_postfix_str(f"pending={len(pending)} failed={failed} "
                                     + " ".join(f"{node}:{n}" for node, n in sorted(per_node.items())))
            progress.update(1)
            yield cell, statuses


@ray.remote(max_retries=MAX_RETRIES)
def _run_segment(cell: GridRun, stages: list[str], options: LevelOptions, state: dict, baseline: dict | None,
                 start_recipes: list[str], *starts: dict) -> dict:
    """Run `stages` of one run on this node, from the run's state so far (and the runs `start_recipes` at its level
    that a composed recipe may start from); returns the new state."""
    node = node_label()
    missing = missing_input(cell.spec, stages)
    if missing:
        error = f"node {node} has no {missing}"
        return {**state, "statuses": {**state["statuses"], **{s: {"status": "failed", "error": error, "node": node}
                                                              for s in stages}}}
    with _local_runs():
        if baseline and baseline["archive"] is not None and cell.level:
            unpack(baseline["archive"], RunDir(cell.spec.name, cell.recipe, 0.0).path)
        if state["archive"] is not None:
            unpack(state["archive"], cell.run.path)
        for recipe, start in zip(start_recipes, starts):
            if start["archive"] is not None:
                unpack(start["archive"], RunDir(cell.spec.name, recipe, cell.level).path)
        before = cell.run.manifest()
        statuses = run_level(cell, stages, dataclasses.replace(options, isolate=True), earlier=state["statuses"])
        ran = [s for s in statuses if cell.run.manifest().get("stages", {}).get(s) != before.get("stages", {}).get(s)]
        for stage in ran:  # (a current stage skips itself and keeps the node that ran it)
            statuses[stage]["node"] = node
            if statuses[stage]["status"] == "done":
                record_stage(cell.run.manifest_path, stage, {**cell.run.stage_record(stage), "node": node})
        changed = cell.run.manifest() != before
        return {"statuses": {**state["statuses"], **statuses},
                "archive": pack(cell.run.path) if changed else state["archive"],
                "changed": state["changed"] or changed}


@contextlib.contextmanager
def _local_runs() -> Iterator[Path]:
    """A node-local HARNESS_RUNS for one task (the stage processes inherit it), deleted afterwards."""
    previous = os.environ.get("HARNESS_RUNS")
    with tempfile.TemporaryDirectory(prefix="harness-ray-runs-") as root:
        os.environ["HARNESS_RUNS"] = root
        try:
            yield Path(root)
        finally:
            if previous is None:
                del os.environ["HARNESS_RUNS"]
            else:
                os.environ["HARNESS_RUNS"] = previous


def node_label() -> str:
    """This node's host name and Ray node id (short), as the ledger records it."""
    return f"{socket.gethostname()}/{ray.get_runtime_context().get_node_id()[:8]}"


def missing_input(spec: load.ModelSpec, stages: list[str]) -> str | None:
    """What this node lacks to run `stages` of `spec` (its model source, the benchmark data), or None."""
    kind, source = spec.source_kind, spec.source[spec.source_kind]
    if "eval" in stages and not data_dir().is_dir():
        return f"benchmark data at {data_dir()} (set HARNESS_DATA)"
    if not {"prune", "bench"} & set(stages):  # the later stages read the run's own checkpoint
        return None
    if kind == "hub":
        from huggingface_hub import try_to_load_from_cache
        from huggingface_hub.constants import HF_HUB_CACHE

        if not isinstance(try_to_load_from_cache(source, "config.json"), str):
            return f"model {source} in the Hugging Face cache {HF_HUB_CACHE} (`huggingface-cli download {source}`)"
    elif kind in ("local", "gguf") and not Path(source).expanduser().exists():
        return f"model {spec.name} at {Path(source).expanduser()}"
    elif kind == "package" and importlib.util.find_spec(source.partition("/")[0]) is None:
        return f"model {spec.name}'s package {source.partition('/')[0]} (run `make setup`)"
    return None


def estimated_memory(spec: load.ModelSpec) -> int:
    """Bytes a stage of `spec` may need: BYTES_PER_PARAM per parameter, counted on the meta device."""
    config = _config_values(spec)
    if config is None:
        return UNKNOWN_MEMORY
    import torch
    import transformers

    with torch.device("meta"):
        model = getattr(transformers, spec.model_class).from_config(transformers.AutoConfig.for_model(**config))
    return max(MIN_MEMORY, BYTES_PER_PARAM * sum(p.numel() for p in model.parameters()))


def _config_values(spec: load.ModelSpec) -> dict | None:
    kind, source = spec.source_kind, spec.source[spec.source_kind]
    if kind == "config":
        return dict(source)
    if kind == "config_file":
        overrides = dict(source) if isinstance(source, dict) else {"file": source}
        return {**read_json(load.CONFIGS_DIR / overrides.pop("file")), **overrides}
    if kind == "hub":
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(source, "config.json")
        return read_json(Path(path)) if isinstance(path, str) else None
    if kind in ("local", "package"):
        return json.loads((load.checkpoint_dir(spec) / "config.json").read_text())
    return None


def pack(path: Path) -> np.ndarray:
    """A run directory as an uncompressed tar archive (weights do not compress), held in a temporary file
    and mapped, not read: Ray copies it into its object store without it passing through this heap
    (a full-size run with its export is ~12 GB)."""
    with tempfile.TemporaryFile(prefix="harness-run-", suffix=".tar") as file:
        with tarfile.open(fileobj=file, mode="w") as archive:
            archive.add(path, arcname=".")
        file.flush()
        return np.memmap(file, dtype=np.uint8, mode="r")  # the mapping outlives the closed, deleted file


def unpack(archive: np.ndarray, path: Path) -> None:
    """Extract an archive of `pack` into `path`, reading it in place (in the object store)."""
    path.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=_Reader(archive), mode="r|") as tar:
        tar.extractall(path, filter="data")


class _Reader(io.RawIOBase):
    """A read-only stream over a buffer, without copying it whole (io.BytesIO would)."""

    def __init__(self, buffer):
        super().__init__()
        self._view, self._at = memoryview(buffer).cast("B"), 0

    def readable(self) -> bool:
        return True

    def readinto(self, target) -> int:
        chunk = self._view[self._at:self._at + len(target)]
        target[:len(chunk)] = chunk
        self._at += len(chunk)
        return len(chunk)
