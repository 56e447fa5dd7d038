"""Bench: bench.json schema and consistency, the FLOP-ideal model, sizes on disk, DeepSparse fallback."""
import sys
import time

import psutil
import pytest
import torch
import transformers
from compressed_tensors.compressors.sparse_bitmask import BitmaskCompressor

from harness import bench, cli, export, load, sparsity
from harness.evaluators import onnx_engine
from harness.errors import HarnessError
from harness.rundir import read_json
from conftest import RECIPE, write_run

# One thread: DeepSparse's spinning worker threads slow down badly when the CPU is shared (CI).
SETTINGS = {"batch_sizes": [1, 2], "seq_len": 16, "threads": 1, "iterations": 3, "min_time_s": 0.0,
            "max_iterations": 3, "warmup": 1, "engines": list(bench.ENGINES),
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
    ideal = bench.flop_ideal_for(model, "decoder", 4, targets)
    assert ideal["macs_dense"] == 3840 and ideal["macs_sparse"] == 2304
    assert ideal["speedup"] == pytest.approx(3840 / 2304, abs=1e-4)
    assert ideal["prunable_share"] == pytest.approx(3072 / 3840, abs=1e-4)
    assert ideal["other_linear_share"] == pytest.approx(512 / 3840, abs=1e-4)
    assert ideal["other_matmul_share"] == pytest.approx(256 / 3840, abs=1e-4)
    assert ideal["max_speedup"] == pytest.approx(3840 / 768, abs=1e-4)


def test_bench_json_schema_and_sane_values(gpt2_bench):
    run, result = gpt2_bench
    assert read_json(run.path / bench.BENCH_FILE) == result
    assert run.stage_record("bench")["status"] == "done"
    assert result["dense_run"] == str(write_run("tiny-gpt2", 0).path)
    for engine in bench.ENGINES:
        if result["engines"][engine]["status"] != "ok":
            assert engine == "deepsparse" and result["warnings"]
            continue
        for scenario, batch in (("b1_s16", 1), ("b2_s16", 2)):
            for timings in (result["results"], result["dense_results"]):
                timing = timings[engine][scenario]
                assert timing["batch_size"] == batch and timing["threads"] == 1 and timing["iterations"] == 3
                assert 0 < timing["median_ms"] <= timing["p90_ms"]
                assert timing["items_per_s"] == pytest.approx(batch / timing["median_ms"] * 1000, rel=1e-3)


def test_speedups_are_ratios_of_the_reported_medians(gpt2_bench):
    _, result = gpt2_bench
    dense, sparse = result["dense_results"], result["results"]
    for scenario, entry in result["speedups"].items():
        ideal = result["flop_ideal"][scenario]["speedup"]
        assert 4 < ideal < 10  # 90 % of ~96 % of the MACs pruned
        for engine in bench.ENGINES:
            if scenario in sparse.get(engine, {}):
                expected = dense[engine][scenario]["median_ms"] / sparse[engine][scenario]["median_ms"]
                assert entry[engine] == pytest.approx(expected, rel=1e-3)
                assert entry["efficiency"][engine] == pytest.approx(expected / ideal, rel=1e-3)
        if sparse.get("deepsparse"):
            expected = dense["onnxruntime"][scenario]["median_ms"] / sparse["deepsparse"][scenario]["median_ms"]
            assert entry["headline"] == pytest.approx(expected, rel=1e-3)


def test_sizes_are_consistent_and_the_bitmask_format_round_trips(gpt2_bench):
    run, result = gpt2_bench
    sizes = result["sizes"]
    params = sum(t.numel() for _, t in sparsity.saved_tensors(run.model_dir))
    assert sizes["params"] == params
    for entry in sizes.values():
        if isinstance(entry, dict):
            assert entry["bits_per_weight"] == pytest.approx(8 * entry["bytes"] / params, abs=1e-3)
    assert 31.9 < sizes["checkpoint"]["bits_per_weight"] < 33
    assert sizes["sparse_bitmask"]["bytes"] < 0.25 * sizes["checkpoint"]["bytes"]  # 86 % of all weights are zero
    assert sizes["checkpoint_gzip"]["bytes"] < sizes["checkpoint"]["bytes"]
    dense = write_run("tiny-gpt2", 0)
    dense_sizes = bench.sizes(dense, export.ensure_onnx(dense), "decoder")
    assert dense_sizes["sparse_bitmask"]["bytes"] > dense_sizes["checkpoint"]["bytes"]  # no zeros: mask is pure overhead
    compressed = run.path / bench.COMPRESSED_SUBDIR
    assert read_json(compressed / "config.json")["compression_config"]["sparsity_config"]["format"] == "sparse-bitmask"
    original = dict(sparsity.saved_tensors(run.model_dir))
    restored = dict(BitmaskCompressor(config=None).decompress(str(compressed)))
    assert restored.keys() == original.keys()
    assert all(torch.equal(restored[name], original[name]) for name in original)


def engine_in_child(monkeypatch, replacement: str) -> None:
    """Make the bench's DeepSparse child compile with `replacement` (Python source; os, signal and the real
    Engine in scope) instead of deepsparse.Engine."""
    monkeypatch.setattr(bench, "DEEPSPARSE_CHILD", "import os, signal, deepsparse\nEngine = deepsparse.Engine\n"
                        f"deepsparse.Engine = {replacement}\n" + bench.DEEPSPARSE_CHILD)


def test_a_deepsparse_compile_killed_at_one_batch_size_leaves_the_others(gpt2_bench, monkeypatch):
    # as the kernel's OOM killer does to a compile that needs more memory than the machine has
    engine_in_child(monkeypatch, "lambda path, batch_size, num_cores: os.kill(os.getpid(), signal.SIGKILL) "
                                 "if batch_size == 2 else Engine(path, batch_size=batch_size, num_cores=num_cores)")
    run, _ = gpt2_bench
    result = bench.bench(run, {**SETTINGS, "engines": ["deepsparse", "onnxruntime"]}, force=True)
    assert list(result["results"]["deepsparse"]) == ["b1_s16"] and result["speedups"]["b1_s16"]["headline"] > 0
    assert result["engines"]["deepsparse"]["status"] == "unavailable"
    reason = result["engines"]["deepsparse"]["reason"]
    assert reason.startswith("from b2_s16 on: ") and "killed while compiling model.onnx (sparse) (out of memory?)" in reason
    assert set(result["results"]["onnxruntime"]) == {"b1_s16", "b2_s16"}
    assert any(w.endswith("; onnxruntime results only there") for w in result["warnings"])


def test_a_child_is_stopped_when_the_machine_runs_low_on_memory(monkeypatch):
    assert onnx_engine.child_failure("print('compiled')") is None
    # a threshold above the machine's memory stands in for a compile that has eaten it all
    monkeypatch.setattr(onnx_engine, "MIN_AVAILABLE_BYTES", psutil.virtual_memory().total + 1)
    monkeypatch.setattr(onnx_engine, "MEMORY_POLL_SECONDS", 0.1)
    started = time.monotonic()
    reason = onnx_engine.child_failure("import time; print('compiling model.onnx', flush=True); time.sleep(60)")
    assert time.monotonic() - started < 30
    assert reason.startswith("stopped while compiling model.onnx: the machine was down to ")


def test_a_sharded_bitmask_round_trips(gpt2_bench, monkeypatch):
    run, _ = gpt2_bench
    monkeypatch.setattr(load, "SHARD_BYTES", 20_000)  # a few tensors per shard
    compressed = bench.write_bitmask(run)
    assert len(list(compressed.glob("model-*-of-*.safetensors"))) > 3
    original = dict(sparsity.saved_tensors(run.model_dir))
    restored = dict(BitmaskCompressor(config=None).decompress(str(compressed)))
    assert restored.keys() == original.keys()
    assert all(torch.equal(restored[name], original[name]) for name in original)


def test_encoder_decoder_reports_encoder_decoder_and_combined():
    write_run("tiny-m2m100", 0)
    run = write_run("tiny-m2m100", 90)  # the run test_export exports too
    settings = {**SETTINGS, "batch_sizes": [2], "engines": ["onnxruntime", "pytorch"]}
    result = bench.bench(run, settings)
    for engine in ("onnxruntime", "pytorch"):
        timing = result["results"][engine]["b2_s16"]
        assert set(timing["parts"]) == {"encoder", "decoder"}
        assert timing["median_ms"] >= max(part["median_ms"] for part in timing["parts"].values()) > 0
    ideal = result["flop_ideal"]["b2_s16"]
    assert set(ideal["parts"]) == {"encoder", "decoder"}
    assert ideal["macs_dense"] == pytest.approx(sum(p["macs_dense"] for p in ideal["parts"].values()))
    assert all(2 < entry["speedup"] < 10 for entry in (ideal, *ideal["parts"].values()))


def test_cli_prints_the_table(gpt2_bench, capsys):
    args = ["bench", "--model", "tiny-gpt2", "--level", "90", "--recipe", RECIPE, "--batch-sizes", "1", "2",
            "--seq-len", "16", "--threads", "1", "--iterations", "3", "--min-time", "0", "--max-iterations", "3",
            "--warmup", "1"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "DeepSparse sparse vs ONNX Runtime dense" in out and "FLOP-ideal" in out and "sparse-bitmask" in out
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
    assert result["engines"]["deepsparse"]["status"] == "unavailable"
    assert expected in result["engines"]["deepsparse"]["reason"]
    assert any("DeepSparse unavailable" in w for w in result["warnings"])
    assert result["results"]["onnxruntime"]["b1_s16"]["median_ms"] > 0
    assert result["speedups"]["b1_s16"]["headline"] is None


def test_missing_run_says_to_prune_first(capsys):
    assert cli.main(["bench", "--model", "tiny-gpt2", "--level", "33", "--recipe", RECIPE]) == 2
    assert "make prune MODEL=tiny-gpt2 LEVEL=33" in capsys.readouterr().err


def test_a_busy_cpu_is_flagged():
    """Other processes' CPU use is measured over the timing window (not the load average, which counts
    the harness's own previous stage)."""
    import subprocess

    assert bench.busy_cpu_warning(0.1, threads=2) == []
    started = bench.cpu_seconds()
    other = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 1.5\nwhile time.time() < end: pass"])
    time.sleep(1.5)
    load = bench.other_load(started)
    other.wait()
    assert load > 0.5 and "unreliable" in bench.busy_cpu_warning(load, threads=2)[0]


def test_level0_dense_timings_are_reused_only_with_the_same_settings(gpt2_bench):
    run, _ = gpt2_bench
    settings = {**SETTINGS, "batch_sizes": [1], "engines": ["onnxruntime", "pytorch"], "dense_timings": "level0"}
    result = bench.bench(run, settings, force=True)
    level0 = read_json(result["dense_run"] + "/bench.json")
    assert result["dense_results"] == level0["results"] and level0["settings"] == settings
    # as `make bench-shapes`: the sparse level times one engine, the headline uses level 0's ONNX Runtime
    fewer = bench.bench(run, {**settings, "engines": ["pytorch"]}, force=True)
    assert list(fewer["results"]) == ["pytorch"] and fewer["dense_results"] == level0["results"]
    assert fewer["speedups"]["b1_s16"]["pytorch"] > 0 and fewer["speedups"]["b1_s16"]["headline"] is None
    with pytest.raises(HarnessError, match=r"other settings \(iterations\)"):
        bench.bench(run, {**settings, "iterations": 2}, force=True)
    with pytest.raises(HarnessError, match="without deepsparse"):
        bench.bench(run, {**settings, "engines": ["deepsparse", "pytorch"]}, force=True)
