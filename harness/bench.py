"""Stage 5, bench: real CPU speed of a run on DeepSparse, ONNX Runtime, OpenVINO (FP32 and INT8) and PyTorch,
and its size on disk.

The engines (`engines`) see the same inputs and time each scenario, a (batch, sequence length) pair:
each warms up, then repeats until it has at least `--iterations` runs and `--min-time` seconds per
variant (at most `--max-iterations`; `timing`); with `--repeats` every engine does so several times, in
turns, and its passes are pooled. DeepSparse and OpenVINO compile one engine per scenario
in a child process that also times it (a compile that aborts or runs out of memory ends only the child);
OpenVINO INT8 first quantizes each variant's export once (NNCF, calibrated on training text).
Encoder-decoders time the encoder pass and one decoder pass (one decoder token, no KV cache)
separately and as one combined step.

Speedups compare with the dense baseline, level 0 of the same model and recipe (pruned first if
missing), timed in the same process with passes alternating between dense and sparse, so both see
the same load on a shared CPU. With `--dense-timings level0` the dense figures are instead read from
level 0's own bench.json (same settings): half the time and one model in memory, for full-size
models on a quiet machine. Sparse levels may then time fewer engines than level 0 (`--engines
deepsparse`): the headline still compares with level 0's ONNX Runtime timings. Each scenario also names
the fastest dense engine at each precision (FP32, INT8: what a user would pick instead of sparsity) and
the run's DeepSparse speedup against it. The FLOP-ideal
speedup (`flops`) counts the multiply-accumulates of one forward pass: Linear/Conv1D weights scale
with their measured density, everything else stays dense; `efficiency` = measured / ideal shows
where Amdahl's law bites. Sizes on disk: `sizes`.

`<run>/bench.json` (`layout.Bench`):

    model, recipe, level, architecture, achieved_percent, run, dense_run (paths)
    settings       {batch_sizes, seq_len, threads, iterations, min_time_s, max_iterations, warmup, repeats, engines,
                    dense_timings: "alongside" | "level0", gzip_level}
    cpu            {model, physical_cores, logical_cores, load_average_1min (after timing), avx,
                    other_processes_cores (average cores other processes used while timing)}
    engines        {engine: {status: "ok" | "unavailable", threads, precision: "fp32" | "int8", reason?}}
    results        {engine: {scenario: timing}}        scenario = "b<batch>_s<seq>", e.g. "b1_s128"
    dense_results  the same for the dense run, timed alongside or read from level 0 (level 0: the same
                   numbers as results)
        timing     {batch_size, seq_len, median_ms, p90_ms, items_per_s, iterations, threads,
                    parts?: {encoder: {median_ms, p90_ms}, decoder: {...}}}   (parts: encoder-decoder only;
                    the top-level figures are the combined encoder + decoder step)
    speedups       {scenario: {<engine>: sparse vs its own dense, headline: DeepSparse sparse vs ONNX Runtime
                    dense, efficiency: {<engine>: speedup / ideal, headline: ...}}} (null if an engine is missing)
    fastest_dense  {scenario: {precision: {engine, median_ms, speedup}}}  the fastest engine of that precision on
                   the dense run and DeepSparse sparse vs it (speedup null without DeepSparse; absent in older files)
    flop_ideal     {scenario: {speedup, macs_dense, macs_sparse, prunable_share, other_linear_share,
                    other_matmul_share, max_speedup, parts?: {encoder: {...}, decoder: {...}}}}  (per sequence)
    sizes          {params, checkpoint, checkpoint_gzip, onnx, onnx_gzip, sparse_bitmask: {bytes, bits_per_weight}}
                    (gzip at `gzip_level`, default 6 as the gzip command)
                    sparse_bitmask = compressed-tensors "sparse-bitmask" format written to <run>/compressed/;
                    a quantized run adds checkpoint_int8 and sparse_bitmask_int8 (the same format, <run>/compressed-int8/)
    warnings       [str]

`items_per_s` counts sequences (batch items) per second.
"""
from __future__ import annotations

import warnings
from dataclasses import replace

from tqdm import tqdm

from harness import export, load, runargs
from harness.engines import ENGINES, Variant, engine_precision, synthetic_inputs
from harness.errors import HarnessError
from harness.flops import flop_ideal_for
from harness.layout import (BENCH_FILE, SPARSITY_FILE, Bench, EngineStatus, FastestDense, FlopIdeal, PartTiming,
                            Sparsity, Speedup, Timing, to_json)
from harness.rundir import RunDir, fingerprint, stage_run, write_json
from harness.sizes import sizes
from harness.timing import (busy_cpu_warning, cpu_info, cpu_seconds, node_kind, other_load, physical_threads,
                            scenario_name, summarize, vector_features)

DEFAULT_BATCH_SIZES = (1, 16)
DEFAULT_SEQ_LEN = 128
DENSE_TIMINGS = ("alongside", "level0")

Results = dict[str, dict[str, Timing]]  # engine -> scenario -> timing
OLDER_SETTINGS = {"repeats": 1}  # how a bench.json written before these settings existed was timed


def variant(run: RunDir) -> Variant:
    """A run's side of the comparison, exported first if needed."""
    return Variant(run, export.ensure_onnx(run), load.resolve_spec(str(run.path)))


def bench_engines(variants: dict[str, Variant], settings: dict,
                  warnings_out: list[str]) -> tuple[dict[str, EngineStatus], dict[str, Results]]:
    """Time every engine on every scenario for both variants ({"sparse": ..., "dense": ...}, or only "sparse"
    for a dense run); returns (engine status, {variant: {engine: {scenario: timing}}}).

    With `repeats` > 1 every engine times every scenario that many times, in turns (the engine order reversed
    every other turn) and its passes are pooled: engines compared with each other then share the same minutes
    of a shared CPU's load, as dense and sparse of one engine always do (`timing.time_interleaved`)."""
    threads = settings["threads"]
    some = next(iter(variants.values()))
    statuses = {name: EngineStatus("ok", threads, precision=engine_precision(ENGINES[name], variants["sparse"].run))
                for name in settings["engines"]}
    pooled: dict[str, dict[str, dict[str, dict[str, list[float]]]]] = {side: {} for side in variants}
    scenarios = {scenario_name(b, settings["seq_len"]): (b, settings["seq_len"]) for b in settings["batch_sizes"]}
    repeats = settings["repeats"]
    progress = tqdm(total=len(statuses) * len(scenarios) * repeats, unit="scenario",
                    desc=f"bench {some.run.model} {some.run.level:g}%")
    for repeat in range(repeats):
        for name in settings["engines"][::-1 if repeat % 2 else 1]:
            engine = ENGINES[name]
            for scenario, (batch_size, seq_len) in scenarios.items():
                if statuses[name].status != "ok":
                    progress.update(1)
                    continue
                progress.set_postfix_str(f"{name} {scenario}" + (f" ({repeat + 1}/{repeats})" if repeats > 1 else ""))
                values = synthetic_inputs(some.config, some.spec.architecture, batch_size, seq_len)
                try:
                    times = engine.times(variants, threads, values, settings)
                except Exception as exc:
                    if not engine.may_fail:
                        raise
                    reason = unavailable(name, scenario, exc, settings["engines"], warnings_out)
                    statuses[name] = replace(statuses[name], status="unavailable", reason=reason)
                    names = list(scenarios)
                    for side in pooled.values():  # later scenarios have larger batches: no engine there either
                        for later in names[names.index(scenario):]:
                            side.get(name, {}).pop(later, None)
                    progress.update(1)
                    continue
                for side, parts in times.items():  # an engine may time only some variants (OpenVINO INT8: FP32)
                    into = pooled[side].setdefault(name, {}).setdefault(scenario, {})
                    for part, values_ms in parts.items():
                        into.setdefault(part, []).extend(values_ms)
                progress.update(1)
            for side in variants.values():
                side.release()
    progress.close()
    results = {side: {name: {scenario: summarize(times, *scenarios[scenario], threads)
                             for scenario, times in by_scenario.items()}
                      for name, by_scenario in by_engine.items() if by_scenario}
               for side, by_engine in pooled.items()}
    return statuses, results


def unavailable(name: str, scenario: str, exc: Exception, engines: list[str], warnings_out: list[str]) -> str:
    """Why an engine that failed on `scenario` is unavailable from there on; the warning goes to `warnings_out`."""
    text = str(exc).strip()
    reason = f"from {scenario} on: {type(exc).__name__}: {text.splitlines()[0][:200] if text else ''}"
    others = [other for other in engines if other != name]
    warnings_out.append(f"{ENGINES[name].label} unavailable {reason}; "
                        + (f"{', '.join(others)} results only there" if others else "no timings there"))
    return reason


def speedups(results: Results, dense_results: Results, ideal: dict[str, FlopIdeal]) -> dict[str, Speedup]:
    """Per scenario: each engine's dense/sparse median ratio, the headline (ORT dense / DeepSparse sparse), efficiencies."""
    out = {}
    for scenario, ideal_entry in ideal.items():
        def ratio(dense_engine: str, sparse_engine: str) -> float | None:
            dense = dense_results.get(dense_engine, {}).get(scenario)
            sparse = results.get(sparse_engine, {}).get(scenario)
            return dense.median_ms / sparse.median_ms if dense and sparse else None

        engines = {engine: ratio(engine, engine) for engine in results}
        headline = ratio("onnxruntime", "deepsparse")
        efficiency = {k: (v / ideal_entry.speedup if v is not None else None)
                      for k, v in {**engines, "headline": headline}.items()}
        out[scenario] = Speedup(engines, headline, efficiency)
    return out


def fastest_dense(results: Results, dense_results: Results, scenarios: list[str],
                  precisions: dict[str, str]) -> dict[str, dict[str, FastestDense]]:
    """Per scenario and precision: the dense engine with the lowest median, and DeepSparse sparse vs it.
    `precisions` maps engine names to the precision they computed the dense run in, "fp32" | "int8"."""
    out = {}
    for scenario in scenarios:
        sparse = results.get("deepsparse", {}).get(scenario)
        for precision in sorted(set(precisions.values())):
            timed = {engine: by_scenario[scenario] for engine, by_scenario in dense_results.items()
                     if precisions.get(engine) == precision and scenario in by_scenario}
            if timed:
                engine = min(timed, key=lambda name: timed[name].median_ms)
                dense_ms = timed[engine].median_ms
                out.setdefault(scenario, {})[precision] = FastestDense(
                    engine, dense_ms, round(dense_ms / sparse.median_ms, 4) if sparse else None)
    return out


def bench(run: RunDir, settings: dict, force: bool = False) -> Bench:
    """Benchmark a run against its dense baseline (exporting both if needed); writes `<run>/bench.json`."""
    run.require("prune")
    dense_run = runargs.dense_baseline(run, "bench", fp32=True)  # a quantized run is compared with dense FP32
    alone = dense_run.path == run.path  # the dense baseline itself
    reuse_dense = not alone and settings["dense_timings"] == "level0"
    dense_document = dense_bench(dense_run, settings) if reuse_dense else None
    timed_runs = [run] if reuse_dense or alone else [run, dense_run]
    # The weights' identity (their prune records), not the exports: a finished run may have had its
    # checkpoint and ONNX discarded to save disk, and its bench.json still stands.
    inputs = fingerprint([(r.stage_record("prune") or {}).get("finished") for r in timed_runs],
                         export.OPSET, export.GRAPH_REVISION,
                         settings, (dense_run.stage_record("bench") or {}).get("finished") if reuse_dense else None)
    if not force and run.is_current("bench", inputs, [BENCH_FILE]):
        return run.read(BENCH_FILE, Bench)
    variants = {"sparse": variant(run)} | ({"dense": variant(dense_run)} if len(timed_runs) > 1 else {})

    sparse = variants["sparse"]
    bench_warnings: list[str] = []
    with stage_run(run.manifest_path, "bench", inputs) as record:
        measured = run.read(SPARSITY_FILE, Sparsity)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            per_sequence = flop_ideal_for(sparse.loaded.model, sparse.spec.architecture, settings["seq_len"],
                                          set(measured.prunable_tensors))
            sparse.release()
            ideal = {scenario_name(b, settings["seq_len"]): per_sequence for b in settings["batch_sizes"]}
            started = cpu_seconds()
            engines, results = bench_engines(variants, settings, bench_warnings)
            others = other_load(started)
            bench_warnings += busy_cpu_warning(others, settings["threads"])
        dense_results = dense_document.results if dense_document else results.get("dense", results["sparse"])
        result = Bench(
            model=run.model, recipe=run.recipe, level=run.level, architecture=sparse.spec.architecture,
            achieved_percent=measured.achieved_percent, run=str(run.path), dense_run=str(dense_run.path),
            settings=settings, cpu={**cpu_info(), "other_processes_cores": round(others, 2)}, engines=engines,
            results=results["sparse"], dense_results=dense_results,
            speedups=speedups(results["sparse"], dense_results, ideal), flop_ideal=ideal,
            sizes=sizes(run, sparse.onnx_dir, sparse.spec.architecture, settings["gzip_level"]),
            warnings=bench_warnings,
            fastest_dense=fastest_dense(results["sparse"], dense_results, list(ideal),
                                        {name: engine_precision(engine, dense_run) for name, engine in ENGINES.items()}))
        write_json(run.path / BENCH_FILE, to_json(result))
        first = scenario_name(settings["batch_sizes"][0], settings["seq_len"])
        record.update(headline_speedup=result.speedups[first].headline,
                      flop_ideal_speedup=ideal[first].speedup, warnings=len(result.warnings))
    return result


def dense_bench(dense_run: RunDir, settings: dict) -> Bench:
    """Level 0's bench.json, benched first if missing; it must have been timed with the same settings, on
    at least the engines this level times (a sparse level may time fewer, e.g. only DeepSparse), on the same
    kind of machine (a cluster's nodes may differ: speedups compare timings from one kind only)."""
    path = dense_run.path / BENCH_FILE
    if not path.exists():
        print(f"bench: no dense timings in {dense_run.path}; benching level 0 first")
        # with ONNX Runtime always: it is the headline's baseline
        bench(dense_run, {**settings, "engines": [e for e in ENGINES if e in settings["engines"] or e == "onnxruntime"]})
    document = dense_run.read(BENCH_FILE, Bench)
    if document is None:
        raise HarnessError(f"{path} is unreadable; bench level 0 again (--force) or use --dense-timings alongside")
    then = {**OLDER_SETTINGS, **document.settings}
    differing = sorted(k for k in settings if k != "engines" and then.get(k) != settings[k])
    untimed = [e for e in settings["engines"] if e not in document.settings["engines"]]
    if differing or untimed:
        problem = f"other settings ({', '.join(differing)})" if differing else f"without {', '.join(untimed)}"
        raise HarnessError(f"{path} was timed {problem}; bench level 0 again with these settings (--force) "
                           f"or use --dense-timings alongside")
    there, here = node_kind(document.cpu), node_kind(cpu_info())
    if there != here:
        differs = ", ".join(f"{key} {there[key]!r} there, {here[key]!r} here" for key in here if there[key] != here[key])
        raise HarnessError(f"{path} was timed on another kind of machine ({differs}); bench level 0 on this one "
                           f"(--force) or use --dense-timings alongside")
    return document


# --- the table ------------------------------------------------------------------------------------------

def _ms(timing: Timing | PartTiming | None) -> str:
    return f"{timing.median_ms:.2f}" if timing else "-"


def format_table(result: Bench) -> str:
    """One screen: medians per engine and scenario (parts for encoder-decoders), speedups, FLOP-ideal, sizes."""
    settings = result.settings
    lines = [f"bench: {result.model} {result.recipe} level {result.level:g}% "
             f"(achieved {result.achieved_percent:.1f}% of prunable weights), seq {settings['seq_len']}, "
             f"{settings['threads']} threads on {result.cpu.get('model', 'this CPU')} ({vector_features(result.cpu)}); "
             "median ms (dense -> sparse)",
             f"{'engine':<13} {'scenario':<10} {'part':<9} {'dense':>9} {'sparse':>9} {'p90':>9} {'items/s':>9} "
             f"{'speedup':>8} {'eff.':>6}"]
    for engine, scenarios in result.results.items():
        for scenario, timing in scenarios.items():
            dense = result.dense_results.get(engine, {}).get(scenario)
            speedup = result.speedups[scenario]
            lines.append(f"{engine:<13} {scenario:<10} {'all':<9} {_ms(dense):>9} {_ms(timing):>9} "
                         f"{timing.p90_ms:>9.2f} {timing.items_per_s:>9.1f} "
                         f"{_x(speedup.engines[engine]):>8} {_num(speedup.efficiency[engine]):>6}")
            for part, part_timing in (timing.parts or {}).items():
                lines.append(f"{'':<13} {'':<10} {part:<9} {_ms(dense.parts[part] if dense else None):>9} "
                             f"{_ms(part_timing):>9} {part_timing.p90_ms:>9.2f}")
    for engine, status in result.engines.items():
        if status.status != "ok":
            lines.append(f"{engine:<13} unavailable: {status.reason}")
    for scenario, entry in result.speedups.items():
        ideal = result.flop_ideal[scenario]
        lines.append(f"{scenario}: DeepSparse sparse vs ONNX Runtime dense {_x(entry.headline)}, "
                     f"FLOP-ideal {ideal.speedup:.2f}x, efficiency {_num(entry.efficiency['headline'])}")
        fastest = result.fastest_dense.get(scenario, {})
        if fastest:
            lines.append(f"{scenario}: DeepSparse sparse vs the fastest dense engine: " + ", ".join(
                f"{precision.upper()} {ENGINES[best.engine].label if best.engine in ENGINES else best.engine} "
                f"({best.median_ms:.2f} ms) {_x(best.speedup)}" for precision, best in fastest.items()))
    ideal = next(iter(result.flop_ideal.values()))
    limit = f"{ideal.max_speedup:.1f}x" if ideal.max_speedup else "unbounded"
    lines.append(f"MACs per sequence: {ideal.prunable_share:.0%} in prunable weights, {ideal.other_linear_share:.0%} "
                 f"in other weights (LM head, task heads), {ideal.other_matmul_share:.0%} in attention matmuls "
                 f"-> FLOP-ideal at most {limit} even at 100% sparsity (Amdahl)")
    size = result.sizes
    lines.append("size: " + ", ".join(
        f"{label} {entry.bytes / 1e6:.1f} MB ({entry.bits_per_weight:.1f} b/w)"
        for entry, label in ((size.checkpoint, "checkpoint"), (size.checkpoint_gzip, "gzip"),
                             (size.sparse_bitmask, "sparse-bitmask"), (size.onnx, "onnx"), (size.onnx_gzip, "onnx gzip"),
                             (size.checkpoint_int8, "int8"), (size.sparse_bitmask_int8, "int8 sparse-bitmask"))
        if entry))
    lines += [f"warning: {w}" for w in result.warnings]
    return "\n".join(lines)


def _x(value) -> str:
    return f"{value:.2f}x" if value is not None else "-"


def _num(value) -> str:
    return f"{value:.2f}" if value is not None else "-"


# --- CLI ----------------------------------------------------------------------------------------------------

def add_arguments(parser) -> None:
    runargs.add_run_arguments(parser)
    parser.add_argument("--force", action="store_true", help="bench again even if bench.json is current")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=list(DEFAULT_BATCH_SIZES),
                        help="batch sizes, one scenario each (default: 1 16)")
    parser.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN, help="sequence length (default 128)")
    parser.add_argument("--engines", default=",".join(ENGINES), help="comma-separated subset of " + ",".join(ENGINES))
    parser.add_argument("--threads", type=int, default=None, help="threads per engine (default: physical cores)")
    parser.add_argument("--iterations", type=int, default=5, help="minimum timed passes per scenario (default 5)")
    parser.add_argument("--min-time", type=float, default=1.0, help="minimum timed seconds per scenario (default 1)")
    parser.add_argument("--max-iterations", type=int, default=100, help="maximum timed passes per scenario")
    parser.add_argument("--warmup", type=int, default=1, help="untimed passes before each timing block (default 1)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="time every engine this many times over, in turns, pooling the passes: the engines' "
                             "ratios then share the same minutes of a noisy machine (default 1)")
    parser.add_argument("--dense-timings", choices=DENSE_TIMINGS, default=DENSE_TIMINGS[0],
                        help="time the dense baseline alongside each level (default; fair on a shared CPU) or "
                             "reuse level 0's bench.json (half the time, one model in memory)")
    parser.add_argument("--gzip-level", type=int, choices=range(1, 10), default=6, metavar="1-9",
                        help="gzip level for the compressed sizes (default 6; 1 is 2-3x faster on GB-sized models)")


def settings_from_args(args) -> dict:
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = [e for e in engines if e not in ENGINES]
    if unknown or not engines:
        raise HarnessError(f"unknown engine {unknown[0] if unknown else '(none)'}; engines: {', '.join(ENGINES)}")
    if min(args.batch_sizes) < 1 or args.seq_len < 2 or args.iterations < 1 or args.repeats < 1 or args.warmup < 0:
        raise HarnessError("--batch-sizes, --iterations and --repeats must be >= 1, --seq-len >= 2, --warmup >= 0")
    return {"batch_sizes": sorted(set(args.batch_sizes)), "seq_len": args.seq_len,
            "threads": args.threads or physical_threads(), "iterations": args.iterations,
            "min_time_s": args.min_time, "max_iterations": max(args.max_iterations, args.iterations),
            "warmup": args.warmup, "repeats": args.repeats, "engines": [e for e in ENGINES if e in engines],
            "dense_timings": args.dense_timings, "gzip_level": args.gzip_level}


def main(args) -> None:
    run = runargs.run_from_args(args)
    result = bench(run, settings_from_args(args), force=args.force)
    print(format_table(result))
