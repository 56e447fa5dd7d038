"""The sensitivity stage on tiny models: every unit at every level, damage that is zero without pruning and
grows with the level, a resumed run that skips finished units, a fingerprint that follows its inputs; and
`allocate`, which keeps the overall level exact within bounds and prunes the fragile layer less."""
import csv

import numpy as np
import pytest
import torch

from harness import damage, layerwise, load, sensitivity, sparsity
from harness.backends import sparseml as sparseml_backend
from harness.errors import HarnessError
from harness.layout import SENSITIVITY_CSV, SENSITIVITY_FILE, SENSITIVITY_PARTIAL, Sensitivity, UnitDamage, read_record, to_json
from harness.recipes import load_recipe
from harness.rundir import write_json

HELDOUT = damage.HeldOut(sequences=2, seq_len=32)
RECIPE = "sparseml/oneshot-magnitude"
REAL_PRUNE = sparseml_backend.prune


def counting_prunes(monkeypatch, stop_after: int | None = None) -> list:
    """Count the backend's prune calls (and interrupt like Ctrl-C after `stop_after` of them)."""
    calls = []

    def prune(job):
        if stop_after is not None and len(calls) == stop_after:
            raise KeyboardInterrupt
        calls.append(job.targets)
        REAL_PRUNE(job)

    monkeypatch.setattr(sparseml_backend, "prune", prune)
    return calls


def test_every_unit_at_every_level_and_an_interrupted_run_resumes(monkeypatch):
    calls = counting_prunes(monkeypatch, stop_after=5)
    with pytest.raises(KeyboardInterrupt):
        sensitivity.sensitivity("tiny-gpt2", RECIPE, levels=[90, 50], heldout=HELDOUT)
    directory = sensitivity.output_dir("tiny-gpt2", RECIPE, "layer")
    partial = read_record(directory / SENSITIVITY_PARTIAL, Sensitivity)
    assert [unit.unit for unit in partial.units] == ["transformer.h.0.attn.c_attn.weight",
                                                     "transformer.h.0.attn.c_proj.weight"]
    assert not (directory / SENSITIVITY_FILE).exists()

    calls = counting_prunes(monkeypatch)
    sensitivity.sensitivity("tiny-gpt2", RECIPE, levels=[50, 90], heldout=HELDOUT)
    targets = sparsity.prunable_names(load.load_model("tiny-gpt2").model)
    assert len(calls) == 2 * (len(targets) - 2)  # the two finished units were not pruned again
    assert all(len(call) == 1 for call in calls) and targets[0] not in {call[0] for call in calls}
    result = read_record(directory / SENSITIVITY_FILE, Sensitivity)
    assert [unit.unit for unit in result.units] == targets and result.levels == [50.0, 90.0]
    assert all(len(unit.damage) == 2 and unit.weights > 0 for unit in result.units)
    assert result.measure == damage.MEASURES[True] and result.dense_loss > 0
    with open(directory / SENSITIVITY_CSV) as handle:
        rows = list(csv.DictReader(handle))
    assert [row["unit"] for row in rows] == targets and float(rows[3]["damage_at_90"]) == pytest.approx(
        result.units[3].damage[1], rel=1e-5)
    assert not (directory / SENSITIVITY_PARTIAL).exists()

    calls = counting_prunes(monkeypatch)
    sensitivity.sensitivity("tiny-gpt2", RECIPE, levels=[50, 90], heldout=HELDOUT)
    assert calls == []  # up to date
    sensitivity.sensitivity("tiny-gpt2", RECIPE, levels=[50, 90], granularity="block", heldout=HELDOUT)
    blocks = layerwise.blocks(load.load_model("tiny-gpt2").model, targets)
    assert calls == [block.targets for block in blocks for _level in (50, 90)]


def test_the_fingerprint_follows_levels_granularity_recipe_params_and_heldout_text():
    spec = load.resolve_spec("tiny-gpt2")
    recipe = load_recipe("sparseml/oneshot-sparsegpt")
    base = sensitivity.inputs_fingerprint(spec, recipe, [50.0, 90.0], "layer", HELDOUT)
    assert base == sensitivity.inputs_fingerprint(spec, recipe, [50.0, 90.0], "layer", HELDOUT)
    changed = [
        sensitivity.inputs_fingerprint(spec, recipe, [50.0], "layer", HELDOUT),
        sensitivity.inputs_fingerprint(spec, recipe, [50.0, 90.0], "block", HELDOUT),
        sensitivity.inputs_fingerprint(spec, recipe.with_params({"samples": 16}), [50.0, 90.0], "layer", HELDOUT),
        sensitivity.inputs_fingerprint(spec, recipe, [50.0, 90.0], "layer", damage.HeldOut(sequences=3, seq_len=32)),
    ]
    assert base not in changed and len(set(changed)) == len(changed)


@pytest.mark.parametrize("alias", ["tiny-gpt2", "tiny-llama", "tiny-deberta", "tiny-m2m100", "minilm"])
def test_replaying_the_unchanged_blocks_measures_what_a_full_forward_does(alias):
    loaded = load.load_model(alias)
    targets = sparsity.prunable_names(loaded.model)
    blocks = layerwise.blocks(loaded.model, targets)
    meter = damage.DamageMeter(loaded.model, damage.heldout_batch(loaded, HELDOUT), blocks)
    # nothing changed: no damage, up to one float32 step of 1 - cosine (6e-8 on some CPUs' kernels for MiniLM)
    assert [meter.damage(first) for first in range(len(blocks))] == pytest.approx([0.0] * len(blocks), abs=1e-7)
    last = blocks[-1]
    with torch.no_grad():
        loaded.model.get_parameter(last.targets[0]).mul_(0.5)
    assert meter.damage(len(blocks) - 1) == pytest.approx(meter.damage(0), rel=1e-4, abs=1e-7)
    assert meter.damage(0) != 0


def test_a_real_prune_damages_more_at_a_higher_level():
    sensitivity.sensitivity("minilm", RECIPE, levels=[50, 99], granularity="block", heldout=HELDOUT)
    result = read_record(sensitivity.output_dir("minilm", RECIPE, "block") / SENSITIVITY_FILE, Sensitivity)
    assert result.measure == damage.MEASURES[False] and len(result.units) == 6
    for unit in result.units:
        assert 0 < unit.damage[0] < unit.damage[1], unit


def store(model: str, units: dict[str, list[float]], granularity: str = "layer", targets: dict | None = None,
          recipe: str = RECIPE) -> None:
    directory = sensitivity.output_dir(model, recipe, granularity)
    record = Sensitivity(model, recipe, granularity, [50.0, 90.0], "loss increase", {}, 1.0, "x",
                         [UnitDamage(name, (targets or {}).get(name, [name]), 1, values, 0.0)
                          for name, values in units.items()], 0.0)
    write_json(directory / SENSITIVITY_FILE, to_json(record))


SIZES = {"fragile": 1000, "robust": 3000, "middle": 2001}


@pytest.mark.parametrize("level, bounds", [(0.6, (0.0, 1.0)), (0.6, (0.5, 0.7)), (0.3, (0.1, 0.95)), (0.85, (0.2, 0.95))])
def test_allocate_keeps_the_level_exact_within_bounds_and_spares_the_fragile_layer(level, bounds):
    store("toy", {"fragile": [0.5, 2.0], "robust": [0.01, 0.1], "middle": [0.05, 0.6]})
    levels = sensitivity.allocate("toy", RECIPE, SIZES, level, bounds)
    assert abs(sum(SIZES[t] * levels[t] for t in SIZES) - level * sum(SIZES.values())) < 1
    assert all(bounds[0] <= value <= bounds[1] for value in levels.values())
    assert levels["fragile"] < levels["middle"] < levels["robust"] or levels["robust"] == bounds[1]
    assert levels["fragile"] < levels["robust"]


def test_allocate_equalises_the_predicted_damage_and_spreads_block_results():
    store("toy-blocks", {"model.layers.0": [0.1, 1.0], "model.layers.1": [0.02, 0.2]}, "block",
          {"model.layers.0": ["a0", "b0"], "model.layers.1": ["a1", "b1"]})
    sizes = {"a0": 10, "b0": 30, "a1": 10, "b1": 30}
    levels = sensitivity.allocate("toy-blocks", RECIPE, sizes, 0.5, (0.0, 1.0))
    assert levels["a0"] == levels["b0"] < levels["a1"] == levels["b1"]
    # predicted damage (linear between the measured levels, 0 at level 0) is the same for both blocks
    predicted = [sensitivity.DamageCurve([0.5, 0.9], values, 0.0) for values in ([0.1, 1.0], [0.02, 0.2])]
    damages = [float(np.interp(levels[target], curve.levels, curve.damages)) for target, curve in zip(("a0", "a1"), predicted)]
    assert damages[0] == pytest.approx(damages[1], rel=1e-4)


def test_allocate_without_results_says_which_command_to_run_and_reads_a_variant_s_results():
    with pytest.raises(HarnessError, match="make sensitivity MODEL=nothing-here RECIPE=sparseml/oneshot-magnitude"):
        sensitivity.allocate("nothing-here", RECIPE, SIZES, 0.5, (0.0, 1.0))
    store("toy-variant", {"fragile": [0.5, 2.0], "robust": [0.01, 0.1], "middle": [0.05, 0.6]},
          recipe="sparseml/oneshot-sparsegpt@samples=16")
    levels = sensitivity.allocate("toy-variant", "sparseml/oneshot-sparsegpt", SIZES, 0.5, (0.0, 1.0))
    assert levels["fragile"] < levels["robust"]
    with pytest.raises(HarnessError, match="do not cover extra"):
        sensitivity.allocate("toy-variant", "sparseml/oneshot-sparsegpt", {**SIZES, "extra": 10}, 0.5, (0.0, 1.0))


def test_the_report_section_draws_both_plots_and_names_the_fragile_layers_from_the_data():
    from harness.paths import runs_dir
    from harness.report.plotting import PlotSet
    from harness.report.runs import ModelRuns
    from harness.report.sensitivity import section_sensitivity

    damages = {f"model.layers.{block}.{kind}.weight": [0.01 * (block + 1), 0.1 * (block + 1) * (4 if kind == "mlp.down_proj" else 1)]
               for block in range(3) for kind in ("self_attn.q_proj", "mlp.down_proj")}
    store("toy-report", damages)
    plots = PlotSet("toy-report")
    text = "\n".join(section_sensitivity(ModelRuns("toy-report", runs_dir() / "toy-report", []), plots))
    assert ("the most fragile layers are 2 mlp.down_proj (1.2), 1 mlp.down_proj (0.8), 0 mlp.down_proj (0.4); "
            "2 of 6 cause more than 2 times the median damage (0.35)") in text
    assert "block 2 is the most fragile" in text and "`mlp.down_proj` layers are the most fragile" in text
    assert len(plots.written) == 2 and all(path.stat().st_size > 0 for path in plots.written)
    assert "make sensitivity MODEL=elsewhere" in "\n".join(
        section_sensitivity(ModelRuns("elsewhere", runs_dir() / "elsewhere", []), PlotSet("elsewhere")))
