"""How the bench times: passes alternating between dense and sparse, their summary, and the CPU they ran on.

Every engine turns a variant into steps, one per graph (`model`, or `encoder` then `decoder`), and
`time_interleaved` times them; `summarize` turns the wall times into a `layout.Timing`. The CPU
measurements (`cpu_seconds`, `other_load`, `busy_cpu_warning`) tell whether other processes shared
the cores while timing.
"""
from __future__ import annotations

import os
import time
from typing import Callable

import numpy as np
import psutil

from harness import onnx_graphs
from harness.layout import PartTiming, Timing

BUSY_CORES = 0.25  # other processes' average CPU use while timing above which the times are flagged
ROUNDS = 2  # alternating timing blocks per variant when dense and sparse are timed together

Step = Callable[[dict], dict]  # named inputs -> named outputs (numpy arrays or torch tensors)
Times = dict[str, dict[str, list[float]]]  # variant -> part (and "total") -> wall times in ms


def physical_threads() -> int:
    """Physical cores this process may use (the default for every engine)."""
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(psutil.cpu_count(logical=False) or available, available))


def scenario_name(batch_size: int, seq_len: int) -> str:
    return f"b{batch_size}_s{seq_len}"


def part_inputs(part: str, values: dict, outputs: dict) -> dict:
    """What a part's graph is fed: the scenario's inputs, or for the decoder the encoder's output."""
    return onnx_graphs.decoder_values(values, outputs["last_hidden_state"]) if part == "decoder" else values


def time_interleaved(steps: dict[str, dict[str, Step]], values: dict, settings: dict) -> Times:
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


def summarize(times: dict[str, list[float]], batch_size: int, seq_len: int, threads: int) -> Timing:
    """One variant's wall times as median, 90th percentile and throughput (parts: encoder-decoders only)."""
    def stats(values: list[float]) -> PartTiming:
        return PartTiming(median_ms=round(float(np.median(values)), 4), p90_ms=round(float(np.percentile(values, 90)), 4))

    total = stats(times["total"])
    parts = [p for p in times if p not in ("total", "model")]
    return Timing(batch_size=batch_size, seq_len=seq_len, median_ms=total.median_ms, p90_ms=total.p90_ms,
                  items_per_s=round(batch_size / (total.median_ms / 1000), 3), iterations=len(times["total"]),
                  threads=threads, parts={part: stats(times[part]) for part in parts} if parts else None)


# --- the CPU ----------------------------------------------------------------------------------------------

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


NODE_KIND = ("model", "physical_cores", "logical_cores", "avx")  # what makes two machines' timings comparable


def cpu_info() -> dict:
    """The machine that timed (host name), its CPU's model name, core counts, 1-minute load average and
    AVX/AMX/VNNI flags."""
    import platform

    info = {"node": platform.node(), "model": platform.processor() or platform.machine(),
            "physical_cores": psutil.cpu_count(logical=False),
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


VECTOR_FEATURES = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_vnni": "VNNI", "avx_vnni": "AVX-VNNI",
                   "avx512_bf16": "BF16", "amx_tile": "AMX"}  # flag -> label, what sparse and INT8 kernels depend on


def vector_features(info: dict) -> str:
    """The CPU's vector instructions that decide an engine's kernels, e.g. "AVX2, AVX-512, VNNI, BF16"; INT8
    speedups in particular differ by machine (VNNI multiplies 8-bit integers in one instruction)."""
    flags = set(info.get("avx") or ())
    return ", ".join(label for flag, label in VECTOR_FEATURES.items() if flag in flags) or "no AVX2"


def cpu_has_vnni() -> bool:
    """Does this CPU multiply 8-bit integers with VNNI (AVX-512 or AVX) instructions?"""
    return _has_any({"avx512_vnni", "avx_vnni"})


def cpu_has_bf16() -> bool:
    """Does this CPU multiply bf16 matrices natively (AMX or AVX512-BF16)? Without, bf16 is emulated and slower."""
    return _has_any({"amx_bf16", "avx512_bf16"})


def _has_any(flags: set[str]) -> bool:
    return bool(flags & set(cpu_info().get("avx", ())))


def node_kind(info: dict) -> dict:
    """The part of `cpu_info()` that must match for two timings to be compared."""
    return {key: info.get(key) for key in NODE_KIND}
