"""The report stage over real tiny-model sweeps: complete, traceable to run files, and honest about gaps."""
import json
import re
import shutil
from pathlib import Path

import pytest

from harness import report, sweep
from harness.errors import HarnessError
from harness.paths import reports_dir, runs_dir
from harness.report.format import number
from harness.report.plotting import wrapped
from harness.report.recovery import budget_family
from harness.rundir import prune_inputs

MODEL = "tiny-gpt2"
RECIPES = ["sparseml/oneshot-magnitude", "inc/oneshot-magnitude"]
LEVELS = [0, 50]
SECTIONS = ["Runs and gaps", "Concepts", "Methods used", "Sparsity reached", "Accuracy vs sparsity",
            "Per-layer allocation", "Speed vs sparsity", "Size vs sparsity", "Sparsity structure", "Layer sensitivity", "Recovery",
            "Challenges, from the measured curves",
            "Time and memory per stage"]
# Small settings so the whole module stays within the CI budget (the stages' own CLI options): one short
# bench scenario without OpenVINO INT8 (its NNCF quantization is tested in test_bench_engines); eval on PyTorch only and on LAMBADA only (WikiText-2's rolling loglikelihood over whole
# articles, and the DeepSparse check, take a minute or more per level).
BENCHMARK = "lambada_openai"
FAST_OPTIONS = {"bench": ["--batch-sizes", "1", "--seq-len", "32", "--iterations", "2", "--min-time", "0",
                          "--warmup", "1", "--engines", "deepsparse,onnxruntime,openvino,pytorch"],
                "eval": ["--engines", "pytorch", "--benchmarks", BENCHMARK]}
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:e[-+]\d+)?")
LINK = re.compile(r"\[[^\]]*\]\(([^)]+)\)")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """One real sweep in its own runs root: tiny-gpt2, two recipes, levels 0 and 50, every stage."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HARNESS_RUNS", str(tmp_path_factory.mktemp("report-runs")))
        patch.setenv("HARNESS_REPORTS", str(tmp_path_factory.mktemp("reports")))
        summary = sweep.sweep([MODEL], RECIPES, LEVELS, list(sweep.STAGE_ORDER), limit=2, stage_args=FAST_OPTIONS)
        statuses = {key: {stage: record["status"] for stage, record in stages.items()}
                    for key, stages in summary[MODEL].items()}
        assert all(status == "done" for stages in statuses.values() for status in stages.values()), statuses
        yield runs_dir()


@pytest.fixture
def scratch(swept, tmp_path, monkeypatch):
    """A copy of the swept runs (JSON only) and an empty reports directory, for tests that damage runs."""
    runs = tmp_path / "runs"
    shutil.copytree(swept, runs, ignore=shutil.ignore_patterns("model", "onnx", "compressed", "*.png"))
    monkeypatch.setenv("HARNESS_RUNS", str(runs))
    monkeypatch.setenv("HARNESS_REPORTS", str(tmp_path / "reports"))
    return runs / MODEL


def headings(markdown: str) -> list[str]:
    return [line[3:] for line in markdown.splitlines() if line.startswith("## ")][1:]  # after the contents


def table_rows(markdown: str) -> list[list[str]]:
    """Cells of every markdown table row that links a run directory (header and rule rows excluded)."""
    rows = []
    for line in markdown.splitlines():
        if line.startswith("| ") and "](" in line:
            rows.append([cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]])
    return rows


def file_numbers(run_dir: Path) -> set[str]:
    """Every number stored in a run directory's JSON files (and digit-string keys such as layer indices),
    written as the report writes numbers: as stored, or a fraction in percent."""
    found = set()

    def walk(value):
        if isinstance(value, dict):
            for key, item in value.items():
                if key.isdigit():
                    found.add(key)
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            found.update({number(value), number(100 * value)})

    for path in [run_dir / "manifest.json", *run_dir.glob("*.json"), *run_dir.glob("analysis/*.json")]:
        walk(json.loads(path.read_text()))
    return found


def test_report_is_complete_and_every_table_number_comes_from_the_run_files(swept):
    (path,) = report.report([MODEL])
    markdown = path.read_text()
    assert headings(markdown) == SECTIONS
    assert "No gaps" in markdown
    assert f"### {BENCHMARK}" in markdown
    for recipe in RECIPES:
        assert f"### `{recipe}`" in markdown  # the methods section describes each recipe
    assert "Intel Neural Compressor" in markdown and "SparseML" in markdown
    assert "In this model's runs" not in markdown  # no INT8 run: no pruning-vs-quantization numbers

    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert len(images) == 5  # accuracy (one benchmark), speed, speed vs accuracy, size, structure
    for image in images:
        png = (path.parent / image).resolve()
        assert png.parent == reports_dir() and png.read_bytes().startswith(PNG_SIGNATURE)
        assert png.stat().st_size > 5000, png

    rows = table_rows(markdown)
    assert len(rows) > 20
    runs_seen = set()
    for row in rows:
        links = [LINK.search(cell).group(1) for cell in row if LINK.search(cell)]
        run_dir = (path.parent / links[-1]).resolve()
        assert run_dir.parent.parent.parent == swept / MODEL, run_dir
        runs_seen.add(run_dir)
        allowed = file_numbers(run_dir)
        for cell in row:
            if "](" in cell:
                continue
            for token in NUMBER.findall(cell):
                assert token in allowed, (token, row)
    assert len(runs_seen) == len(RECIPES) * len(LEVELS)

    # generation is deterministic: a second report is byte-identical
    assert report.report([MODEL])[0].read_text() == markdown


def test_challenges_explain_the_amdahl_ceiling_with_the_shares_the_bench_measured(swept):
    markdown = report.report([MODEL])[0].read_text()
    challenges = markdown.split("## Challenges, from the measured curves")[1].split("## ")[0]
    level = LEVELS[-1]
    for recipe in RECIPES:
        bench = json.loads((swept / MODEL / recipe / str(level) / "bench.json").read_text())
        assert bench["flop_ideal"]
        for scenario, ideal in bench["flop_ideal"].items():
            prunable, linear, matmul = ideal["prunable_share"], ideal["other_linear_share"], ideal["other_matmul_share"]
            assert 0 < prunable < 1 and linear > 0  # the LM head stays dense
            assert abs(prunable + linear + matmul - 1) < 1e-3
            assert ideal["max_speedup"] == pytest.approx(1 / (1 - prunable), rel=1e-2)
            assert (f"- {scenario}, `{recipe}`, Amdahl's law: at {level} % the pruned weights carry "
                    f"{number(100 * prunable)} % of the dense multiply-accumulates; the rest (dense weights such as "
                    f"the LM head and unpruned layers: {number(100 * linear)} %, attention matmuls: "
                    f"{number(100 * matmul)} %) does not shrink, so even at 100 % sparsity the FLOP-ideal speedup "
                    f"is at most {number(ideal['max_speedup'])}× (here {number(ideal['speedup'])}×).") in challenges


def test_report_names_missing_stage_outputs_instead_of_failing(scratch):
    run = scratch / RECIPES[1] / "50"
    (run / "eval.json").unlink()
    shutil.rmtree(run / "analysis")
    markdown = report.report([MODEL])[0].read_text()
    assert headings(markdown) == SECTIONS
    assert (f"missing `eval.json`: run `make eval MODEL={MODEL} LEVEL=50 RECIPE={RECIPES[1]}`") in markdown
    assert "missing `analysis/structure.json`: run `make analyze MODEL=" in markdown
    assert markdown.count(f"- `{RECIPES[1]}` level 50 %") == 2  # exactly the two damaged outputs

    for level in LEVELS:  # no bench output anywhere: the sections say so
        for recipe in RECIPES:
            (scratch / recipe / str(level) / "bench.json").unlink()
    markdown = report.report([MODEL])[0].read_text()
    assert "Missing: no run has `bench.json`" in markdown
    assert "Missing: sizes come from `bench.json`" in markdown
    assert not list(reports_dir().glob(f"{MODEL}.speedup.png"))  # stale plots are removed


def test_failed_level_in_the_sweep_ledger_is_marked_as_a_gap(scratch, monkeypatch):
    (scratch / RECIPES[0] / "50" / "bench.json").unlink()

    def failing_stage(argv, isolate=False):
        raise HarnessError("DeepSparse cannot compile this graph (planted failure)")

    monkeypatch.setattr(sweep, "run_stage", failing_stage)
    sweep.sweep([MODEL], [RECIPES[0]], [50], ["bench"])
    ledger = json.loads((scratch / "sweep.json").read_text())["runs"]
    assert ledger[f"{RECIPES[0]}/50"]["bench"]["status"] == "failed"

    markdown = report.report([MODEL])[0].read_text()
    assert f"`{RECIPES[0]}` level 50 %, bench: failed in the sweep: DeepSparse cannot compile" in markdown
    coverage = markdown.split("## Runs and gaps")[1].split("## ")[0]
    (row,) = [line for line in coverage.splitlines() if line.startswith(f"| {RECIPES[0]} | 50 |")]
    assert "FAILED" in row
    speed = markdown.split("## Speed vs sparsity")[1].split("## ")[0]
    assert f"{RECIPES[0]}/50" not in speed and f"{RECIPES[1]}/50" in speed  # the other level is complete


def test_shape_only_model_has_no_accuracy_and_a_combined_shapes_table(scratch):
    manifests = list(scratch.rglob("manifest.json"))
    for path in manifests:  # the same runs, presented as a shape-only model
        manifest = json.loads(path.read_text())
        manifest["spec"]["shape_only"] = manifest["shape_only"] = True
        path.write_text(json.dumps(manifest))
    written = report.report([MODEL])
    assert [p.name for p in written] == [f"{MODEL}.md", "shapes.md"]
    markdown = written[0].read_text()
    assert "shape-only" in markdown.splitlines()[0]
    assert "Not measured: this is a shape-only model" in markdown
    assert f"### {BENCHMARK}" not in markdown and "missing `eval.json`" not in markdown
    shapes = written[1].read_text()
    assert "## Speedup and efficiency vs the FLOP-ideal" in shapes and "## Peak memory per stage" in shapes
    rows = table_rows(shapes)
    assert {row[0] for row in rows} == {MODEL}
    for row in rows:
        run_dir = (written[1].parent / LINK.search(row[-1]).group(1)).resolve()
        allowed = file_numbers(run_dir)
        assert all(token in allowed for cell in row[1:-1] for token in NUMBER.findall(cell)), row


def test_unknown_model_is_one_clear_error(swept):
    with pytest.raises(HarnessError, match="run `make sweep MODEL=no-such-model` first"):
        report.report(["no-such-model"])


@pytest.mark.parametrize("recipe,family", [
    ("sparseml/oneshot-magnitude+distil@tokens=5000000,lr=0.005", "sparseml/oneshot-magnitude+distil@lr=0.005"),
    ("sparseml/oneshot-magnitude+distil@lr=0.005,tokens=1250000", "sparseml/oneshot-magnitude+distil@lr=0.005"),
    ("sparseml/oneshot-magnitude+distil@tokens=400000", "sparseml/oneshot-magnitude+distil"),
    ("sparseml/gradual-magnitude@lr=0.005,tokens=1,ramp=0.5", "sparseml/gradual-magnitude@lr=0.005,ramp=0.5"),
    ("sparseml/oneshot-magnitude+distil@max_tokens=3", "sparseml/oneshot-magnitude+distil@max_tokens=3"),
])
def test_runs_that_differ_only_in_their_budget_share_an_accuracy_vs_tokens_line(recipe, family):
    assert budget_family(recipe) == family


def test_a_recovered_runs_accuracy_line_starts_at_its_one_shot_run_and_outdated_runs_get_their_own(scratch):
    """Three recovery budgets of one family, made from the swept one-shot run (JSON only, known values); one of them
    pruned with an earlier version of the recipe."""
    from harness.layout import CurvePoint, Recovery, to_json
    from harness.recipes import load_recipe
    from harness.report.recovery import accuracy_vs_tokens
    from harness.report.runs import collect
    from harness.rundir import RunDir, write_json

    one_shot = RunDir(MODEL, "sparseml/oneshot-magnitude", 50)
    one_shot_acc = json.loads((one_shot.path / "eval.json").read_text())["benchmarks"][BENCHMARK]["metrics"]["acc"]["value"]
    for tokens, acc, earlier in ((3000, 0.75, ""), (1000, 0.5, ""), (2000, 0.25, "\nnote: an earlier version\n")):
        run = RunDir(MODEL, f"sparseml/oneshot-magnitude+distil@lr=0.01,tokens={tokens}", 50)
        shutil.copytree(one_shot.path, run.path)
        recipe = load_recipe(run.recipe)
        pruned_earlier(run.path, recipe=run.recipe, recipe_text=recipe.text + earlier, params=recipe.params)
        eval_file = run.path / "eval.json"
        results = json.loads(eval_file.read_text())
        results["benchmarks"][BENCHMARK]["metrics"]["acc"].update(value=acc)
        write_json(eval_file, results)
        write_json(run.path / "recovery.json", to_json(Recovery(plan={}, curve=[CurvePoint(1, tokens, 1.0)],
                                                                tokens=tokens, steps=1, wall_time_s=1.0)))
    lines, dense = accuracy_vs_tokens(collect(MODEL))[f"{BENCHMARK}: acc"]
    family = "sparseml/oneshot-magnitude+distil@lr=0.01"
    assert lines == {(family, 50.0): [(0, one_shot_acc), (1000, 0.5), (3000, 0.75)],
                     (f"{family} (outdated)", 50.0): [(0, one_shot_acc), (2000, 0.25)]}
    assert dense[0].level == 0


def test_long_legend_labels_wrap_after_separators_and_keep_their_text():
    name = "sparseml/oneshot-sparsegpt+distil@accumulation=2,batch_size=16,lr=0.005,trainable=targets+norms+biases 90 %"
    lines = wrapped(name, width=40).split("\n")
    assert len(lines) == 3 and all(len(line) <= 40 for line in lines)
    assert lines[0] == "sparseml/oneshot-sparsegpt+distil@"
    assert re.sub(r"\s", "", "".join(lines)) == re.sub(r"\s", "", name)
    assert wrapped("DeepSparse") == "DeepSparse"


def test_quantizing_the_lm_head_is_compared_with_the_same_recipe_keeping_it_fp32():
    from types import SimpleNamespace

    from harness.layout import Speedup
    from harness.report.challenges import quantized_head

    def run(recipe, level, headline):
        speedups = {"b1_s128": Speedup({}, headline, {})}
        return SimpleNamespace(recipe=recipe, level=level, bench=SimpleNamespace(speedups=speedups))

    runs = [run("a/b+int8@mask_type=block4", 50.0, 1.5), run("a/b+int8@fp32_head=none,mask_type=block4", 50.0, 1.8),
            run("a/b+int8@fp32_head=none", 90.0, 2.0)]  # no FP32-head run at 90 %: no sentence
    (line,) = quantized_head(runs, "b1_s128")
    assert line == ("- b1_s128, `a/b+int8@fp32_head=none,mask_type=block4` at 50 %: with the LM head in INT8 too, "
                    "DeepSparse sparse vs ONNX Runtime dense is 1.8× against 1.5× with the head FP32 "
                    "(`a/b+int8@mask_type=block4`).")


def test_an_int8_run_is_compared_with_its_fp32_run_at_the_same_level():
    from types import SimpleNamespace

    from harness.report.challenges import quantization_cost

    def point(recipe, level, value):
        return SimpleNamespace(recipe=recipe, level=level), SimpleNamespace(value=value)

    fp32, int8 = "sparseml/oneshot-sparsegpt", "sparseml/oneshot-sparsegpt+int8@fp32_layers=down_proj,samples=16"
    series = {f"{fp32}@samples=16": [point(fp32, 0.0, 35.0), point(fp32, 50.0, 80.0)],
              int8: [point(int8, 50.0, 84.0), point(int8, 70.0, 300.0)]}  # no FP32 run at 70 %: no sentence
    values = [(run, entry.value) for run, entry in series[int8]]
    assert quantization_cost("wikitext2 word_perplexity", int8, values, series) == [
        f"- wikitext2 word_perplexity, `{int8}` at 50 %: INT8 84 vs FP32 80 (`{fp32}@samples=16`), +5.0 %."]
    assert quantization_cost("wikitext2 word_perplexity", f"{fp32}@samples=16", [], series) == []


def test_collapse_judges_the_pruned_levels_not_a_control_at_level_0():
    from types import SimpleNamespace

    from harness.report.challenges import collapse

    control, run50, run70 = (SimpleNamespace(level=level) for level in (0.0, 50.0, 70.0))
    assert collapse([(control, 0.28)], 0.34, True, 10.0) is None  # the dense model trained: the control's own table
    assert collapse([(control, 0.28), (run50, 0.33), (run70, 0.20)], 0.34, True, 10.0) == (
        "collapses at 70 % (0.2 vs dense 0.34, -41.2 %); holds up to 50 %.")
    assert collapse([(run70, 36.0), (control, 60.0)], 35.0, False, 10.0) == (
        "within 10 % of dense up to the highest level measured (70 %).")


def pruned_earlier(run_dir, **changes):
    """Rewrite a run's manifest as if it had been pruned with other inputs (`changes` to its manifest keys), and
    with the inputs fingerprint that prune would have recorded for them."""
    manifest = json.loads((run_dir / "manifest.json").read_text())
    manifest.update(changes)
    manifest["stages"]["prune"]["inputs"] = prune_inputs(manifest["spec"], manifest["recipe_text"], manifest["params"],
                                                         manifest["level"])
    (run_dir / "manifest.json").write_text(json.dumps(manifest))


def test_a_run_of_an_earlier_recipe_model_entry_or_a_renamed_recipe_is_marked_outdated_and_still_reported(scratch):
    data = json.loads((scratch / RECIPES[0] / "50" / "manifest.json").read_text())
    pruned_earlier(scratch / RECIPES[0] / "50", recipe_text=data["recipe_text"] + "\nnote: an earlier version\n")
    pruned_earlier(scratch / RECIPES[0] / "0", recipe_text=data["recipe_text"] + "\n# a comment edited since\n")
    for level in ("0", "50"):  # every level outdated: one line each, not "missing at every level"
        pruned_earlier(scratch / RECIPES[1] / level, spec={**data["spec"], "seq_len": data["spec"]["seq_len"] + 1})
    renamed = scratch / "sparseml" / "magnitude-recover+int8" / "50"  # a name from before recovery composed
    shutil.copytree(scratch / RECIPES[0] / "50", renamed)
    pruned_earlier(renamed, recipe="sparseml/magnitude-recover+int8")

    markdown = report.report([MODEL])[0].read_text()  # a renamed recipe's INT8 run has no FP32 run to compare
    assert (f"- `{RECIPES[0]}` level 50 %, prune: outdated, pruned with an earlier version of its recipe (its "
            f"files or defaults changed since): run `make prune MODEL={MODEL} LEVEL=50 RECIPE={RECIPES[0]}` again"
            in markdown)
    assert ("- `sparseml/magnitude-recover+int8` level 50 %, prune: outdated, recipe sparseml/magnitude-recover "
            "is now sparseml/oneshot-magnitude+distil@accumulation=2,batch_size=16,train_seq_len=128 (the same steps, "
            "composed)" in markdown)
    coverage = markdown.split("## Runs and gaps")[1].split("## ")[0]
    cells = {tuple(row[:2]): row[2] for row in table_rows(coverage) if len(row) > 2}
    for level in ("0", "50"):
        assert (f"- `{RECIPES[1]}` level {level} %, prune: outdated, pruned from an earlier entry of its model in "
                f"harness/models.yaml: run `make prune MODEL={MODEL} LEVEL={level} RECIPE={RECIPES[1]}` again"
                in markdown)
    assert "at every level" not in coverage
    assert cells[(RECIPES[0], "50")] == cells[(RECIPES[1], "50")] == cells[(RECIPES[1], "0")] == "outdated"
    assert cells[("sparseml/magnitude-recover+int8", "50")] == "outdated"
    assert cells[(RECIPES[0], "0")] == "done"  # a comment edit leaves a run current


def test_a_run_outdated_by_the_harness_is_not_blamed_on_a_comment_edit_of_its_recipe(scratch):
    run_dir = scratch / RECIPES[0] / "0"
    data = json.loads((run_dir / "manifest.json").read_text())
    pruned_earlier(run_dir, recipe_text=data["recipe_text"] + "\n# a comment edited since\n")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    manifest["stages"]["prune"]["inputs"] = "an earlier harness's fingerprint"
    (run_dir / "manifest.json").write_text(json.dumps(manifest))

    markdown = report.report([MODEL])[0].read_text()
    assert (f"- `{RECIPES[0]}` level 0 %, prune: outdated, pruned with other inputs than the harness gives now "
            "(an earlier version of the harness)" in markdown)


def test_the_concepts_put_pruning_quantization_and_both_in_the_runs_own_numbers(scratch):
    """An INT8 run beside its FP32 run (JSON copies with known bench records): the concepts quote each run's own
    recorded speedups against the fastest dense engines, and the sparse INT8 size."""
    from harness.rundir import RunDir, read_json, write_json

    fp32, int8 = RunDir(MODEL, RECIPES[0], 50), RunDir(MODEL, f"{RECIPES[0]}+int8", 50)
    shutil.copytree(fp32.path, int8.path)
    pruned_earlier(int8.path, recipe=int8.recipe)
    scenario = next(iter(read_json(fp32.path / "bench.json")["speedups"]))
    for run, fastest, sizes in (
            (fp32, {"fp32": ("onnxruntime", 10.0, 2.5), "int8": ("openvino-int8", 4.0, 1.0)}, {}),
            (int8, {"fp32": ("openvino", 9.0, 4.5), "int8": ("openvino-int8", 4.5, 2.25)},
             {"checkpoint_int8": 9.0, "sparse_bitmask_int8": 3.5})):
        bench = read_json(run.path / "bench.json")
        bench["fastest_dense"] = {scenario: {precision: {"engine": engine, "median_ms": ms, "speedup": speedup}
                                             for precision, (engine, ms, speedup) in fastest.items()}}
        bench["sizes"].update({key: {"bytes": 1, "bits_per_weight": bits} for key, bits in sizes.items()})
        write_json(run.path / "bench.json", bench)
    markdown = report.report([MODEL])[0].read_text()
    concepts = markdown.split("## Concepts")[1].split("## Methods used")[0]
    assert f"**In this model's runs** ({scenario}; " in concepts
    assert "- Quantization alone: the fastest dense INT8 engine, OpenVINO INT8 at 4 ms, is 2.5× faster" in concepts
    assert f"- Pruning alone (`{RECIPES[0]}`, 50 %): DeepSparse is 2.5× the fastest dense FP32 engine" in concepts
    assert (f"- Both (`{int8.recipe}`, 50 %): DeepSparse is 4.5× the fastest dense FP32 engine and 2.25× the fastest "
            "dense INT8 one; 3.5 bits per weight as sparse INT8 (INT8 alone 9)") in concepts
    assert "- Had the two gains multiplied, both together would be 6.25×." in concepts


def test_plots_are_palette_pngs_that_keep_every_line_colour_beside_a_large_gradient(tmp_path):
    """Ten thin lines in matplotlib's ten default colours beside a heatmap of many shades: each line colour stays
    within a few levels in the saved palette PNG (median cut gave the shades the palette and merged line colours)."""
    import matplotlib
    import matplotlib.pyplot as plt
    import numpy as np
    from PIL import Image

    from harness.plots import _save_palette_png

    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 4))
    left.imshow(np.add.outer(np.arange(200), np.arange(200)), cmap="viridis")
    for index in range(10):
        right.plot([0, 1], [index, index], color=f"C{index}", linewidth=2)
    _save_palette_png(fig, tmp_path / "lines.png")
    plt.close(fig)
    with Image.open(tmp_path / "lines.png") as image:
        assert image.mode == "P"
        palette = np.array([colour for _, colour in image.convert("RGB").getcolors(256)])
    for index in range(10):
        colour = np.array(matplotlib.colors.to_rgb(f"C{index}")) * 255
        assert np.abs(palette - colour).max(axis=1).min() <= 6, f"C{index}"


def test_every_line_of_a_crowded_plot_gets_its_own_style_and_loss_curves_are_smoothed():
    """Past matplotlib's ten colours a line changes its line style, not repeats another's (18 recovered MiniLM runs
    drew two lines in each of eight colours); loss curves are drawn as moving averages."""
    from harness.report.plotting import line_styles, moving_average

    styles = line_styles(list(range(40)))
    assert len({(style["color"], style["linestyle"]) for style in styles.values()}) == 40
    assert moving_average([1.0, 3.0] * 50, 2) == [2.0] * 99
    assert moving_average([1.0, 2.0, 6.0], 10) == [3.0]  # a run shorter than the window: one mean
