"""Per-layer allocation (uniform, OWL), Wanda and N:M masks: levels from `harness.allocation` on their own,
then pruned tiny models recounted from the weights the prune stage saved."""
import pytest
import torch

from harness import allocation, export, load, prune, sparsity
from harness.errors import HarnessError
from harness.layout import EVAL_FILE, SPARSITY_FILE, BenchmarkResult, Evaluation, Metric, to_json
from harness.rundir import read_json, write_json

SIZES = {f"model.layers.{block}.{name}.weight": size for block in range(4)
         for name, size in (("q_proj", 4096), ("up_proj", 11008), ("down_proj", 11007))}
OWL_PARAMS = {"owl_threshold_m": 5.0, "owl_lambda": 0.08}
CALIBRATION = {"samples": 4, "seq_len": 32}


def request(level=0.6, bounds=(0.0, 1.0), params=OWL_PARAMS, outliers=(0.0, 0.01, 0.03, 0.001)) -> allocation.Request:
    """Scores of ones with a share of large outliers in each block (block i: outliers[i])."""
    def scores():
        result = {}
        for target, size in SIZES.items():
            values = torch.ones(size)
            values[:int(size * outliers[int(target.split(".")[2])])] = 100.0
            result[target] = values
        return result

    return allocation.Request("tiny", "recipe", SIZES, level, bounds, params, scores)


def grid_cells(text: str) -> dict[tuple[str, str], dict[str, str]]:
    """The report's method x allocation x level grid: {(method, allocation): {column: cell}}."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| method | allocation | examples limit |"))
    header = [cell.strip() for cell in lines[start].strip("|").split("|")]
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = dict(zip(header, (cell.strip() for cell in line.strip("|").split("|"))))
        rows[cells["method"], cells["allocation"]] = cells
    return rows


def pruned_weights(levels: dict[str, float]) -> float:
    return sum(levels[t] * SIZES[t] for t in SIZES)


@pytest.mark.parametrize("name", ["uniform", "owl"])
@pytest.mark.parametrize("level", [0.5, 0.6, 0.7, 0.333])
def test_allocations_keep_the_overall_level_exact(name, level):
    levels = allocation.ALLOCATIONS[name](request(level))
    assert set(levels) == set(SIZES)
    assert pruned_weights(levels) == pytest.approx(level * sum(SIZES.values()), abs=0.5)  # whole weights


def test_owl_prunes_blocks_with_more_outliers_less_and_lambda_0_is_uniform():
    levels = allocation.owl(request())
    block = {i: levels[f"model.layers.{i}.q_proj.weight"] for i in range(4)}
    assert block[2] < block[1] < block[3] < block[0]
    assert block[0] - block[2] == pytest.approx(2 * OWL_PARAMS["owl_lambda"], abs=1e-3)
    flat = allocation.owl(request(params={**OWL_PARAMS, "owl_lambda": 0.0}))
    uniform = allocation.uniform(request())
    assert all(abs(flat[t] - uniform[t]) <= 1 / SIZES[t] for t in SIZES)


def test_bounds_are_respected_and_the_level_still_exact():
    levels = allocation.owl(request(level=0.7, bounds=(0.65, 0.72), params={**OWL_PARAMS, "owl_lambda": 0.3}))
    assert all(0.65 - 1 / SIZES[t] <= levels[t] <= 0.72 + 1 / SIZES[t] for t in SIZES)
    assert max(levels.values()) == pytest.approx(0.72, abs=1e-3)  # the spread was clipped
    assert pruned_weights(levels) == pytest.approx(round(0.7 * sum(SIZES.values())), abs=1e-6)
    with pytest.raises(HarnessError, match="bounds"):
        allocation.uniform(request(level=0.7, bounds=(0.0, 0.6)))


def tensors(run) -> dict:
    return dict(sparsity.saved_tensors(run.model_dir))


def source_tensors(model: str) -> dict:
    return dict(sparsity.saved_tensors(load.checkpoint_dir(load.resolve_spec(model))))


def zero_share(tensor) -> float:
    return float((tensor == 0).float().mean())


@pytest.mark.parametrize("recipe", ["sparseml/oneshot-magnitude", "inc/oneshot-magnitude"])
def test_owl_magnitude_varies_per_block_at_the_exact_overall_level(recipe):
    run = prune.prune("tiny-llama", 60, recipe, {"allocation": "owl", **CALIBRATION})
    assert "allocation=owl" in run.recipe
    recorded = read_json(run.path / SPARSITY_FILE)
    saved = tensors(run)
    targets = recorded["prunable_tensors"]
    zeros = sum(int((saved[t] == 0).sum()) for t in targets)
    assert abs(zeros - 0.6 * sum(saved[t].numel() for t in targets)) <= len(targets)  # libraries round per tensor
    per_block = recorded["per_layer_percent"]
    assert sorted(per_block) == ["0", "1"]
    assert max(per_block.values()) - min(per_block.values()) == pytest.approx(16, abs=0.5)  # 2 x lambda
    source = source_tensors("tiny-llama")
    for target in targets:  # still magnitude pruning inside each tensor
        kept = saved[target] != 0
        assert source[target][kept].abs().min() >= source[target][~kept].abs().max()


@pytest.mark.parametrize("recipe", ["sparseml/oneshot-magnitude", "sparseml/oneshot-sparsegpt", "sparseml/oneshot-wanda"])
def test_a_target_allocated_none_or_all_of_its_weights_is_kept_or_zeroed(recipe):
    # lambda 0.5 spreads tiny-llama's two blocks over 50 +- 50 %: one keeps every weight, the other none
    run = prune.prune("tiny-llama", 50, recipe, {"allocation": "owl", "owl_lambda": 0.5, **CALIBRATION})
    recount = read_json(run.path / SPARSITY_FILE)
    assert sorted(recount["per_layer_percent"].values()) == [0.0, 100.0]
    assert recount["achieved_percent"] == 50.0
    # the exporter stores the zeroed block's same-shaped weights as one initializer: still every zero kept
    assert read_json(export.ensure_onnx(run) / "export.json")["zeros"]["onnx_percent"] == 50.0


def test_owl_needs_calibration_samples():
    with pytest.raises(HarnessError, match="calibration samples"):
        prune.prune("tiny-llama", 60, "sparseml/oneshot-magnitude", {"allocation": "owl"})


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gpt2"])
def test_wanda_prunes_each_output_row_to_the_level(model):
    run = prune.prune(model, 50, "sparseml/oneshot-wanda", CALIBRATION)
    saved, source = tensors(run), source_tensors(model)
    magnitude_rows = rows = 0
    for target in read_json(run.path / SPARSITY_FILE)["prunable_tensors"]:
        pruned, dense = (saved[target], source[target]) if model == "tiny-llama" else \
            (saved[target].t(), source[target].t())  # GPT-2's Conv1D weight is [in, out]
        assert torch.all((pruned == 0).sum(dim=1) == pruned.shape[1] // 2), target  # Wanda ranks within an output
        kept = pruned != 0
        assert torch.equal(pruned[kept], dense[kept]), target  # no weight update
        smallest = dense.abs().argsort(dim=1)[:, :pruned.shape[1] // 2]
        magnitude_rows += int((~kept).gather(1, smallest).all(dim=1).sum())
        rows += pruned.shape[0]
    assert magnitude_rows < rows / 2  # the activation norms changed which weights go in most rows


@pytest.mark.parametrize("recipe", ["sparseml/oneshot-wanda", "sparseml/oneshot-sparsegpt"])
def test_two_of_four_masks_hold_in_every_group_of_four_inputs(recipe):
    run = prune.prune("tiny-llama", 50, recipe, {"mask_structure": "2:4", **CALIBRATION})
    saved = tensors(run)
    for target in read_json(run.path / SPARSITY_FILE)["prunable_tensors"]:
        groups = saved[target].reshape(saved[target].shape[0], -1, 4)
        assert torch.all((groups == 0).sum(dim=-1) == 2), target


def test_two_of_four_needs_level_50_and_uniform_allocation():
    with pytest.raises(HarnessError, match="use level 50 with allocation uniform"):
        prune.prune("tiny-llama", 60, "sparseml/oneshot-wanda", {"mask_structure": "2:4", **CALIBRATION})
    with pytest.raises(HarnessError, match="use level 50 with allocation uniform"):
        prune.prune("tiny-llama", 50, "sparseml/oneshot-wanda",
                    {"mask_structure": "2:4", "allocation": "owl", **CALIBRATION})


def test_report_shows_method_allocation_and_level_with_the_per_layer_levels():
    from harness.report.allocation import section_allocation
    from harness.report.runs import collect

    owl_run = prune.prune("tiny-llama", 60, "sparseml/oneshot-magnitude", {"allocation": "owl", **CALIBRATION})
    uniform_run = prune.prune("tiny-llama", 60, "sparseml/oneshot-magnitude", CALIBRATION)
    for run, perplexity in ((owl_run, 80.0), (uniform_run, 100.0)):
        write_json(run.path / EVAL_FILE, to_json(Evaluation(
            "tiny-llama", run.recipe, 60.0, 4, ["pytorch"], None,
            {"wikitext2": BenchmarkResult("done", limit=4, metrics={"word_perplexity": Metric(perplexity)})})))
    text = "\n".join(section_allocation(collect("tiny-llama")))
    method = "sparseml/oneshot-magnitude@samples=4,seq_len=32"
    assert f"| {method} | owl | 60 |" in text
    assert f"| {method} | uniform | 60 |" in text
    # the grid: one row per allocation, the better (lower perplexity) in bold, and OWL against uniform (other
    # modules' runs of this model may add level columns, so cells are read by their column's name)
    grid = grid_cells(text)
    assert grid[method, "uniform"]["examples limit"] == "4" and grid[method, "uniform"]["60 %"] == "100"
    assert grid[method, "owl"]["examples limit"] == "4" and grid[method, "owl"]["60 %"] == "**80**"
    assert f"- `{method}` at 60 %: the best non-uniform allocation, owl, gives 80 against uniform's 100 (-20.0 %)." in text
    owl_levels = read_json(owl_run.path / SPARSITY_FILE)["per_layer_percent"]
    assert "| recipe | level % | 0 | 1 |" in text
    assert f"| {owl_levels['0']:.4g} | {owl_levels['1']:.4g} |" in text


def test_sensitivity_allocation_reads_make_sensitivity_and_keeps_the_level():
    from harness import damage, sensitivity

    with pytest.raises(HarnessError, match="make sensitivity"):
        prune.prune("tiny-llama", 60, "sparseml/oneshot-magnitude", {"allocation": "sensitivity"})
    sensitivity.sensitivity("tiny-llama", "sparseml/oneshot-magnitude", levels=[50, 90], granularity="block",
                            heldout=damage.HeldOut(sequences=2, seq_len=32))
    # a composed recipe (pruned here, with no one-shot run to start from) reads its pruning recipe's results
    training = {"tokens": 256, "train_seq_len": 32, "batch_size": 2, "accumulation": 1}
    recovered = prune.prune("tiny-llama", 60, "sparseml/oneshot-magnitude+distil", {"allocation": "sensitivity", **training})
    run = prune.prune("tiny-llama", 60, "sparseml/oneshot-magnitude", {"allocation": "sensitivity"})
    recorded = read_json(run.path / SPARSITY_FILE)
    assert recorded["achieved_percent"] == pytest.approx(60, abs=0.01)
    assert len(set(recorded["per_layer_percent"].values())) == 2  # the blocks' damage differs, so do their levels
    assert read_json(recovered.path / SPARSITY_FILE)["per_layer_percent"] == recorded["per_layer_percent"]
