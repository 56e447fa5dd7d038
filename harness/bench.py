"""Stage 5, bench: real CPU speed of a run on DeepSparse, ONNX Runtime and PyTorch, and its size on disk.

All three engines see the same inputs (random token ids, seed 0, full attention mask); DeepSparse and
ONNX Runtime run the same ONNX file (`export.ensure_onnx`), PyTorch runs the checkpoint eagerly. Each
scenario is a (batch, sequence length) pair; DeepSparse compiles one engine per scenario, in a child
process that also times it (a compile that aborts or runs out of memory ends only the child). Each
scenario warms up, then repeats until it has at least `--iterations` runs and `--min-time` seconds
per variant (at most `--max-iterations`). Encoder-decoders time the encoder pass and one decoder pass
(one decoder token, no KV cache) separately and as one combined step.

Speedups compare with the dense baseline, level 0 of the same model and recipe (pruned first if
missing), timed in the same process with passes alternating between dense and sparse, so both see
the same load on a shared CPU. With `--dense-timings level0` the dense figures are instead read from
level 0's own bench.json (same settings): half the time and one model in memory, for full-size
models on a quiet machine. Sparse levels may then time fewer engines than level 0 (`--engines
deepsparse`): the headline still compares with level 0's ONNX Runtime timings. The FLOP-ideal
speedup counts the multiply-accumulates of one forward pass from the model's own modules:
Linear/Conv1D weights scale with their measured density, everything else (attention score and
context matmuls, the LM head and any unpruned layer) stays dense; `efficiency` = measured / ideal
shows where Amdahl's law bites.

`<run>/bench.json`:

    model, recipe, level, architecture, achieved_percent, run, dense_run (paths)
    settings       {batch_sizes, seq_len, threads, iterations, min_time_s, max_iterations, warmup, engines,
                    dense_timings: "alongside" | "level0", gzip_level}
    cpu            {model, physical_cores, logical_cores, load_average_1min (after timing), avx,
                    other_processes_cores (average cores other processes used while timing)}
    engines        {engine: {status: "ok" | "unavailable", threads, reason?}}
    results        {engine: {scenario: timing}}        scenario = "b<batch>_s<seq>", e.g. "b1_s128"
    dense_results  the same for the dense run, timed alongside or read from level 0 (level 0: the same
                   numbers as results)
        timing     {batch_size, seq_len, median_ms, p90_ms, items_per_s, iterations, threads,
                    parts?: {encoder: {median_ms, p90_ms}, decoder: {...}}}   (parts: encoder-decoder only;
                    the top-level figures are the combined encoder + decoder step)
    speedups       {scenario: {<engine>: sparse vs its own dense, headline: DeepSparse sparse vs ONNX Runtime
                    dense, efficiency: {<engine>: speedup / ideal, headline: ...}}} (null if an engine is missing)
    flop_ideal     {scenario: {speedup, macs_dense, macs_sparse, prunable_share, other_linear_share,
                    other_matmul_share, max_speedup, parts?: {encoder: {...}, decoder: {...}}}}  (per sequence)
    sizes          {params, checkpoint, checkpoint_gzip, onnx, onnx_gzip, sparse_bitmask: {bytes, bits_per_weight}}
                    (gzip at `gzip_level`, default 6 as the gzip command)
                    sparse_bitmask = compressed-tensors "sparse-bitmask" format written to <run>/compressed/
    warnings       [str]

`items_per_s` counts sequences (batch items) per second.
"""
from __future__ import annotations

import gc
import gzip
import os
import shutil
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import psutil
from tqdm import tqdm

from harness import export, load, onnx_graphs, prune
from harness.errors import HarnessError
from harness.rundir import RunDir, fingerprint, read_json, stage_run, staging_dir, write_json

BENCH_FILE = "bench.json"
COMPRESSED_SUBDIR = "compressed"
DEFAULT_BATCH_SIZES = (1, 16)
DEFAULT_SEQ_LEN = 128
INPUT_SEED = 0
DENSE_TIMINGS = ("alongside", "level0")
BUSY_CORES = 0.25  # other processes' average CPU use while timing above which the times are flagged
ROUNDS = 2  # alternating timing blocks per variant when dense and sparse are timed together
# One graph per part; encoder-decoders run encoder then decoder (in onnx_graphs.graph_files order).
PARTS = {"model.onnx": "model", "encoder_model.onnx": "encoder", "decoder_model.onnx": "decoder"}

Step = Callable[[dict], dict]  # named inputs -> named outputs (numpy arrays or torch tensors)


def physical_threads() -> int:
    """Physical cores this process may use (the default for every engine)."""
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(psutil.cpu_count(logical=False) or available, available))


def scenario_name(batch_size: int, seq_len: int) -> str:
    return f"b{batch_size}_s{seq_len}"


# --- inputs and engines ---------------------------------------------------------------------------

def synthetic_inputs(config, architecture: str, batch_size: int, seq_len: int) -> dict[str, np.ndarray]:
    """Random token ids (fixed seed) with a full attention mask; plus one decoder start token for encoder-decoders."""
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if limit and seq_len > limit:
        raise HarnessError(f"--seq-len {seq_len} is longer than the model's {limit} positions")
    rng = np.random.default_rng(INPUT_SEED)
    values = {"input_ids": rng.integers(4, config.vocab_size, size=(batch_size, seq_len), dtype=np.int64),
              "attention_mask": np.ones((batch_size, seq_len), dtype=np.int64)}
    if architecture == "encoder-decoder":
        values["decoder_input_ids"] = onnx_graphs.decoder_start(config, batch_size)
    return values


def part_inputs(part: str, values: dict, outputs: dict) -> dict:
    """What a part's graph is fed: the scenario's inputs, or for the decoder the encoder's output."""
    return onnx_graphs.decoder_values(values, outputs["last_hidden_state"]) if part == "decoder" else values


@dataclass
class Variant:
    """One side of the comparison (the sparse run or its dense baseline): its ONNX export and, loaded
    on first use, its PyTorch model (released while other engines run, so a full-size model is in
    memory once: as PyTorch weights or inside one engine)."""

    run: RunDir
    onnx_dir: Path
    spec: load.ModelSpec
    _loaded: load.LoadedModel | None = None

    @property
    def loaded(self) -> load.LoadedModel:
        if self._loaded is None:
            self._loaded = load.load_model(self.spec)
        return self._loaded

    @property
    def config(self):
        """The model's config, without loading its weights."""
        from transformers import AutoConfig

        return self._loaded.model.config if self._loaded else AutoConfig.from_pretrained(self.run.model_dir)

    def release(self) -> None:
        """Drop the PyTorch model; the next use loads it again."""
        self._loaded = None
        gc.collect()

    @classmethod
    def of(cls, run: RunDir) -> "Variant":
        return cls(run, export.ensure_onnx(run), load.resolve_spec(str(run.path)))


def ort_steps(variant: Variant, threads: int, example: dict) -> dict[str, Step]:
    """ONNX Runtime CPU sessions on the exported graphs."""
    steps = {}
    for graph in onnx_graphs.graph_files(variant.spec.architecture):
        session = onnx_graphs.ort_session(variant.onnx_dir / graph, threads)
        names, outputs = onnx_graphs.graph_io(variant.onnx_dir / graph)
        steps[PARTS[graph]] = _ort_step(session, names, outputs)
    return steps


def _ort_step(session, names: list[str], outputs: list[str]) -> Step:
    return lambda values: dict(zip(outputs, session.run(None, onnx_graphs.onnx_feeds(names, values))))


def deepsparse_times(variants: dict[str, Variant], threads: int, values: dict, settings: dict) -> dict:
    """DeepSparse timings of one scenario (as `time_interleaved`), compiled and timed in a child process.

    A compile may abort the whole process (SmolLM2's Llama export) or need more memory than the machine
    has (DeBERTa-v2-xxlarge at batch 16): either ends only the child, and RuntimeError says why. Each
    graph compiles once, and the child's memory is all returned when the scenario ends.
    """
    import importlib.util
    import tempfile

    from harness.evaluators.onnx_engine import child_failure

    if importlib.util.find_spec("deepsparse") is None:
        raise ModuleNotFoundError("No module named 'deepsparse'")
    with tempfile.TemporaryDirectory(prefix="harness-deepsparse-") as folder:
        np.savez(Path(folder) / "inputs.npz", **values)
        write_json(Path(folder) / "request.json", {
            "variants": {name: [str(v.onnx_dir), v.spec.architecture] for name, v in variants.items()},
            "threads": threads, "settings": settings})
        failure = child_failure(DEEPSPARSE_CHILD, folder, str(Path(__file__).resolve().parents[1]))
        if failure:
            raise RuntimeError(f"DeepSparse failed: {failure}")
        return read_json(Path(folder) / "times.json")


DEEPSPARSE_CHILD = ("import sys; sys.path.insert(0, sys.argv[2]); "
                    "from harness.bench import time_deepsparse_request; time_deepsparse_request(sys.argv[1])")


def time_deepsparse_request(folder: str) -> None:
    """The child's side of `deepsparse_times`: compile the request's graphs, time them, write times.json."""
    request = read_json(Path(folder) / "request.json")
    with np.load(Path(folder) / "inputs.npz") as stored:
        values = dict(stored)
    steps = {name: deepsparse_steps(Path(onnx_dir), architecture, request["threads"], values, name)
             for name, (onnx_dir, architecture) in request["variants"].items()}
    print("timing", flush=True)
    write_json(Path(folder) / "times.json", time_interleaved(steps, values, request["settings"]))


def deepsparse_steps(onnx_dir: Path, architecture: str, threads: int, example: dict, label: str) -> dict[str, Step]:
    """DeepSparse engines compiled for the example's shapes (from static copies of the graphs)."""
    from deepsparse import Engine

    batch_size, seq_len = example["input_ids"].shape
    dims = {"batch_size": batch_size, "sequence_length": seq_len, "encoder_sequence_length": seq_len,
            "decoder_sequence_length": example.get("decoder_input_ids", example["input_ids"]).shape[1]}
    steps = {}
    for graph in onnx_graphs.graph_files(architecture):
        names, outputs = onnx_graphs.graph_io(onnx_dir / graph)
        print(f"compiling {graph} ({label})", flush=True)  # what the parent names if this child dies
        with onnx_graphs.static_graph(onnx_dir / graph, dims) as fixed:
            engine = Engine(str(fixed), batch_size=batch_size, num_cores=threads)
        steps[PARTS[graph]] = _deepsparse_step(engine, names, outputs)
    return steps


def _deepsparse_step(engine, names: list[str], outputs: list[str]) -> Step:
    return lambda values: dict(zip(outputs, engine.run(list(onnx_graphs.onnx_feeds(names, values).values()))))


def pytorch_steps(variant: Variant, threads: int, example: dict) -> dict[str, Step]:
    """Eager PyTorch on the checkpoint, fed the same named inputs as the ONNX graphs (threads: torch.set_num_threads)."""
    import torch

    model = variant.loaded.model

    def tensors(values: dict, *names: str) -> dict:
        return {name: torch.as_tensor(values[name]) for name in names}

    def run_model(v: dict) -> dict:
        with torch.no_grad():
            return dict(model(**tensors(v, "input_ids", "attention_mask")))

    def encoder(v: dict) -> dict:
        with torch.no_grad():
            return {"last_hidden_state": model.get_encoder()(**tensors(v, "input_ids", "attention_mask")).last_hidden_state}

    def decoder(v: dict) -> dict:
        v = tensors(v, "input_ids", "encoder_hidden_states", "encoder_attention_mask")
        with torch.no_grad():
            return {"logits": model(encoder_outputs=(v["encoder_hidden_states"],),
                                    attention_mask=v["encoder_attention_mask"], decoder_input_ids=v["input_ids"]).logits}

    return {"encoder": encoder, "decoder": decoder} if variant.spec.architecture == "encoder-decoder" else {"model": run_model}


def in_process(make_steps: Callable[[Variant, int, dict], dict[str, Step]]):
    """A timer that builds each variant's steps in this process and times them as `time_interleaved`."""
    def timer(variants: dict[str, Variant], threads: int, values: dict, settings: dict) -> dict:
        return time_interleaved({name: make_steps(v, threads, values) for name, v in variants.items()}, values, settings)

    return timer


# engine -> timer(variants, threads, values, settings) -> {variant: {part: [ms]}}
ENGINE_TIMERS = {"deepsparse": deepsparse_times, "onnxruntime": in_process(ort_steps), "pytorch": in_process(pytorch_steps)}
ENGINES = tuple(ENGINE_TIMERS)


# --- timing ---------------------------------------------------------------------------------------

def time_interleaved(steps: dict[str, dict[str, Step]], values: dict, settings: dict) -> dict[str, dict[str, list[float]]]:
    """Wall times (ms) per variant, per part and in total, in blocks that alternate between the variants.

    Alternating exposes dense and sparse to the same machine load, so their ratio holds up on a shared
    CPU. Blocks rather than single passes, each after `warmup` untimed passes: an engine's idle worker
    threads keep spinning for a while and would slow the other variant's next pass. Each variant gets
    ROUNDS blocks (one if there is a single variant), in total at least `iterations` timed passes and
    `min_time_s` seconds, at most `max_iterations` passes (from the bench settings).
    """
    warmup, iterations, min_time, max_iterations = (settings[key] for key in ("warmup", "iterations", "min_time_s",
                                                                              "max_iterations"))
    times = {variant: {part: [] for part in [*parts, "total"]} for variant, parts in steps.items()}
    rounds = ROUNDS if len(steps) > 1 else 1

    def one_pass(variant: str, record: bool) -> None:
        outputs, total = {}, 0.0
        for part, step in steps[variant].items():
            inputs = part_inputs(part, values, outputs)
            start = time.perf_counter()
            outputs = step(inputs)
            elapsed = (time.perf_counter() - start) * 1000
            total += elapsed
            if record:
                times[variant][part].append(elapsed)
        if record:
            times[variant]["total"].append(total)

    for round_index in range(1, rounds + 1):
        for variant in steps:
            for _ in range(warmup):
                one_pass(variant, record=False)
            started, done = time.perf_counter(), times[variant]["total"]
            while len(done) < -(-iterations * round_index // rounds) or (
                    time.perf_counter() - started < min_time / rounds and len(done) < max_iterations * round_index // rounds):
                one_pass(variant, record=True)
    return times


def summarize(times: dict[str, list[float]], batch_size: int, seq_len: int, threads: int) -> dict:
    def stats(values: list[float]) -> dict:
        return {"median_ms": round(float(np.median(values)), 4), "p90_ms": round(float(np.percentile(values, 90)), 4)}

    total = stats(times["total"])
    timing = {"batch_size": batch_size, "seq_len": seq_len, **total,
              "items_per_s": round(batch_size / (total["median_ms"] / 1000), 3),
              "iterations": len(times["total"]), "threads": threads}
    parts = [p for p in times if p not in ("total", "model")]
    if parts:
        timing["parts"] = {part: stats(times[part]) for part in parts}
    return timing


# --- FLOP-ideal speedup ---------------------------------------------------------------------------

class LinearCost(NamedTuple):
    macs: float  # multiply-accumulates of this Linear/Conv1D in the pass
    density: float  # non-zero fraction of its weight
    target: bool  # among the recipe's prunable weights


def linear_macs(model, call: Callable[[], object], targets: set[str]) -> tuple[float, dict[str, LinearCost]]:
    """Multiply-accumulates of one `call()`: the total over all matmuls, and the cost of each Linear/Conv1D
    (`targets`: parameter names the recipe prunes)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from harness.sparsity import _linear_like

    macs: dict[str, float] = {}
    hooks = []
    for name, module in model.named_modules():
        if _linear_like(module):
            def hook(mod, inputs, output, name=name):
                rows = inputs[0].numel() // inputs[0].shape[-1]
                macs[name] = macs.get(name, 0.0) + rows * mod.weight.numel()

            hooks.append(module.register_forward_hook(hook))
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            call()
    finally:
        for handle in hooks:
            handle.remove()
    modules = dict(model.named_modules())
    costs = {name: LinearCost(value, float((modules[name].weight != 0).sum()) / modules[name].weight.numel(),
                              f"{name}.weight" in targets)
             for name, value in macs.items()}
    return counter.get_total_flops() / 2, costs


def flop_ideal(total_macs: float, costs: dict[str, LinearCost]) -> dict:
    """Ideal speedup when each weight's MACs scale with its density and every other matmul stays dense.

    The shares split the dense MACs into the recipe's prunable weights, other weights (LM head,
    task heads, anything the recipe leaves alone) and other matmuls (attention scores and context);
    `max_speedup` is Amdahl's limit with every prunable weight at 100 % sparsity.
    """
    prunable = sum(c.macs for c in costs.values() if c.target)
    other_linear = sum(c.macs for c in costs.values() if not c.target)
    sparse_macs = total_macs - sum(c.macs * (1 - c.density) for c in costs.values())
    return {
        "speedup": round(total_macs / sparse_macs, 4),
        "macs_dense": total_macs,
        "macs_sparse": sparse_macs,
        "prunable_share": round(prunable / total_macs, 4),
        "other_linear_share": round(other_linear / total_macs, 4),
        "other_matmul_share": round(1 - (prunable + other_linear) / total_macs, 4),
        "max_speedup": round(total_macs / (total_macs - prunable), 4) if prunable < total_macs else None,
    }


def flop_ideal_for(model, architecture: str, seq_len: int, targets: set[str]) -> dict:
    """The FLOP-ideal speedup of one sequence (batch size cancels out); encoder-decoders per part and combined."""
    import torch

    values = synthetic_inputs(model.config, architecture, 1, seq_len)
    inputs = {k: torch.from_numpy(v) for k, v in values.items() if k in ("input_ids", "attention_mask")}
    if architecture != "encoder-decoder":
        return flop_ideal(*linear_macs(model, lambda: model(**inputs), targets))
    encoder_total, encoder_costs = linear_macs(model, lambda: model.get_encoder()(**inputs), targets)
    with torch.no_grad():
        hidden = model.get_encoder()(**inputs).last_hidden_state
    decoder_ids = torch.from_numpy(values["decoder_input_ids"])
    decoder_total, decoder_costs = linear_macs(model, lambda: model(
        encoder_outputs=(hidden,), attention_mask=inputs["attention_mask"], decoder_input_ids=decoder_ids), targets)
    combined = {f"encoder:{k}": v for k, v in encoder_costs.items()} | {f"decoder:{k}": v for k, v in decoder_costs.items()}
    return {**flop_ideal(encoder_total + decoder_total, combined),
            "parts": {"encoder": flop_ideal(encoder_total, encoder_costs),
                      "decoder": flop_ideal(decoder_total, decoder_costs)}}


# --- sizes on disk ----------------------------------------------------------------------------------

def gzip_size(paths: list[Path], level: int = 6) -> int:
    """Bytes of the files gzip-compressed at `level`, streamed; nothing is written."""
    class Counter:
        size = 0

        def write(self, data):
            self.size += len(data)

        def flush(self):
            pass

    counter = Counter()
    with gzip.GzipFile(fileobj=counter, mode="wb", compresslevel=level, mtime=0) as stream:
        for path in paths:
            with open(path, "rb") as handle:
                shutil.copyfileobj(handle, stream, 1 << 22)
    return counter.size


def write_bitmask(run: RunDir) -> Path:
    """The checkpoint in compressed-tensors' sparse-bitmask format (every tensor: values + bitmask + row
    offsets), in shards of about load.SHARD_BYTES with an index, so memory holds one shard, not the model."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.compressors.sparse_bitmask import BitmaskTensor
    from compressed_tensors.config import BitmaskConfig
    from safetensors.torch import save_file

    from harness.sparsity import saved_tensors

    target = run.path / COMPRESSED_SUBDIR
    with staging_dir(target) as tmp:
        shards, shard, shard_bytes, zeros, numel = [], {}, 0, 0, 0

        def flush() -> None:
            save_file(shard, tmp / f"shard-{len(shards)}", metadata={"format": "pt"})
            shards.append(list(shard))

        for name, tensor in saved_tensors(run.model_dir):
            parts = BitmaskTensor.from_dense(tensor).dict(name_prefix=name)
            shard.update(parts)
            shard_bytes += sum(part.numel() * part.element_size() for part in parts.values())
            zeros, numel = zeros + int((tensor == 0).sum()), numel + tensor.numel()
            if shard_bytes >= load.SHARD_BYTES:
                flush()
                shard, shard_bytes = {}, 0
        if shard or not shards:
            flush()
        weight_map = {}
        for index, names in enumerate(shards):
            file = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
            os.replace(tmp / f"shard-{index}", tmp / file)
            weight_map.update(dict.fromkeys(names, file))
        write_json(tmp / "model.safetensors.index.json", {"metadata": {}, "weight_map": weight_map})
        shutil.copy(run.model_dir / "config.json", tmp / "config.json")
        ModelCompressor(sparsity_config=BitmaskConfig(global_sparsity=zeros / numel)).update_config(str(tmp))
    return target


def sizes(run: RunDir, onnx_dir: Path, architecture: str, gzip_level: int = 6) -> dict:
    """Bytes and bits per weight of the checkpoint, the ONNX graphs, both gzipped, and the sparse-bitmask format."""
    from harness.sparsity import saved_tensors

    params = sum(tensor.numel() for _, tensor in saved_tensors(run.model_dir))
    checkpoint = sorted(run.model_dir.glob("*.safetensors"))
    graphs = [onnx_dir / name for name in onnx_graphs.graph_files(architecture)]
    onnx_files = [p for graph in graphs for p in (graph, graph.with_name(graph.name + "_data")) if p.exists()]
    bitmask = sorted(write_bitmask(run).glob("*.safetensors"))

    def entry(size: int) -> dict:
        return {"bytes": size, "bits_per_weight": round(8 * size / params, 3)}

    with ThreadPoolExecutor(2) as pool:  # zlib releases the GIL: both files compress at once
        checkpoint_gzip, onnx_gzip = pool.map(lambda files: gzip_size(files, gzip_level), [checkpoint, onnx_files])
    return {
        "params": params,
        "checkpoint": entry(sum(p.stat().st_size for p in checkpoint)),
        "checkpoint_gzip": entry(checkpoint_gzip),
        "onnx": entry(sum(p.stat().st_size for p in onnx_files)),
        "onnx_gzip": entry(onnx_gzip),
        "sparse_bitmask": entry(sum(p.stat().st_size for p in bitmask)),
    }


# --- the stage ----------------------------------------------------------------------------------------

def bench_engines(variants: dict[str, Variant], settings: dict, warnings_out: list[str]) -> tuple[dict, dict]:
    """Time every engine on every scenario for both variants ({"sparse": ..., "dense": ...}, or only "sparse"
    for a dense run); returns (engine status, {variant: {engine: {scenario: timing}}})."""
    import torch

    threads = settings["threads"]
    torch.set_num_threads(threads)
    some = next(iter(variants.values()))
    engines = {}
    results = {name: {} for name in variants}
    scenarios = [(b, settings["seq_len"]) for b in settings["batch_sizes"]]
    progress = tqdm(total=len(settings["engines"]) * len(scenarios), unit="scenario",
                    desc=f"bench {some.run.model} {some.run.level:g}%")
    for engine in settings["engines"]:
        engines[engine] = {"status": "ok", "threads": threads}
        for batch_size, seq_len in scenarios:
            scenario = scenario_name(batch_size, seq_len)
            progress.set_postfix_str(f"{engine} {scenario}")
            values = synthetic_inputs(some.config, some.spec.architecture, batch_size, seq_len)
            try:
                times = ENGINE_TIMERS[engine](variants, threads, values, settings)
            except Exception as exc:
                if engine != "deepsparse":
                    raise
                text = str(exc).strip()
                # later scenarios have larger batches: no engine there either
                reason = f"from {scenario} on: {type(exc).__name__}: {text.splitlines()[0][:200] if text else ''}"
                others = [name for name in settings["engines"] if name != engine]
                warnings_out.append(f"DeepSparse unavailable {reason}; "
                                    + (f"{', '.join(others)} results only there" if others else "no timings there"))
                engines[engine] = {"status": "unavailable", "threads": threads, "reason": reason}
                progress.update(len(scenarios) - len(results["sparse"].get(engine, {})))
                break
            for name in variants:
                results[name].setdefault(engine, {})[scenario] = summarize(times[name], batch_size, seq_len, threads)
            progress.update(1)
        for variant in variants.values():
            variant.release()
    progress.close()
    return engines, results


def speedups(results: dict, dense_results: dict, ideal: dict) -> dict:
    """Per scenario: each engine's dense/sparse median ratio, the headline (ORT dense / DeepSparse sparse), efficiencies."""
    out = {}
    for scenario, ideal_entry in ideal.items():
        def ratio(dense_engine: str, sparse_engine: str):
            dense = dense_results.get(dense_engine, {}).get(scenario)
            sparse = results.get(sparse_engine, {}).get(scenario)
            return dense["median_ms"] / sparse["median_ms"] if dense and sparse else None

        entry = {engine: ratio(engine, engine) for engine in results}
        entry["headline"] = ratio("onnxruntime", "deepsparse")
        entry["efficiency"] = {k: (v / ideal_entry["speedup"] if v is not None else None)
                               for k, v in entry.items() if k != "efficiency"}
        out[scenario] = entry
    return out


def bench(run: RunDir, settings: dict, force: bool = False) -> dict:
    """Benchmark a run against its dense baseline (exporting both if needed); writes `<run>/bench.json`."""
    run.require("prune")
    dense_run = RunDir(run.model, run.recipe, 0.0)
    if not dense_run.exists():
        print(f"bench: no dense baseline for {run.model} {run.recipe}; pruning level 0 first")
        prune.prune(run.model, 0, run.recipe)
    reuse_dense = run.level > 0 and settings["dense_timings"] == "level0"
    dense_document = dense_bench(dense_run, settings) if reuse_dense else None
    timed_runs = [run] if reuse_dense or run.level == 0 else [run, dense_run]
    # The weights' identity (their prune records), not the exports: a finished run may have had its
    # checkpoint and ONNX discarded to save disk, and its bench.json still stands.
    inputs = fingerprint([(r.stage_record("prune") or {}).get("finished") for r in timed_runs],
                         export.OPSET, export.GRAPH_REVISION,
                         settings, (dense_run.stage_record("bench") or {}).get("finished") if reuse_dense else None)
    if not force and run.is_current("bench", inputs, [BENCH_FILE]):
        return read_json(run.path / BENCH_FILE)
    variants = {"sparse": Variant.of(run)} | ({"dense": Variant.of(dense_run)} if len(timed_runs) > 1 else {})

    sparse = variants["sparse"]
    bench_warnings: list[str] = []
    with stage_run(run.manifest_path, "bench", inputs) as record:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            targets = set(read_json(run.path / prune.SPARSITY_FILE)["prunable_tensors"])
            per_sequence = flop_ideal_for(sparse.loaded.model, sparse.spec.architecture, settings["seq_len"], targets)
            sparse.release()
            ideal = {scenario_name(b, settings["seq_len"]): per_sequence for b in settings["batch_sizes"]}
            started = cpu_seconds()
            engines, results = bench_engines(variants, settings, bench_warnings)
            others = other_load(started)
            bench_warnings += busy_cpu_warning(others, settings["threads"])
        dense_results = dense_document["results"] if dense_document else results.get("dense", results["sparse"])
        result = {
            "model": run.model, "recipe": run.recipe, "level": run.level,
            "architecture": sparse.spec.architecture,
            "achieved_percent": read_json(run.path / prune.SPARSITY_FILE)["achieved_percent"],
            "run": str(run.path), "dense_run": str(dense_run.path),
            "settings": settings, "cpu": {**cpu_info(), "other_processes_cores": round(others, 2)}, "engines": engines,
            "results": results["sparse"], "dense_results": dense_results,
            "speedups": speedups(results["sparse"], dense_results, ideal),
            "flop_ideal": ideal,
            "sizes": sizes(run, sparse.onnx_dir, sparse.spec.architecture, settings["gzip_level"]),
            "warnings": bench_warnings,
        }
        write_json(run.path / BENCH_FILE, result)
        first = scenario_name(settings["batch_sizes"][0], settings["seq_len"])
        record.update(headline_speedup=result["speedups"][first]["headline"],
                      flop_ideal_speedup=ideal[first]["speedup"], warnings=len(result["warnings"]))
    return result


def dense_bench(dense_run: RunDir, settings: dict) -> dict:
    """Level 0's bench.json, benched first if missing; it must have been timed with the same settings, on
    at least the engines this level times (a sparse level may time fewer, e.g. only DeepSparse)."""
    path = dense_run.path / BENCH_FILE
    if not path.exists():
        print(f"bench: no dense timings in {dense_run.path}; benching level 0 first")
        # with ONNX Runtime always: it is the headline's baseline
        bench(dense_run, {**settings, "engines": [e for e in ENGINES if e in settings["engines"] or e == "onnxruntime"]})
    document = read_json(path)
    differing = sorted(k for k in settings if k != "engines" and document["settings"].get(k) != settings[k])
    untimed = [e for e in settings["engines"] if e not in document["settings"]["engines"]]
    if differing or untimed:
        problem = f"other settings ({', '.join(differing)})" if differing else f"without {', '.join(untimed)}"
        raise HarnessError(f"{path} was timed {problem}; bench level 0 again with these settings (--force) "
                           f"or use --dense-timings alongside")
    return document


def cpu_seconds() -> tuple[float, float, float]:
    """(wall clock, CPU seconds of every process, CPU seconds of this process and its finished children)."""
    system, own = psutil.cpu_times(), psutil.Process().cpu_times()
    busy = sum(getattr(system, field, 0.0) for field in ("user", "nice", "system", "irq", "softirq", "steal"))
    return time.time(), busy, own.user + own.system + own.children_user + own.children_system


def other_load(since: tuple[float, float, float]) -> float:
    """Cores' worth of CPU that other processes used, on average, since a `cpu_seconds()` snapshot."""
    wall, busy, own = (now - then for now, then in zip(cpu_seconds(), since))
    return max(0.0, (busy - own) / wall) if wall > 0 else 0.0


def busy_cpu_warning(others: float, threads: int) -> list[str]:
    """A warning when other processes kept the cores busy while timing: spin-waiting thread pools (DeepSparse,
    PyTorch) then lose whole time slices whenever one of their threads is descheduled."""
    cores = psutil.cpu_count() or 1
    if others <= BUSY_CORES:
        return []
    return [f"other processes kept {others:.1f} of {cores} cores busy while timing with {threads} threads: "
            f"the times are unreliable; use an idle machine or fewer --threads"]


def cpu_info() -> dict:
    import platform

    info = {"model": platform.processor() or platform.machine(), "physical_cores": psutil.cpu_count(logical=False),
            "logical_cores": psutil.cpu_count(), "load_average_1min": round(os.getloadavg()[0], 2)}
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    info["model"] = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    info["avx"] = sorted(f for f in flags if f.startswith(("avx", "amx")) or f.endswith("vnni"))
                    break
    except OSError:
        pass
    return info


# --- the table ------------------------------------------------------------------------------------------

def _ms(timing: dict | None, part: str | None = None) -> str:
    if not timing:
        return "-"
    value = timing["parts"][part]["median_ms"] if part else timing["median_ms"]
    return f"{value:.2f}"


def format_table(result: dict) -> str:
    """One screen: medians per engine and scenario (parts for encoder-decoders), speedups, FLOP-ideal, sizes."""
    settings = result["settings"]
    lines = [f"bench: {result['model']} {result['recipe']} level {result['level']:g}% "
             f"(achieved {result['achieved_percent']:.1f}% of prunable weights), seq {settings['seq_len']}, "
             f"{settings['threads']} threads; median ms (dense -> sparse)",
             f"{'engine':<12} {'scenario':<10} {'part':<9} {'dense':>9} {'sparse':>9} {'p90':>9} {'items/s':>9} "
             f"{'speedup':>8} {'eff.':>6}"]
    for engine, scenarios in result["results"].items():
        for scenario, timing in scenarios.items():
            dense = result["dense_results"].get(engine, {}).get(scenario)
            speed = result["speedups"][scenario][engine]
            efficiency = result["speedups"][scenario]["efficiency"][engine]
            lines.append(f"{engine:<12} {scenario:<10} {'all':<9} {_ms(dense):>9} {_ms(timing):>9} "
                         f"{timing['p90_ms']:>9.2f} {timing['items_per_s']:>9.1f} "
                         f"{_x(speed):>8} {_num(efficiency):>6}")
            for part in timing.get("parts", {}):
                lines.append(f"{'':<12} {'':<10} {part:<9} {_ms(dense, part) if dense else '-':>9} "
                             f"{_ms(timing, part):>9} {timing['parts'][part]['p90_ms']:>9.2f}")
    for engine, status in result["engines"].items():
        if status["status"] != "ok":
            lines.append(f"{engine:<12} unavailable: {status['reason']}")
    for scenario, entry in result["speedups"].items():
        ideal = result["flop_ideal"][scenario]
        lines.append(f"{scenario}: DeepSparse sparse vs ONNX Runtime dense {_x(entry['headline'])}, "
                     f"FLOP-ideal {ideal['speedup']:.2f}x, efficiency {_num(entry['efficiency']['headline'])}")
    ideal = next(iter(result["flop_ideal"].values()))
    limit = f"{ideal['max_speedup']:.1f}x" if ideal["max_speedup"] else "unbounded"
    lines.append(f"MACs per sequence: {ideal['prunable_share']:.0%} in prunable weights, {ideal['other_linear_share']:.0%} "
                 f"in other weights (LM head, task heads), {ideal['other_matmul_share']:.0%} in attention matmuls "
                 f"-> FLOP-ideal at most {limit} even at 100% sparsity (Amdahl)")
    size = result["sizes"]
    lines.append("size: " + ", ".join(
        f"{label} {size[key]['bytes'] / 1e6:.1f} MB ({size[key]['bits_per_weight']:.1f} b/w)"
        for key, label in (("checkpoint", "checkpoint"), ("checkpoint_gzip", "gzip"),
                           ("sparse_bitmask", "sparse-bitmask"), ("onnx", "onnx"), ("onnx_gzip", "onnx gzip"))))
    lines += [f"warning: {w}" for w in result["warnings"]]
    return "\n".join(lines)


def _x(value) -> str:
    return f"{value:.2f}x" if value is not None else "-"


def _num(value) -> str:
    return f"{value:.2f}" if value is not None else "-"


# --- CLI ----------------------------------------------------------------------------------------------------

def add_arguments(parser) -> None:
    export.add_run_arguments(parser)
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
    if min(args.batch_sizes) < 1 or args.seq_len < 2 or args.iterations < 1 or args.warmup < 0:
        raise HarnessError("--batch-sizes and --iterations must be >= 1, --seq-len >= 2, --warmup >= 0")
    return {"batch_sizes": sorted(set(args.batch_sizes)), "seq_len": args.seq_len,
            "threads": args.threads or physical_threads(), "iterations": args.iterations,
            "min_time_s": args.min_time, "max_iterations": max(args.max_iterations, args.iterations),
            "warmup": args.warmup, "engines": [e for e in ENGINES if e in engines],
            "dense_timings": args.dense_timings, "gzip_level": args.gzip_level}


def main(args) -> None:
    run = export.run_from_args(args)
    result = bench(run, settings_from_args(args), force=args.force)
    print(format_table(result))
