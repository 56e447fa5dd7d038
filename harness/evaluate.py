"""Stage 5, eval: accuracy of a run on its model's paper benchmarks -> `<run>/eval.json`.

The benchmarks are data (`evals/benchmarks.yaml`): each names an evaluator kind (a key of
`EVALUATORS`, one module under harness/evaluators/) and its data files under the data directory,
with a Hub fallback used only when a file is missing and the Hub is reachable. PyTorch gives the
metrics; the exported ONNX on DeepSparse runs the same benchmark (decoders, through lm-eval) or a
sample of it (agreement with PyTorch's predictions). Level 0 is the dense baseline: its run is
created on first use, and every other level records its difference to it.

eval.json is a `layout.Evaluation`: one `layout.BenchmarkResult` per benchmark, either done (how it
was run, the evaluator's `layout.Outcome`, and the metrics' difference to level 0) or skipped with
the reason.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass
from typing import Callable

import yaml

from harness import export, layout, load
from harness.errors import HarnessError
from harness.evaluators import DataSource, EvalJob, classification, embeddings, language_modeling, translation
from harness.layout import EVAL_FILE, EngineCheck, Evaluation, Outcome
from harness.paths import EVALS_DIR, data_dir
from harness.rundir import RunDir, fingerprint, level_name, stage_run, write_json
from harness.runargs import add_run_arguments, dense_baseline, run_from_args

REGISTRY_FILE = EVALS_DIR / "benchmarks.yaml"
ENGINES = ("pytorch", "deepsparse")


@dataclass(frozen=True)
class Evaluator:
    run: Callable[[EvalJob], Outcome]
    model_classes: tuple[str, ...]  # transformers Auto classes it can evaluate
    needs: str  # what kind of model that is, for the error message


EVALUATORS = {
    "language_modeling": Evaluator(language_modeling.evaluate, ("AutoModelForCausalLM",), "a decoder language model"),
    "classification": Evaluator(classification.evaluate, ("AutoModelForSequenceClassification",),
                                "a model with an MNLI-style classification head (e.g. deberta-mnli)"),
    "translation": Evaluator(translation.evaluate, ("AutoModelForSeq2SeqLM",),
                             "an encoder-decoder translation model (e.g. m2m100)"),
    "embedding_probe": Evaluator(embeddings.evaluate_probe, ("AutoModel",),
                                 "an encoder without a task head (e.g. minilm)"),
    "embedding_fidelity": Evaluator(embeddings.evaluate_fidelity, ("AutoModel",),
                                    "an encoder without a task head (e.g. minilm)"),
}


class MissingData(HarnessError):
    """A benchmark's data file is absent and the Hub cannot stand in for it."""


@functools.lru_cache(maxsize=1)
def benchmark_registry() -> dict[str, dict]:
    """All benchmarks by name, as written in evals/benchmarks.yaml."""
    try:
        entries = yaml.safe_load(REGISTRY_FILE.read_text()) or {}
    except yaml.YAMLError as exc:
        raise HarnessError(f"{REGISTRY_FILE} is not valid YAML: {exc}") from None
    for name, entry in entries.items():
        if entry.get("evaluator") not in EVALUATORS:
            raise HarnessError(f"{REGISTRY_FILE}: benchmark '{name}' has evaluator {entry.get('evaluator')!r}, "
                               f"expected one of {', '.join(EVALUATORS)}")
        unknown = sorted(set(entry.get("use", [])) - set(entry["data"]))
        if unknown:
            raise HarnessError(f"{REGISTRY_FILE}: benchmark '{name}' uses {unknown[0]!r}, which is not in its data")
    return entries


def parse_limit(value) -> int | dict[str, int] | None:
    """LIMIT: examples per benchmark (per language pair for translation), None for all.

    A positive integer applies to every benchmark; `NAME=N` entries (comma- or space-separated) set one
    benchmark's limit, e.g. `wikitext2=4,lambada_openai=500` (a bare number among them is the default
    for the others). Returns an int, None, or {name: N} with the default under "*".
    """
    if value is None or str(value).strip() == "":
        return None
    limits = {}
    for entry in str(value).replace(",", " ").split():
        name, _, number = entry.rpartition("=")
        try:
            limits[name or "*"] = int(number)
        except ValueError:
            limits[name or "*"] = 0
        if limits[name or "*"] < 1:
            raise HarnessError(f"LIMIT must be a positive integer (examples per benchmark) or NAME=N entries, "
                               f"e.g. wikitext2=4,lambada_openai=500; got {value!r}")
    return limits["*"] if list(limits) == ["*"] else limits


def limit_for(limit: int | dict[str, int] | None, benchmark: str) -> int | None:
    """The examples limit of one benchmark under a parsed LIMIT."""
    return limit.get(benchmark, limit.get("*")) if isinstance(limit, dict) else limit


def parse_engines(value: str | tuple) -> tuple[str, ...]:
    engines = tuple(e.strip() for e in value.split(",") if e.strip()) if isinstance(value, str) else tuple(value)
    unknown = [e for e in engines if e not in ENGINES]
    if unknown or "pytorch" not in engines:
        raise HarnessError(f"--engines must list pytorch (the reference) and optionally deepsparse, got {value!r}")
    return tuple(e for e in ENGINES if e in engines)


def data_sources(name: str, entry: dict) -> dict[str, DataSource]:
    """The benchmark's data parts: local files when all are present, else the Hub entry when online."""
    sources = {}
    for part in entry.get("use", list(entry["data"])):
        part_entry = entry["data"][part]
        files = {role: data_dir() / relative for role, relative in part_entry["files"].items()}
        missing = [path for path in files.values() if not path.exists()]
        if not missing:
            sources[part] = DataSource(part, files=files)
        elif part_entry.get("hub") and not load.hub_offline():
            sources[part] = DataSource(part, hub=part_entry["hub"])
        else:
            hub = f" and the Hub is offline ({DataSource(part, hub=part_entry['hub']).describe()})" \
                if part_entry.get("hub") else ""
            raise MissingData(f"benchmark {name}: data file {missing[0]} is missing{hub}: put it there "
                              f"(see {data_dir() / 'SOURCES.md'}) or point HARNESS_DATA at a folder that has it")
    return sources


def plan(spec: load.ModelSpec, requested: list[str] | None) -> tuple[dict, dict]:
    """({benchmark: data sources} to run, {benchmark: reason} to skip), checking everything before any work.

    Explicitly requested benchmarks must have their data; a default one without data is skipped.
    """
    registry = benchmark_registry()
    names = requested or list(spec.benchmarks)
    if not names:
        raise HarnessError(f"model '{spec.name}' lists no benchmarks in harness/models.yaml: "
                           f"pass --benchmarks (known: {', '.join(registry)})")
    unknown = [name for name in names if name not in registry]
    if unknown:
        raise HarnessError(f"unknown benchmark '{unknown[0]}' (known: {', '.join(registry)})")
    runnable, skipped = {}, {}
    for name in names:
        evaluator = EVALUATORS[registry[name]["evaluator"]]
        if spec.model_class not in evaluator.model_classes:
            raise HarnessError(f"benchmark {name} needs {evaluator.needs}, but '{spec.name}' is a "
                               f"{spec.architecture} loaded as {spec.model_class}")
        try:
            runnable[name] = data_sources(name, registry[name])
        except MissingData as exc:
            if requested:
                raise
            skipped[name] = str(exc)
    return runnable, skipped


def _baseline(run: RunDir) -> tuple[dict, Evaluation] | None:
    """The level-0 run of the same model and recipe ({path, when it was evaluated}) and its eval.json."""
    baseline = RunDir(run.model, run.recipe, 0)
    evaluation = None if run.level == 0 else layout.read_record(baseline.path / EVAL_FILE, Evaluation)
    if evaluation is None:
        return None
    return {"path": str(baseline.path), "finished": (baseline.stage_record("eval") or {}).get("finished")}, evaluation


def deltas(results: dict[str, layout.BenchmarkResult], baseline: Evaluation) -> None:
    """Fill `delta_vs_level0` of each finished benchmark evaluated at level 0 with the same limit."""
    for name, result in results.items():
        if result.status != "done":
            continue
        base = baseline.benchmarks.get(name)
        if base and base.status == "done" and base.limit == result.limit:
            result.delta_vs_level0 = {m: v.value - base.metrics[m].value
                                      for m, v in result.metrics.items() if m in base.metrics}


def evaluate(run: RunDir, benchmarks: list[str] | None = None, limit=None, engines=ENGINES,
             force: bool = False, cores: int | None = None) -> Evaluation:
    """Evaluate a run on its benchmarks, write `<run>/eval.json` and return its content.

    `cores`: DeepSparse cores (None: all physical cores).
    """
    spec = load.resolve_spec(run.model)
    if spec.shape_only:
        raise HarnessError(f"model '{spec.name}' is shape-only (random weights at a real model's shapes): "
                           f"its accuracy means nothing, so eval refuses it")
    limit, engines = parse_limit(limit), parse_engines(engines)
    runnable, skipped = plan(spec, benchmarks)
    unknown = sorted(set(limit) - set(runnable) - set(skipped) - {"*"}) if isinstance(limit, dict) else []
    if unknown:
        raise HarnessError(f"LIMIT names {unknown[0]!r}, which is not among the benchmarks evaluated "
                           f"({', '.join([*runnable, *skipped])})")
    if run.level == 0:
        dense_baseline(run, "eval")
    run.require("prune")
    registry = benchmark_registry()
    prune_record = run.stage_record("prune")
    graphs_revision = (export.OPSET, export.GRAPH_REVISION) if "deepsparse" in engines else None
    inputs = fingerprint(prune_record.get("inputs"), prune_record.get("finished"), limit, engines, graphs_revision,
                         {name: [registry[name], {p: s.describe() for p, s in sources.items()}]
                          for name, sources in runnable.items()}, skipped)
    if not force and run.is_current("eval", inputs, [EVAL_FILE]):
        evaluation = run.read(EVAL_FILE, Evaluation)
        print(f"eval: {run.path / EVAL_FILE} is up to date (use --force to redo)")
        print(format_table(evaluation))
        return evaluation

    loaded = load.load_model(str(run.path))
    reference = (lambda: loaded) if run.level == 0 else functools.lru_cache(maxsize=1)(lambda: load.load_model(spec))
    onnx_dir = functools.lru_cache(maxsize=1)(lambda: _onnx_dir(run))
    graphs = {}  # each exported graph is compiled once and shared by the benchmarks
    with stage_run(run.manifest_path, "eval", inputs) as record:
        results = {}
        for name, sources in runnable.items():
            entry = registry[name]
            start = time.time()
            job = EvalJob(name, entry, sources, loaded, limit_for(limit, name), engines, onnx_dir, reference_model=reference,
                          engine_cores=cores, graphs=graphs)
            outcome = EVALUATORS[entry["evaluator"]].run(job)
            results[name] = layout.BenchmarkResult(
                "done", description=entry.get("description", ""), evaluator=entry["evaluator"],
                data={part: source.describe() for part, source in sources.items()}, limit=limit_for(limit, name),
                wall_time_s=round(time.time() - start, 2),
                **{f.name: getattr(outcome, f.name) for f in dataclasses.fields(outcome)})
        results.update({name: layout.BenchmarkResult("skipped", reason) for name, reason in skipped.items()})
        baseline, baseline_evaluation = _baseline(run) or (None, None)
        if baseline_evaluation:
            deltas(results, baseline_evaluation)
        evaluation = Evaluation(spec.name, run.recipe, run.level, limit, list(engines), baseline, results)
        write_json(run.path / EVAL_FILE, layout.to_json(evaluation))
        record.update(benchmarks={name: r.status for name, r in results.items()}, limit=limit)
    print(format_table(evaluation))
    print(f"eval: -> {run.path / EVAL_FILE}")
    return evaluation


def _onnx_dir(run: RunDir):
    try:
        return export.ensure_onnx(run)
    except HarnessError as exc:
        raise HarnessError(f"{exc} (to evaluate on PyTorch alone, pass --engines pytorch)") from None


def _number(value) -> str:
    return "-" if value is None else f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"


def _engine_cell(engine: EngineCheck | None, metric: str) -> str:
    if not engine:
        return ""
    if engine.difference is not None:
        return f"{engine.runtime} {engine.difference[metric]:+.2e}"
    if engine.agreement is not None:
        return f"{engine.runtime} agree {engine.agreement:.3f}/{engine.sample}"
    return f"{engine.runtime} cos {engine.mean_cosine_vs_pytorch:.5f}/{engine.sample}"


def _limit_text(limit: int | dict) -> str:
    return ",".join(f"{k}={v}" if k != "*" else str(v) for k, v in limit.items()) if isinstance(limit, dict) else str(limit)


def format_table(evaluation: Evaluation) -> str:
    """eval.json as a table: one row per benchmark metric."""
    header = (f"{evaluation.model} {evaluation.recipe} level {level_name(evaluation.level)}"
              f"{'' if evaluation.limit is None else ' LIMIT ' + _limit_text(evaluation.limit)}")
    rows = [header, f"{'benchmark':<20} {'metric':<18} {'value':>10} {'stderr':>9} {'n':>6} "
                    f"{'vs level 0':>11} {'time s':>7}  deepsparse vs pytorch"]
    for name, result in evaluation.benchmarks.items():
        if result.status != "done":
            rows.append(f"{name:<20} skipped: {result.reason}")
            continue
        for metric, value in result.metrics.items():
            delta = (result.delta_vs_level0 or {}).get(metric)
            rows.append(f"{name:<20} {metric:<18} {_number(value.value):>10} {_number(value.stderr):>9} "
                        f"{result.examples:>6} {'-' if delta is None else f'{delta:+.4g}':>11} "
                        f"{result.wall_time_s:>7.1f}  {_engine_cell(result.deepsparse, metric)}")
    return "\n".join(rows)


def add_arguments(parser) -> None:
    add_run_arguments(parser)
    parser.add_argument("--benchmarks", help="comma-separated names from evals/benchmarks.yaml "
                                             "(default: the model's benchmarks in harness/models.yaml)")
    parser.add_argument("--limit", help="at most this many examples per benchmark (per language pair), or "
                                        "NAME=N entries per benchmark, e.g. wikitext2=4,lambada_openai=500")
    parser.add_argument("--engines", default=",".join(ENGINES),
                        help="pytorch, plus deepsparse to check the exported ONNX on DeepSparse (default both)")
    parser.add_argument("--cores", type=int, help="cores for DeepSparse (default: all physical cores)")
    parser.add_argument("--force", action="store_true", help="evaluate again even if eval.json is current")


def main(args) -> None:
    benchmarks = [b.strip() for b in args.benchmarks.split(",") if b.strip()] if args.benchmarks else None
    evaluate(run_from_args(args), benchmarks, args.limit, args.engines, args.force, args.cores)
