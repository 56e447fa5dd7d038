"""Smoke test of `make bench-shapes` in CI: one block of each full-size shape through the same code path.

The hidden sizes, heads and FFN widths are the published ones (harness/configs/); only the number of
layers (1) and the vocabulary (1,024) are cut so CI stays fast. The full run is `make bench-shapes`.
"""
import pytest
import yaml

from harness import load, sweep
from harness.engines import ENGINES
from harness.layout import BENCH_FILE, SPARSITY_FILE
from harness.rundir import RunDir, read_json

SHAPES = {
    "gpt2xl-shape": {"file": "gpt2-xl.json", "n_layer": 1},
    "deberta-shape": {"file": "deberta-v2-xxlarge.json", "num_hidden_layers": 1},
    "m2m100-shape": {"file": "m2m100_1.2B.json", "encoder_layers": 1, "decoder_layers": 1},
}
RECIPES = ["sparseml/oneshot-magnitude", "inc/oneshot-magnitude"]  # benched, pruned and analysed only
# The Makefile's SHAPE_BENCH (one model copy, fast gzip), with a shorter sequence and one batch size;
# its sparse levels time only SHAPE_SPARSE_ENGINES.
FAST_BENCH = ["--dense-timings", "level0", "--gzip-level", "1", "--iterations", "1", "--min-time", "0",
              "--batch-sizes", "1", "--seq-len", "32"]
SPARSE_ENGINES = ["--engines", "deepsparse"]


@pytest.fixture(scope="module")
def one_block_shapes(tmp_path_factory):
    """Registry entries `<shape>-1block`: the real entries with one block and a small vocabulary."""
    entries = {}
    for name, config in SHAPES.items():
        entry = load.registry()[name].to_dict()
        entry["source"] = {"config_file": {**config, "vocab_size": 1024}}
        entries[f"{name}-1block"] = {k: v for k, v in entry.items() if k != "name"}
    extra = tmp_path_factory.mktemp("registry") / "shapes.yaml"
    extra.write_text(yaml.safe_dump(entries))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HARNESS_EXTRA_MODELS", str(extra))
        patch.setenv("HARNESS_RUNS", str(tmp_path_factory.mktemp("shape-runs")))
        # the stages `make bench-shapes` runs, in this process (test_sweep covers `--isolate`: a process per stage)
        stages = ["prune", "analyze", "export", "bench", "eval"]
        dense = sweep.sweep(list(entries), RECIPES[:1], [0], stages, stage_args={"bench": FAST_BENCH},
                            discard_artifacts=True)
        benched = sweep.sweep(list(entries), RECIPES[:1], [90], stages, stage_args={"bench": FAST_BENCH + SPARSE_ENGINES},
                              discard_artifacts=True)
        pruned = sweep.sweep(list(entries), RECIPES[1:], [90], ["prune", "analyze"], discard_artifacts=True)
        yield {model: {**dense[model], **benched[model], **pruned[model]} for model in entries}


def test_every_shape_goes_through_prune_analyze_export_and_bench(one_block_shapes):
    for model, runs in one_block_shapes.items():
        for key, stages in runs.items():
            expected = ("prune", "analyze", "export", "bench") if key.startswith(RECIPES[0]) else ("prune", "analyze")
            assert {s: stages[s]["status"] for s in expected} == dict.fromkeys(expected, "done"), (model, key, stages)
            if "eval" in stages:
                assert stages["eval"]["status"] == "skipped" and "shape-only" in stages["eval"]["reason"]


def test_shape_runs_are_labelled_measured_and_their_weights_discarded(one_block_shapes):
    for model in one_block_shapes:
        for recipe in RECIPES:
            run = RunDir(model, recipe, 90)
            assert run.manifest()["shape_only"] is True
            assert abs(read_json(run.path / SPARSITY_FILE)["achieved_percent"] - 90) <= 1
            assert run.manifest()["stages"]["prune"]["peak_rss_mb"] > 0
            assert not list(run.model_dir.glob("*.safetensors")) and run.manifest()["discarded"]["bytes"] > 0
        bench = read_json(RunDir(model, RECIPES[0], 90).path / BENCH_FILE)
        dense = read_json(RunDir(model, RECIPES[0], 0).path / BENCH_FILE)
        assert list(bench["results"]) == ["deepsparse"] and bench["results"]["deepsparse"]["b1_s32"]["median_ms"] > 0
        # level 0 times every engine; OpenVINO INT8 may fail to compile NNCF's graph of a random one-block
        # M2M100 decoder (an OpenVINO core error, seen in some runs), which the bench records with its reason
        assert {"deepsparse", "onnxruntime", "openvino", "pytorch"} <= set(dense["results"])
        assert all(name in dense["results"] or dense["engines"][name]["reason"] for name in ENGINES)
        assert bench["dense_results"] == dense["results"] and bench["speedups"]["b1_s32"]["headline"] > 0
        assert 1 < bench["flop_ideal"]["b1_s32"]["speedup"] < 10
        # DeepSparse compiles and runs in a child process; its memory is recorded beside the bench's own
        assert RunDir(model, RECIPES[0], 90).manifest()["stages"]["bench"]["children_peak_rss_mb"] > 50


def test_the_shapes_report_compares_the_three_models(one_block_shapes, tmp_path, monkeypatch):
    from harness import report

    monkeypatch.setenv("HARNESS_REPORTS", str(tmp_path))
    written = report.report(list(one_block_shapes))
    assert [p.name for p in written] == [*(f"{m}.md" for m in one_block_shapes), "shapes.md"]
    shapes = written[-1].read_text()
    speed_rows = shapes.split("## Speedup and efficiency vs the FLOP-ideal")[1].split("## ")[0]
    assert all(f"| {model} |" in speed_rows for model in one_block_shapes)
    peaks = shapes.split("## Peak memory per stage")[1]
    assert all(f"| {model} | {RECIPES[0]} | 90 |" in peaks for model in one_block_shapes)
    assert peaks.count(" children |") >= 2 * len(one_block_shapes)  # both benches, each with DeepSparse
    assert "## Gaps" not in shapes  # INC's runs are pruned and analysed, as bench-shapes asked, not benched
    coverage = written[0].read_text().split("## Runs and gaps")[1].split("## ")[0]
    assert "| inc/oneshot-magnitude | 90 | done | done | not asked |" in coverage and "No gaps" in coverage
