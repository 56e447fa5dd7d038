"""Bench: bench.json schema and consistency, the FLOP-ideal model, sizes on disk, DeepSparse fallback."""
import sys
import time

import psutil
import pytest
import torch
import transformers
from compressed_tensors.compressors.sparse_bitmask import BitmaskCompressor

from harness import bench, child, cli, engines, export, flops, layout, load, sizes, sparsity, timing
from harness.errors import HarnessError
from harness.report.format import number
from harness.rundir import read_json, write_json
from conftest import RECIPE, write_run

# One thread: DeepSparse's spinning worker threads slow down badly when the CPU is shared (CI).
SETTINGS = {"batch_sizes": [1, 2], "seq_len": 16, "threads": 1, "iterations": 3, "min_time_s": 0.0,
            "max_iterations": 3, "warmup": 1, "repeats": 1, "engines": list(engines.ENGINES),
            "dense_timings": "alongside", "gzip_level": 6}


@pytest.fixture(scope="module")
def gpt2_bench():
    write_run("tiny-gpt2", 0)
    run = write_run("tiny-gpt2", 90)
    return run, bench.bench(run, SETTINGS)


def test_flop_ideal_of_a_hand_computed_gpt2():
    # 1 layer, width 8, 2 heads, vocab 16, 4 tokens. Per token: c_attn 8x24 + attn c_proj 8x8 + c_fc 8x32
    # + mlp c_proj 32x8 = 768 MACs in the block's weights (x4 tokens = 3072); attention scores and context
    # 2 heads x 4x4x4 each = 256; LM head 4 x 8 x 16 = 512. Total 3840; half the block weights zero -> 2304.
    config = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=8)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    targets = set(sparsity.prunable_names(model))
    with torch.no_grad():
        for name in targets:
            weight = dict(model.named_parameters())[name].view(-1)
            weight[: weight.numel() // 2] = 0
    ideal = flops.flop_ideal_for(model, "decoder", 4, targets)
    assert ideal.macs_dense == 3840 and ideal.macs_sparse == 2304
    assert ideal.speedup == pytest.approx(3840 / 2304, abs=1e-4)
    assert ideal.prunable_share == pytest.approx(3072 / 3840, abs=1e-4)
    assert ideal.other_linear_share == pytest.approx(512 / 3840, abs=1e-4)
    assert ideal.other_matmul_share == pytest.approx(256 / 3840, abs=1e-4)
    assert ideal.max_speedup == pytest.approx(3840 / 768, abs=1e-4)


def test_bench_json_schema_and_sane_values(gpt2_bench):
    run, result = gpt2_bench
    assert run.read(layout.BENCH_FILE, layout.Bench) == result
    stored = read_json(run.path / layout.BENCH_FILE)  # the format the report reads: shares by name, speedups flat
    assert set(stored["flop_ideal"]["b1_s16"]) >= {"prunable_share", "other_linear_share", "other_matmul_share"}
    assert set(stored["speedups"]["b1_s16"]) == {*engines.ENGINES, "headline", "efficiency"}
    assert "reason" not in stored["engines"]["deepsparse"] and "parts" not in stored["results"]["pytorch"]["b1_s16"]
    assert run.stage_record("bench")["status"] == "done"
    assert result.dense_run == str(write_run("tiny-gpt2", 0).path)
    assert result.engines == {name: layout.EngineStatus("ok", 1, precision="int8" if name == "openvino-int8" else "fp32")
                              for name in engines.ENGINES}  # DeepSparse runs here
    assert stored["engines"]["openvino-int8"]["precision"] == "int8" and stored["engines"]["openvino"]["precision"] == "fp32"
    for engine in engines.ENGINES:
        for scenario, batch in (("b1_s16", 1), ("b2_s16", 2)):
            for timings in (result.results, result.dense_results):
                entry = timings[engine][scenario]
                assert entry.batch_size == batch and entry.threads == 1 and entry.iterations == 3
                assert 0 < entry.median_ms <= entry.p90_ms
                assert entry.items_per_s == pytest.approx(batch / entry.median_ms * 1000, rel=1e-3)


def test_speedups_are_ratios_of_the_reported_medians(gpt2_bench):
    _, result = gpt2_bench
    dense, sparse = result.dense_results, result.results
    assert set(result.speedups) == {"b1_s16", "b2_s16"}
    for scenario, entry in result.speedups.items():
        ideal = result.flop_ideal[scenario].speedup
        assert 4 < ideal < 10  # 90 % of ~96 % of the MACs pruned
        for engine in engines.ENGINES:
            expected = dense[engine][scenario].median_ms / sparse[engine][scenario].median_ms
            assert entry.engines[engine] == pytest.approx(expected, rel=1e-3)
            assert entry.efficiency[engine] == pytest.approx(expected / ideal, rel=1e-3)
        expected = dense["onnxruntime"][scenario].median_ms / sparse["deepsparse"][scenario].median_ms
        assert entry.headline == pytest.approx(expected, rel=1e-3)
        assert entry.efficiency["headline"] == pytest.approx(expected / ideal, rel=1e-3)


def test_the_fastest_dense_engines_are_the_fastest_in_the_timings(gpt2_bench):
    run, result = gpt2_bench
    stored = read_json(run.path / layout.BENCH_FILE)
    for scenario in ("b1_s16", "b2_s16"):
        assert set(stored["fastest_dense"][scenario]) == {"fp32", "int8"}
        deepsparse_sparse = result.results["deepsparse"][scenario].median_ms
        for precision in ("fp32", "int8"):
            medians = {name: result.dense_results[name][scenario].median_ms
                       for name, status in result.engines.items() if status.precision == precision}
            best = result.fastest_dense[scenario][precision]
            assert best.engine == min(medians, key=medians.get) and best.median_ms == medians[best.engine]
            assert best.speedup == pytest.approx(best.median_ms / deepsparse_sparse, rel=1e-3)


def test_fastest_dense_leaves_out_what_was_not_timed():
    def timing(ms: float) -> layout.Timing:
        return layout.Timing(1, 16, ms, ms, 1000 / ms, 3, 1)

    dense = {"onnxruntime": {"b1_s16": timing(4.0)}, "openvino": {"b1_s16": timing(3.0), "b2_s16": timing(5.0)},
             "deepsparse": {"b1_s16": timing(3.5)}, "openvino-int8": {"b2_s16": timing(2.0)}}
    precisions = {"onnxruntime": "fp32", "openvino": "fp32", "deepsparse": "fp32", "openvino-int8": "int8"}
    fastest = bench.fastest_dense({"deepsparse": {"b1_s16": timing(1.5)}}, dense, ["b1_s16", "b2_s16"], precisions)
    assert fastest == {"b1_s16": {"fp32": layout.FastestDense("openvino", 3.0, 2.0)},
                       "b2_s16": {"fp32": layout.FastestDense("openvino", 5.0, None),  # no DeepSparse timing there
                                  "int8": layout.FastestDense("openvino-int8", 2.0, None)}}


OLD_ENGINES = ("deepsparse", "onnxruntime", "pytorch")  # what bench.json held before the peer engines


def test_the_report_reads_bench_files_from_before_the_peer_engines(gpt2_bench, tmp_path, monkeypatch):
    """A bench.json without OpenVINO, precisions and fastest_dense renders with empty fastest-engine cells; the
    current one names the fastest engines; with an eval.json the speed-vs-accuracy plot appears."""
    from harness.paths import runs_dir
    from harness.report.plotting import PlotSet
    from harness.report.runs import collect
    from harness.report.speed import SPEED_ENGINES, section_speed

    run, result = gpt2_bench
    copy = tmp_path / "runs" / run.path.relative_to(runs_dir())
    copy.mkdir(parents=True)
    for name in (layout.MANIFEST, layout.SPARSITY_FILE):
        (copy / name).write_text((run.path / name).read_text())
    current = read_json(run.path / layout.BENCH_FILE)
    old = {**{key: value for key, value in current.items() if key != "fastest_dense"},
           "engines": {e: {k: v for k, v in current["engines"][e].items() if k != "precision"} for e in OLD_ENGINES},
           "results": {e: current["results"][e] for e in OLD_ENGINES},
           "dense_results": {e: current["dense_results"][e] for e in OLD_ENGINES},
           "speedups": {s: {k: v for k, v in entry.items() if not k.startswith("openvino")}
                        for s, entry in current["speedups"].items()}}
    monkeypatch.setenv("HARNESS_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("HARNESS_REPORTS", str(tmp_path / "reports"))
    (tmp_path / "reports").mkdir()

    def speed_rows(document: dict, evaluated: bool = False) -> tuple[list[str], str]:
        write_json(copy / layout.BENCH_FILE, document)
        if evaluated:
            write_json(copy / layout.EVAL_FILE, {
                "model": "tiny-gpt2", "recipe": RECIPE, "level": 90.0, "limit": 2, "engines": ["pytorch"],
                "baseline": None, "benchmarks": {"lambada_openai": {"status": "done", "metrics": {
                    "accuracy": {"value": 0.25}, "perplexity": {"value": 3000.0}}}}})
        markdown = "\n".join(section_speed(collect("tiny-gpt2"), PlotSet("tiny-gpt2")))
        return [line for line in markdown.splitlines() if line.startswith(f"| {RECIPE} | 90 |")], markdown

    rows, markdown = speed_rows(old)
    assert len([row for row in rows if "| – | – | – | – | [" in row]) == 2  # both scenarios: no fastest engines
    assert "OpenVINO" not in markdown and "speed vs accuracy" not in markdown
    rows, markdown = speed_rows(current)
    for scenario in ("b1_s16", "b2_s16"):
        (row,) = [row for row in rows if f" | {scenario} | " in row and "fastest" not in row and " ms) | " in row]
        cells = [f"{SPEED_ENGINES[best.engine]} ({number(best.median_ms)} ms) | {number(best.speedup)}"
                 for best in result.fastest_dense[scenario].values()]
        assert " | ".join(cells) in row
    _, markdown = speed_rows(current, evaluated=True)
    assert "accuracy = the run's lambada_openai accuracy" in markdown
    png = tmp_path / "reports" / "tiny-gpt2.speed-vs-accuracy.png"
    assert "![speed vs accuracy]" in markdown and png.read_bytes().startswith(b"\x89PNG")


def test_sizes_are_consistent_and_the_bitmask_format_round_trips(gpt2_bench):
    run, result = gpt2_bench
    measured = result.sizes
    params = sum(t.numel() for _, t in sparsity.saved_tensors(run.model_dir))
    assert measured.params == params
    entries = [measured.checkpoint, measured.checkpoint_gzip, measured.onnx, measured.onnx_gzip, measured.sparse_bitmask]
    for entry in entries:
        assert entry.bits_per_weight == pytest.approx(8 * entry.bytes / params, abs=1e-3)
    assert 31.9 < measured.checkpoint.bits_per_weight < 33
    assert measured.sparse_bitmask.bytes < 0.25 * measured.checkpoint.bytes  # 86 % of all weights are zero
    assert measured.checkpoint_gzip.bytes < measured.checkpoint.bytes
    dense = write_run("tiny-gpt2", 0)
    dense_sizes = sizes.sizes(dense, export.ensure_onnx(dense), "decoder")
    assert dense_sizes.sparse_bitmask.bytes > dense_sizes.checkpoint.bytes  # no zeros: mask is pure overhead
    compressed = run.path / layout.COMPRESSED_SUBDIR
    assert read_json(compressed / "config.json")["compression_config"]["sparsity_config"]["format"] == "sparse-bitmask"
    original = dict(sparsity.saved_tensors(run.model_dir))
    restored = dict(BitmaskCompressor(config=None).decompress(str(compressed)))
    assert restored.keys() == original.keys()
    assert all(torch.equal(restored[name], original[name]) for name in original)


def engine_in_child(monkeypatch, replacement: str) -> None:
    """Make the bench's engine children compile DeepSparse with `replacement` (Python source; os, signal and the
    real Engine in scope) instead of deepsparse.Engine."""
    monkeypatch.setenv("NM_DISABLE_ANALYTICS", "1")  # deepsparse is imported here before the child's own line
    monkeypatch.setattr(engines, "CHILD", "import os, signal, deepsparse\nEngine = deepsparse.Engine\n"
                        f"deepsparse.Engine = {replacement}\n" + engines.CHILD)


def test_a_deepsparse_compile_killed_at_one_batch_size_leaves_the_others(gpt2_bench, monkeypatch):
    # as the kernel's OOM killer does to a compile that needs more memory than the machine has
    engine_in_child(monkeypatch, "lambda path, batch_size, num_cores: os.kill(os.getpid(), signal.SIGKILL) "
                                 "if batch_size == 2 else Engine(path, batch_size=batch_size, num_cores=num_cores)")
    run, _ = gpt2_bench
    result = bench.bench(run, {**SETTINGS, "engines": ["deepsparse", "onnxruntime"]}, force=True)
    assert list(result.results["deepsparse"]) == ["b1_s16"] and result.speedups["b1_s16"].headline > 0
    assert result.engines["deepsparse"].status == "unavailable"
    reason = result.engines["deepsparse"].reason
    assert reason.startswith("from b2_s16 on: ") and "killed while compiling model.onnx (sparse) (out of memory?)" in reason
    assert set(result.results["onnxruntime"]) == {"b1_s16", "b2_s16"}
    assert any(w.endswith("; onnxruntime results only there") for w in result.warnings)


def test_a_child_is_stopped_when_the_machine_runs_low_on_memory(monkeypatch):
    assert child.child_failure("print('compiled')") is None
    # a threshold above the machine's memory stands in for a compile that has eaten it all
    monkeypatch.setattr(child, "MIN_AVAILABLE_BYTES", psutil.virtual_memory().total + 1)
    monkeypatch.setattr(child, "MEMORY_POLL_SECONDS", 0.1)
    started = time.monotonic()
    reason = child.child_failure("import time; print('compiling model.onnx', flush=True); time.sleep(60)")
    assert time.monotonic() - started < 30
    assert reason.startswith("stopped while compiling model.onnx: the machine was down to ")


def test_a_sharded_bitmask_round_trips(gpt2_bench, monkeypatch):
    run, _ = gpt2_bench
    monkeypatch.setattr(load, "SHARD_BYTES", 20_000)  # a few tensors per shard
    compressed = sizes.write_bitmask(run)
    assert len(list(compressed.glob("model-*-of-*.safetensors"))) > 3
    original = dict(sparsity.saved_tensors(run.model_dir))
    restored = dict(BitmaskCompressor(config=None).decompress(str(compressed)))
    assert restored.keys() == original.keys()
    assert all(torch.equal(restored[name], original[name]) for name in original)


def test_the_bench_leaves_torch_threads_as_it_found_them(gpt2_bench):
    # an in-process sweep runs its later stages (eval) with the process's own setting
    run, _ = gpt2_bench
    before = torch.get_num_threads()
    torch.set_num_threads(SETTINGS["threads"] + 2)
    try:
        result = bench.bench(run, {**SETTINGS, "batch_sizes": [1], "engines": ["pytorch"]}, force=True)
        assert result.results["pytorch"]["b1_s16"].threads == SETTINGS["threads"]
        assert torch.get_num_threads() == SETTINGS["threads"] + 2
    finally:
        torch.set_num_threads(before)


def test_encoder_decoder_reports_encoder_decoder_and_combined():
    write_run("tiny-m2m100", 0)
    run = write_run("tiny-m2m100", 90)  # the run test_export exports too
    settings = {**SETTINGS, "batch_sizes": [2], "engines": ["onnxruntime", "pytorch"]}
    result = bench.bench(run, settings)
    for engine in ("onnxruntime", "pytorch"):
        measured = result.results[engine]["b2_s16"]
        assert set(measured.parts) == {"encoder", "decoder"}
        assert measured.median_ms >= max(part.median_ms for part in measured.parts.values()) > 0
    ideal = result.flop_ideal["b2_s16"]
    assert set(ideal.parts) == {"encoder", "decoder"}
    assert ideal.macs_dense == pytest.approx(sum(p.macs_dense for p in ideal.parts.values()))
    assert all(2 < entry.speedup < 10 for entry in (ideal, *ideal.parts.values()))


def test_cli_prints_the_table(gpt2_bench, capsys):
    args = ["bench", "--model", "tiny-gpt2", "--level", "90", "--recipe", RECIPE, "--batch-sizes", "1", "2",
            "--seq-len", "16", "--threads", "1", "--iterations", "3", "--min-time", "0", "--max-iterations", "3",
            "--warmup", "1", "--engines", "deepsparse,onnxruntime,pytorch"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "DeepSparse sparse vs ONNX Runtime dense" in out and "FLOP-ideal" in out and "sparse-bitmask" in out
    assert f"1 threads on {timing.cpu_info()['model']} ({timing.vector_features(timing.cpu_info())})" in out
    assert "b2_s16: DeepSparse sparse vs the fastest dense engine: FP32 " in out and "INT8" not in out
    assert len(out.splitlines()) < 25


@pytest.mark.parametrize("failure", ["not installed", "compiler aborts"])
def test_deepsparse_failure_falls_back_with_a_warning(gpt2_bench, monkeypatch, failure):
    run, _ = gpt2_bench
    if failure == "not installed":  # also what an unsupported CPU looks like: the import fails
        monkeypatch.setitem(sys.modules, "deepsparse", None)
        expected = "ModuleNotFoundError"
    else:
        engine_in_child(monkeypatch, "lambda *args, **kwargs: os.abort()")
        expected = "exit code -6 while compiling model.onnx (sparse)"
    settings = {**SETTINGS, "batch_sizes": [1], "engines": ["deepsparse", "onnxruntime"]}
    result = bench.bench(run, settings, force=True)
    assert result.engines["deepsparse"].status == "unavailable"
    assert expected in result.engines["deepsparse"].reason
    assert any("DeepSparse unavailable" in w for w in result.warnings)
    assert result.results["onnxruntime"]["b1_s16"].median_ms > 0
    assert result.speedups["b1_s16"].headline is None


def test_repeats_take_turns_between_engines_and_pool_their_passes(gpt2_bench, monkeypatch, capsys):
    run, _ = gpt2_bench
    calls = []
    for name in ("onnxruntime", "pytorch"):
        def logged(variants, threads, values, settings, name=name, times=engines.ENGINES[name].times):
            calls.append((name, values["input_ids"].shape[0]))
            return times(variants, threads, values, settings)
        monkeypatch.setattr(engines.ENGINES[name], "times", logged)
    result = bench.bench(run, {**SETTINGS, "repeats": 2, "engines": ["onnxruntime", "pytorch"]}, force=True)
    # the second turn in the reverse order: each engine's passes straddle the other's
    assert calls == [("onnxruntime", 1), ("onnxruntime", 2), ("pytorch", 1), ("pytorch", 2),
                     ("pytorch", 1), ("pytorch", 2), ("onnxruntime", 1), ("onnxruntime", 2)]
    for timings in (result.results, result.dense_results):
        assert {entry.iterations for by_scenario in timings.values() for entry in by_scenario.values()} == {6}
    assert cli.main(["bench", "--model", "tiny-gpt2", "--level", "90", "--recipe", RECIPE, "--repeats", "0"]) == 2
    assert "--repeats must be >= 1" in capsys.readouterr().err


def test_missing_run_says_to_prune_first(capsys):
    assert cli.main(["bench", "--model", "tiny-gpt2", "--level", "33", "--recipe", RECIPE]) == 2
    assert "make prune MODEL=tiny-gpt2 LEVEL=33" in capsys.readouterr().err


def test_the_vector_features_name_what_int8_and_sparse_kernels_use():
    flags = ["avx", "avx2", "avx512_bf16", "avx512_vnni", "avx512bw", "avx512f"]
    assert timing.vector_features({"avx": flags}) == "AVX2, AVX-512, VNNI, BF16"
    assert timing.vector_features({"avx": ["avx", "avx2"]}) == "AVX2"
    assert timing.vector_features({"model": "an old CPU"}) == "no AVX2"


def test_a_busy_cpu_is_flagged():
    """Other processes' CPU use is measured over the timing window (not the load average, which counts
    the harness's own previous stage)."""
    import subprocess

    assert timing.busy_cpu_warning(0.1, threads=2) == []
    started = timing.cpu_seconds()
    other = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 1.5\nwhile time.time() < end: pass"])
    time.sleep(1.5)
    others = timing.other_load(started)
    other.wait()
    assert others > 0.5 and "unreliable" in timing.busy_cpu_warning(others, threads=2)[0]


def test_level0_dense_timings_are_reused_only_with_the_same_settings(gpt2_bench):
    run, _ = gpt2_bench
    settings = {**SETTINGS, "batch_sizes": [1], "engines": ["onnxruntime", "pytorch"], "dense_timings": "level0"}
    result = bench.bench(run, settings, force=True)
    level0 = write_run("tiny-gpt2", 0).read(layout.BENCH_FILE, layout.Bench)
    assert result.dense_run == str(write_run("tiny-gpt2", 0).path)
    assert result.dense_results == level0.results and level0.settings == settings
    # as `make bench-shapes`: the sparse level times one engine, the headline uses level 0's ONNX Runtime
    fewer = bench.bench(run, {**settings, "engines": ["pytorch"]}, force=True)
    assert list(fewer.results) == ["pytorch"] and fewer.dense_results == level0.results
    assert fewer.speedups["b1_s16"].engines["pytorch"] > 0 and fewer.speedups["b1_s16"].headline is None
    with pytest.raises(HarnessError, match=r"other settings \(iterations\)"):
        bench.bench(run, {**settings, "iterations": 2}, force=True)
    with pytest.raises(HarnessError, match="without deepsparse"):
        bench.bench(run, {**settings, "engines": ["deepsparse", "pytorch"]}, force=True)
    # timed on another kind of machine (as a cluster node may be): no speedups from it
    level0_path = write_run("tiny-gpt2", 0).path / layout.BENCH_FILE
    document = read_json(level0_path)
    before_repeats = {**document, "settings": {k: v for k, v in document["settings"].items() if k != "repeats"}}
    write_json(level0_path, before_repeats)  # written before `repeats` existed: timed once, as repeats=1 is
    assert bench.bench(run, settings, force=True).dense_results == level0.results
    assert document["cpu"]["node"] and document["cpu"]["physical_cores"] >= 1
    write_json(level0_path, {**document, "cpu": {**document["cpu"], "physical_cores": document["cpu"]["physical_cores"] + 8}})
    try:
        with pytest.raises(HarnessError, match=r"another kind of machine \(physical_cores \d+ there, \d+ here\)"):
            bench.bench(run, settings, force=True)
    finally:
        write_json(level0_path, document)
